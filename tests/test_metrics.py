"""leader_jax.metrics against independent computations: scikit-learn for AP/ROC-AUC/F1, Python set
arithmetic for Jaccard/precision/recall, explicit pair loops for the DDI rate."""
import itertools
import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from leader_jax import metrics as M


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    n, m = 150, 25
    y = (rng.random((n, m)) < 0.25).astype(np.uint8)
    y[np.arange(n), rng.integers(0, m, n)] = 1             # ground truth never empty (the normal case)
    # scores rounded to one decimal: many ties, exercising sklearn's grouped thresholds
    p = np.round(rng.random((n, m)), 1).astype(np.float32)
    p[:50] = rng.random((50, m)).astype(np.float32)       # and some untied rows
    sv = rng.random(n) < 0.3
    a = (rng.random((m, m)) < 0.2).astype(np.uint8)
    a = np.triu(a, 1)
    a = a | a.T
    return y, p, sv, a


def _sets(row):
    return {int(i) for i in np.flatnonzero(row)}


def _ref_sample(yt, yp_set):
    g, s = _sets(yt), yp_set
    inter, union = len(g & s), len(g | s)
    jac = inter / union if union else 0.0
    p = inter / len(s) if s else 0.0
    r = inter / len(g) if g else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return jac, p, r, f1


def test_per_sample_matches_sklearn_and_sets(data):
    y, p, _, _ = data
    for th in (0.5, 0.3):
        ps = M.per_sample_metrics(y, p, th)
        for i in range(y.shape[0]):
            pred = {j for j in range(y.shape[1]) if p[i, j] >= np.float32(th)}
            jac, pr, rc, f1 = _ref_sample(y[i], pred)
            assert ps["jaccard"][i] == pytest.approx(jac, abs=1e-12)
            assert ps["precision"][i] == pytest.approx(pr, abs=1e-12)
            assert ps["recall"][i] == pytest.approx(rc, abs=1e-12)
            assert ps["f1"][i] == pytest.approx(f1, abs=1e-12)
            assert ps["n_pred"][i] == len(pred) and ps["n_true"][i] == y[i].sum()
            assert abs(ps["prauc"][i] - average_precision_score(y[i], p[i])) < 1e-9
            assert abs(ps["roc_auc"][i] - roc_auc_score(y[i], p[i])) < 1e-9
    # the threshold really matters in this data (the test could not pass with a constant rule)
    assert not np.allclose(M.per_sample_metrics(y, p, 0.5)["jaccard"], M.per_sample_metrics(y, p, 0.3)["jaccard"])


def test_threshold_rule_is_greater_equal():
    y = np.array([[1, 0, 1]], np.uint8)
    p = np.array([[0.5, 0.4999, 0.7]], np.float32)
    ps = M.per_sample_metrics(y, p, 0.5)
    assert ps["n_pred"][0] == 2 and ps["jaccard"][0] == 1.0


def test_edge_cases_no_nan():
    y = np.array([[0, 0, 0, 0],     # no positive label, nothing predicted: empty union
                  [1, 1, 1, 1],     # all positive
                  [1, 0, 0, 0],     # nothing predicted
                  [0, 1, 0, 0]], np.uint8)
    p = np.array([[0.1, 0.2, 0.3, 0.4],
                  [0.9, 0.2, 0.2, 0.6],
                  [0.1, 0.1, 0.1, 0.1],   # all tied
                  [0.3, 0.3, 0.9, 0.3]], np.float32)
    ps = M.per_sample_metrics(y, p, 0.5)
    np.testing.assert_array_equal(ps["jaccard"], [0.0, 0.5, 0.0, 0.0])
    np.testing.assert_array_equal(ps["precision"], [0.0, 1.0, 0.0, 0.0])
    np.testing.assert_array_equal(ps["f1"], [0.0, 2 / 3, 0.0, 0.0])
    np.testing.assert_allclose(ps["prauc"], [0.0, 1.0, 0.25, 0.25], atol=1e-12)
    assert math.isnan(ps["roc_auc"][0]) and math.isnan(ps["roc_auc"][1])
    assert ps["roc_auc"][2] == 0.5 and ps["roc_auc"][3] == pytest.approx(roc_auc_score(y[3], p[3]))
    with pytest.warns(Warning):          # sklearn agrees on the all-negative row (AP 0, with a warning)
        assert average_precision_score(y[0], p[0]) == 0.0
    s = M.summarize(y, p, threshold=0.5, single_visit=np.array([1, 1, 1, 1], bool), rounds=3)
    assert s["overall"]["roc_auc"] == pytest.approx(np.mean(ps["roc_auc"][2:]))
    assert s["overall"]["n_roc_auc"] == 2
    assert s["multi_visit"]["n"] == 0 and s["multi_visit"]["jaccard"] is None
    for g in ("overall", "single_visit"):
        for k, v in s[g].items():
            assert v is None or not math.isnan(v), (g, k)
    # a group where ROC-AUC is defined nowhere gives None, not NaN
    s2 = M.summarize(y[:2], p[:2], threshold=0.5)
    assert s2["overall"]["roc_auc"] is None and s2["rounds"]["roc_auc"]["mean"] is None
    assert s2["overall"]["prauc"] == 0.5


