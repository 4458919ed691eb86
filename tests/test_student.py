"""LEADER(S) student: input encoding, padding invariance, losses vs independent numpy, overfitting,
determinism, compile counts, the training CLI's outputs, resume (bit-identical to an uninterrupted run)
and its feature-store errors. Config, run-folder, damaged-shard and sharding guards are in
tests/test_student_runs.py."""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from leader_jax import sharding
from leader_jax.data.dataset import Sample, Vocab
from leader_jax.data.records import Visit
from leader_jax.feature_store import FeatureStore, FeatureStoreWriter, MissingFeaturesError
from leader_jax.io import load_npz, read_jsonl
from leader_jax.models.student import LossConfig, build_student, info_nce, init_student, kd_loss, student_loss
from leader_jax.train import packing
from leader_jax.train import student as ts
from leader_jax.train import student_inputs as si
from leader_jax.train import student_trainer as st

TEACHER_DIM = 16
OVERFIT_EPOCHS = 60


def _cfg(**kw):
    """The small student every training test uses (same shapes, so compiled steps can be shared)."""
    from configs.student import get_config
    c = get_config()
    c.seed = 0
    c.model.update(dict(d=32, heads=2, ffn=64, head_hidden=64, dropout=0.1, attn_dropout=0.0, bucket_levels=1))
    c.train.update(dict(batch_size=16, lr=5e-3, epochs=3))
    c.eval.batch_size = 32
    c.update(kw)
    return c


@pytest.fixture(scope="module")
def store(data, tmp_path_factory):
    """Teacher features = a fixed random projection of the labels (a learnable, deterministic target)."""
    path = tmp_path_factory.mktemp("store") / "features"
    proj = np.random.default_rng(7).normal(size=(data.vocab.n_med, TEACHER_DIM)).astype(np.float32)
    w = FeatureStoreWriter(path, hidden_dim=TEACHER_DIM, n_med=data.vocab.n_med, meta={"teacher": "fixture"})
    for split, samples in data.splits.items():
        y = data.labels(samples).astype(np.float32)
        w.write_shard(split, [s.id for s in samples], y @ proj, y * 0.9)
    w.finalize()
    return path


@pytest.fixture(scope="module")
def enc(data):
    return si.encode_samples(data.splits["train"], data.vocab, 10)


def _toy_vocab():
    return Vocab(diag=tuple(f"dx9:{i}" for i in range(20)), proc=tuple(f"px9:{i}" for i in range(10)),
                 med=tuple(f"atc:{i}" for i in range(8)), names={}, profile={"gender": ("unknown", "F", "M")})


def _visit(j, dx, px, med):
    return Visit(id=f"v{j}", time=f"{j:03d}", diagnoses=tuple(f"dx9:{k}" for k in dx),
                 procedures=tuple(f"px9:{k}" for k in px), medications=tuple(f"atc:{k}" for k in med))


# ------------------------------------------------------------------------------------ encoding
def test_keeps_last_n_visits_and_shifts_drugs():
    visits = tuple(_visit(j, [j % 20, (j + 1) % 20], [j % 10], [j % 8]) for j in range(13))
    s_long = Sample(id="p1", patient_id="p1", visits=visits, profile={"gender": "M"})
    s_one = Sample(id="p2", patient_id="p2", visits=(_visit(0, [5], [], [1, 2]),), profile={"gender": "X"})
    e = si.encode_samples([s_long, s_one], _toy_vocab(), max_visits=10)
    assert e.n_visits.tolist() == [10, 1]
    assert e.single_visit.tolist() == [False, True]
    # kept visits are 3..12 (the last 10); the target (visit 12) is the last slot of the dx/px streams
    for slot in range(10):
        j = 3 + slot
        assert e.diag[0, slot, :2].tolist() == [j % 20 + 1, (j + 1) % 20 + 1]
        assert e.proc[0, slot, 0] == j % 10 + 1
    # drug stream: slot 0 empty (profile), slot k = drugs of kept visit k-1; the target's drugs never appear
    assert (e.med[0, 0] == 0).all()
    assert [e.med[0, k, 0] - 1 for k in range(1, 10)] == [(3 + k - 1) % 8 for k in range(1, 10)]
    assert e.target[0, 0] - 1 == 12 % 8 and e.labels[0].tolist() == [int(i == 12 % 8) for i in range(8)]
    assert (e.med[1] == 0).all() and (e.diag[1, 1:] == 0).all() and e.diag[1, 0, 0] == 6
    assert e.labels[1].tolist() == [0, 1, 1, 0, 0, 0, 0, 0]
    assert e.profile[:, 0].tolist() == [2, 0]          # "M", unseen "X" → "unknown"
    assert e.needs.tolist() == [[10, 2, 1, 1], [1, 1, 0, 2]]


