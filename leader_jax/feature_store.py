"""The teacher feature store: per-sample pooled hidden state (float16) and drug probabilities.

Layout (format "leader_jax.features/1")::

    STORE/manifest.json            dims, dtype, teacher + dataset fingerprints, per-split shard list
    STORE/<split>/<00000>.npz      ids (str), hidden (float16 [n, D]), probs (float32 [n, n_med])

Each shard is written atomically, so a shard that exists is complete: an interrupted extraction resumes
by skipping the ids already stored. A shard damaged afterwards (truncated by a copy or a full disk) is
named in a ValueError by the reader, and the writer's `done_ids` deletes it (with a warning), so running
the extraction again repairs the store. The student reads hidden states by sample id and gets a clear
error naming the ids the store lacks.
"""
from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from leader_jax.io import atomic_save_npz, atomic_write_json, load_npz

log = logging.getLogger(__name__)

FORMAT = "leader_jax.features/1"
MANIFEST = "manifest.json"


def read_shard(path: Path, hidden_dim: int, n_med: int) -> dict[str, np.ndarray]:
    """The arrays of one shard; ValueError naming the file when it does not load (e.g. truncated by a
    full disk or a copy) or its arrays do not fit together."""
    try:
        arrays = load_npz(path)
        ids, hidden, probs = arrays["ids"], arrays["hidden"], arrays["probs"]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"feature store shard {path} cannot be read ({type(e).__name__}: {e})") from None
    n = len(ids)
    if hidden.shape != (n, hidden_dim) or probs.shape != (n, n_med):
        raise ValueError(f"feature store shard {path} has arrays of shapes ids {ids.shape}, hidden "
                         f"{hidden.shape}, probs {probs.shape} (expected ({n}, {hidden_dim}) / ({n}, {n_med}))")
    return arrays


class MissingFeaturesError(KeyError):
    """Raised when a caller asks for sample ids that the store does not hold."""

    def __init__(self, store: Path, split: str | None, missing: Sequence[str], n_asked: int):
        shown = ", ".join(list(missing)[:10])
        more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        where = f"split {split!r} of " if split else ""
        msg = (f"feature store {store}: {len(missing)} of {n_asked} requested sample ids are missing from "
               f"{where}the store: {shown}{more}. Was the store extracted from the same prepared dataset?")
        super().__init__(msg)
        self.missing = list(missing)

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return self.args[0]


class FeatureStoreWriter:
    """Writes shards for each split; `done_ids(split)` lists what an earlier (interrupted) run stored."""

    def __init__(self, path: str | Path, *, hidden_dim: int, n_med: int, meta: dict[str, Any]):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        manifest_path = self.path / MANIFEST
        fresh = {"format": FORMAT, "hidden_dim": int(hidden_dim), "n_med": int(n_med),
                 "hidden_dtype": "float16", "probs_dtype": "float32", "meta": meta,
                 "complete": False, "splits": {}}
        if manifest_path.exists():
            old = json.loads(manifest_path.read_text())
            for key in ("hidden_dim", "n_med", "meta"):
                if old.get(key) != fresh[key]:
                    raise ValueError(
                        f"feature store {self.path} was written for a different teacher/dataset "
                        f"({key}: stored {old.get(key)!r}, now {fresh[key]!r}); use a new folder or delete it")
        atomic_write_json(manifest_path, fresh)
        self.hidden_dim, self.n_med = int(hidden_dim), int(n_med)

    def _shards(self, split: str) -> list[Path]:
        return sorted((self.path / split).glob("[0-9]*.npz"))

    def done_ids(self, split: str) -> set[str]:
        """Ids of `split` held by readable shards. A shard that does not load (truncated, corrupt, wrong
        shapes) is deleted with a warning naming it, so its ids are extracted again."""
        done: set[str] = set()
        for shard in self._shards(split):
            try:
                arrays = read_shard(shard, self.hidden_dim, self.n_med)
            except ValueError as e:
                log.warning("%s: deleting it, its samples are extracted again", e)
                shard.unlink()
                continue
            done.update(arrays["ids"].tolist())
        return done

    def write_shard(self, split: str, ids: Sequence[str], hidden: np.ndarray, probs: np.ndarray) -> Path:
        hidden = np.asarray(hidden)
        probs = np.asarray(probs, dtype=np.float32)
        n = len(ids)
        if hidden.shape != (n, self.hidden_dim) or probs.shape != (n, self.n_med):
            raise ValueError(f"shard shapes {hidden.shape}/{probs.shape} do not match "
                             f"({n}, {self.hidden_dim})/({n}, {self.n_med})")
        existing = self._shards(split)           # next number after the last (a deleted shard leaves a gap)
        index = int(existing[-1].stem) + 1 if existing else 0
        return atomic_save_npz(self.path / split / f"{index:05d}.npz", ids=np.asarray(list(ids), dtype=str),
                               hidden=hidden.astype(np.float16), probs=probs)

    def finalize(self) -> None:
        manifest = json.loads((self.path / MANIFEST).read_text())
        manifest["splits"] = {}
        for split_dir in sorted(p for p in self.path.iterdir() if p.is_dir() and not p.name.startswith(".")):
            shards = self._shards(split_dir.name)
            n = 0
            for shard in shards:
                n += len(read_shard(shard, self.hidden_dim, self.n_med)["ids"])
            manifest["splits"][split_dir.name] = {
                "n": n, "shards": [str(s.relative_to(self.path)) for s in shards]}
        manifest["complete"] = True
        atomic_write_json(self.path / MANIFEST, manifest)


