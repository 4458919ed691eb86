"""The student stage's guards (no training): config validation, --out folders of another kind refused
untouched, damaged feature-store shards (named to the student, repaired by re-extraction), and the batch
layout taken from the sharding rules table."""
import json
import logging
import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from leader_jax import sharding
from leader_jax.cli import UserError, load_config
from leader_jax.data.dataset import PreparedData
from leader_jax.feature_store import FeatureStore, FeatureStoreWriter
from leader_jax.train import student as ts
from leader_jax.train import student_inputs as si
from leader_jax.train import student_trainer as st
from leader_jax.train.common import make_mesh
from leader_jax.train.engine import Checkpointer


@pytest.mark.parametrize("name", ["student.py", "student.py:mimic3", "student.py:mimic4", "student.py:eicu"])
def test_bundled_configs_validate(name):
    ts.validate_config(load_config(name))
    ts.validate_config(load_config("demo.py").student)


@pytest.mark.parametrize("field,value,match", [
    ("model.visit_position", "absolute", r"model.visit_position='absolute': expected one of \('none', 'recency'\)"),
    ("model.inference_kernel", "fast", r"model.inference_kernel='fast'"),
    ("model.d", 30, r"model.d=30: must be a multiple of model.heads=4"),
    ("model.max_visits", 0, r"model.max_visits=0: must be >= 1"),
    ("loss.align_loss", "mse", r"loss.align_loss='mse'"),
    ("loss.tau", 0.0, r"loss.tau=0.0: must be > 0"),
    ("train.batch_size", -16, r"train.batch_size=-16: must be >= 1"),
    ("train.stop_after", -1, r"train.stop_after=-1"),
    ("eval.threshold", 1.5, r"eval.threshold=1.5"),
    ("mesh", (1, 1), r"mesh=\(1, 1\)"),
])
def test_bad_config_values_are_named(field, value, match):
    cfg = load_config("student.py")
    section, _, key = field.rpartition(".")
    (cfg[section] if section else cfg)[key] = value
    with pytest.raises(UserError, match=match):
        ts.validate_config(cfg)


def test_launch_clock_reads_proc_and_falls_back_to_the_import_time(tmp_path):
    """seconds_since_launch: Linux /proc (process start tick vs uptime), else the module's import."""
    import os
    import time
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    tick = os.sysconf("SC_CLK_TCK")
    rest = " ".join(["0"] * 17)                        # fields 5..21, then starttime (22) and more
    (proc / "self" / "stat").write_text(f"4242 (python -m x) S 1 {rest} {50 * tick} 7 8\n")
    (proc / "uptime").write_text("62.25 100.00\n")
    assert ts.seconds_since_launch(proc) == (pytest.approx(12.25), "proc")
    age, clock = ts.seconds_since_launch(tmp_path / "missing")
    assert clock == "import" and age == pytest.approx(time.time() - ts._IMPORTED, abs=1.0)
    if os.path.exists("/proc/self/stat"):                # this process started before this module was imported
        age, clock = ts.seconds_since_launch()
        assert clock == "proc" and age >= time.time() - ts._IMPORTED - 0.05


def _cfg(prepared, out, **kw):
    cfg = load_config("student.py")
    cfg.data_dir, cfg.out, cfg.distill = str(prepared), str(out), False
    cfg.update(kw)
    return cfg


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(folder.rglob("*"))}


def test_out_folder_of_another_kind_is_refused_untouched(prepared_synthetic, tmp_path):
    teacher = tmp_path / "teacher"                       # a finished teacher run
    (teacher / "checkpoints").mkdir(parents=True)
    (teacher / "run.json").write_text(json.dumps({"model": "teacher", "data_dir": "x"}))
    (teacher / "metrics.jsonl").write_text('{"step": 1}\n')
    interrupted = tmp_path / "interrupted"               # a teacher killed before writing run.json
    ck = Checkpointer(interrupted / "checkpoints", max_to_keep=1)
    ck.save(5, {"w": np.ones(3)}, None, {"step": 5, "best_val": 0.1})
    ck.close()
    (interrupted / "config.json").write_text("{}")
    fake = tmp_path / "fake"                             # run.json says student, checkpoints do not
    ck = Checkpointer(fake / "checkpoints", max_to_keep=1)
    ck.save(1, {"w": np.ones(3)}, None, {"step": 1})
    ck.close()
    (fake / "run.json").write_text(json.dumps({"model": "student"}))
    cases = {teacher: r"holds a run of model 'teacher'", prepared_synthetic: r"holds vocab.json \(prepared data\)",
             interrupted: r"holds config.json, checkpoints but no run.json with \"model\": \"student\"",
             fake: r"checkpoints of another kind \(meta model None\)"}
    for folder, match in cases.items():
        before = _snapshot(folder)
        with pytest.raises(UserError, match=match):
            ts.train(_cfg(prepared_synthetic, folder))
        assert _snapshot(folder) == before, folder


