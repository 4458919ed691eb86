"""LoRA adapters: zero-init no-op, two-step PEFT really sums both deltas, gradients reach exactly the
trainable adapters, merge equality, save/load round trip, HF PEFT export loaded by `peft` on torch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from leader_jax.models import lora
from leader_jax.models.llama import Llama, LlamaConfig, hf_key_to_path

CFG = LlamaConfig.tiny(vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                       num_key_value_heads=2)


def _model(seed=0):
    with nnx.use_eager_sharding(False):
        return Llama(CFG, rngs=nnx.Rngs(seed))


def _ids():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, CFG.vocab_size, size=(2, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


def _randomize_b(model, name, seed, scale=0.3):
    key = jax.random.key(seed)
    for i, (_, lin) in enumerate(lora.iter_projections(model)):
        if name in lin.adapters:
            b = lin.adapters[name].lora_b
            b[...] = scale * jax.random.normal(jax.random.fold_in(key, i), b[...].shape)


def _logits(model):
    ids, mask = _ids()
    out = np.asarray(model(ids, mask))
    return out * np.asarray(mask)[..., None]   # padded positions are garbage by contract


@pytest.fixture(scope="module")
def base_logits():
    return _logits(_model())


def test_fresh_adapter_is_noop_and_targets(base_logits):
    m = _model()
    n = lora.add_adapter(m, "task", "q,v", rank=4, alpha=8, param_type=lora.TaskLoRA)
    assert n == 2 * CFG.num_hidden_layers
    np.testing.assert_array_equal(_logits(m), base_logits)
    a = m.layers[0].self_attn.q_proj.adapters["task"]
    assert a.scale == 2.0 and a.lora_a[...].shape == (32, 4) and a.lora_b[...].shape == (4, 32)
    assert isinstance(a.lora_a, lora.TaskLoRA)
    assert a.lora_a.get_metadata()["out_sharding"] == ("embed", "lora_rank")
    assert "task" not in m.layers[0].self_attn.k_proj.adapters
    with pytest.raises(ValueError, match="unknown LoRA target"):
        lora.add_adapter(m, "x", ["qq"], rank=2, alpha=2)


def test_projection_matches_numpy_two_adapters():
    m = _model()
    lora.add_adapter(m, "domain", lora.ALL_TARGETS, rank=4, alpha=16, param_type=lora.DomainLoRA, seed=1)
    lora.add_adapter(m, "task", lora.ALL_TARGETS, rank=2, alpha=2, param_type=lora.TaskLoRA, seed=2)
    _randomize_b(m, "domain", 3)
    _randomize_b(m, "task", 4)
    lin = m.layers[1].mlp.up_proj
    x = np.random.default_rng(1).normal(size=(3, 32)).astype(np.float32)
    d, t = lin.adapters["domain"], lin.adapters["task"]
    want = (x @ np.asarray(lin.kernel[...]) + 4.0 * x @ np.asarray(d.lora_a[...]) @ np.asarray(d.lora_b[...])
            + 1.0 * x @ np.asarray(t.lora_a[...]) @ np.asarray(t.lora_b[...]))
    np.testing.assert_allclose(np.asarray(lin(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)


def test_two_adapters_are_summed(base_logits):
    """Model with both adapters = base + (domain-only − base) + (task-only − base) to first order is not
    exact (nonlinear), so check per projection linearity and that each adapter changes the output."""
    both, dom, task = _model(), _model(), _model()
    for m in (both, dom):
        lora.add_adapter(m, "domain", lora.ALL_TARGETS, rank=4, alpha=8, param_type=lora.DomainLoRA, seed=1)
        _randomize_b(m, "domain", 3)
    for m in (both, task):
        lora.add_adapter(m, "task", lora.ALL_TARGETS, rank=4, alpha=8, param_type=lora.TaskLoRA, seed=2)
        _randomize_b(m, "task", 4)
    lb, ld, lt = _logits(both), _logits(dom), _logits(task)
    for other in (base_logits, ld, lt):
        assert np.abs(lb - other).max() > 1e-3          # each adapter really is in the forward pass
    # merging the domain adapter into the base of `both` changes nothing (the deltas are summed on the base)
    lora.merge_adapter(both, "domain")
    np.testing.assert_allclose(_logits(both), lb, rtol=1e-5, atol=1e-5)
    # ... and the same task adapter put on the domain-merged base of `dom` reproduces the two-adapter model
    lora.merge_adapter(dom, "domain")
    np.testing.assert_allclose(_logits(dom), ld, rtol=1e-5, atol=1e-5)
    lora.add_adapter(dom, "task", lora.ALL_TARGETS, rank=4, alpha=8, param_type=lora.TaskLoRA, seed=2)
    _randomize_b(dom, "task", 4)
    np.testing.assert_allclose(_logits(dom), lb, rtol=1e-5, atol=1e-5)
    # perturbing only the task adapter changes the output of the two-adapter model
    _randomize_b(both, "task", 9)
    assert np.abs(_logits(both) - lb).max() > 1e-3


def test_gradients_reach_exactly_the_trainable_adapters():
    m = _model()
    lora.add_adapter(m, "domain", lora.ALL_TARGETS, rank=4, alpha=8, param_type=lora.DomainLoRA, seed=1)
    lora.add_adapter(m, "task", lora.ALL_TARGETS, rank=4, alpha=8, param_type=lora.TaskLoRA, seed=2)
    _randomize_b(m, "domain", 3)
    _randomize_b(m, "task", 4)
    ids, mask = _ids()

    def loss(model):
        return jnp.mean(model(ids, mask) ** 2)

    for trainable in (lora.TaskLoRA, nnx.Any(lora.TaskLoRA, lora.DomainLoRA)):
        grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, trainable)))(m)
        leaves = jax.tree_util.tree_leaves_with_path(grads)
        kinds = {type(v).__name__ for v in jax.tree.leaves(grads, is_leaf=lambda x: isinstance(x, nnx.Variable))}
        want = {"TaskLoRA"} if trainable is lora.TaskLoRA else {"TaskLoRA", "DomainLoRA"}
        assert kinds == want
        n_expected = 2 * 7 * CFG.num_hidden_layers * len(want)
        assert len(leaves) == n_expected
        assert all(float(jnp.abs(g).max()) > 0 for _, g in leaves)   # every trainable leaf gets signal
    # one SGD step through nnx.Optimizer(wrt=TaskLoRA): base and domain adapter bit-identical
    import optax
    before = jax.tree.map(np.asarray, nnx.state(m))
    opt = nnx.Optimizer(m, optax.sgd(0.1), wrt=lora.TaskLoRA)
    opt.update(m, nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, lora.TaskLoRA)))(m))
    after = nnx.state(m)
    for (path, old), (_, new) in zip(jax.tree_util.tree_leaves_with_path(before),
                                     jax.tree_util.tree_leaves_with_path(after)):
        changed = not np.array_equal(old, np.asarray(new))
        assert changed == ("task" in jax.tree_util.keystr(path)), jax.tree_util.keystr(path)


def test_merge_equals_unmerged_and_dropout():
    m = _model()
    lora.add_adapter(m, "task", lora.ALL_TARGETS, rank=4, alpha=32, dropout=0.5, seed=5)
    _randomize_b(m, "task", 6)
    lora.set_deterministic(m, True)
    unmerged = _logits(m)
    lora.set_deterministic(m, False)
    assert np.abs(_logits(m) - unmerged).max() > 1e-4   # dropout active in training mode
    lora.set_deterministic(m, True)
    lora.merge_adapter(m, "task")
    assert lora.adapter_names(m) == []
    np.testing.assert_allclose(_logits(m), unmerged, rtol=1e-5, atol=1e-5)


def test_save_load_roundtrip(tmp_path):
    m = _model()
    lora.add_adapter(m, "domain", "q,k,v,o", rank=4, alpha=8, param_type=lora.DomainLoRA, seed=1)
    _randomize_b(m, "domain", 3)
    want = _logits(m)
    lora.save_adapter(m, "domain", tmp_path / "dom")
    fresh = _model()
    name = lora.load_adapter(fresh, tmp_path / "dom")
    assert name == "domain"
    assert isinstance(fresh.layers[0].self_attn.q_proj.adapters["domain"].lora_a, lora.DomainLoRA)
    np.testing.assert_array_equal(_logits(fresh), want)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora.load_adapter(_model(), tmp_path / "missing")


def _copy_torch_weights(torch_model, model):
    state = nnx.state(model)
    flat = dict(nnx.to_flat_state(state))
    for key, tensor in torch_model.state_dict().items():
        mapped = hf_key_to_path(key, CFG)
        if mapped is None:
            continue
        path, _, transpose = mapped
        arr = tensor.detach().numpy()
        flat[path][...] = jnp.asarray(arr.T if transpose else arr)


def test_peft_export_loads_in_peft(tmp_path):
    import torch
    import transformers
    import peft
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in CFG.to_hf_dict().items()
                                         if k not in ("architectures", "dtype")})
    tm = transformers.LlamaForCausalLM(hf_cfg).eval()
    tm.save_pretrained(tmp_path / "base")
    m = _model()
    _copy_torch_weights(tm, m)
    lora.add_adapter(m, "task", lora.ALL_TARGETS, rank=4, alpha=32, dropout=0.1, seed=7)
    _randomize_b(m, "task", 8, scale=0.2)
    lora.set_deterministic(m, True)
    lora.save_adapter(m, "task", tmp_path / "peft", base_model_name_or_path=str(tmp_path / "base"))
    ids, mask = _ids()
    pm = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                                        tmp_path / "peft").eval()
    with torch.no_grad():
        got = pm(input_ids=torch.tensor(np.asarray(ids), dtype=torch.long),
                 attention_mask=torch.tensor(np.asarray(mask))).logits.numpy()
        base = tm(input_ids=torch.tensor(np.asarray(ids), dtype=torch.long),
                  attention_mask=torch.tensor(np.asarray(mask))).logits.numpy()
    mk = np.asarray(mask)[..., None]
    ours = np.asarray(m(ids, mask)) * mk
    assert np.abs(got * mk - base * mk).max() > 1e-3      # the adapter really is applied by peft
    np.testing.assert_allclose(got * mk, ours, rtol=1e-4, atol=1e-4)
    # and back: the PEFT-saved adapter imports into JAX with the same outputs
    pm.save_pretrained(tmp_path / "peft2")
    m2 = _model()
    _copy_torch_weights(tm, m2)
    lora.load_adapter(m2, tmp_path / "peft2", name="task", param_type="task")
    lora.set_deterministic(m2, True)
    np.testing.assert_allclose(np.asarray(m2(ids, mask)) * mk, ours, rtol=1e-5, atol=1e-5)
