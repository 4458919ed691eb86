"""Prepared-data API on the shared fixtures: load/save round trip, labels, fingerprint, splits."""
import json

import numpy as np

from leader_jax.data.dataset import PreparedData, SPLITS


def test_synthetic_roundtrip_and_labels(prepared_synthetic, tmp_path):
    d = PreparedData.load(prepared_synthetic)
    assert d.dataset == "synthetic"
    assert d.stats["n_patients"] == 200
    assert sum(len(d.splits[s]) for s in SPLITS) == 200
    # labels: independent multi-hot from the raw samples.jsonl lines
    lines = [json.loads(x) for x in (prepared_synthetic / "samples.jsonl").read_text().splitlines()]
    med = json.loads((prepared_synthetic / "vocab.json").read_text())["med"]
    tr = [x for x in lines if x["split"] == "train"]
    y = d.labels(d.splits["train"])
    assert y.dtype == np.uint8 and y.shape == (len(tr), len(med))
    for row, x in zip(y, tr):
        assert sorted(np.flatnonzero(row).tolist()) == sorted(med.index(t) for t in x["visits"][-1]["medications"])
    assert y.sum(1).min() >= 1
    # save/load round trip gives identical bytes and fingerprint
    d.save(tmp_path / "copy")
    for f in ("vocab.json", "samples.jsonl", "splits.json", "ddi.npy", "stats.json", "report.md"):
        assert (tmp_path / "copy" / f).read_bytes() == (prepared_synthetic / f).read_bytes(), f
    assert PreparedData.load(tmp_path / "copy").fingerprint() == d.fingerprint()
    # DDI: symmetric, zero diagonal, over the label space
    assert d.ddi.shape == (d.vocab.n_med, d.vocab.n_med) and d.ddi.dtype == np.uint8
    assert (d.ddi == d.ddi.T).all() and not d.ddi.diagonal().any()


def test_eicu_fixture(prepared_eicu):
    d = PreparedData.load(prepared_eicu)
    assert d.dataset == "eicu" and d.ddi is None
    assert (d.stats["n_patients"], d.stats["n_visits"]) == (1262, 1584)
    assert d.stats["ddi"]["available"] is False
    ids = [set(s.patient_id for s in d.splits[k]) for k in SPLITS]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])


def test_cli_writes_same_bytes_as_api(tmp_path):
    import subprocess
    import sys

    from leader_jax.cli import REPO_ROOT
    from leader_jax.data.prepare import prepare_to

    api = prepare_to(tmp_path / "api", dataset="mimic3", visit_order="hadm_id")
    r = subprocess.run([sys.executable, "-m", "leader_jax.data.prepare", "--config", str(REPO_ROOT / "configs/data.py"),
                        "--config.dataset=mimic3", "--config.visit_order=hadm_id", "--out", str(tmp_path / "cli")],
                       capture_output=True, text=True, cwd=REPO_ROOT,
                       env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "LEADER_JAX_NO_PROGRESS": "1"})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n_patients"] == 82
    assert PreparedData.load(tmp_path / "cli").fingerprint() == api.fingerprint()
    assert json.loads((tmp_path / "cli" / "stats.json").read_text())["config"]["visit_order"] == "hadm_id"