def test_encoding_matches_prepared_labels_and_rejects_unknown_tokens(data, enc):
    np.testing.assert_array_equal(enc.labels, data.labels(data.splits["train"]))
    v = _toy_vocab()
    bad = Sample(id="p9", patient_id="p9", visits=(_visit(0, [1], [99], [1]),))
    with pytest.raises(ValueError, match=r"sample p9: procedures token 'px9:99'"):
        si.encode_samples([bad], v)


def test_buckets_cover_every_sample(enc):
    caps = si.bucket_caps(enc.needs, 3)
    assert 1 <= len(caps) <= 3
    assert caps[-1] == tuple(int(m) for m in np.maximum(enc.needs.max(0), 1))
    b = si.assign_buckets(enc.needs, caps)
    assert (enc.needs <= np.asarray(caps)[b]).all()
    for i in range(len(enc)):       # the chosen bucket is the first that fits
        fits = [k for k, c in enumerate(caps) if (enc.needs[i] <= np.asarray(c)).all()]
        assert b[i] == fits[0]
    vol = [c[0] * sum(c[1:]) for c in caps]
    assert vol == sorted(vol) and len(set(b.tolist())) == len(caps)
    assert si.bucket_caps(np.array([[1, 3, 0, 5], [2, 9, 1, 2]]), 1) == [(2, 9, 1, 5)]


# ------------------------------------------------------------------------------- model / losses
LC = LossConfig(alpha=0.7, align_weight=0.3, tau=0.5, align_loss="paper")


@pytest.fixture(scope="module")
def probe(data):
    """One jitted function returning every intermediate the loss tests need (compiled once per shape)."""
    cfg = st.model_config(_cfg(), data.vocab, TEACHER_DIM)
    with sharding.use_mesh(None):
        graphdef, params = init_student(cfg, seed=3)

    @jax.jit
    def run(params, batch):
        m = nnx.merge(graphdef, params)
        out = m(batch)
        x, y = m.align_pair(batch["target"], out["profile"])
        loss, parts = student_loss(m, batch, LC)
        kd = kd_loss(m, out["mediator"], batch["teacher"])
        return {**out, "proj": m.kd_proj(out["mediator"]), "x": x, "y": y, "kd_rows": kd, **parts}

    return lambda batch: jax.device_get(run(params, batch))


def _batch(enc, rows, cap, bs, teacher):
    b = si.make_batch(enc, np.asarray(rows), cap, bs)
    b["teacher"] = np.zeros((bs, TEACHER_DIM), np.float32)
    b["teacher"][: len(rows)] = teacher
    return b


ROWS = np.arange(12)


@pytest.fixture(scope="module")
def tight(enc):
    return tuple(int(x) for x in enc.needs[ROWS].max(0))


@pytest.fixture(scope="module")
def teacher():
    return np.random.default_rng(2).normal(size=(len(ROWS), TEACHER_DIM)).astype(np.float32)