class FeatureStore:
    """Read-only view of a finished store."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.exists():
            raise FileNotFoundError(f"feature store {self.path}: {MANIFEST} not found "
                                    f"(run `python -m leader_jax.train.extract_features` first)")
        self.manifest = json.loads(mpath.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"feature store {self.path}: unknown format {self.manifest.get('format')!r}")
        if not self.manifest.get("complete"):
            raise ValueError(f"feature store {self.path} is incomplete (extraction was interrupted); "
                             f"re-run the extraction to resume it")
        self._cache: dict[str, dict[str, np.ndarray]] = {}

    @property
    def hidden_dim(self) -> int:
        return int(self.manifest["hidden_dim"])

    @property
    def n_med(self) -> int:
        return int(self.manifest["n_med"])

    @property
    def splits(self) -> list[str]:
        return sorted(self.manifest["splits"])

    def _split(self, split: str) -> dict[str, np.ndarray]:
        if split not in self._cache:
            info = self.manifest["splits"].get(split)
            if info is None:
                raise MissingFeaturesError(self.path, split, [f"<whole split {split!r}>"], 1)
            try:
                parts = [read_shard(self.path / s, self.hidden_dim, self.n_med) for s in info["shards"]]
            except ValueError as e:
                raise ValueError(f"{e}; re-run the extraction to repair the store") from None
            if parts:
                data = {k: np.concatenate([p[k] for p in parts]) for k in ("ids", "hidden", "probs")}
            else:
                data = {"ids": np.zeros((0,), str), "hidden": np.zeros((0, self.hidden_dim), np.float16),
                        "probs": np.zeros((0, self.n_med), np.float32)}
            self._cache[split] = data
        return self._cache[split]

    def ids(self, split: str) -> list[str]:
        return self._split(split)["ids"].tolist()

    def _rows(self, split: str, ids: Iterable[str]) -> np.ndarray:
        ids = list(ids)
        data = self._split(split)
        pos = {k: i for i, k in enumerate(data["ids"].tolist())}
        missing = [i for i in ids if i not in pos]
        if missing:
            raise MissingFeaturesError(self.path, split, missing, len(ids))
        return np.fromiter((pos[i] for i in ids), dtype=np.int64, count=len(ids))

    def hidden(self, split: str, ids: Iterable[str]) -> np.ndarray:
        """float16 [len(ids), hidden_dim] in the order of `ids`."""
        rows = self._rows(split, ids)
        return self._split(split)["hidden"][rows]

    def probs(self, split: str, ids: Iterable[str]) -> np.ndarray:
        """float32 [len(ids), n_med] teacher drug probabilities in the order of `ids`."""
        rows = self._rows(split, ids)
        return self._split(split)["probs"][rows]
