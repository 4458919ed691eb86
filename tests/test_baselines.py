"""Built-in baselines: each prediction checked against an independent plain-Python computation on a
small random prepared dataset; the logistic model must learn a planted code→drug rule; the CLI writes
the project's prediction format."""
import json
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import importlib.util

import numpy as np
import pytest

from leader_jax import baselines as B
from leader_jax.cli import UserError
from leader_jax.data.dataset import PreparedData, Sample, Vocab
from leader_jax.data.records import Visit
from leader_jax.eval import read_predictions
from leader_jax.metrics import ranking_metrics

REPO = Path(__file__).resolve().parents[1]


def get_config():
    spec = importlib.util.spec_from_file_location("baselines_config", REPO / "configs" / "baselines.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()

DX = tuple(f"dx9:{i}" for i in range(8))
PX = tuple(f"px9:{i}" for i in range(3))
MED = tuple(f"atc:M{i}" for i in range(6))


def _visit(rng, vid):
    dx = tuple(rng.choice(DX, size=rng.integers(1, 4), replace=False))
    px = tuple(rng.choice(PX, size=rng.integers(0, 2), replace=False))
    # planted rule: dx9:k -> drug k (k < 6), plus one random drug
    meds = {MED[int(d.split(":")[1])] for d in dx if int(d.split(":")[1]) < 6}
    meds.add(MED[rng.integers(0, 6)])
    if rng.random() < 0.1:
        dx = dx + ("dx9:unseen",)          # a code outside the vocabulary is ignored
    return Visit(vid, "0", dx, px, tuple(sorted(meds)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(0)
    splits = {"train": [], "val": [], "test": []}
    for i in range(160):
        visits = tuple(_visit(rng, f"{i}_{j}") for j in range(rng.integers(1, 4)))
        split = "train" if i < 110 else "val" if i < 135 else "test"
        splits[split].append(Sample(id=str(i), patient_id=str(i), visits=visits))
    vocab = Vocab(diag=DX, proc=PX, med=MED, names={m: m for m in MED})
    path = PreparedData("synthetic", vocab, None, splits, {}).save(tmp_path_factory.mktemp("b") / "prepared")
    return PreparedData.load(path), path


def _freq(d):
    c = Counter(m for s in d.splits["train"] for m in s.target.medications)
    return np.array([c[m] / len(d.splits["train"]) for m in MED])


def test_most_frequent_and_previous_visit(data):
    d, _ = data
    test = d.splits["test"]
    freq = _freq(d)
    np.testing.assert_allclose(B.fit_most_frequent(d, None)(test), np.tile(freq, (len(test), 1)), atol=1e-12)
    p = B.fit_previous_visit(d, None)(test)
    for i, s in enumerate(test):
        if s.single_visit:
            np.testing.assert_allclose(p[i], freq, atol=1e-12)
        else:
            prev = set(s.history[-1].medications)
            for j, m in enumerate(MED):
                assert p[i, j] == (1.0 if m in prev else pytest.approx(min(freq[j], 0.99) / 2))
            assert set(np.array(MED)[p[i] >= 0.5]) == prev     # at θ = 0.5: exactly the previous drugs
    assert any(s.single_visit for s in test) and not all(s.single_visit for s in test)


def test_cooccurrence_matches_counting(data):
    d, _ = data
    code_n, pair_n = Counter(), defaultdict(Counter)
    for s in d.splits["train"]:
        for v in s.visits:
            codes = [c for c in v.diagnoses + v.procedures if c in DX + PX]
            for c in codes:
                code_n[c] += 1
                for m in v.medications:
                    pair_n[c][m] += 1
    freq = _freq(d)
    p = B.fit_cooccurrence(d, None)(d.splits["test"])
    for i, s in enumerate(d.splits["test"]):
        codes = [c for c in s.target.diagnoses + s.target.procedures if code_n[c] > 0]
        want = (np.array([[pair_n[c][m] / code_n[c] for m in MED] for c in codes]).mean(0) if codes else freq)
        np.testing.assert_allclose(p[i], want, atol=1e-12)


def test_logistic_learns_planted_rule(data):
    d, _ = data
    cfg = get_config()
    cfg.logistic.steps = 60
    y = d.labels(d.splits["test"])
    ap_lr = ranking_metrics(y, B.fit_logistic(d, cfg)(d.splits["test"]))[0].mean()
    ap_mf = ranking_metrics(y, B.fit_most_frequent(d, cfg)(d.splits["test"]))[0].mean()
    # independent reference: scikit-learn's logistic regression on the same features, same L2 strength
    from sklearn.linear_model import LogisticRegression
    x_tr, x_te = B.logistic_features(d, d.splits["train"]), B.logistic_features(d, d.splits["test"])
    y_tr = d.labels(d.splits["train"])
    c = 1.0 / (2 * cfg.logistic.l2 * y_tr.shape[0])
    p_sk = np.stack([LogisticRegression(C=c, max_iter=2000).fit(x_tr, y_tr[:, j]).predict_proba(x_te)[:, 1]
                     for j in range(y_tr.shape[1])], axis=1)
    ap_sk = ranking_metrics(y, p_sk)[0].mean()
    assert ap_lr > 0.8 and ap_lr > ap_mf + 0.25 and abs(ap_lr - ap_sk) < 0.05, (ap_lr, ap_mf, ap_sk)


def test_cli_writes_prediction_files(data, tmp_path):
    d, path = data
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "LEADER_JAX_NO_PROGRESS": "1"}
    r = subprocess.run([sys.executable, "-m", "leader_jax.baselines", f"--config.data_dir={path}",
                        "--config.name=cooccurrence", "--out", str(out)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "run.json").read_text())
    assert meta["model"] == "baseline:cooccurrence" and Path(meta["data_dir"]) == path.resolve()
    for split in ("val", "test"):
        pred = read_predictions(out / "predictions" / f"{split}.npz")
        samples = d.splits[split]
        assert pred["ids"].tolist() == [s.id for s in samples]
        np.testing.assert_array_equal(pred["y_true"], d.labels(samples))
        np.testing.assert_array_equal(pred["single_visit"], [s.single_visit for s in samples])
        np.testing.assert_allclose(pred["y_prob"], B.fit_cooccurrence(d, None)(samples), atol=1e-6)
    bad = subprocess.run([sys.executable, "-m", "leader_jax.baselines", f"--config.data_dir={path}",
                          "--config.name=nope", "--out", str(out)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "'nope' is not a baseline" in bad.stderr and "Traceback" not in bad.stderr


def test_all_baselines_through_eval_on_synthetic(prepared_synthetic, tmp_path):
    """Integration: every baseline on the shared synthetic MIMIC-format data (with a DDI graph) is
    scored by the evaluator; the JSON agrees with metrics.summarize on the written predictions."""
    from leader_jax import metrics as M
    from leader_jax.eval import evaluate_run

    spec = importlib.util.spec_from_file_location("eval_config", REPO / "configs" / "eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ddi = PreparedData.load(prepared_synthetic).ddi
    assert ddi is not None
    for name in B.NAMES:
        cfg = get_config()
        cfg.data_dir, cfg.name, cfg.logistic.steps = str(prepared_synthetic), name, 20
        out = tmp_path / name
        B.run_baseline(cfg, out)
        ecfg = mod.get_config()
        ecfg.run_dir, ecfg.rounds, ecfg.plots = str(out), 3, False
        res = evaluate_run(ecfg)
        pred = read_predictions(out / "predictions" / "test.npz")
        ref = M.summarize(pred["y_true"], pred["y_prob"], threshold=0.5, ddi=ddi,
                          single_visit=pred["single_visit"], rounds=3)
        assert res["overall"] == ref["overall"] and res["model"] == f"baseline:{name}"
        assert res["overall"]["ddi_rate"] is not None and res["tuned"]["source"] == "val"
        # the predictions record the prepared data's fingerprint; eval checked both files against it
        assert str(pred["data_fingerprint"]) == PreparedData.load(prepared_synthetic).fingerprint()
        assert {k: c["data_fingerprint"] for k, c in res["checks"].items()} == {"test": "match", "val": "match"}


@pytest.mark.parametrize("field,value", [("name", "nope"), ("splits", ("val", "dev")), ("splits", ()),
                                         ("splits", ("test", "test")), ("seed", -1), ("logistic.lr", 0.0),
                                         ("logistic.l2", -1e-3), ("logistic.steps", 0),
                                         ("logistic.eval_every", 0), ("data_dir", None)])
def test_validate_config_rejects_bad_values(field, value):
    B.validate_config(get_config())                 # the bundled config is valid as is
    cfg = get_config()
    *parent, leaf = field.split(".")
    node = cfg
    for part in parent:
        node = node[part]
    node[leaf] = value
    with pytest.raises(UserError, match=re.escape(f"--config.{field}={value!r} is invalid")):
        B.validate_config(cfg)