def test_ddi_rate_pooled_pairs(data):
    y, p, sv, a = data
    s = M.summarize(y, p, threshold=0.5, ddi=a, single_visit=sv, rounds=2)

    def ref(mask_rows, sets):
        num = den = 0
        for i in np.flatnonzero(mask_rows):
            for u, v in itertools.combinations(sorted(sets(i)), 2):
                den += 1
                num += int(a[u, v] or a[v, u])
        return num / den if den else 0.0

    pred = lambda i: _sets(p[i] >= np.float32(0.5))
    true = lambda i: _sets(y[i])
    for g, rows in (("overall", np.ones_like(sv)), ("single_visit", sv), ("multi_visit", ~sv)):
        assert abs(s[g]["ddi_rate"] - ref(rows, pred)) < 1e-12
        assert abs(s[g]["ddi_rate_true"] - ref(rows, true)) < 1e-12
    assert 0 < s["overall"]["ddi_rate"] < 1
    assert M.summarize(y, p)["overall"]["ddi_rate"] is None          # no DDI graph -> null
    # one-directional entries count as interactions
    up = np.triu(a, 1)
    assert M.summarize(y, p, ddi=up)["overall"]["ddi_rate"] == pytest.approx(s["overall"]["ddi_rate"])


def test_groups_and_rounds(data):
    y, p, sv, _ = data
    s = M.summarize(y, p, threshold=0.4, single_visit=sv, rounds=10, seed=3)
    ps = M.per_sample_metrics(y, p, 0.4)
    for g, rows in (("overall", np.ones_like(sv)), ("single_visit", sv), ("multi_visit", ~sv)):
        assert s[g]["n"] == rows.sum()
        for k in ("jaccard", "prauc", "f1", "precision", "recall"):
            assert s[g][k] == pytest.approx(ps[k][rows].mean(), abs=1e-12)
        assert s[g]["avg_meds"] == pytest.approx((p[rows] >= np.float32(0.4)).sum(1).mean())
        assert s[g]["avg_true_meds"] == pytest.approx(y[rows].sum(1).mean())
    # rounds: reproduce with the documented protocol (default_rng(seed), permutation prefix of floor(0.8 n))
    rng = np.random.default_rng(3)
    n = y.shape[0]
    k = int(0.8 * n)
    draws = [rng.permutation(n)[:k] for _ in range(10)]
    for metric in ("jaccard", "prauc", "f1"):
        v = np.array([ps[metric][d].mean() for d in draws])
        assert s["rounds"][metric]["mean"] == pytest.approx(v.mean(), abs=1e-12)
        assert s["rounds"][metric]["std"] == pytest.approx(v.std(), abs=1e-12)
        assert s["rounds"][metric]["std"] > 0
    # each draw has distinct samples (without replacement) and rounds are deterministic for a seed
    assert all(len(set(d.tolist())) == k for d in draws)
    assert M.summarize(y, p, threshold=0.4, single_visit=sv, seed=3) == s
    assert M.summarize(y, p, threshold=0.4, single_visit=sv, seed=4)["rounds"] != s["rounds"]
    assert s["rounds_by_group"]["single_visit"]["jaccard"]["mean"] is not None


def test_best_threshold_matches_brute_force(data):
    y, p, _, _ = data
    grid, jac = M.jaccard_by_threshold(y, p)
    for k in range(0, grid.size, 7):
        assert jac[k] == pytest.approx(M.per_sample_metrics(y, p, float(grid[k]))["jaccard"].mean(), abs=1e-12)
    t = M.best_threshold(y, p)
    brute = max(grid, key=lambda th: (M.per_sample_metrics(y, p, float(th))["jaccard"].mean(), -th))
    assert t == pytest.approx(float(brute))


def test_per_drug_f1_and_calibration(data):
    y, p, _, _ = data
    pred = p >= np.float32(0.5)
    np.testing.assert_allclose(M.per_drug_f1(y, pred), f1_score(y, pred, average=None, zero_division=0),
                               atol=1e-12)
    cal = M.calibration_bins(y, p, n_bins=5)
    for b in range(5):
        cells = (p >= b / 5) & (p < (b + 1) / 5) if b < 4 else (p >= 0.8)
        assert cal["count"][b] == cells.sum()
        assert cal["frac_pos"][b] == pytest.approx(y[cells].mean())


def test_bad_input_errors():
    with pytest.raises(ValueError, match="equal shape"):
        M.per_sample_metrics(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="row 1 column 2"):
        y = np.zeros((2, 3)); y[1, 2] = 2
        M.per_sample_metrics(y, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="finite"):
        M.per_sample_metrics(np.zeros((1, 2)), np.array([[0.1, np.nan]]))


def test_grid_counting_matches_searchsorted():
    rng = np.random.default_rng(1)
    p = rng.random(5000).astype(np.float32)
    for step in (0.01, 0.05, 0.001):
        grid = M.threshold_grid(step)
        q = np.concatenate([p, grid, np.nextafter(grid, np.float32(0)), [0.0, 1.0]]).astype(np.float32)
        np.testing.assert_array_equal(M._count_le(grid, q), np.searchsorted(grid, q, side="right"))
    odd = np.array([0.1, 0.15, 0.7], np.float32)            # non-uniform grid: generic path
    np.testing.assert_array_equal(M._count_le(odd, p), np.searchsorted(odd, p, side="right"))
