"""Medication-recommendation metrics (SafeDrug/LEADER style), vectorised numpy.

Every metric is computed **per sample** (one row of `y_true`/`y_prob`) and then averaged, except the DDI
rate, which is pooled over drug pairs. Per-sample values are computed once (one argsort per row, in
chunks); the 10 subsampling rounds are then cheap means over index subsets.

Definitions (row = one sample; G = true drug set, Ŷ = {m : p_m >= θ}, #X = size of X):

- jaccard   = #(Ŷ∩G) / #(Ŷ∪G);  0 when the union is empty (sklearn's `zero_division=0`, SafeDrug's guard).
- precision = #(Ŷ∩G) / #Ŷ;  0 when nothing is predicted.
- recall    = #(Ŷ∩G) / #G;  0 when G is empty.
- f1        = 2PR / (P+R);  0 when P+R = 0.
- prauc     = average precision of the row's probability ranking, exactly
              `sklearn.metrics.average_precision_score(y, p)` including tied scores (tied scores form
              one threshold);  0 when the row has no positive label (sklearn's value), 1 when every
              label is positive.
- roc_auc   = `sklearn.metrics.roc_auc_score(y, p)` (ties count 1/2);  undefined (NaN per sample) when
              the row's labels are all 0 or all 1. Averages are taken over the rows where it is
              defined (`n_roc_auc` says how many); `None` when no row has it.
- ddi_rate  = Σ_s #{i<j ∈ Ŷ_s : A_ij = 1} / Σ_s C(#Ŷ_s, 2)  (pooled over pairs; 0 when there is no
              pair at all; `None` when no DDI graph is given). `ddi_rate_true` is the same for G.
- avg_meds / avg_true_meds = mean #Ŷ / mean #G.

Threshold rule: a drug is predicted when `p >= θ` (θ default 0.5), compared in float32 everywhere.
Groups: overall, single_visit (target visit has no history), multi_visit. A group without samples has
every metric `None` and `n = 0`. Averages never contain NaN.

Rounds: `rounds` times draw ⌊fraction·N⌋ samples of the group **without** replacement (seeded), average
each metric over the draw; report mean and std (ddof 0) over the draws (the original's protocol).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

PER_SAMPLE_KEYS = ("jaccard", "precision", "recall", "f1", "prauc", "roc_auc", "n_pred", "n_true")
ROUND_METRICS = ("jaccard", "prauc", "f1", "precision", "recall", "roc_auc", "ddi_rate", "avg_meds")
GROUPS = ("overall", "single_visit", "multi_visit")
_CHUNK = 4096  # rows per argsort chunk: keeps temporaries small and cache-friendly


def _check(y_true: np.ndarray, y_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob)
    if y_true.ndim != 2 or y_prob.shape != y_true.shape:
        raise ValueError(f"y_true and y_prob must be 2-D arrays of equal shape, got "
                         f"{y_true.shape} and {y_prob.shape}")
    if y_true.dtype != bool:
        bad = (y_true != 0) & (y_true != 1)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise ValueError(f"y_true must be 0/1; row {r} column {c} holds {y_true[r, c]!r}")
        y_true = y_true.astype(bool)
    y_prob = y_prob.astype(np.float32, copy=False)
    if not np.isfinite(y_prob).all():
        r, c = np.argwhere(~np.isfinite(y_prob))[0]
        raise ValueError(f"y_prob must be finite; row {r} column {c} holds {y_prob[r, c]!r}")
    return y_true, y_prob


def predict_sets(y_prob: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean predicted sets: `y_prob >= threshold`, compared in float32."""
    return np.asarray(y_prob, dtype=np.float32) >= np.float32(threshold)


