"""Mesh construction, the logical-axis rules table, and sharded LLaMA forward passes on 8 virtual CPU
devices: meshes (1,1,1), (2,2,2), (1,8,1), (1,1,8) give the single-device logits, and every parameter is
laid out as the rules say (spec and per-device shard shape asserted)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P
from transformers import LlamaConfig as HFConfig
from transformers import LlamaForCausalLM

from leader_jax import sharding as shd
from leader_jax.models.llama import LlamaConfig, init_model, load_hf

# expected layout under LOGICAL_AXIS_RULES, written out by hand: parameter leaf -> mesh axis per dim
EXPECTED = {
    "embedding": ("tensor", "fsdp"),   # (vocab, embed)
    "q_proj": ("fsdp", "tensor"), "k_proj": ("fsdp", "tensor"), "v_proj": ("fsdp", "tensor"),
    "o_proj": ("tensor", "fsdp"),      # (heads, embed)
    "gate_proj": ("fsdp", "tensor"), "up_proj": ("fsdp", "tensor"),
    "down_proj": ("tensor", "fsdp"),   # (mlp, embed)
    "lm_head": ("fsdp", "tensor"),     # (embed, vocab)
    "weight": (None,),                 # RMSNorm scales replicated
}


def test_mesh_shapes_and_axis_types():
    assert jax.device_count() == 8, "conftest must provide 8 virtual CPU devices"
    m = shd.make_mesh((2, -1, 1))
    assert dict(m.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert m.axis_names == ("data", "fsdp", "tensor")
    assert tuple(m.axis_types) == (jax.sharding.AxisType.Auto,) * 3
    assert shd.resolve_shape((1, 1, -1), 8) == (1, 1, 8)
    assert shd.MeshConfig((-1, 2, 2)).resolve(8) == (2, 2, 2)
    with pytest.raises(ValueError, match="needs 4 devices"):
        shd.resolve_shape((2, 2, 1), 8)
    with pytest.raises(ValueError, match="not divisible"):
        shd.resolve_shape((3, -1, 1), 8)
    with pytest.raises(ValueError, match="at most one -1"):
        shd.resolve_shape((-1, -1, 1), 8)


def test_logical_to_mesh():
    assert shd.logical_to_mesh(("batch", "length", "act_embed")) == P(("data", "fsdp"), None, None)
    assert shd.logical_to_mesh(("embed", "mlp")) == P("fsdp", "tensor")
    assert shd.logical_to_mesh(("heads", "kv_heads")) == P("tensor", None)  # a mesh axis is used once
    custom = (("embed", None), ("mlp", ("fsdp", "tensor")))
    assert shd.logical_to_mesh(("embed", "mlp"), rules=custom) == P(None, ("fsdp", "tensor"))
    with pytest.raises(KeyError, match="nonexistent"):
        shd.logical_to_mesh(("nonexistent",))
    mesh = shd.make_mesh((2, 2, 2))
    assert shd.batch_sharding(mesh).spec == P(("data", "fsdp"), None)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = HFConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    d = tmp_path_factory.mktemp("hf")
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def _batch():
    rs = np.random.RandomState(0)
    lengths = np.array([8, 5, 2, 8, 7, 1, 3, 6])
    mask = (np.arange(8)[None] < lengths[:, None]).astype(np.int32)
    return rs.randint(1, 128, (8, 8)).astype(np.int32) * mask, mask


@pytest.fixture(scope="module")
def reference(hf_dir):
    _, model = load_hf(hf_dir)
    ids, mask = _batch()
    return np.asarray(nnx.jit(lambda m, i, a: m(i, a))(model, jnp.asarray(ids), jnp.asarray(mask)))


def _check_layout(model, mesh):
    n_checked = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        arr = var.get_value()
        key = path[-2] if path[-1] == "kernel" else path[-1]
        axes = EXPECTED[key]
        assert arr.sharding.spec == P(*axes), (path, arr.sharding.spec)
        shard = tuple(dim // (mesh.shape[a] if a else 1) for dim, a in zip(arr.shape, axes))
        assert arr.addressable_shards[0].data.shape == shard, path
        assert len(arr.sharding.device_set) == 8 or mesh.size == 1
        n_checked += 1
    assert n_checked == 1 + 2 * 9 + 1 + 1  # embedding, 2 layers x (7 kernels + 2 norms), norm, lm_head


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 2, 2), (1, 8, 1), (1, 1, 8)])
def test_sharded_forward_matches_single_device(hf_dir, reference, shape):
    mesh = shd.make_mesh(shape, devices=jax.devices()[: int(np.prod(shape))])
    _, model = load_hf(hf_dir, mesh=mesh)
    _check_layout(model, mesh)
    ids, mask = _batch()
    with shd.use_mesh(mesh):
        ids_s, mask_s = shd.shard_batch(ids, mesh), shd.shard_batch(mask, mesh)
        assert ids_s.sharding.spec == P(("data", "fsdp"), None)
        out = nnx.jit(lambda m, i, a: m(i, a))(model, ids_s, mask_s)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out)[valid], reference[valid], atol=1e-5, rtol=0)


def test_init_model_sharded_and_state_shardings():
    mesh = shd.make_mesh((1, 2, 4))
    cfg = LlamaConfig.tiny(tie_word_embeddings=True)
    model = init_model(cfg, seed=3, mesh=mesh)
    plain = init_model(cfg, seed=3)  # same seed, single device: same values (jit vs eager: 1 ulp)
    np.testing.assert_allclose(np.asarray(model.layers[1].mlp.up_proj.kernel[...]),
                               np.asarray(plain.layers[1].mlp.up_proj.kernel[...]), rtol=1e-6, atol=0)
    w = np.asarray(plain.layers[0].self_attn.q_proj.kernel[...])
    assert abs(w.std() - cfg.initializer_range) < 0.003 and np.all(np.asarray(plain.norm.weight[...]) == 1)
    sh = shd.state_shardings(model, mesh)
    for (path, s), (_, var) in zip(nnx.to_flat_state(sh), nnx.to_flat_state(nnx.state(model))):
        assert var.get_value().sharding == s, path
    assert model.embed_tokens.embedding[...].sharding.spec == P("tensor", "fsdp")


def test_batch_layout_follows_rules_table(monkeypatch):
    """Editing the one "batch" entry of LOGICAL_AXIS_RULES changes the batch layout of a real compiled train
    step (nothing re-derives it by hand), and the batch-size check follows it."""
    import optax
    from leader_jax.train.engine import Engine, place, stacked_batch_sharding

    mesh = shd.make_mesh((2, 4, 1))
    assert stacked_batch_sharding(mesh, 3).spec == P(None, ("data", "fsdp"), None)
    assert shd.batch_parallelism(mesh) == 8
    with pytest.raises(ValueError, match="micro_batch=6 must be a multiple of the batch parallelism 8"):
        shd.check_batch_size("micro_batch", 6, mesh)

    def compiled_batch_spec():
        model = place(nnx.Linear(4, 2, rngs=nnx.Rngs(0)), mesh)

        def loss_fn(m, b):
            return jnp.mean((m(b["x"]) - b["y"]) ** 2), {}

        eng = Engine(model, nnx.Param, optax.sgd(0.1), mesh, loss_fn)
        sh = stacked_batch_sharding(mesh, 3)
        batch = {"x": jax.device_put(np.ones((1, 8, 4), np.float32), sh),
                 "y": jax.device_put(np.zeros((1, 8, 2), np.float32), sh)}
        loss = eng.train_step(batch)["loss"]
        assert np.isfinite(loss)
        fn = eng._build_train(batch)
        args = (eng.trainable, eng.opt_state, getattr(eng, "rng_keys", getattr(eng, "keys", None)), eng.frozen,
                batch, jnp.asarray(0, jnp.int32))
        with jax.set_mesh(mesh):
            in_sh = fn.lower(*args).compile().input_shardings[0]
        return in_sh[4]["x"].spec

    assert compiled_batch_spec() == P(None, ("data", "fsdp"), None)
    rules = tuple((k, "data") if k == "batch" else (k, v) for k, v in shd.LOGICAL_AXIS_RULES)
    monkeypatch.setattr(shd, "LOGICAL_AXIS_RULES", rules)
    assert stacked_batch_sharding(mesh, 3).spec == P(None, "data", None)
    assert shd.batch_sharding(mesh, 2).spec == P("data", None)
    assert shd.batch_parallelism(mesh) == 2
    shd.check_batch_size("micro_batch", 6, mesh)       # a multiple of 2 is now fine
    assert compiled_batch_spec() == P(None, "data", None)


def test_indivisible_dim_warns_once(caplog):
    """A dim that a mesh axis does not divide falls back to replication with one warning naming it."""
    mesh = shd.make_mesh((1, 8, 1))
    caplog.set_level("WARNING", logger="leader_jax.sharding")
    spec = shd._fit_spec(P("fsdp", None), (12, 3), mesh, "parameter ('embed', None) of shape (12, 3)")
    assert spec == P(None, None)
    shd._fit_spec(P("fsdp", None), (12, 3), mesh, "parameter ('embed', None) of shape (12, 3)")
    msgs = [r.getMessage() for r in caplog.records if "not divisible" in r.getMessage()]
    assert len(msgs) == 1 and "('embed', None) of shape (12, 3)" in msgs[0] and "'fsdp'" in msgs[0]
    assert shd._fit_spec(P("fsdp", None), (16, 3), mesh) == P("fsdp", None)
