"""DDI safety for recommended drug sets: list the interacting pairs, and optionally filter them out.

A DDI graph is the prepared data's `ddi.npy` ([n_med, n_med] 0/1, MIMIC datasets; eICU has none). An
interaction between drugs i and j is counted when A[i, j] or A[j, i] is set, as in the DDI rate.

Filters act on the set {m : p_m >= θ} and return adjusted scores (the eval CLI can score them):

- `off`: the set is {p >= θ}; its interacting pairs are listed.
- `drop_lower`: greedy in order of decreasing probability (ties: lower drug index first), a drug is
  kept only if it interacts with no drug already kept. So for every interacting pair the
  lower-probability drug goes, and a drug removed this way never removes another one. The kept set has
  no interacting pair. Removed drugs get score 0.
- `penalty` (strength λ >= 0): the same greedy pass, but a drug's score is lowered by λ times the sum
  of the probabilities of the drugs already kept that it interacts with:
  `a_i = p_i − λ·Σ_{j kept, A_ij} p_j`, and it is kept when `a_i >= θ`. λ = 0 is `off`; λ >= 1 is
  `drop_lower` (a kept j has p_j >= p_i, so a_i <= 0). In between, a pair survives only when the
  lower drug is confident enough; pairs that survive are still listed. Scores are clipped to [0, 1].

Drugs below θ keep their probability as their score. All of it is vectorised over patients: the work is
O(patients · k²) for sets of at most k candidate drugs (filters) and O(patients · graph pairs) (pair
lists).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

FILTERS = ("off", "drop_lower", "penalty")


def symmetric(ddi: np.ndarray) -> np.ndarray:
    """bool [m, m]: A or Aᵀ, zero diagonal."""
    a = np.asarray(ddi) != 0
    a = a | a.T
    np.fill_diagonal(a, False)
    return a


def top_order(scores: np.ndarray, width: int) -> np.ndarray:
    """int [n, width]: per row the `width` highest-scoring columns, highest first, ties by lower index."""
    n, m = scores.shape
    width = min(int(width), m)
    if width <= 0:
        return np.zeros((n, 0), dtype=np.int64)
    idx = (np.argpartition(-scores, width - 1, axis=1)[:, :width] if width < m
           else np.broadcast_to(np.arange(m), (n, m)))
    vals = np.take_along_axis(scores, idx, axis=1)
    key = np.lexsort((idx, -vals), axis=-1)
    return np.take_along_axis(idx, key, axis=1)


def pair_index(sets: np.ndarray, ddi: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The interacting pairs of every row of the boolean `sets` [n, m], vectorised: (starts [n + 1], lo,
    hi) with row r's pairs (lo[t], hi[t]), lo < hi, for t in starts[r]:starts[r + 1], sorted. Each
    graph pair is tested against every row (O(n·pairs), in row chunks)."""
    sets = np.asarray(sets, dtype=bool)
    n = sets.shape[0]
    g_lo, g_hi = np.nonzero(np.triu(symmetric(ddi), 1))                  # the graph's pairs, sorted
    rows, pids = [], []
    for a in range(0, n, chunk):
        s = sets[a:a + chunk]
        r, p = np.nonzero(s[:, g_lo] & s[:, g_hi])                        # row-major: sorted per row
        rows.append(r + a)
        pids.append(p)
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    p = np.concatenate(pids) if pids else np.zeros(0, np.int64)
    return np.searchsorted(r, np.arange(n + 1)), g_lo[p], g_hi[p]


def interacting_pairs(sets: np.ndarray, ddi: np.ndarray) -> list[list[tuple[int, int]]]:
    """Per row of the boolean `sets` [n, m]: the interacting pairs (i, j), i < j, both in the set, sorted."""
    starts, lo, hi = pair_index(sets, ddi)
    pairs = list(zip(lo.tolist(), hi.tolist()))
    return [pairs[starts[r]:starts[r + 1]] for r in range(len(starts) - 1)]