def test_padding_never_changes_outputs(probe, enc, tight, teacher):
    base = probe(_batch(enc, ROWS, tight, 16, teacher))
    enc2 = si.EncodedSplit(**{**enc.__dict__})    # same samples, 3 extra empty visit slots
    enc2.diag, enc2.proc, enc2.med = (np.pad(a, ((0, 0), (0, 3), (0, 0))) for a in (enc.diag, enc.proc, enc.med))
    loose = (13, tight[1] + 5, tight[2] + 3, tight[3] + 4)
    more = probe(_batch(enc2, ROWS, loose, 20, teacher))     # more visits, codes and padded batch rows
    np.testing.assert_allclose(more["logits"][:12], base["logits"][:12], atol=2e-5)
    np.testing.assert_allclose(more["proj"][:12], base["proj"][:12], atol=2e-5)
    for k in ("loss", "bce", "kd", "align"):
        np.testing.assert_allclose(more[k], base[k], rtol=2e-5)


def test_kd_term_zero_when_projection_equals_teacher(probe, enc, tight, teacher):
    first = probe(_batch(enc, ROWS, tight, 16, teacher))
    again = probe(_batch(enc, ROWS, tight, 16, first["proj"][:12]))
    assert float(again["kd"]) == 0.0 and float(np.abs(again["kd_rows"][:12]).max()) == 0.0
    np.testing.assert_allclose(first["kd_rows"][:12], ((first["proj"][:12] - teacher) ** 2).mean(-1), rtol=1e-5)


