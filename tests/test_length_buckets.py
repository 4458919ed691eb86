"""Length buckets: the training stream is a pure function of the step and covers every sample once per
epoch; evaluation plans cover every row once; a two-bucket teacher run compiles one train step per bucket,
pads less than the fixed-length path and reports it in summary.json; bucketed predictions and losses equal
the padded path's (1e-5)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leader_jax.train import length_buckets as lb
from test_teacher import make_cfg, setup  # noqa: F401  (module fixture reused)


def test_bucket_set_and_index():
    assert lb.bucket_set((64, 128, 512, 0), 192) == (64, 128, 192)
    assert lb.bucket_set((), 50) == (50,)
    np.testing.assert_array_equal(lb.bucket_index(np.array([1, 64, 65, 192]), (64, 128, 192)), [0, 0, 1, 2])
    with pytest.raises(ValueError, match="exceeds"):
        lb.bucket_index(np.array([193]), (64, 128, 192))
    with pytest.raises(ValueError, match="data.length_buckets"):
        lb.validate_buckets("data.length_buckets", (64, -1))


def test_stream_is_a_pure_function_of_the_step_and_covers_each_epoch():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 300, size=103)
    buckets = lb.bucket_set((32, 64, 128), 300)
    a, b = lb.BucketedStream(lengths, buckets, 8, seed=5), lb.BucketedStream(lengths, buckets, 8, seed=5)
    k = a.groups_per_epoch
    assert k == 13                                   # 103 rows -> 12 full groups + one completed remainder
    seen = []
    for step in range(k):
        rows, t = a.step_rows(step)
        assert len(rows) == 8 and t in buckets and lengths[rows].max() <= t
        seen.append(rows)
    for step in reversed(range(2 * k)):              # any order, another object: the same groups
        np.testing.assert_array_equal(b.step_rows(step)[0], a.step_rows(step)[0])
    counts = np.bincount(np.concatenate(seen), minlength=len(lengths))
    assert counts.min() == 1 and counts.sum() == 13 * 8 and (counts > 1).sum() == 13 * 8 - 103
    assert not np.array_equal(a.step_rows(0)[0], a.step_rows(k)[0])   # epochs are reshuffled


def test_eval_plan_covers_rows_once_and_pads_less():
    lengths = np.array([5, 300, 17, 60, 61, 2, 128, 9, 33])
    plan = lb.eval_plan(lengths, 4, (64, 128, 512))
    rows = np.concatenate([r for r, _ in plan])
    assert sorted(rows.tolist()) == list(range(len(lengths)))
    assert [t for _, t in plan] == [64, 128, 512]
    st = lb.PadStats()
    for r, t in plan:
        st.add(int(lengths[r].sum()), 4, t)
    assert st.computed_tokens == 4 * (64 + 128 + 512) and st.pad_fraction == pytest.approx(1 - 615 / 2816)


@pytest.fixture(scope="module")
def bucketed(setup):  # noqa: F811
    """A teacher config whose training prompts fall in two buckets (the median length splits them)."""
    from leader_jax.data.dataset import PreparedData
    from leader_jax.train import common, text_batches as tdata
    from leader_jax.train.teacher import encode_split

    cfg = make_cfg(setup, "bucketed", (1, 1, 1))
    prepared = PreparedData.load(cfg.data_dir)
    tok = common.load_tokenizer(cfg.tokenizer)
    special = tdata.SpecialIds.from_tokenizer(tok)
    enc = {s: encode_split(cfg, prepared, s, tok, special) for s in ("train", "val")}
    cfg.data.length_buckets = (int(np.median(enc["train"].lengths)),)
    return cfg, enc


def test_two_bucket_run_reports_compiles_and_padding(bucketed):
    from leader_jax.train.teacher import train

    cfg, enc = bucketed
    cfg.train.steps, cfg.train.accum, cfg.train.eval_every, cfg.train.ckpt_every = 6, 1, 3, 6
    cfg.eval.splits = ("val",)
    train(cfg)
    s = json.loads((__import__("pathlib").Path(cfg.out) / "summary.json").read_text())
    train_buckets = lb.bucket_set(cfg.data.length_buckets, cfg.data.max_len)
    stream = lb.BucketedStream(enc["train"].lengths, train_buckets, cfg.train.micro_batch, cfg.seed)
    used = {stream.step_rows(i)[1] for i in range(6)}
    assert len(used) == 2 and s["length_buckets"]["train"] == list(train_buckets)
    assert s["compiles"]["train"] == 2                 # one compiled train step per bucket
    eval_lengths = {t for _, t in lb.eval_plan(enc["val"].lengths, cfg.eval.batch_size,
                                               lb.bucket_set(cfg.data.length_buckets, cfg.data.eval_max_len))}
    assert s["compiles"]["predict"] == len(eval_lengths)
    real = sum(int(enc["train"].lengths[stream.step_rows(i)[0]].sum()) for i in range(6))
    assert s["padding"]["train"]["real_tokens"] == real
    padded_fraction = 1 - real / (6 * cfg.train.micro_batch * cfg.data.max_len)
    assert s["padding"]["train"]["pad_fraction"] < padded_fraction - 0.1
    assert 0 <= s["padding"]["eval"]["pad_fraction"] < 1


def test_bucketed_predictions_and_loss_equal_the_padded_path(bucketed):
    import optax
    from flax import nnx

    from leader_jax.train import common, loop
    from leader_jax.train.engine import Engine
    from leader_jax.train.teacher import build_teacher, teacher_loss, teacher_predict, trainable_filter

    cfg, enc = bucketed
    mesh = common.make_mesh(cfg)
    n_med = enc["val"].labels.shape[1]
    eng = Engine(build_teacher(cfg, n_med, mesh), trainable_filter(cfg), optax.identity(), mesh, teacher_loss,
                 predict_fn=teacher_predict)
    # a non-zero task adapter, so the comparison covers it
    eng.trainable = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape, x.dtype),
                                 eng.trainable)
    padded = loop.gather(eng, enc["val"], 8)
    st = lb.PadStats()
    bucketed_out = loop.gather(eng, enc["val"], 8, buckets=cfg.data.length_buckets, stats=st)
    for a, b in zip(padded, bucketed_out):   # fp32 sums over other shapes: 2e-5 of the outputs' scale
        np.testing.assert_allclose(b, a, rtol=0, atol=2e-5 * max(1.0, float(np.abs(a).max())))
    assert st.pad_fraction < 1 - enc["val"].lengths.sum() / (len(enc["val"]) * cfg.data.eval_max_len)
    # one training batch: loss padded to its bucket vs to max_len
    rows = np.argsort(enc["train"].lengths)[:8]
    t = int(enc["train"].lengths[rows].max())
    model = eng.model()
    jit_loss = nnx.jit(lambda m, b: teacher_loss(m, b)[0])   # one compile per width (eager: one per op)

    def loss(width):
        ids = enc["train"].ids[rows][:, :width]
        mask = (np.arange(width)[None] < enc["train"].lengths[rows][:, None]).astype(np.int32)
        return float(jit_loss(model, {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
                                      "labels": jnp.asarray(enc["train"].labels[rows])}))

    assert loss(t) == pytest.approx(loss(cfg.data.max_len), abs=1e-5)
