"""B0 candidate pools: the `pool` best memory visits per query by a code-set similarity.

Similarities over the query visit's diagnosis + procedure tokens against each memory visit's:
- `jaccard`: |A ∩ B| / |A ∪ B|;
- `bm25`: Okapi BM25 with the query's tokens as terms and memory visits as documents (binary term
  frequencies: a visit holds each code once), idf = ln(1 + (M - n_t + 0.5) / (n_t + 0.5));
- `random`: a seeded uniform score (the "random neighbours" control);
- `oracle`: Jaccard between drug sets — uses the query's true drugs, so it is an upper bound, never a model.
Memory visits a query may not see (`memory.eligible`) are never in its pool; a pool with fewer eligible
visits than `pool` is padded with index -1 (score -inf). Ties are broken by the lower memory index, so a
pool is a pure function of (prepared data, settings).

Pools are computed once per split and saved with `save_pools` as an .npz holding the prepared-data
fingerprint and the settings; `load_pools` refuses a file made for other data or settings.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.sparse as sp

from leader_jax.io import atomic_save_npz, load_npz
from leader_jax.retrieval.memory import Memory, Queries, eligible

SIMILARITIES = ("bm25", "jaccard", "random", "oracle")
FORMAT = "leader_jax.retrieval.pools/1"
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PoolSettings:
    """Everything a pool depends on besides the data."""
    similarity: str = "bm25"
    pool: int = 20
    time_order: str = "within_patient"
    bm25_k1: float = 1.2
    bm25_b: float = 0.75
    seed: int = 0

    @classmethod
    def from_config(cls, cfg) -> "PoolSettings":
        """From a `retrieval` config block (configs/retrieval.py)."""
        return cls(similarity=cfg.similarity, pool=int(cfg.pool), time_order=cfg.time_order,
                   bm25_k1=float(cfg.bm25.k1), bm25_b=float(cfg.bm25.b), seed=int(cfg.seed))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Pools:
    """Candidate pools of one split: row r belongs to query `query_ids[r]`, best first."""
    query_ids: list[str]
    indices: np.ndarray              # int32 [n, pool]: memory rows, -1 = empty slot
    scores: np.ndarray               # float32 [n, pool]: similarity, -inf for empty slots
    fingerprint: str
    settings: PoolSettings
    split: str = ""

    def top(self, k: int) -> np.ndarray:
        """int32 [n, k]: the k best memory rows per query (-1 = none)."""
        return self.indices[:, :k]

    def row_of(self) -> dict[str, int]:
        return {q: r for r, q in enumerate(self.query_ids)}


# ------------------------------------------------------------------------------------------ scoring
def _token_matrix(token_lists: Sequence[Sequence[str]], index: dict[str, int]) -> sp.csr_matrix:
    """Binary CSR [n, V]; tokens outside `index` are left out (they match nothing)."""
    indptr, cols = [0], []
    for toks in token_lists:
        row = sorted({index[t] for t in toks if t in index})
        cols.extend(row)
        indptr.append(len(cols))
    data = np.ones(len(cols), np.float64)
    return sp.csr_matrix((data, np.asarray(cols, np.int64), np.asarray(indptr, np.int64)),
                         shape=(len(token_lists), len(index)))


class _Scorer:
    """Scores a block of queries against the whole memory (float64 [b, M])."""

    def __init__(self, memory: Memory, settings: PoolSettings):
        self.settings = settings
        oracle = settings.similarity == "oracle"
        mem_tokens = memory.medications if oracle else [memory.query_tokens(i) for i in range(len(memory))]
        vocab = sorted({t for toks in mem_tokens for t in toks})
        self.index = {t: i for i, t in enumerate(vocab)}
        mem = _token_matrix(mem_tokens, self.index)
        self.mem_sizes = np.array([len(set(t)) for t in mem_tokens], np.float64)
        if settings.similarity == "bm25":
            n_docs = mem.shape[0]
            df = np.asarray((mem > 0).sum(axis=0)).ravel()
            idf = np.log1p((n_docs - df + 0.5) / (df + 0.5))
            avgdl = max(float(self.mem_sizes.mean()), 1e-12)
            k1, b = settings.bm25_k1, settings.bm25_b
            norm = (k1 + 1.0) / (1.0 + k1 * (1.0 - b + b * self.mem_sizes / avgdl))     # per document
            mem = sp.csr_matrix(sp.diags(norm) @ mem @ sp.diags(idf))
        self.mem_t = sp.csr_matrix(mem.T)

    def __call__(self, queries: Queries, start: int) -> np.ndarray:
        s = self.settings
        if s.similarity == "random":
            m = self.mem_t.shape[1]   # one stream per query row: independent of the block size
            return np.stack([np.random.default_rng([s.seed, start + r]).random(m) for r in range(len(queries))])
        q_tokens = queries.medications if s.similarity == "oracle" else queries.tokens
        q = _token_matrix(q_tokens, self.index)
        inter = np.asarray((q @ self.mem_t).todense(), np.float64)
        if s.similarity == "bm25":
            return inter
        q_sizes = np.array([len(set(t)) for t in q_tokens], np.float64)   # unseen tokens count in the union
        union = q_sizes[:, None] + self.mem_sizes[None, :] - inter
        return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def top_with_ties(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices int64 [n, k], scores [n, k]): the k highest scores per row, best first; equal scores go to
    the lower column index (so the result never depends on the sort algorithm). -inf entries are kept
    as padding, which the caller turns into -1."""
    n, m = scores.shape
    if m < k:   # fewer memory visits than the pool size: pad with -inf columns
        scores = np.concatenate([scores, np.full((n, k - m), -np.inf)], axis=1)
        m = k
    kth = np.partition(scores, m - k, axis=1)[:, m - k][:, None]           # the k-th largest value
    above = scores > kth
    at = scores == kth
    need = k - above.sum(axis=1, keepdims=True)
    chosen = above | (at & (np.cumsum(at, axis=1) <= need))               # exactly k per row
    cols = np.nonzero(chosen)[1].reshape(n, k)                            # ascending column per row
    vals = np.take_along_axis(scores, cols, axis=1)
    order = np.lexsort((cols, -vals), axis=-1)                            # best first, then lower index
    return np.take_along_axis(cols, order, axis=1), np.take_along_axis(vals, order, axis=1)