def _numpy_align(x, y, valid, tau, paper):
    """Direct loop implementation of the paper's alignment loss / standard symmetric InfoNCE."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    yn = y / np.linalg.norm(y, axis=1, keepdims=True)
    idx = [i for i in range(len(x)) if valid[i]]
    out = np.zeros(len(x))
    if len(idx) < 2:
        return out
    for j in idx:
        s = lambda a, b: float(xn[a] @ yn[b]) / tau  # noqa: E731
        others = [i for i in idx if not (paper and i == j)]
        d1 = sum(np.exp(s(i, j)) for i in others)
        d2 = sum(np.exp(s(j, i)) for i in others)
        out[j] = -np.log(np.exp(s(j, j)) / d1) - np.log(np.exp(s(j, j)) / d2)
    return out


@pytest.mark.parametrize("paper", [False, True])
def test_alignment_loss_matches_numpy(paper):
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    valid = np.array([1, 1, 0, 1, 1, 1], bool)
    got = np.asarray(info_nce(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), jnp.asarray(valid), 0.5, paper))
    np.testing.assert_allclose(got, _numpy_align(x, y, valid, 0.5, paper), rtol=1e-4, atol=1e-5)
    one = np.array([0, 0, 1, 0, 0, 0], bool)      # fewer than 2 samples: the term is skipped
    assert float(np.abs(np.asarray(info_nce(jnp.asarray(x), jnp.asarray(y), jnp.asarray(one)))).max()) == 0.0


def test_total_loss_composition(probe, enc, tight, teacher):
    o = probe(_batch(enc, ROWS, tight, 16, teacher))
    z, yl = o["logits"][:12].astype(np.float64), enc.labels[ROWS].astype(np.float64)
    bce = (np.maximum(z, 0) - z * yl + np.log1p(np.exp(-np.abs(z)))).mean(1)
    kd = ((o["proj"][:12] - teacher) ** 2).mean(1)
    al = _numpy_align(o["x"][:12], o["y"][:12], np.ones(12, bool), LC.tau, paper=True)
    np.testing.assert_allclose(o["bce"], bce.mean(), rtol=1e-5)
    np.testing.assert_allclose(o["kd"], kd.mean(), rtol=1e-5)
    np.testing.assert_allclose(o["align"], al.mean(), rtol=1e-4)
    np.testing.assert_allclose(o["loss"], (bce + LC.alpha * kd + LC.align_weight * al).mean(), rtol=1e-5)
    # no-KD model: no projector at all (no parameters, no optimizer state for it)
    with sharding.use_mesh(None):
        m2 = nnx.eval_shape(lambda: build_student(st.model_config(_cfg(), _toy_vocab(), None), 0))
    assert m2.kd_proj is None


def test_shared_embedding_is_one_table_with_disjoint_rows_per_code_type(data, enc):
    """`model.shared_embedding=True`: one [1 + n_diag + n_proc + n_med, d] table; each code type reads
    its own block of rows (no collisions), padding reads the zero row; kernel and XLA inference agree."""
    v = data.vocab
    shared = st.model_config(_cfg(model=dict(shared_embedding=True)), v, None)
    separate = st.model_config(_cfg(), v, None)
    with sharding.use_mesh(None):
        m, m_sep = build_student(shared, 4), build_student(separate, 4)
    nd, npr, nm, d = len(v.diag), len(v.proc), len(v.med), shared.d
    assert m.diag_emb is None and m.proc_emb is None and m.med_emb is None
    assert m.code_emb.table[...].shape == (1 + nd + npr + nm, d) and m_sep.code_emb is None
    assert [m_sep.diag_emb.table[...].shape[0], m_sep.proc_emb.table[...].shape[0],
            m_sep.med_emb.table[...].shape[0]] == [nd + 1, npr + 1, nm + 1]
    count = lambda model: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(model, nnx.Param)))  # noqa: E731
    assert count(m_sep) - count(m) == 2 * d                    # the same model less two padding rows
    # tag every row with its index: each type's ids 1..n map to a block of rows, the blocks are disjoint
    n_rows = 1 + nd + npr + nm
    m.code_emb.table[...] = jnp.broadcast_to(jnp.arange(n_rows, dtype=jnp.float32)[:, None], (n_rows, d))
    rows = {}
    for name, n in (("diag", nd), ("proc", npr), ("med", nm)):
        got = np.asarray(m.embed(name, jnp.arange(n + 1)))[:, 0].astype(int)
        assert got[0] == 0                                     # padding: the shared zero row
        rows[name] = got[1:]
        np.testing.assert_array_equal(np.asarray(m.stream_table(name))[:, 0].astype(int), got)
    assert rows["diag"].tolist() == list(range(1, nd + 1))
    assert rows["proc"].tolist() == list(range(nd + 1, nd + npr + 1))
    assert rows["med"].tolist() == list(range(nd + npr + 1, n_rows))
    # the kernel reads `stream_table` rows, the XLA paths `embed`: both compute the same function
    tr = st.StudentTrainer(shared, st.loss_config(_cfg(distill=False)), lr=1e-3, seed=5)
    caps = si.bucket_caps(enc.needs, 1)
    assert tr.kernel
    np.testing.assert_allclose(tr.predict(enc, caps, 32), tr.predict(enc, caps, 32, kernel=False), atol=1e-5)


# ---------------------------------------------------------------------------------- training
def _strip(records):
    """metrics.jsonl records without the wall-clock field."""
    return [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in records]


@pytest.fixture(scope="module")
def run_a(prepared_synthetic, store, tmp_path_factory):
    """The reference run: 3 epochs straight through (its trainer's compiled steps are reused below)."""
    out = tmp_path_factory.mktemp("run") / "a"
    cfg = _cfg(data_dir=str(prepared_synthetic), features=str(store), out=str(out))
    return cfg, ts.train(cfg), out


def test_training_cli_is_deterministic_and_writes_predictions(prepared_synthetic, data, store, run_a, tmp_path):
    cfg, res, out_a = run_a
    s1 = res.summary
    assert s1["compile_counts"] == {"train_step": 1, "predict_step": 1}   # 30 steps + 6 eval batches
    assert s1["finished"] and s1["epochs_run"] == 3
    cfg_b = _cfg(data_dir=str(prepared_synthetic), features=str(store), out=str(tmp_path / "b"))
    s2 = ts.train(cfg_b, steps=res.trainer.steps).summary
    assert s2["compile_counts"] == {"train_step": 1, "predict_step": 1}   # second run: nothing recompiled
    m1, m2 = read_jsonl(out_a / "metrics.jsonl"), read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert _strip(m1) == _strip(m2) and len(m1) == cfg.train.epochs + 1
    assert {"train_bce", "train_kd", "train_align", "val_prauc", "val_jaccard"} <= set(m1[0])
    epochs = [r for r in m1 if not r.get("final")]
    assert epochs[-1]["train_kd"] < epochs[0]["train_kd"]        # distillation is being learned
    for split in ("val", "test"):
        p1 = load_npz(out_a / "predictions" / f"{split}.npz")
        p2 = load_npz(tmp_path / "b" / "predictions" / f"{split}.npz")
        np.testing.assert_array_equal(p1["y_prob"], p2["y_prob"])
        assert p1["ids"].tolist() == [s.id for s in data.splits[split]]
        np.testing.assert_array_equal(p1["y_true"], data.labels(data.splits[split]))
        assert p1["y_true"].dtype == np.uint8 and p1["y_prob"].dtype == np.float32
        assert p1["single_visit"].tolist() == [s.single_visit for s in data.splits[split]]
        assert str(p1["data_fingerprint"]) == data.fingerprint()
    run = json.loads((out_a / "run.json").read_text())
    assert run["model"] == "student" and run["data_dir"] == str(prepared_synthetic.resolve())
    config = json.loads((out_a / "config.json").read_text())      # written at start by common.start_run
    assert config["model"]["d"] == 32 and config["train"]["epochs"] == 3
    best = max(r["val_prauc"] for r in m1 if not r.get("final"))
    assert run["val"]["prauc"] == pytest.approx(best)
    card = (out_a / "model_card.md").read_text()                 # written at the end of every run
    test_eval = json.loads((out_a / "eval" / "test.json").read_text())
    assert "Not a clinical device" in card and f"{test_eval['n']} samples" in card
    # the orbax checkpoint holds the best parameters: restoring reproduces the saved test predictions
    tr = st.StudentTrainer(st.model_config(cfg, data.vocab, TEACHER_DIM), st.loss_config(cfg), lr=cfg.train.lr,
                           seed=99, steps=res.trainer.steps)
    meta = st.restore_params(out_a, tr)
    assert meta["best_epoch"] == run["best_epoch"] and meta["model"] == "student" and meta["epochs_done"] == 3
    test_enc = si.encode_samples(data.splits["test"], data.vocab)
    probs = tr.predict(test_enc, [tuple(c) for c in run["buckets"]], cfg.eval.batch_size)
    np.testing.assert_array_equal(probs, load_npz(out_a / "predictions" / "test.npz")["y_prob"])


def test_steps_of_another_structure_are_refused(data, run_a):
    cfg, res, _ = run_a
    with pytest.raises(ValueError, match="built for another model, loss, learning rate"):
        st.StudentTrainer(st.model_config(cfg, data.vocab, TEACHER_DIM), st.loss_config(cfg), lr=1e-3, seed=0,
                          steps=res.trainer.steps)


def test_first_step_alone_then_the_rest_of_its_chunk_equals_the_whole_chunk(data, store, run_a):
    """The CLI runs a run's first optimizer step on its own (to time its end) and the rest of that chunk
    after `after_first_step`: same parameters, optimizer state and loss sums as one dispatch of the chunk."""
    cfg, res, _ = run_a
    encs, _ = ts.load_inputs(cfg, data, FeatureStore(store))
    caps = [tuple(c) for c in res.summary["buckets"]]
    chunk = max(si.chunk_plan(si.assign_buckets(encs["train"].needs, caps), cfg.train.batch_size,
                              cfg.train.steps_per_call, np.random.default_rng(0)), key=lambda c: c.steps)
    assert chunk.steps >= 3
    arrays = si.make_chunk(encs["train"], chunk.rows, caps[chunk.bucket], with_teacher=True)
    trainers = [st.StudentTrainer(st.model_config(cfg, data.vocab, TEACHER_DIM), st.loss_config(cfg),
                                  lr=cfg.train.lr, seed=1, steps=res.trainer.steps) for _ in range(2)]
    whole = trainers[0].train_chunk(arrays, chunk.steps)
    split = [trainers[1].train_chunk(arrays, 1), trainers[1].train_chunk(si.after_first_step(arrays), chunk.steps - 1)]
    assert trainers[0].step == trainers[1].step == chunk.steps
    for a, b in zip(jax.tree.leaves(jax.device_get((trainers[0].params, trainers[0].opt_state))),
                    jax.tree.leaves(jax.device_get((trainers[1].params, trainers[1].opt_state))), strict=True):
        np.testing.assert_array_equal(a, b)
    for name, total in jax.device_get(whole).items():
        np.testing.assert_allclose(sum(float(p[name]) for p in jax.device_get(split)), total, rtol=1e-6)


# ------------------------------------------------------------------------------------------- resume
@pytest.fixture(scope="module")
def interrupted(prepared_synthetic, store, run_a, tmp_path_factory):
    """A copy of the prepared data and a run on it stopped after 2 of 3 epochs (train.stop_after=2)."""
    import shutil
    root = tmp_path_factory.mktemp("resume")
    data_copy = root / "prepared"
    shutil.copytree(prepared_synthetic, data_copy)
    cfg = _cfg(data_dir=str(data_copy), features=str(store), out=str(root / "run"))
    cfg.train.stop_after = 2
    summary = ts.train(cfg, steps=run_a[1].trainer.steps).summary
    return cfg, summary, root / "run"


def test_stopped_run_leaves_a_resumable_folder(interrupted):
    _, summary, out = interrupted
    assert not summary["finished"] and summary["epochs_run"] == 2
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1]
    assert not (out / "predictions").exists()
    assert json.loads((out / "run.json").read_text()) == {"model": "student", "finished": False,
                                                          "data_dir": summary["data_dir"]}


