"""The retrieval memory (training-split visits) and the leakage rules deciding what a query may see.

Memory: every visit of every training-split sample, once per (patient, visit) — history visits included —
in a fixed order (training samples in split order, then visit order), so a memory index is stable for a
given prepared dataset. Validation and test patients are never in the memory: they are only queries.

Leakage rules (`eligible`), applied to every query:
1. never the query patient: no visit of the query's own patient, whatever its time;
2. never at or after the query visit: inside a patient (only reachable when rule 1 is switched off, which
   only the leak check does) a memory visit must come strictly before the query visit in admission order;
   across patients, `time_order="global"` also requires `Visit.time` strictly before the query visit's
   time. The default `time_order="within_patient"` compares times inside a patient only, because the
   bundled datasets have no cross-patient clock: MIMIC shifts every patient's dates independently, and
   eICU's ordering key is the discharge year followed by stay ids (see docs/retrieval.md).
A query without a time (a new patient at prediction time, `time=""`) is later than every memory visit.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from leader_jax.data.dataset import PreparedData, Sample, Vocab
from leader_jax.io import atomic_save_npz, load_npz

TIME_ORDERS = ("within_patient", "global")
FORMAT = "leader_jax.retrieval.memory/1"
_CODES = ("diagnoses", "procedures", "medications")


@dataclasses.dataclass(frozen=True)
class Memory:
    """Training-split visits, index = memory row."""
    patient_ids: np.ndarray          # str [M]
    visit_ids: np.ndarray            # str [M]
    times: np.ndarray                # str [M] (Visit.time)
    positions: np.ndarray            # int32 [M]: 0-based admission index within the patient
    diagnoses: tuple[tuple[str, ...], ...]
    procedures: tuple[tuple[str, ...], ...]
    medications: tuple[tuple[str, ...], ...]
    fingerprint: str = ""            # prepared-data fingerprint the memory was built from

    def __len__(self) -> int:
        return len(self.patient_ids)

    @classmethod
    def from_samples(cls, train: Sequence[Sample], fingerprint: str = "") -> "Memory":
        seen: set[tuple[str, str]] = set()
        rows = []
        for s in train:
            for pos, v in enumerate(s.visits):
                key = (s.patient_id, v.id)
                if key not in seen:
                    seen.add(key)
                    rows.append((s.patient_id, v, pos))
        if not rows:
            raise ValueError("the training split holds no visits: the retrieval memory would be empty")
        return cls(patient_ids=np.array([r[0] for r in rows], dtype=str),
                   visit_ids=np.array([r[1].id for r in rows], dtype=str),
                   times=np.array([r[1].time for r in rows], dtype=str),
                   positions=np.array([r[2] for r in rows], dtype=np.int32),
                   diagnoses=tuple(r[1].diagnoses for r in rows),
                   procedures=tuple(r[1].procedures for r in rows),
                   medications=tuple(r[1].medications for r in rows),
                   fingerprint=fingerprint)

    @classmethod
    def from_prepared(cls, data: PreparedData) -> "Memory":
        """The memory of a prepared dataset: its training split only."""
        return cls.from_samples(data.splits["train"], data.fingerprint())

    def save(self, path: str | os.PathLike) -> Path:
        """Atomic .npz (string arrays and offsets, no pickle): a run keeps its memory so prediction needs
        no prepared-data folder."""
        arrays = {"patient_ids": self.patient_ids, "visit_ids": self.visit_ids, "times": self.times,
                  "positions": self.positions,
                  "meta": np.array(json.dumps({"format": FORMAT, "fingerprint": self.fingerprint}))}
        for name in _CODES:
            lists = getattr(self, name)
            arrays[name] = np.array([t for toks in lists for t in toks] or [""], dtype=str)
            arrays[name + "_offsets"] = np.cumsum([0] + [len(t) for t in lists]).astype(np.int64)
        return atomic_save_npz(path, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Memory":
        z = load_npz(path)
        meta = json.loads(str(z["meta"]))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a retrieval memory file ({meta.get('format')!r})")
        codes = {}
        for name in _CODES:
            flat, off = [str(t) for t in z[name]], z[name + "_offsets"]
            codes[name] = tuple(tuple(flat[off[i]:off[i + 1]]) for i in range(len(off) - 1))
        return cls(patient_ids=z["patient_ids"], visit_ids=z["visit_ids"], times=z["times"],
                   positions=z["positions"].astype(np.int32), fingerprint=meta["fingerprint"], **codes)

    def query_tokens(self, i: int) -> tuple[str, ...]:
        """Diagnosis + procedure tokens of memory visit i (what the code similarity compares)."""
        return self.diagnoses[i] + self.procedures[i]

    def drug_bag(self, indices: np.ndarray, vocab: Vocab) -> np.ndarray:
        """float32 [n, n_med]: mean multi-hot of the drugs of each row's neighbours (`indices` [n, k],
        -1 = no neighbour; a row without neighbours is all zero). The student's neighbour-drug input."""
        idx = vocab.index("med")
        indices = np.asarray(indices)
        out = np.zeros((indices.shape[0], vocab.n_med), np.float32)
        for r, row in enumerate(indices):
            valid = [int(j) for j in row if j >= 0]
            for j in valid:
                for t in self.medications[j]:
                    out[r, idx[t]] += 1.0
            if valid:
                out[r] /= len(valid)
        return out


@dataclasses.dataclass(frozen=True)
class Queries:
    """What the leakage rules need to know about a batch of queries."""
    ids: list[str]
    patient_ids: np.ndarray          # str [n]
    times: np.ndarray                # str [n] (the query visit's time; "" = after every memory visit)
    positions: np.ndarray            # int32 [n]: admission index of the query visit within its patient
    tokens: list[tuple[str, ...]]    # diagnosis + procedure tokens of the query visit
    medications: list[tuple[str, ...]]   # the query visit's true drugs (oracle pools and quality only)

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_samples(cls, samples: Sequence[Sample]) -> "Queries":
        """The query of a sample is its target visit; history visits give its admission index."""
        return cls(ids=[s.id for s in samples],
                   patient_ids=np.array([s.patient_id for s in samples], dtype=str),
                   times=np.array([s.target.time for s in samples], dtype=str),
                   positions=np.array([len(s.visits) - 1 for s in samples], dtype=np.int32),
                   tokens=[s.target.diagnoses + s.target.procedures for s in samples],
                   medications=[s.target.medications for s in samples])

    def subset(self, rows: slice) -> "Queries":
        return Queries(ids=self.ids[rows], patient_ids=self.patient_ids[rows], times=self.times[rows],
                       positions=self.positions[rows], tokens=self.tokens[rows],
                       medications=self.medications[rows])


def eligible(memory: Memory, queries: Queries, *, time_order: str,
             exclude_same_patient: bool = True) -> np.ndarray:
    """bool [n_queries, M]: which memory visits each query may retrieve (the leakage rules above).

    `exclude_same_patient=False` exists for the leak check only: no config field reaches it."""
    if time_order not in TIME_ORDERS:
        raise ValueError(f"time_order={time_order!r}; expected {' | '.join(TIME_ORDERS)}")
    same = memory.patient_ids[None, :] == queries.patient_ids[:, None]
    if exclude_same_patient:
        ok = ~same
    else:   # own visits only strictly before the query visit (admission order)
        ok = ~same | (memory.positions[None, :] < queries.positions[:, None])
    if time_order == "global":
        q_time = queries.times[:, None]
        ok &= (memory.times[None, :] < q_time) | (q_time == "")
    return ok
