"""Parity of leader_jax.models.llama with transformers' LlamaForCausalLM / LlamaForSequenceClassification
(torch, CPU, fp32) on tiny random configs: MHA, GQA + llama3 rope scaling, tied embeddings, right padding;
gradients vs torch autograd; scan/remat equivalence; the Linear.adapters contract."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import LlamaConfig as HFConfig
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

from leader_jax.models.llama import LlamaConfig, Linear, load_hf, pool_last

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
CASES = {
    "mha": dict(num_key_value_heads=4),
    "gqa_llama3": dict(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE),
    "tied": dict(num_key_value_heads=2, tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                                    "rope_theta": 1000.0}),
}
LENGTHS = [12, 7, 3]
T = 12


def make_hf(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = HFConfig(**{**dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2), **kw})
    return LlamaForCausalLM(cfg).eval()


def batch():
    rs = np.random.RandomState(0)
    ids = rs.randint(3, 128, (len(LENGTHS), T)).astype(np.int32)
    mask = (np.arange(T)[None] < np.array(LENGTHS)[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, 0)  # right padding with pad id 0
    return ids, mask


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for name, kw in CASES.items():
        hf = make_hf(**kw)
        d = tmp_path_factory.mktemp(name)
        hf.save_pretrained(d)
        cfg, model = load_hf(d)
        out[name] = (hf, d, cfg, model)
    return out


@pytest.fixture(scope="module")
def fwd():
    return nnx.jit(lambda m, i, a: m(i, a))


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(models, fwd, name):
    hf, _, cfg, model = models[name]
    assert cfg.num_key_value_heads == CASES[name]["num_key_value_heads"]
    ids, mask = batch()
    with torch.no_grad():
        ref = hf(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
    out = np.asarray(fwd(model, jnp.asarray(ids), jnp.asarray(mask)))
    assert out.shape == (3, T, 128) and out.dtype == np.float32
    valid = mask.astype(bool)
    diff = np.abs(out - ref)[valid].max()
    assert diff <= 1e-4, diff
    assert np.abs(ref).max() > 0.05  # logits are not trivially zero
    # a padded row agrees with the same row run unpadded (padding does not leak into valid positions)
    with torch.no_grad():
        short = hf(torch.tensor(ids[2:3, :3], dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(out[2, :3], short[0], atol=1e-4)


def test_config_fields_read(models):
    _, d, cfg, _ = models["gqa_llama3"]
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling_dict["factor"] == 8.0
    assert cfg.head_dim == 16 and cfg.rms_norm_eps == 1e-5 and not cfg.tie_word_embeddings
    assert models["tied"][2].tie_word_embeddings and models["tied"][3].lm_head is None
    # round trip through our HF dict, and transformers parses our dict to the same config
    assert LlamaConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    hf_cfg = HFConfig(**cfg.to_hf_dict())
    assert hf_cfg.rope_parameters["rope_type"] == "llama3" and hf_cfg.num_key_value_heads == 2
    # legacy config keys (transformers 4: rope_theta + rope_scaling with "type")
    legacy = json.loads((d / "config.json").read_text())
    legacy.pop("rope_parameters")
    legacy["rope_theta"] = 500000.0
    legacy["rope_scaling"] = {k: v for k, v in LLAMA3_ROPE.items() if k not in ("rope_theta", "rope_type")}
    legacy["rope_scaling"]["type"] = "llama3"
    assert LlamaConfig.from_hf_dict(legacy) == cfg
    with pytest.raises(ValueError, match="model_type"):
        LlamaConfig.from_hf_dict({**legacy, "model_type": "mistral"})
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        LlamaConfig.tiny(attention_impl="flash")
    with pytest.raises(ValueError, match="remat='some'"):
        LlamaConfig.tiny(remat="some")
    with pytest.raises(ValueError, match="rope_type"):
        LlamaConfig.from_hf_dict({**legacy, "rope_scaling": {"type": "yarn", "factor": 2.0}})


def test_pooled_hidden_matches_sequence_classification(models):
    hf, _, cfg, model = models["gqa_llama3"]
    d = cfg.hidden_size
    torch.manual_seed(1)
    cls = LlamaForSequenceClassification(HFConfig(**{**hf.config.to_dict(), "num_labels": d})).eval()
    missing, unexpected = cls.load_state_dict(hf.state_dict(), strict=False)
    assert list(missing) == ["score.weight"] and list(unexpected) == ["lm_head.weight"]
    with torch.no_grad():
        cls.score.weight.copy_(torch.eye(d))  # pooled "logits" = pooled final-norm hidden state
    ids, mask = batch()
    with torch.no_grad():
        ref = cls(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
    hidden = nnx.jit(lambda m, i, a: m.hidden_states(i, a))(model, jnp.asarray(ids), jnp.asarray(mask))
    assert hidden.shape == (3, T, d)
    pooled = np.asarray(pool_last(hidden, jnp.asarray(mask)))
    np.testing.assert_allclose(pooled, ref, atol=1e-5, rtol=0)
    # pooled row i is hidden[i, length-1]
    np.testing.assert_array_equal(pooled[1], np.asarray(hidden)[1, LENGTHS[1] - 1])


def _weights():
    ids, mask = batch()
    return np.random.RandomState(1).randn(3, T, 128).astype(np.float32) * mask[..., None]


def _loss(m):
    ids, mask = batch()
    return jnp.sum(m(jnp.asarray(ids), jnp.asarray(mask)) * jnp.asarray(_weights()))


@pytest.fixture(scope="module")
def ref_grads(models):
    return nnx.jit(nnx.value_and_grad(_loss))(models["gqa_llama3"][3])


def test_gradients_match_torch(models, ref_grads):
    hf = models["gqa_llama3"][0]
    ids, mask = batch()
    _, grads = ref_grads
    hf.zero_grad()
    out = hf(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits
    (out * torch.tensor(_weights())).sum().backward()
    g_q = np.asarray(grads.layers[0].self_attn.q_proj.kernel[...])
    np.testing.assert_allclose(g_q, hf.model.layers[0].self_attn.q_proj.weight.grad.numpy().T, atol=1e-4)
    g_e = np.asarray(grads.embed_tokens.embedding[...])
    np.testing.assert_allclose(g_e, hf.model.embed_tokens.weight.grad.numpy(), atol=1e-4)
    g_n = np.asarray(grads.layers[1].post_attention_layernorm.weight[...])
    np.testing.assert_allclose(g_n, hf.model.layers[1].post_attention_layernorm.weight.grad.numpy(),
                               atol=1e-4)
    assert np.abs(g_q).max() > 1e-3


def test_scan_with_remat_equals_plain(models, ref_grads):
    d = models["gqa_llama3"][1]
    ref_l, ref_g = ref_grads
    _, scanned = load_hf(d, scan_layers=True, remat="full")
    assert scanned.layers.self_attn.q_proj.kernel[...].shape == (2, 64, 64)
    l, g = nnx.jit(nnx.value_and_grad(_loss))(scanned)
    np.testing.assert_allclose(float(l), float(ref_l), rtol=1e-5)
    for i in range(2):
        np.testing.assert_allclose(np.asarray(g.layers.self_attn.k_proj.kernel[...][i]),
                                   np.asarray(ref_g.layers[i].self_attn.k_proj.kernel[...]), atol=1e-5)


class _Adapter(nnx.Module):
    def __init__(self, w):
        self.w = nnx.Param(jnp.asarray(w))

    def __call__(self, x):
        return x @ self.w[...]


def test_linear_adapters_contract():
    cfg = LlamaConfig.tiny()
    with nnx.use_eager_sharding(False):
        lin = Linear(8, 4, axes=("embed", "mlp"), config=cfg, rngs=nnx.Rngs(0))
    assert len(lin.adapters) == 0
    x = np.random.RandomState(0).randn(2, 8).astype(np.float32)
    base = np.asarray(lin(jnp.asarray(x)))
    np.testing.assert_allclose(base, x @ np.asarray(lin.kernel[...]), atol=1e-6)
    wa, wb = np.full((8, 4), 0.5, np.float32), np.eye(8, 4, dtype=np.float32)
    lin.adapters["b"] = _Adapter(wb)
    lin.adapters["a"] = _Adapter(wa)
    np.testing.assert_allclose(np.asarray(lin(jnp.asarray(x))), base + x @ wa + x @ wb, atol=1e-5)
    assert lin.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")


def test_linear_flattened_rows_equal_2d_rows():
    """[B, T, in] rows (flattened to [N, in] inside Linear) give exactly the values of [N, in] rows, with a
    LoRA adapter attached, and match x @ W + scale * (x @ A) @ B."""
    from leader_jax.models import lora

    rs = np.random.RandomState(1)
    x3 = jnp.asarray(rs.randn(2, 5, 8).astype(np.float32))
    with nnx.use_eager_sharding(False):
        lin = Linear(8, 6, axes=("embed", "mlp"), config=LlamaConfig.tiny(), rngs=nnx.Rngs(0))
        ad = lora.LoRAAdapter(8, 6, rank=2, alpha=4.0, rngs=nnx.Rngs(1))
    ad.lora_b[...] = jnp.asarray(rs.randn(2, 6).astype(np.float32))
    lin.adapters["task"] = ad
    k, a, b = (np.asarray(v[...]) for v in (lin.kernel, ad.lora_a, ad.lora_b))
    out = np.asarray(lin(x3))
    assert out.shape == (2, 5, 6)
    np.testing.assert_array_equal(np.asarray(lin(x3.reshape(10, 8))), out.reshape(10, 6))
    xn = np.asarray(x3)
    np.testing.assert_allclose(out, xn @ k + 2.0 * (xn @ a) @ b, atol=1e-5)


def test_bf16_compute_close_to_fp32(models, fwd):
    _, d, _, model = models["gqa_llama3"]
    ids, mask = batch()
    cfg16, m16 = load_hf(d, dtype="bfloat16")
    assert m16.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    hid = nnx.jit(lambda m, i, a: m.hidden_states(i, a))(m16, jnp.asarray(ids), jnp.asarray(mask))
    assert hid.dtype == jnp.bfloat16
    out16 = np.asarray(fwd(m16, jnp.asarray(ids), jnp.asarray(mask)))
    out32 = np.asarray(fwd(model, jnp.asarray(ids), jnp.asarray(mask)))
    valid = mask.astype(bool)
    assert np.abs(out16 - out32)[valid].max() < 5e-2


def test_bf16_dot_operands_fp32_sums(models, fwd):
    """`dot_dtype=bfloat16`: each projection equals an independent float64 product of the bf16-rounded
    operands (fp32 accumulation), activations stay fp32, logits stay close to fp32, and gradients flow."""
    import jax
    import ml_dtypes

    hf, d, _, model = models["tied"]
    _, mb = load_hf(d, dot_dtype="bfloat16")
    lin = mb.layers[0].mlp.up_proj
    x = jnp.asarray(np.random.RandomState(3).randn(2, 5, lin.in_features).astype(np.float32))
    y = np.asarray(lin(x))
    r = lambda a: np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float64)
    np.testing.assert_allclose(y, r(x) @ r(lin.kernel[...]), rtol=1e-5, atol=1e-5)
    assert y.dtype == np.float32 and lin.kernel[...].dtype == jnp.float32
    assert np.abs(y - np.asarray(x) @ np.asarray(lin.kernel[...])).max() > 1e-4      # really rounded
    ids, mask = batch()
    out_b = np.asarray(fwd(mb, jnp.asarray(ids), jnp.asarray(mask)))
    out_f = np.asarray(fwd(model, jnp.asarray(ids), jnp.asarray(mask)))
    valid = mask.astype(bool)
    assert out_b.dtype == np.float32 and np.abs(out_b - out_f)[valid].max() < 2e-2 * np.abs(out_f).max()
    g = jax.grad(lambda xx: jnp.sum(lin(xx) ** 2))(x)
    g32 = jax.grad(lambda xx: jnp.sum((xx @ lin.kernel[...]) ** 2))(x)
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(g), np.asarray(g32), rtol=0.05, atol=0.05 * np.abs(g32).max())