def test_resume_refuses_changed_config_or_data(interrupted, run_a):
    from leader_jax.cli import UserError
    cfg, _, out = interrupted
    changed = _cfg(**{**cfg.to_dict(), "loss": dict(tau=0.5)})
    with pytest.raises(UserError, match=r"cannot resume, the config changed since its checkpoints were written"):
        ts.train(changed)
    stats = Path(cfg.data_dir) / "stats.json"
    original = stats.read_bytes()
    try:
        stats.write_text(json.dumps({**json.loads(original), "note": "edited"}))
        with pytest.raises(UserError, match=r"cannot resume, the prepared data \(another folder, split or seed\) "
                                            r"changed.*--config.train.resume=False"):
            ts.train(cfg)
    finally:
        stats.write_bytes(original)
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1]    # nothing was touched


def test_resume_is_bit_identical_to_an_uninterrupted_run(interrupted, run_a):
    cfg, _, out = interrupted
    _, straight, out_a = run_a
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "step": 30, "train_lo')       # torn last line: a kill while appending
    resumed = _cfg(**cfg.to_dict())
    resumed.train.stop_after = 0
    summary = ts.train(resumed, steps=straight.trainer.steps).summary
    assert summary["finished"] and summary["epochs_run"] == 3
    assert summary["best_epoch"] == straight.summary["best_epoch"]
    assert _strip(read_jsonl(out / "metrics.jsonl")) == _strip(read_jsonl(out_a / "metrics.jsonl"))
    for split in ("val", "test"):
        assert np.array_equal(load_npz(out / "predictions" / f"{split}.npz")["y_prob"],
                              load_npz(out_a / "predictions" / f"{split}.npz")["y_prob"])


