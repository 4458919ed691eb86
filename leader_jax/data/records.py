"""Patient and visit records: the dataset-independent output of every raw-table reader.

Codes are namespaced tokens (`dx9:4019`, `px10:0DTJ4ZZ`, `atc:N02B`, `hicl:2812`, ...) so that a
diagnosis never shares an id with a procedure and ICD-9 never collides with ICD-10.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

CHANNELS = ("diagnoses", "procedures", "medications")


@dataclass(frozen=True)
class Visit:
    """One admission (MIMIC: hadm_id) or ICU unit stay (eICU: patientunitstayid)."""
    id: str
    time: str                        # sortable ordering key (ISO admittime; eICU: documented key)
    diagnoses: Tuple[str, ...]       # namespaced tokens, first-appearance order, unique
    procedures: Tuple[str, ...]
    medications: Tuple[str, ...]

    def to_json(self) -> dict:
        return {"id": self.id, "time": self.time, "diagnoses": list(self.diagnoses),
                "procedures": list(self.procedures), "medications": list(self.medications)}

    @classmethod
    def from_json(cls, d: dict) -> "Visit":
        return cls(id=str(d["id"]), time=str(d["time"]), diagnoses=tuple(d["diagnoses"]),
                   procedures=tuple(d["procedures"]), medications=tuple(d["medications"]))


@dataclass(frozen=True)
class Patient:
    """A patient with visits ordered oldest → newest; `profile` is taken at the latest visit."""
    id: str
    profile: Dict[str, str]          # field -> raw value ("unknown" when missing)
    visits: Tuple[Visit, ...]