@pytest.fixture(scope="module")
def shard_store(prepared_synthetic, tmp_path_factory):
    data = PreparedData.load(prepared_synthetic)
    path = tmp_path_factory.mktemp("shards") / "features"
    w = FeatureStoreWriter(path, hidden_dim=4, n_med=data.vocab.n_med, meta={"teacher": "t"})
    rng = np.random.default_rng(0)
    values = {}
    for split, samples in data.splits.items():
        ids = [s.id for s in samples]
        hidden, probs = rng.normal(size=(len(ids), 4)), rng.random((len(ids), data.vocab.n_med))
        values[split] = (ids, hidden.astype(np.float16), probs.astype(np.float32))
        for lo in range(0, len(ids), 64):
            w.write_shard(split, ids[lo:lo + 64], hidden[lo:lo + 64], probs[lo:lo + 64])
    w.finalize()
    return data, path, values


def test_truncated_shard_is_named_to_the_student_and_repaired_by_reextraction(
        prepared_synthetic, shard_store, tmp_path, caplog):
    data, path, values = shard_store
    shard = path / "train" / "00001.npz"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])     # a copy cut short
    cfg = _cfg(prepared_synthetic, tmp_path / "run", distill=True, features=str(path))
    with pytest.raises(UserError, match=rf"feature store shard {shard} cannot be read .*re-run the extraction"):
        ts.train(cfg)
    # re-running the extraction: the writer drops the shard (warning naming it), redoes its ids
    w = FeatureStoreWriter(path, hidden_dim=4, n_med=data.vocab.n_med, meta={"teacher": "t"})
    with caplog.at_level(logging.WARNING, logger="leader_jax.feature_store"):
        done = w.done_ids("train")
    assert str(shard) in caplog.text and not shard.exists()
    ids, hidden, probs = values["train"]
    todo = [i for i, sid in enumerate(ids) if sid not in done]
    assert todo == list(range(64, 128))                                   # exactly the lost shard's ids
    new = w.write_shard("train", [ids[i] for i in todo], hidden[todo], probs[todo])
    assert new.name == "00003.npz"                                        # never overwrites a kept shard
    w.finalize()
    store = FeatureStore(path)
    np.testing.assert_array_equal(store.hidden("train", ids), hidden)
    np.testing.assert_array_equal(store.probs("train", ids), probs)


def _batch_axes_in_train_step(trainer, enc) -> set[str]:
    """Mesh axes of dim 0 of every [16, ...] argument (the batch arrays) of the lowered train step."""
    batch = trainer.put_batch(si.make_batch(enc, np.arange(2), (2, 2, 1, 1), 16))
    assert {a.sharding for a in batch.values()} == {trainer.steps.batch_sharding}
    text = trainer.train_step.lower(trainer.params, trainer.opt_state, batch,
                                    jax.random.fold_in(trainer.base_key, 0)).as_text()
    found = re.findall(r'%arg\d+: tensor<16x[^>]*> \{sdy.sharding = #sdy.sharding<@mesh, \[\{([^}]*)\}', text)
    assert len(found) >= 5, text[:2000]           # diag, proc, med, n_visits, labels, weight (unused ones pruned)
    return set(found)


def test_batch_layout_follows_the_rules_table(monkeypatch):
    """The train step's batch arrays are laid out by the "batch" rule: (data, fsdp) by default, data only
    after editing the table (a (2, 4, 1) mesh, a tiny model, lowered but never compiled)."""
    from leader_jax.models.student import LossConfig, StudentConfig

    mesh = make_mesh(ConfigDict(dict(mesh=(2, 4, 1))))
    mcfg = StudentConfig(n_diag=20, n_proc=10, n_med=8, d=12, heads=2, ffn=12, head_hidden=12, max_visits=2)
    lc = LossConfig(align_weight=0.0, distill=False)
    enc = si.EncodedSplit(ids=np.array(["a", "b"]), diag=np.array([[[1, 2], [3, 0]], [[4, 0], [0, 0]]], np.int32),
                          proc=np.ones((2, 2, 1), np.int32), med=np.array([[[0], [2]], [[0], [0]]], np.int32),
                          n_visits=np.array([2, 1], np.int32), profile=np.zeros((2, 0), np.int32),
                          target=np.array([[1], [3]], np.int32), labels=np.eye(8, dtype=np.uint8)[[0, 2]],
                          single_visit=np.array([False, True]), needs=np.array([[2, 2, 1, 1], [1, 1, 1, 1]]))
    default = st.StudentTrainer(mcfg, lc, lr=1e-3, seed=0, mesh=mesh, inference_kernel="off")
    assert default.steps.batch_sharding.spec == P(("data", "fsdp"))
    assert _batch_axes_in_train_step(default, enc) == {'"data", "fsdp"'}
    rules = tuple((k, ("data",) if k == "batch" else v) for k, v in sharding.LOGICAL_AXIS_RULES)
    monkeypatch.setattr(sharding, "LOGICAL_AXIS_RULES", rules)
    tr = st.StudentTrainer(mcfg, lc, lr=1e-3, seed=0, mesh=mesh, inference_kernel="off")
    assert tr.steps.batch_sharding.spec == P("data")
    assert _batch_axes_in_train_step(tr, enc) == {'"data"'}
    with pytest.raises(ValueError, match="built for another model, loss, learning rate, mesh or sharding rules"):
        st.StudentTrainer(mcfg, lc, lr=1e-3, seed=0, mesh=mesh, steps=default.steps)