def test_resume_false_starts_afresh_in_the_same_folder(interrupted, run_a, tmp_path):
    import shutil
    cfg, _, out = interrupted
    again = tmp_path / "again"
    shutil.copytree(out, again)
    fresh = _cfg(**{**cfg.to_dict(), "out": str(again), "train": dict(resume=False, stop_after=1)})
    ts.train(fresh, steps=run_a[1].trainer.steps)
    assert [r["epoch"] for r in read_jsonl(again / "metrics.jsonl")] == [0]   # the old epochs were replaced
    assert ts.checkpoint_meta(again / "checkpoints")["epochs_done"] == 1


def test_overfits_64_samples(data, enc, store, run_a):
    """Same model/loss/shapes as the CLI run (so the compiled step is reused), 64 training samples."""
    cfg, res, _ = run_a
    rows = np.arange(64)
    sub = si.EncodedSplit(**{k: (v[rows] if isinstance(v, np.ndarray) else v) for k, v in enc.__dict__.items()})
    si.attach_teacher(sub, FeatureStore(store), "train")
    caps = [tuple(c) for c in res.summary["buckets"]]
    tr = st.StudentTrainer(st.model_config(cfg, data.vocab, TEACHER_DIM), st.loss_config(cfg), lr=cfg.train.lr,
                           seed=1, steps=res.trainer.steps)
    buckets = si.assign_buckets(sub.needs, caps)
    for epoch in range(OVERFIT_EPOCHS):
        for c in si.chunk_plan(buckets, cfg.train.batch_size, cfg.train.steps_per_call, np.random.default_rng(epoch)):
            tr.train_chunk(si.make_chunk(sub, c.rows, caps[c.bucket], with_teacher=True), c.steps)
    m = st.split_metrics(sub.labels, tr.predict(sub, caps, cfg.eval.batch_size), 0.5)
    assert m["jaccard"] > 0.9, m
    assert tr.compile_counts() == {"train_step": 1, "predict_step": 1}
    # packed inference (real tokens only) == the bucketed, padded forward pass of the same model
    np.testing.assert_allclose(tr.predict(sub, caps, cfg.eval.batch_size),
                               tr.predict(sub, caps, cfg.eval.batch_size, packed=False), atol=1e-5)


