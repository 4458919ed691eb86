"""`python -m leader_jax.eval`: JSON/markdown/plots of a run, the validation-tuned threshold, --compare,
and clear errors on bad prediction files."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from leader_jax import metrics as M
from leader_jax.cli import UserError
from leader_jax.data.dataset import PreparedData, Sample, Vocab
from leader_jax.data.records import Visit
from leader_jax.eval import compare_runs, read_predictions, write_predictions

REPO = Path(__file__).resolve().parents[1]
N_MED = 12


def _prepared(tmp: Path, n: dict[str, int], ddi: bool) -> tuple[Path, dict]:
    """A tiny prepared folder with random target drug sets and single/multi-visit samples; returns it
    and, per split, the labels and single-visit flags the evaluator checks predictions against."""
    rng = np.random.default_rng(0)
    med = tuple(f"atc:D{i:02d}" for i in range(N_MED))
    splits, truth = {}, {}
    for split, k in n.items():
        y = (rng.random((k, N_MED)) < 0.3).astype(np.uint8)
        y[np.arange(k), rng.integers(0, N_MED, k)] = 1
        sv = rng.random(k) < 0.4
        history = (Visit("h", "0", ("dx9:1",), (), (med[0],)),)
        splits[split] = [Sample(id=f"{split}{i}", patient_id=f"{split}{i}",
                                visits=(() if sv[i] else history)
                                + (Visit(f"v{i}", "1", ("dx9:1",), (), tuple(np.array(med)[y[i] == 1])),))
                         for i in range(k)]
        truth[split] = (y, sv)
    a = None
    if ddi:
        a = np.triu((rng.random((N_MED, N_MED)) < 0.3).astype(np.uint8), 1)
        a = a | a.T
    vocab = Vocab(diag=("dx9:1",), proc=(), med=med, names={m: f"drug {m[-2:]}" for m in med})
    data = PreparedData("synthetic", vocab, a, splits, {})
    return data.save(tmp / "prepared"), truth


def _write_run(run: Path, data_dir: Path, split: str, truth: dict, seed: int, model="toy"):
    rng = np.random.default_rng(seed)
    y, sv = truth[split]
    n = len(y)
    # informative but noisy probabilities, so thresholds matter
    p = np.clip(0.35 * y + 0.65 * rng.random((n, N_MED)), 0, 1).astype(np.float32)
    write_predictions(run, split, ids=[f"{split}{i}" for i in range(n)], y_true=y, y_prob=p, single_visit=sv,
                      data_fingerprint=PreparedData.load(data_dir).fingerprint())
    (run / "run.json").write_text(json.dumps({"data_dir": str(data_dir), "model": model}))
    return y, p, sv


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    data_dir, truth = _prepared(tmp, {"train": 2, "val": 80, "test": 120}, ddi=True)
    a, b = tmp / "run_a", tmp / "run_b"
    arrays = {"val": _write_run(a, data_dir, "val", truth, 1), "test": _write_run(a, data_dir, "test", truth, 2)}
    _write_run(b, data_dir, "test", truth, 3, model="other")
    env = {**os.environ, "PYTHONPATH": str(REPO), "LEADER_JAX_NO_PROGRESS": "1"}
    for run in (a, b):
        r = subprocess.run([sys.executable, "-m", "leader_jax.eval", f"--config.run_dir={run}",
                            "--config.rounds=5"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    cmp = subprocess.run([sys.executable, "-m", "leader_jax.eval", "--compare", str(a), str(b)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert cmp.returncode == 0, cmp.stderr
    return {"a": a, "b": b, "data_dir": data_dir, "arrays": arrays, "compare": cmp.stdout, "env": env, "tmp": tmp}


def test_eval_json_matches_metrics(runs):
    res = json.loads((runs["a"] / "eval" / "test.json").read_text())
    y, p, sv = runs["arrays"]["test"]
    ddi = PreparedData.load(runs["data_dir"]).ddi
    ref = M.summarize(y, p, threshold=0.5, ddi=ddi, single_visit=sv, rounds=5)
    for g in M.GROUPS:
        assert res[g] == pytest.approx(ref[g], abs=1e-12)
    assert res["rounds"] == ref["rounds"] and res["threshold"] == 0.5   # JSON floats round-trip exactly
    assert res["overall"]["ddi_rate"] is not None and res["ddi_graph"]
    assert res["single_visit"]["n"] == sv.sum() and res["multi_visit"]["n"] == (~sv).sum()
    assert res["model"] == "toy" and res["n_med"] == N_MED
    # both files were checked against the prepared data (the val file feeds the tuned threshold)
    assert {k: (c["n"], c["data_fingerprint"], c["reordered"]) for k, c in res["checks"].items()} == {
        "test": (120, "match", False), "val": (80, "match", False)}


def test_tuned_threshold_comes_from_val_only(runs):
    res = json.loads((runs["a"] / "eval" / "test.json").read_text())
    yv, pv, _ = runs["arrays"]["val"]
    y, p, sv = runs["arrays"]["test"]
    t = M.best_threshold(yv, pv)
    assert res["tuned"]["source"] == "val" and res["tuned"]["threshold"] == pytest.approx(t)
    assert t != 0.5        # the data is built so that the tuned threshold differs from the default
    assert res["tuned"]["overall"]["jaccard"] == pytest.approx(M.per_sample_metrics(y, p, t)["jaccard"].mean())
    # run_b has no val predictions: no tuned section
    assert json.loads((runs["b"] / "eval" / "test.json").read_text())["tuned"] is None


def test_markdown_plots_and_compare(runs):
    md = (runs["a"] / "eval" / "test.md").read_text()
    res = json.loads((runs["a"] / "eval" / "test.json").read_text())
    assert f"{res['overall']['jaccard']:.4f}" in md and "single_visit" in md and "tuned on val" in md
    for name in ("test_groups.png", "test_calibration.png", "test_drug_f1.png"):
        data = (runs["a"] / "eval" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    lines = [l for l in runs["compare"].splitlines() if l.startswith("|")]
    assert len(lines) == 4 and "run_a" in lines[2] and "run_b" in lines[3]
    rb = json.loads((runs["b"] / "eval" / "test.json").read_text())
    assert f"{rb['rounds']['prauc']['mean']:.4f} ± {rb['rounds']['prauc']['std']:.4f}" in lines[3]
    assert compare_runs([str(runs["a"]), str(runs["b"])]) == runs["compare"].strip()


def test_top_drugs():
    from leader_jax.eval import top_drugs

    y = np.zeros((5, 6), np.uint8)
    y[:4, 3] = 1
    y[:2, 0] = 1
    y[:2, 5] = 1
    y[0, 1] = 1
    assert top_drugs(y, 3).tolist() == [3, 0, 5]
    assert top_drugs(y, 10).tolist() == [3, 0, 5, 1]        # never-given drugs are left out


def test_bad_predictions_give_clear_errors(runs, tmp_path):
    path = tmp_path / "predictions" / "test.npz"
    with pytest.raises(UserError, match="y_prob must be probabilities"):
        write_predictions(tmp_path, "test", ids=["a"], y_true=[[1, 0]], y_prob=[[1.5, 0.1]], single_visit=[0])
    with pytest.raises(UserError, match="not found"):
        read_predictions(path)
    np.savez(path.parent.mkdir(parents=True) or path, ids=np.array(["a"]), y_true=np.array([[1, 0]]))
    with pytest.raises(UserError, match=r"missing array\(s\) \['y_prob', 'single_visit'\]"):
        read_predictions(path)
    # through the CLI: one line on stderr, exit status 2, no traceback; ids must belong to the split
    run = tmp_path / "bad"
    write_predictions(run, "test", ids=["nope"], y_true=np.eye(1, N_MED), y_prob=np.zeros((1, N_MED)),
                      single_visit=[True])
    (run / "run.json").write_text(json.dumps({"data_dir": str(runs["data_dir"])}))
    r = subprocess.run([sys.executable, "-m", "leader_jax.eval", f"--config.run_dir={run}"], cwd=REPO,
                       env=runs["env"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "not in the prepared data's 'test' split" in r.stderr and "nope" in r.stderr
