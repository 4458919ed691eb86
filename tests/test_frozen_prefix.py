"""Upper-layer LoRA on cached lower-layer activations (`models.frozen_prefix`): the same loss and the same
gradients on the trained adapters + head as the full model (stage 2 and stage 1 losses, 1e-5), a frozen
domain adapter in the cached layers included; the ragged host cache computes a row on first use and
returns each row's activations."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from leader_jax.models import frozen_prefix as fp, lora
from leader_jax.models.llama import LlamaConfig, init_model
from leader_jax.models.teacher import HeadParam, Teacher, bce_loss

K = 2


def _randomize(model, ptype, seed):
    """Non-zero adapters (a fresh LoRA B is zero), so the gradients flow through every adapter factor."""
    st = nnx.state(model, ptype)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(st))))
    nnx.update(model, jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape, x.dtype), st))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    lengths = np.array([24, 7, 16, 3])
    ids = rng.integers(4, 128, size=(4, 24)).astype(np.int32)
    mask = (np.arange(24)[None] < lengths[:, None]).astype(np.int32)
    labels = (rng.random((4, 6)) < 0.3).astype(np.uint8)
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "labels": jnp.asarray(labels)}


def _llama():
    m = init_model(LlamaConfig.tiny(num_hidden_layers=4), seed=0)
    lora.add_adapter(m, "domain", "q,v", rank=4, alpha=8.0, param_type=lora.DomainLoRA, seed=1)   # all layers
    return m


def _teacher(llama, **kw):
    with nnx.use_eager_sharding(False):
        return Teacher(llama, 6, rngs=nnx.Rngs(4), **kw)


def _loss_and_grads(model, wrt, loss_fn, batch):
    graphdef, trainable, rest = nnx.split(model, wrt, ...)

    def f(tr):
        return loss_fn(nnx.merge(graphdef, tr, rest), batch)[0]

    loss, g = jax.jit(jax.value_and_grad(f))(trainable)
    return float(loss), jax.tree.leaves(g)


def test_teacher_upper_loss_and_grads_equal_the_full_model(batch):
    llama = _llama()
    _randomize(llama, lora.DomainLoRA, 2)
    n = lora.add_adapter(llama, "task", lora.ALL_TARGETS, rank=4, alpha=8.0, param_type=lora.TaskLoRA, seed=3,
                         layers=range(K, 4))
    assert n == 7 * (4 - K) and lora.adapter_config(llama, "task")["layers"] == [2, 3]
    teacher = _teacher(llama, head_norm=True)
    _randomize(teacher, lora.TaskLoRA, 5)
    wrt = nnx.Any(HeadParam, lora.TaskLoRA)

    def full(model, b):
        logits, _ = model(b["input_ids"], b["attention_mask"])
        return bce_loss(logits, b["labels"]), {}

    hidden = nnx.jit(fp.PrefixFn(K))(teacher, batch)
    cached = {**batch, "hidden": hidden}
    l1, g1 = _loss_and_grads(teacher, wrt, full, batch)
    l2, g2 = _loss_and_grads(teacher, wrt, fp.UpperLoss(K), cached)
    assert l1 == pytest.approx(l2, abs=1e-5) and len(g1) == len(g2) == 2 * 7 * (4 - K) + 4
    # every adapter factor, the head and its bias get a gradient (the fixed head statistics do not)
    assert sum(float(jnp.abs(a).max()) > 0 for a in g1) == len(g1) - 2
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)
    # predictions too
    p_full = nnx.jit(lambda t, b: jax.nn.sigmoid(t(b["input_ids"], b["attention_mask"])[0]))(teacher, batch)
    np.testing.assert_allclose(nnx.jit(fp.UpperPredict(K))(teacher, cached)[0], p_full, atol=1e-5)


def test_stage1_upper_lm_loss_and_grads_equal_the_full_model(batch):
    m = init_model(LlamaConfig.tiny(num_hidden_layers=4), seed=0)
    lora.add_adapter(m, "domain", "q,v", rank=4, alpha=8.0, param_type=lora.DomainLoRA, seed=1, layers=[2, 3])
    _randomize(m, lora.DomainLoRA, 2)
    from leader_jax.train.pretrain import lm_loss, lm_nll

    b = {k: batch[k] for k in ("input_ids", "attention_mask")}
    cached = {**b, "hidden": nnx.jit(fp.PrefixFn(K))(m, b)}
    l1, g1 = _loss_and_grads(m, lora.DomainLoRA, lm_loss, b)
    l2, g2 = _loss_and_grads(m, lora.DomainLoRA, fp.UpperLMLoss(K), cached)
    assert l1 == pytest.approx(l2, abs=1e-5)
    for a, c in zip(g1, g2):
        np.testing.assert_allclose(c, a, atol=1e-5, rtol=1e-5)
    for a, c in zip(nnx.jit(lm_nll)(m, b), nnx.jit(fp.UpperLMNll(K))(m, cached)):
        np.testing.assert_allclose(c, a, rtol=1e-5)


def test_prefix_cache_rows_round_trip(batch):
    from leader_jax.train.engine import Engine
    from leader_jax.train.text_batches import Encoded
    from leader_jax.sharding import make_mesh

    llama = _llama()
    lora.add_adapter(llama, "task", "q", rank=2, alpha=4.0, param_type=lora.TaskLoRA, layers=[3])
    teacher = _teacher(llama)
    lengths = np.asarray(batch["attention_mask"]).sum(1)
    enc = Encoded(ids=np.asarray(batch["input_ids"]), lengths=lengths.astype(np.int32), sample_ids=list("abcd"),
                  labels=np.asarray(batch["labels"]), single_visit=np.zeros(4, bool))
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    eng = Engine(teacher, nnx.Any(HeadParam, lora.TaskLoRA), optax.identity(), mesh, fp.UpperLoss(K))
    cache = fp.PrefixCache(eng, enc, K, 2, buckets=(8, 16))
    assert cache.flat.shape == (int(lengths.sum()), 64) and not cache.have.any()
    want = np.asarray(nnx.jit(fp.PrefixFn(K))(teacher, batch))
    part = cache.rows(np.array([2, 1]), 16)                   # computed on first use, only those rows
    assert cache.have.tolist() == [False, True, True, False]
    np.testing.assert_allclose(part[0, :16], want[2, :16], atol=1e-5)
    got = cache.rows(np.arange(4), 24)
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(got[i, :n], want[i, :n], atol=1e-5)
        assert not got[i, n:].any()