def test_pack_batches_cover_rows_and_budgets(enc):
    caps = si.bucket_caps(enc.needs, 1)
    lay = packing.pack_layout(enc, caps, 16)
    small = packing.PackLayout(batch=16, visit_width=lay.visit_width, visit_rows=3, width=lay.width, rows=(12, 10, 10))
    got = list(packing.pack_batches(enc, small))
    assert np.concatenate([b.rows for b in got]).tolist() == list(range(len(enc)))
    for rows, pb in got:
        assert len(rows) <= 16 and pb["diag_tok"].shape == (12, lay.width[0]) and pb["v_seg"].shape == (3, 10)
        for name in packing.STREAMS:   # every real code of every kept visit is packed exactly once, in order
            want = np.sort(getattr(enc, name)[rows][getattr(enc, name)[rows] > 0])
            np.testing.assert_array_equal(np.sort(pb[f"{name}_tok"][pb[f"{name}_tok"] > 0]), want)
        assert (pb["v_seg"] > 0).sum() == enc.n_visits[rows].sum()
        assert np.bincount(pb["v_pat"][pb["v_seg"] > 0], minlength=len(rows)).tolist() == enc.n_visits[rows].tolist()


def test_pack_flat_covers_every_token_once_within_budgets(enc):
    lay = packing.flat_layout(enc, 16)
    small = packing.FlatLayout(batch=16, visit_width=lay.visit_width, slots=24, tokens=(200, 80, 120))
    got = list(packing.pack_flat(enc, small))
    assert np.concatenate([b.rows for b in got]).tolist() == list(range(len(enc)))
    for rows, pb in got:
        nv = enc.n_visits[rows]
        assert len(rows) <= 16 and nv.sum() <= 24 and pb["v_pat"].shape == (24,)
        assert pb["p_len"][:len(rows)].tolist() == nv.tolist() and not pb["p_len"][len(rows):].any()
        for k, name in enumerate(packing.STREAMS):
            ids = getattr(enc, name)[rows]
            assert (ids > 0).sum() <= small.tokens[k]
            # slot-by-slot: the run start/len of visit j of patient p holds exactly that visit's codes
            for p, r in enumerate(rows):
                for j in range(nv[p]):
                    slot = pb["p_start"][p] + j
                    run = pb[f"{name}_tok"][pb[f"{name}_start"][slot]:][:pb[f"{name}_len"][slot]]
                    assert run.tolist() == [c for c in ids[p, j] if c > 0]
                    assert pb["v_pat"][slot] == p and pb["v_first"][slot] == (j == 0)
                    assert pb["v_age"][slot] == nv[p] - 1 - j
    too_small = packing.FlatLayout(batch=16, visit_width=lay.visit_width, slots=1, tokens=(1, 1, 1))
    with pytest.raises(ValueError, match="sample row 0 needs"):
        next(packing.pack_flat(enc, too_small))