def filter_sets(probs: np.ndarray, threshold: float, ddi: np.ndarray | None, mode: str = "off",
                strength: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(kept sets bool [n, m], scores float32 [n, m]) for `mode` in FILTERS (see the module docstring).
    Without a DDI graph every mode is `off`."""
    if mode not in FILTERS:
        raise ValueError(f"ddi_filter={mode!r}; expected one of {FILTERS}")
    probs = np.asarray(probs, dtype=np.float32)
    theta = np.float32(threshold)
    cand = probs >= theta
    scores = probs.copy()
    if mode == "off" or ddi is None or not cand.any():
        return cand, scores
    lam = np.inf if mode == "drop_lower" else float(strength)
    if lam < 0:
        raise ValueError(f"ddi penalty strength must be >= 0, got {strength}")
    a = symmetric(ddi)
    n = probs.shape[0]
    k = int(cand.sum(axis=1).max())
    # candidates of each row in order of decreasing probability (stable: lower index first on ties)
    order = np.argsort(-np.where(cand, probs, -1.0), axis=1, kind="stable")[:, :k]     # [n, k]
    valid = np.take_along_axis(cand, order, axis=1)
    p = np.take_along_axis(probs, order, axis=1).astype(np.float64)
    inter = a[order[:, :, None], order[:, None, :]]                                    # [n, k, k]
    kept = np.zeros((n, k), dtype=bool)
    adj = p.copy()
    for r in range(k):
        conflict = inter[:, r, :r] & kept[:, :r]                 # interacts with an already kept drug
        if np.isinf(lam):
            adj[:, r] = np.where(conflict.any(axis=1), 0.0, p[:, r])
        else:
            adj[:, r] = p[:, r] - lam * (conflict * p[:, :r]).sum(axis=1)
        kept[:, r] = valid[:, r] & (adj[:, r] >= theta)
    rows = np.repeat(np.arange(n), k).reshape(n, k)
    out_sets = np.zeros_like(cand)
    out_sets[rows[valid], order[valid]] = kept[valid]
    scores[rows[valid], order[valid]] = np.clip(adj[valid], 0.0, 1.0).astype(np.float32)
    # a removed drug's clipped score may round up to θ in float32: keep the set and the scores consistent
    removed = cand & ~out_sets
    scores[removed] = np.minimum(scores[removed], np.nextafter(theta, np.float32(0)))
    return out_sets, scores


def graph_note(data=None) -> str:
    """Where the DDI graph comes from: the prepared data's own record (stats.json "ddi"), else the eval
    CLI's description of the bundled graph."""
    from leader_jax.eval import DDI_GRAPH_NOTE
    recorded = ((data.stats or {}).get("ddi") or {}).get("graph") if data is not None else None
    return str(recorded or DDI_GRAPH_NOTE)


# ------------------------------------------------------------------ filtered prediction run folders
def write_filtered_run(src_run: str | Path, out_run: str | Path, mode: str, strength: float,
                       threshold: float, splits=("val", "test")) -> dict[str, Any]:
    """Apply a DDI filter to a run's `predictions/<split>.npz` and write them, as a new run folder the
    eval CLI can score (`run.json` names the same prepared data and the filter). Returns run.json."""
    from leader_jax.cli import UserError
    from leader_jax.eval import load_prepared, read_predictions, read_run_json, write_predictions
    from leader_jax.io import atomic_write_json

    src, out = Path(src_run), Path(out_run)
    meta = read_run_json(src)
    if not meta.get("data_dir"):
        raise UserError(f"{src / 'run.json'}: names no data_dir (needed for the DDI graph)")
    data = load_prepared(meta["data_dir"])
    if data.ddi is None:
        raise UserError(f"{meta['data_dir']}: the prepared data has no DDI graph (ddi.npy); nothing to filter")
    for split in splits:
        pred = read_predictions(src / "predictions" / f"{split}.npz")
        _, scores = filter_sets(pred["y_prob"], threshold, data.ddi, mode, strength)
        fp = pred.get("data_fingerprint")
        write_predictions(out, split, ids=pred["ids"], y_true=pred["y_true"], y_prob=scores,
                          single_visit=pred["single_visit"], data_fingerprint=None if fp is None else str(fp))
    run = {"data_dir": meta["data_dir"], "model": f"{meta.get('model') or 'model'}+ddi_{mode}",
           "source_run": str(src.absolute()),
           "ddi_filter": {"mode": mode, "strength": float(strength), "threshold": float(threshold)}}
    atomic_write_json(out / "run.json", run)
    return run
