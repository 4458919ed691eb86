"""`python -m leader_jax.train.extract_features`: store over every split, interrupted extraction resumes to the
same bytes, manifest fingerprints, values equal to an eager teacher forward, missing ids are named."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from leader_jax.feature_store import FeatureStore, MissingFeaturesError


@pytest.fixture(scope="module")
def teacher_run(tiny_teacher_run, prepared_synthetic, tmp_path_factory):
    """(folder for this module's stores, the teacher run folder, the prepared data). The teacher is the
    session's shared tiny run (conftest `tiny_teacher_run`: head_norm, mesh (2,2,2), 10 steps, validation
    every 5 steps, validation predictions), read only."""
    from leader_jax.data.dataset import PreparedData

    _, run, _ = tiny_teacher_run
    return tmp_path_factory.mktemp("features"), run, PreparedData.load(prepared_synthetic)


def _cfg(run, out, **kw):
    from configs.extract_features import get_config

    c = get_config()
    c.run_dir, c.out = str(run), str(out)
    c.batch_size, c.shard_size = 8, 16
    c.mesh = (2, 2, 2)
    c.update(kw)
    return c


@pytest.fixture(scope="module")
def stores(teacher_run):
    from leader_jax.train.extract_features import extract

    root, run, _ = teacher_run
    first = extract(_cfg(run, root / "resumed", stop_after_shards=3))
    with pytest.raises(ValueError, match="incomplete"):
        FeatureStore(root / "resumed")
    second = extract(_cfg(run, root / "resumed"))
    straight = extract(_cfg(run, root / "straight"))
    return root, first, second, straight


def test_store_covers_every_split_and_resumes(stores, teacher_run):
    root, first, second, straight = stores
    _, run, data = teacher_run
    assert first["interrupted"] and not second["interrupted"]
    assert second["counts"]["train"]["skipped_done"] == 48          # 3 shards of 16 kept from the first run
    s, t = FeatureStore(root / "resumed"), FeatureStore(root / "straight")
    for split in ("train", "val", "test"):
        ids = [x.id for x in data.splits[split]]
        assert sorted(s.ids(split)) == sorted(ids)
        h = s.hidden(split, ids)
        assert h.dtype == np.float16 and h.shape == (len(ids), 32) and np.isfinite(h).all()
        np.testing.assert_array_equal(h, t.hidden(split, ids))
        np.testing.assert_array_equal(s.probs(split, ids), t.probs(split, ids))
    m = s.manifest
    assert m["meta"]["dataset_fingerprint"] == data.fingerprint()
    best_step = json.loads((run / "run.json").read_text())["best_step"]
    assert best_step in (5, 10) and m["meta"]["teacher_checkpoint"]["step"] == best_step
    assert len(m["meta"]["teacher_checkpoint"]["params_sha256"]) == 64
    assert m["meta"]["pooling"] == "final-norm hidden state at the EOS (last real token)"   # the tiny teacher's
    assert m["hidden_dim"] == 32 and m["n_med"] == data.vocab.n_med


def test_store_matches_teacher_outputs(stores, teacher_run):
    """probs equal the teacher's own validation predictions; hidden equals an eager forward."""
    from leader_jax.io import load_npz
    from leader_jax.train.extract_features import load_teacher_run
    from leader_jax.train import common, text_batches as tdata
    from leader_jax.train.teacher import build_teacher, encode_split, tokenizer_path
    from leader_jax.train.engine import _abstract
    from flax import nnx

    root, *_ = stores
    _, run, data = teacher_run
    store = FeatureStore(root / "resumed")
    pred = load_npz(run / "predictions" / "val.npz")
    np.testing.assert_allclose(store.probs("val", pred["ids"].tolist()), pred["y_prob"], rtol=1e-5, atol=1e-6)
    # eager forward of the restored teacher on two validation samples, no jit, no sharding
    tcfg, ckpt, info = load_teacher_run(run, "best", (1, 1, 1))
    mesh = common.make_mesh(tcfg)
    teacher = build_teacher(tcfg, data.vocab.n_med, mesh)
    from leader_jax.models import lora
    from leader_jax.models.teacher import HeadParam
    filt = nnx.Any(HeadParam, lora.TaskLoRA)
    graphdef, trainable, rest = nnx.split(teacher, filt, ...)
    restored, _, _ = ckpt.restore(info["step"], _abstract(trainable))
    teacher = nnx.merge(graphdef, restored, rest)
    lora.set_deterministic(teacher, True)
    tok = common.load_tokenizer(tokenizer_path(tcfg))
    enc = encode_split(tcfg, data, "val", tok, tdata.SpecialIds.from_tokenizer(tok), training=False).subset([0, 1])
    logits, pooled = teacher(jnp.asarray(enc.ids), jnp.asarray(enc.mask()))
    np.testing.assert_allclose(store.hidden("val", enc.sample_ids).astype(np.float32),
                               np.asarray(pooled), rtol=2e-3, atol=2e-3)   # float16 storage


def test_missing_ids_named(stores):
    root, *_ = stores
    store = FeatureStore(root / "resumed")
    with pytest.raises(MissingFeaturesError, match="no-such-id"):
        store.hidden("train", [store.ids("train")[0], "no-such-id"])


def test_cli_errors(tmp_path):
    from leader_jax.cli import UserError
    from leader_jax.train.extract_features import extract

    with pytest.raises(UserError, match="config.json not found"):
        extract(_cfg(tmp_path, tmp_path / "f"))