def build_pools(memory: Memory, samples_or_queries, settings: PoolSettings, *, split: str = "",
                exclude_same_patient: bool = True, block: int = 256) -> Pools:
    """Candidate pools for `samples` (a list of Sample, or Queries). `exclude_same_patient=False` is the
    leak check's switch only."""
    if settings.similarity not in SIMILARITIES:
        raise ValueError(f"similarity={settings.similarity!r}; expected {' | '.join(SIMILARITIES)}")
    queries = samples_or_queries if isinstance(samples_or_queries, Queries) \
        else Queries.from_samples(samples_or_queries)
    scorer = _Scorer(memory, settings)
    n, k = len(queries), settings.pool
    indices = np.full((n, k), -1, np.int32)
    scores = np.full((n, k), -np.inf, np.float32)
    for start in range(0, n, block):
        qb = queries.subset(slice(start, start + block))
        s = scorer(qb, start)
        s[~eligible(memory, qb, time_order=settings.time_order, exclude_same_patient=exclude_same_patient)] \
            = -np.inf
        cols, vals = top_with_ties(s, k)
        valid = np.isfinite(vals)
        indices[start:start + len(qb)] = np.where(valid, cols, -1)
        scores[start:start + len(qb)] = np.where(valid, vals, -np.inf)
    return Pools(query_ids=list(queries.ids), indices=indices, scores=scores, fingerprint=memory.fingerprint,
                 settings=settings, split=split)


# ------------------------------------------------------------------------------------------ storage
def save_pools(path: str | os.PathLike, pools: Pools) -> Path:
    """Write the pools atomically as an .npz (no pickled objects)."""
    meta = {"format": FORMAT, "fingerprint": pools.fingerprint, "settings": pools.settings.to_json(),
            "split": pools.split}
    return atomic_save_npz(path, query_ids=np.array(pools.query_ids, dtype=str), indices=pools.indices,
                           scores=pools.scores, meta=np.array(json.dumps(meta, sort_keys=True)))


class StalePoolsError(ValueError):
    """A saved pool file was made for other data or other settings."""


def load_pools(path: str | os.PathLike, *, fingerprint: str, settings: PoolSettings) -> Pools:
    """Read pools written by `save_pools`; StalePoolsError (naming the file and the difference) when they
    were built from other prepared data or other settings."""
    z = load_npz(path)
    meta = json.loads(str(z["meta"]))
    if meta.get("format") != FORMAT:
        raise StalePoolsError(f"{path}: not a candidate-pool file ({meta.get('format')!r})")
    if meta["fingerprint"] != fingerprint:
        raise StalePoolsError(f"{path}: built from prepared data {meta['fingerprint'][:12]}, "
                              f"not {fingerprint[:12]}")
    if meta["settings"] != settings.to_json():
        diff = {k: v for k, v in settings.to_json().items() if meta["settings"].get(k) != v}
        raise StalePoolsError(f"{path}: built with other retrieval settings (now {diff})")
    return Pools(query_ids=[str(x) for x in z["query_ids"]], indices=z["indices"], scores=z["scores"],
                 fingerprint=meta["fingerprint"], settings=settings, split=meta["split"])


def split_pools(memory: Memory, samples: Sequence, settings: PoolSettings, split: str,
                cache_dir: str | os.PathLike | None = None) -> Pools:
    """The pools of one split: read from `cache_dir/<split>.npz` when it matches the data and settings,
    otherwise (other data, settings or queries; an unreadable file) built, and saved there when `cache_dir`
    is given."""
    path = None if cache_dir is None else Path(cache_dir) / f"{split}.npz"
    if path is not None and path.is_file():
        try:
            pools = load_pools(path, fingerprint=memory.fingerprint, settings=settings)
        except StalePoolsError as e:
            log.info("rebuilding candidate pools: %s", e)
            pools = None
        except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as e:    # unreadable: rebuilt
            log.warning("rebuilding candidate pools: %s is unreadable (%s)", path, e)
            pools = None
        if pools is not None and pools.query_ids == [s.id for s in samples]:
            return pools
    pools = build_pools(memory, samples, settings, split=split)
    if path is not None:
        save_pools(path, pools)
    return pools