def test_trainer_kernel_switch(enc, data):
    from ml_collections import ConfigDict

    from configs.student import get_config
    from leader_jax.train.common import make_mesh
    cfg = get_config()
    mcfg = st.model_config(cfg, data.vocab, None)
    caps = si.bucket_caps(enc.needs, 2)
    tr = st.StudentTrainer(mcfg, st.loss_config(cfg), lr=1e-3, seed=5)
    assert tr.kernel and tr.kernel_note == ""
    fast = tr.predict(enc, caps, 32)
    np.testing.assert_allclose(fast, tr.predict(enc, caps, 32, kernel=False), atol=1e-5)
    np.testing.assert_allclose(fast, tr.predict(enc, caps, 32, packed=False), atol=1e-5)
    off = st.StudentTrainer(mcfg, st.loss_config(cfg), lr=1e-3, seed=5, inference_kernel="off", steps=tr.steps)
    assert not off.kernel and off.kernel_note == "inference_kernel=off"
    two = make_mesh(ConfigDict(dict(mesh=(2, 1, 1))))
    assert st.resolve_kernel("auto", mcfg, two) == (False, "the mesh has 2 devices (the kernel runs on one CPU device)")
    with pytest.raises(ValueError, match="inference_kernel=on, but the CPU kernel cannot be used: the mesh has 2"):
        st.resolve_kernel("on", mcfg, two)
    with pytest.raises(ValueError, match="inference_kernel must be one of"):
        st.resolve_kernel("fast", mcfg, two)


def test_feature_store_id_mismatch_is_a_clear_error(prepared_synthetic, data, tmp_path):
    from leader_jax.cli import UserError
    path = tmp_path / "partial"
    w = FeatureStoreWriter(path, hidden_dim=4, n_med=data.vocab.n_med, meta={})
    ids = [s.id for s in data.splits["train"]][2:]
    w.write_shard("train", ids, np.zeros((len(ids), 4)), np.zeros((len(ids), data.vocab.n_med)))
    w.finalize()
    missing = [s.id for s in data.splits["train"]][:2]
    with pytest.raises(MissingFeaturesError, match="2 of 3 requested sample ids are missing from split 'train'") as e:
        FeatureStore(path).hidden("train", missing + ids[:1])
    assert e.value.missing == missing
    cfg = _cfg(data_dir=str(prepared_synthetic), features=str(path), out=str(tmp_path / "run"))
    with pytest.raises(UserError, match="2 of 160 requested sample ids are missing") as e:
        ts.main(cfg, [])
    assert all(m in str(e.value) for m in missing)
    other = tmp_path / "other"
    w = FeatureStoreWriter(other, hidden_dim=4, n_med=data.vocab.n_med, meta={"dataset_fingerprint": "f" * 64})
    w.finalize()
    cfg.features = str(other)
    with pytest.raises(UserError, match="extracted from a different prepared dataset"):
        ts.main(cfg, [])
    with pytest.raises(UserError, match="features=STORE is required"):
        ts.main(_cfg(data_dir=str(prepared_synthetic), out=str(tmp_path / "run")), [])