def _ranking_chunk(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average precision and ROC-AUC of every row of a chunk (one argsort per row)."""
    n, m = p.shape
    order = np.argsort(p, axis=1)                                   # ascending
    s = np.take_along_axis(p, order, axis=1)
    ys = np.take_along_axis(y, order, axis=1)
    idx = np.arange(m, dtype=np.int32)
    start_mask = np.ones((n, m), dtype=bool)
    start_mask[:, 1:] = s[:, 1:] != s[:, :-1]                       # first position of a tie group
    start = np.maximum.accumulate(np.where(start_mask, idx, 0), axis=1)
    end_mask = np.ones((n, m), dtype=bool)
    end_mask[:, :-1] = start_mask[:, 1:]                            # last position of a tie group
    end = np.minimum.accumulate(np.where(end_mask, idx, m - 1)[:, ::-1], axis=1)[:, ::-1]
    n_pos = ys.sum(axis=1, dtype=np.int64)
    n_neg = m - n_pos
    # AP: threshold at a group's score predicts positions start..m-1 (ascending order); each positive
    # contributes the precision at its own group's threshold, divided by n_pos (sklearn's step sum).
    tp_ge = np.cumsum(ys[:, ::-1], axis=1, dtype=np.int32)[:, ::-1]  # positives at positions >= i
    prec = np.take_along_axis(tp_ge, start, axis=1) / (m - start).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.where(n_pos > 0, np.where(ys, prec, 0.0).sum(axis=1) / n_pos, 0.0)
        # ROC-AUC by midranks (Mann-Whitney U): rank = (start + end)/2 + 1, 1-based, ties averaged.
        rank_sum = np.where(ys, start + end, 0).sum(axis=1, dtype=np.int64) / 2.0 + n_pos
        auc = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    auc = np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)
    return ap, auc


def ranking_metrics(y_true: np.ndarray, y_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample (average precision, ROC-AUC); see the module docstring for edge cases."""
    y_true, y_prob = _check(y_true, y_prob)
    n = y_true.shape[0]
    ap = np.empty(n, dtype=np.float64)
    auc = np.empty(n, dtype=np.float64)
    for a in range(0, n, _CHUNK):
        ap[a:a + _CHUNK], auc[a:a + _CHUNK] = _ranking_chunk(y_true[a:a + _CHUNK], y_prob[a:a + _CHUNK])
    return ap, auc


def set_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample Jaccard, precision, recall, F1, #predicted, #true of boolean sets."""
    y_true = np.asarray(y_true, dtype=bool)
    y_pred = np.asarray(y_pred, dtype=bool)
    inter = np.count_nonzero(y_true & y_pred, axis=1).astype(np.float64)
    n_pred = np.count_nonzero(y_pred, axis=1).astype(np.float64)
    n_true = np.count_nonzero(y_true, axis=1).astype(np.float64)
    union = n_pred + n_true - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        jac = np.where(union > 0, inter / union, 0.0)
        prec = np.where(n_pred > 0, inter / n_pred, 0.0)
        rec = np.where(n_true > 0, inter / n_true, 0.0)
        f1 = np.where(prec + rec > 0, 2 * prec * rec / (prec + rec), 0.0)
    return {"jaccard": jac, "precision": prec, "recall": rec, "f1": f1, "n_pred": n_pred, "n_true": n_true}


def ddi_pairs(sets: np.ndarray, ddi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: (#interacting pairs i<j in the set, #pairs C(k, 2)). `ddi` is [n_med, n_med] 0/1;
    an interaction is counted when A_ij or A_ji is set (symmetrised)."""
    sets = np.asarray(sets, dtype=bool)
    a = np.asarray(ddi)
    if a.shape != (sets.shape[1], sets.shape[1]):
        raise ValueError(f"DDI matrix has shape {a.shape}, expected {(sets.shape[1],) * 2}")
    a = ((a != 0) | (a.T != 0)).astype(np.float32)
    np.fill_diagonal(a, 0.0)
    out = np.empty(sets.shape[0], dtype=np.float64)
    for s in range(0, sets.shape[0], 16384):          # float32 matmul is exact for counts < 2**24
        x = sets[s:s + 16384].astype(np.float32)
        out[s:s + 16384] = ((x @ a) * x).sum(axis=1) / 2.0
    k = np.count_nonzero(sets, axis=1).astype(np.float64)
    return out, k * (k - 1) / 2.0


def per_sample_metrics(y_true: np.ndarray, y_prob: np.ndarray, threshold: float = 0.5,
                       ddi: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-sample arrays `jaccard, precision, recall, f1, prauc, roc_auc (NaN where undefined), n_pred,
    n_true`; with a DDI matrix also `ddi_pairs, pairs, ddi_pairs_true, pairs_true` (for pooled rates)."""
    y_true, y_prob = _check(y_true, y_prob)
    pred = predict_sets(y_prob, threshold)
    out = set_metrics(y_true, pred)
    out["prauc"], out["roc_auc"] = ranking_metrics(y_true, y_prob)
    if ddi is not None:
        out["ddi_pairs"], out["pairs"] = ddi_pairs(pred, ddi)
        out["ddi_pairs_true"], out["pairs_true"] = ddi_pairs(y_true, ddi)
    return out


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else 0.0


def _aggregate(ps: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, Any]:
    """Averages of per-sample values over the samples `idx` (None for an empty group)."""
    n = int(idx.size)
    keys = ("jaccard", "prauc", "f1", "precision", "recall", "roc_auc", "ddi_rate", "ddi_rate_true",
            "avg_meds", "avg_true_meds")
    if n == 0:
        return {**{k: None for k in keys}, "n": 0, "n_roc_auc": 0}
    out: dict[str, Any] = {k: float(ps[k][idx].mean()) for k in ("jaccard", "prauc", "f1", "precision", "recall")}
    auc = ps["roc_auc"][idx]
    ok = ~np.isnan(auc)
    out["roc_auc"] = float(auc[ok].mean()) if ok.any() else None
    out["n_roc_auc"] = int(ok.sum())
    if "ddi_pairs" in ps:
        out["ddi_rate"] = _ratio(ps["ddi_pairs"][idx].sum(), ps["pairs"][idx].sum())
        out["ddi_rate_true"] = _ratio(ps["ddi_pairs_true"][idx].sum(), ps["pairs_true"][idx].sum())
    else:
        out["ddi_rate"] = out["ddi_rate_true"] = None
    out["avg_meds"] = float(ps["n_pred"][idx].mean())
    out["avg_true_meds"] = float(ps["n_true"][idx].mean())
    out["n"] = n
    return out


def subsample_rounds(ps: dict[str, np.ndarray], idx: np.ndarray, *, rounds: int = 10,
                     fraction: float = 0.8, seed: int = 0) -> dict[str, dict[str, float | None]]:
    """Mean ± std (ddof 0) over `rounds` draws of ⌊fraction·len(idx)⌋ samples without replacement."""
    k = int(math.floor(fraction * idx.size))
    if rounds <= 0 or k == 0:
        return {m: {"mean": None, "std": None} for m in ROUND_METRICS}
    rng = np.random.default_rng(seed)
    draws = np.stack([idx[rng.permutation(idx.size)[:k]] for _ in range(rounds)])  # [R, k]
    vals: dict[str, np.ndarray] = {}
    for m in ("jaccard", "prauc", "f1", "precision", "recall"):
        vals[m] = ps[m][draws].mean(axis=1)
    vals["avg_meds"] = ps["n_pred"][draws].mean(axis=1)
    auc = ps["roc_auc"][draws]
    ok = ~np.isnan(auc)
    cnt = ok.sum(axis=1)
    vals["roc_auc"] = np.where(cnt > 0, np.where(ok, auc, 0.0).sum(axis=1) / np.maximum(cnt, 1), np.nan)
    if "ddi_pairs" in ps:
        num, den = ps["ddi_pairs"][draws].sum(axis=1), ps["pairs"][draws].sum(axis=1)
        vals["ddi_rate"] = np.where(den > 0, num / np.maximum(den, 1), 0.0)
    out = {}
    for m in ROUND_METRICS:
        v = vals.get(m)
        if v is None or np.isnan(v).any():
            out[m] = {"mean": None, "std": None}
        else:
            out[m] = {"mean": float(v.mean()), "std": float(v.std())}
    return out


def summarize(y_true: np.ndarray, y_prob: np.ndarray, *, threshold: float = 0.5,
              ddi: np.ndarray | None = None, single_visit: np.ndarray | None = None,
              rounds: int = 10, fraction: float = 0.8, seed: int = 0) -> dict[str, Any]:
    """The eval JSON structure: `{"threshold", "n", "overall", "single_visit", "multi_visit",
    "rounds" (overall, metric -> {mean, std}), "rounds_by_group" (group -> metric -> {mean, std}),
    "rounds_config"}`. Without `single_visit` the two visit groups are empty (`n = 0`)."""
    ps = per_sample_metrics(y_true, y_prob, threshold, ddi)
    n = ps["jaccard"].size
    all_idx = np.arange(n)
    if single_visit is None:
        groups = {"overall": all_idx, "single_visit": all_idx[:0], "multi_visit": all_idx[:0]}
    else:
        sv = np.asarray(single_visit).astype(bool).reshape(-1)
        if sv.size != n:
            raise ValueError(f"single_visit has {sv.size} entries, y_true has {n} rows")
        groups = {"overall": all_idx, "single_visit": all_idx[sv], "multi_visit": all_idx[~sv]}
    out: dict[str, Any] = {"threshold": float(threshold), "n": int(n)}
    by_group = {}
    for g, idx in groups.items():
        out[g] = _aggregate(ps, idx)
        by_group[g] = subsample_rounds(ps, idx, rounds=rounds, fraction=fraction, seed=seed)
    out["rounds"] = by_group["overall"]
    out["rounds_by_group"] = by_group
    out["rounds_config"] = {"rounds": int(rounds), "fraction": float(fraction), "seed": int(seed)}
    return out


def threshold_grid(step: float = 0.01) -> np.ndarray:
    """Candidate thresholds step, 2·step, …, < 1 (float32)."""
    n = int(round(1.0 / step))
    return (np.arange(1, n, dtype=np.float64) * step).astype(np.float32)


def _count_le(grid: np.ndarray, p: np.ndarray) -> np.ndarray:
    """#grid values <= p for every p (float32 comparisons, exact). Uniform grids (the default) use an
    arithmetic first guess corrected by exact comparisons; others use searchsorted."""
    g = grid.size
    d = np.diff(grid.astype(np.float64))
    if g < 2 or not np.allclose(d, d[0], rtol=1e-4, atol=0) or not np.isclose(grid[0], d[0], rtol=1e-4):
        return np.searchsorted(grid, p, side="right")
    b = np.clip(np.floor(p / np.float32(d[0])), 0, g).astype(np.int16 if g < 2**15 else np.int32)
    # fix the guess by at most one step either way, comparing exactly in float32
    ext = np.concatenate([grid, [np.float32(np.inf)]]).astype(np.float32)
    b += p >= ext[b]                                   # grid[b] <= p: one more
    b -= (b > 0) & (p < ext[np.maximum(b - 1, 0)])     # grid[b-1] > p: one fewer
    return b


def jaccard_by_threshold(y_true: np.ndarray, y_prob: np.ndarray,
                         grid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean Jaccard at every threshold of `grid` (sorted ascending), exact under the `p >= θ` rule,
    in O(n·m + n·len(grid)) via per-row histograms of scores over the grid intervals."""
    y_true, y_prob = _check(y_true, y_prob)
    grid = threshold_grid() if grid is None else np.sort(np.asarray(grid, dtype=np.float32))
    n, _ = y_true.shape
    g = grid.size
    # b = #grid values <= p: the drug is predicted at grid[k] iff k < b.
    b = _count_le(grid, y_prob)
    itype = np.int32 if n * (g + 1) < 2**31 else np.int64
    flat = (np.arange(n, dtype=itype)[:, None] * (g + 1) + b.astype(itype)).ravel()
    cnt_all = np.bincount(flat, minlength=n * (g + 1)).reshape(n, g + 1)
    cnt_pos = np.bincount(flat[y_true.ravel()], minlength=n * (g + 1)).reshape(n, g + 1)
    # predicted at grid[k] = sum over bins j > k
    n_pred = np.cumsum(cnt_all[:, ::-1], axis=1)[:, ::-1][:, 1:].astype(np.float64)
    inter = np.cumsum(cnt_pos[:, ::-1], axis=1)[:, ::-1][:, 1:]
    n_true = y_true.sum(axis=1, dtype=np.float64)[:, None]
    union = n_pred + n_true - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        jac = np.where(union > 0, inter / union, 0.0)
    return grid, jac.mean(axis=0)


def best_threshold(y_true: np.ndarray, y_prob: np.ndarray, grid: np.ndarray | None = None) -> float:
    """Threshold of `grid` (default 0.01…0.99) that maximises mean Jaccard; the lowest one on ties.
    Tune it on validation predictions only, never on test."""
    grid, jac = jaccard_by_threshold(y_true, y_prob, grid)
    return float(grid[int(np.argmax(jac))])


def per_drug_f1(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """F1 of every drug column, 2TP / (2TP + FP + FN); 0 when the drug is never true nor predicted."""
    y_true = np.asarray(y_true, dtype=bool)
    y_pred = np.asarray(y_pred, dtype=bool)
    tp = np.count_nonzero(y_true & y_pred, axis=0).astype(np.float64)
    den = 2 * tp + np.count_nonzero(y_true ^ y_pred, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, 2 * tp / den, 0.0)


def calibration_bins(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Reliability curve pooled over all (sample, drug) cells: per equal-width bin of p, the mean p,
    the observed positive rate and the count (empty bins have NaN means)."""
    y_true, y_prob = _check(y_true, y_prob)
    p = y_prob.ravel().astype(np.float64)
    b = np.clip((p * n_bins).astype(np.int64), 0, n_bins - 1)
    cnt = np.bincount(b, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(b, weights=p, minlength=n_bins) / cnt
        frac = np.bincount(b, weights=y_true.ravel().astype(np.float64), minlength=n_bins) / cnt
    return {"mean_prob": mean_p, "frac_pos": frac, "count": cnt}
