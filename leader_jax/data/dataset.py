"""Prepared dataset: samples, vocabularies, DDI matrix and splits, with a deterministic on-disk format.

`PREPARED/` holds `vocab.json`, `samples.jsonl` (one sample per line, split order), `splits.json`
(sample ids per split), `ddi.npy` (MIMIC only), `stats.json` and `report.md`. `save` writes
byte-identical files for identical content, so `fingerprint()` (sha256 over those files) identifies
a prepared dataset in downstream manifests (feature store, runs).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from leader_jax.io import atomic_dir, dumps_json
from leader_jax.data.records import Visit

SPLITS = ("train", "val", "test")
UNKNOWN = "unknown"
FILES = ("vocab.json", "samples.jsonl", "splits.json", "ddi.npy", "stats.json", "report.md")


@dataclass(frozen=True)
class Sample:
    """History visits (oldest first) followed by the target visit; codes already vocab-filtered."""
    id: str                          # "<patient_id>" (last_visit) or "<patient_id>/<visit_id>" (per_visit)
    patient_id: str
    visits: Tuple[Visit, ...]
    profile: Dict[str, str] = field(default_factory=dict)   # profile at the target visit (raw values)

    @property
    def target(self) -> Visit:
        return self.visits[-1]

    @property
    def history(self) -> Tuple[Visit, ...]:
        return self.visits[:-1]

    @property
    def single_visit(self) -> bool:
        return len(self.visits) == 1

    def to_json(self) -> dict:
        return {"id": self.id, "patient_id": self.patient_id, "profile": dict(self.profile),
                "visits": [v.to_json() for v in self.visits]}

    @classmethod
    def from_json(cls, d: dict) -> "Sample":
        return cls(id=str(d["id"]), patient_id=str(d["patient_id"]),
                   visits=tuple(Visit.from_json(v) for v in d["visits"]),
                   profile={str(k): str(v) for k, v in d.get("profile", {}).items()})


@dataclass(frozen=True)
class Vocab:
    """Token vocabularies (index = position), display names and train-built profile vocabularies."""
    diag: Tuple[str, ...]
    proc: Tuple[str, ...]
    med: Tuple[str, ...]             # the label space
    names: Dict[str, str]            # token -> display name
    profile: Dict[str, Tuple[str, ...]] = field(default_factory=dict)   # field -> ("unknown", values...)

    @property
    def n_med(self) -> int:
        return len(self.med)

    def index(self, kind: str) -> Dict[str, int]:
        """token -> index for kind in {"diag", "proc", "med"} (cached per instance)."""
        cache = self.__dict__.setdefault("_index_cache", {})
        if kind not in cache:
            cache[kind] = {t: i for i, t in enumerate(getattr(self, kind))}
        return cache[kind]

    def profile_index(self, field_name: str, value: str) -> int:
        """Index of a profile value in its field vocabulary; unseen values map to "unknown" (0)."""
        values = self.profile[field_name]
        cache = self.__dict__.setdefault("_profile_cache", {})
        if field_name not in cache:
            cache[field_name] = {v: i for i, v in enumerate(values)}
        return cache[field_name].get(value, cache[field_name][UNKNOWN])

    def to_json(self) -> dict:
        return {"diag": list(self.diag), "proc": list(self.proc), "med": list(self.med),
                "names": dict(self.names), "profile": {k: list(v) for k, v in self.profile.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "Vocab":
        return cls(diag=tuple(d["diag"]), proc=tuple(d["proc"]), med=tuple(d["med"]),
                   names=dict(d["names"]), profile={k: tuple(v) for k, v in d.get("profile", {}).items()})


class PreparedData:
    """The prepared dataset every model stage consumes (see docs/architecture.md §1)."""

    def __init__(self, dataset: str, vocab: Vocab, ddi: Optional[np.ndarray],
                 splits: Dict[str, List[Sample]], stats: dict, report: str = ""):
        self.dataset = dataset
        self.vocab = vocab
        self.ddi = None if ddi is None else np.asarray(ddi, dtype=np.uint8)
        self.splits = {s: list(splits.get(s, [])) for s in SPLITS}
        self.stats = stats
        self.report = report

    # ------------------------------------------------------------------ labels
    def labels(self, samples: Sequence[Sample]) -> np.ndarray:
        """uint8 [n, n_med] multi-hot of each sample's target-visit medications."""
        idx = self.vocab.index("med")
        y = np.zeros((len(samples), self.vocab.n_med), dtype=np.uint8)
        for i, s in enumerate(samples):
            for t in s.target.medications:
                j = idx.get(t)
                if j is None:
                    raise ValueError(f"sample {s.id}: medication {t!r} is not in the label vocabulary")
                y[i, j] = 1
        return y

    def all_samples(self) -> List[Sample]:
        return [s for split in SPLITS for s in self.splits[split]]

    # ------------------------------------------------------------------ serialisation
    def _files(self) -> Dict[str, bytes]:
        samples = "".join(json.dumps({"split": split, **s.to_json()}, sort_keys=True, ensure_ascii=False,
                                     separators=(",", ":")) + "\n"
                          for split in SPLITS for s in self.splits[split])
        files = {
            "vocab.json": dumps_json({"dataset": self.dataset, **self.vocab.to_json()}).encode(),
            "samples.jsonl": samples.encode("utf-8"),
            "splits.json": dumps_json({s: [x.id for x in self.splits[s]] for s in SPLITS}).encode(),
            "stats.json": dumps_json(self.stats).encode(),
            "report.md": self.report.encode("utf-8"),
        }
        if self.ddi is not None:
            buf = io.BytesIO()
            np.save(buf, self.ddi, allow_pickle=False)
            files["ddi.npy"] = buf.getvalue()
        return files

    def save(self, path: str | os.PathLike) -> Path:
        """Write the prepared folder atomically (all files or none). Refuses to replace a folder that
        holds files this stage did not write."""
        path = Path(path)
        if path.exists():
            if not path.is_dir():
                raise ValueError(f"{path}: output exists and is not a folder")
            foreign = sorted(p.name for p in path.iterdir() if p.name not in FILES)
            if foreign:
                raise ValueError(f"{path}: refusing to overwrite a folder holding other files: {foreign[:5]}")
        with atomic_dir(path) as tmp:
            for name, data in self._files().items():
                (tmp / name).write_bytes(data)
        return path

    def fingerprint(self) -> str:
        """sha256 over the saved files (name and bytes, fixed order)."""
        h = hashlib.sha256()
        for name, data in sorted(self._files().items()):
            h.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
        return h.hexdigest()

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PreparedData":
        path = Path(path)
        for name in ("vocab.json", "samples.jsonl", "splits.json", "stats.json"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name}: missing; is {path} a prepared-data folder "
                                        f"(python -m leader_jax.data.prepare)?")
        vj = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
        dataset = vj.pop("dataset")
        vocab = Vocab.from_json(vj)
        by_id: Dict[str, Sample] = {}
        with open(path / "samples.jsonl", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    d = json.loads(line)
                    by_id[str(d["id"])] = Sample.from_json(d)
        split_ids = json.loads((path / "splits.json").read_text(encoding="utf-8"))
        try:
            splits = {s: [by_id[i] for i in split_ids.get(s, [])] for s in SPLITS}
        except KeyError as e:
            raise ValueError(f"{path / 'splits.json'}: sample id {e.args[0]!r} not in samples.jsonl") from None
        ddi = np.load(path / "ddi.npy", allow_pickle=False) if (path / "ddi.npy").is_file() else None
        stats = json.loads((path / "stats.json").read_text(encoding="utf-8"))
        report = (path / "report.md").read_text(encoding="utf-8") if (path / "report.md").is_file() else ""
        return cls(dataset, vocab, ddi, splits, stats, report)
