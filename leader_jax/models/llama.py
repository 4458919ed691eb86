"""Flax NNX LLaMA decoder (LLaMA 1/2/3/3.1/3.2) with exact Hugging Face parity.

Pieces: RMSNorm (HF order: fp32 normalise, cast, scale), RoPE in the HF `rotate_half` convention with
`rope_theta` and `llama3` scaling, grouped-query attention through `jax.nn.dot_product_attention`
(causal + right-padding lengths; `attention_impl="cudnn"` on GPU), SwiGLU MLP, optional tied embeddings.

Every projection is a `Linear` whose `adapters` (an `nnx.Dict`, empty by default) are added to its output,
which is where LoRA plugs in. Attribute names mirror HF (`layers[i].self_attn.q_proj`, ...), so the
HF <-> leader_jax key mapping is mechanical (`hf_key_to_path`). Every parameter carries logical axis
names resolved by `leader_jax.sharding.LOGICAL_AXIS_RULES`.

Public API: `LlamaConfig`, `Llama`, `pool_last`, `init_model`, `load_hf`, `save_hf`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from leader_jax import sharding as shd

_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
           "float16": jnp.float16, "fp16": jnp.float16}

REMAT_POLICIES: dict[str, Callable[[], Any] | None] = {
    "none": None,
    "full": lambda: jax.checkpoint_policies.nothing_saveable,
    "dots": lambda: jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims": lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything": lambda: jax.checkpoint_policies.everything_saveable,
    # keep the q/k/v projections and the attention output, recompute the MLP
    "qkv_proj": lambda: jax.checkpoint_policies.save_only_these_names(
        "query_proj", "key_proj", "value_proj", "attn_out"),
    "minimal": lambda: jax.checkpoint_policies.save_only_these_names(
        "query_proj", "key_proj", "value_proj", "attn_out", "mlp_gate", "mlp_up"),
}


def to_dtype(name: Any):
    """'float32' / 'bf16' / jnp dtype -> jnp dtype."""
    if isinstance(name, str):
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
        return _DTYPES[name]
    return jnp.dtype(name).type


def dtype_name(dt: Any) -> str:
    return jnp.dtype(to_dtype(dt)).name


def _hashable(x):
    if isinstance(x, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in x.items()))
    if isinstance(x, list):
        return tuple(_hashable(v) for v in x)
    return x


# ----------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture + numerics. Frozen and hashable (it is static module metadata under jit)."""

    vocab_size: int = 128
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None        # sorted (key, value) pairs of HF rope_parameters, llama3 only
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: Any = 1
    eos_token_id: Any = 2
    pad_token_id: Any = None
    initializer_range: float = 0.02
    # numerics / execution (not part of the HF config)
    param_dtype: str = "float32"
    dtype: str = "float32"                   # compute dtype
    remat: str = "none"                      # key of REMAT_POLICIES
    scan_layers: bool = False                # stack layers + lax.scan (LoRA needs scan_layers=False)
    attention_impl: str | None = None        # None/"xla" (CPU/any) or "cudnn" (GPU flash path)
    dot_dtype: str | None = None             # operands of the projection / LM-head matmuls (None = dtype); the
                                             # products accumulate and come out in dtype. bfloat16 on CPUs
                                             # with AVX512-BF16: ~1.5x faster fp32 forward (docs/teacher.md)

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.rope_scaling, (dict, list)):
            object.__setattr__(self, "rope_scaling", _hashable(self.rope_scaling))
        for f in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if isinstance(getattr(self, f), list):
                object.__setattr__(self, f, tuple(getattr(self, f)))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; expected one of {sorted(REMAT_POLICIES)}")
        to_dtype(self.param_dtype), to_dtype(self.dtype), to_dtype(self.dot_dtype or self.dtype)
        if self.attention_impl not in (None, "", "xla", "cudnn"):
            raise ValueError(f"attention_impl={self.attention_impl!r}; expected None, 'xla' or 'cudnn'")

    @property
    def rope_scaling_dict(self) -> dict | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    def replace(self, **kw) -> "LlamaConfig":
        return dataclasses.replace(self, **kw)

    def num_params(self) -> int:
        d, f, v, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        n, k = self.num_attention_heads, self.num_key_value_heads
        layer = d * n * hd * 2 + d * k * hd * 2 + 3 * d * f + 2 * d
        return v * d * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * layer + d

    # --- HF config.json <-> LlamaConfig
    @classmethod
    def from_hf_dict(cls, d: dict, **overrides) -> "LlamaConfig":
        """Read a transformers `config.json` dict (v5 `rope_parameters` or legacy `rope_theta`/`rope_scaling`)."""
        mt = d.get("model_type", "llama")
        if mt != "llama":
            raise ValueError(f"config.json model_type={mt!r}; only 'llama' is supported")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if key not in d:
                raise ValueError(f"config.json lacks required key {key!r}")
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise ValueError("config.json: attention_bias/mlp_bias=True is not supported")
        rope = dict(d.get("rope_parameters") or {})
        legacy = d.get("rope_scaling") or {}
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        params = {**legacy, **rope}
        rtype = params.get("rope_type", params.get("type", "default"))
        scaling = None
        if rtype == "llama3":
            need = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            miss = [k for k in need if k not in params]
            if miss:
                raise ValueError(f"config.json: llama3 rope scaling lacks {miss}")
            scaling = {"rope_type": "llama3", **{k: params[k] for k in need}}
        elif rtype not in ("default", None):
            raise ValueError(f"config.json: rope_type={rtype!r} is not supported (default, llama3)")
        n = d["num_attention_heads"]
        kw = dict(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=n, num_key_value_heads=d.get("num_key_value_heads") or n,
            head_dim=d.get("head_dim") or d["hidden_size"] // n,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
            rope_scaling=scaling, max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"), initializer_range=d.get("initializer_range", 0.02),
        )
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act={d.get('hidden_act')!r}; only 'silu' is supported")
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_pretrained(cls, path, **overrides) -> "LlamaConfig":
        p = Path(path) / "config.json"
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no config.json in the HF model directory")
        with open(p, encoding="utf-8") as f:
            return cls.from_hf_dict(json.load(f), **overrides)

    def to_hf_dict(self, torch_dtype: str | None = None) -> dict:
        """A transformers-5 `config.json` dict (rope in `rope_parameters`)."""
        rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling is not None:
            rope.update(self.rope_scaling_dict)
        tolist = lambda x: list(x) if isinstance(x, tuple) else x  # noqa: E731
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps, "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": tolist(self.bos_token_id), "eos_token_id": tolist(self.eos_token_id),
            "pad_token_id": tolist(self.pad_token_id), "initializer_range": self.initializer_range,
            "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
            "pretraining_tp": 1, "use_cache": True,
            "dtype": torch_dtype or dtype_name(self.param_dtype),
        }

    # --- presets (tiny ones for tests/demo, real shapes for reference)
    @classmethod
    def tiny(cls, **kw) -> "LlamaConfig":
        """vocab 128, D 64, 2 layers, 4 heads / 2 KV heads: the test model."""
        return cls(**{**dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2), **kw})

    @classmethod
    def small(cls, **kw) -> "LlamaConfig":
        """~20M parameters (demo teacher on CPU)."""
        return cls(**{**dict(vocab_size=4096, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                             num_attention_heads=6, num_key_value_heads=2), **kw})

    @classmethod
    def llama1_7b(cls, **kw) -> "LlamaConfig":
        return cls(**{**dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-6,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0, param_dtype="bfloat16",
                             dtype="bfloat16"), **kw})


# ----------------------------------------------------------------------------------------- layers
def _normal(rngs: nnx.Rngs, shape, std, dtype):
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def _axes(stack: int | None, axes: tuple) -> tuple:
    return (("layers",) + axes) if stack else axes


def _shape(stack: int | None, shape: tuple) -> tuple:
    return ((stack,) + shape) if stack else shape


class Linear(nnx.Module):
    """y = x @ kernel (compute dtype) + sum(adapter(x) for adapters sorted by name). No bias (LLaMA)."""

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str, str], config: LlamaConfig,
                 rngs: nnx.Rngs, stack: int | None = None):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = to_dtype(config.dtype)
        self.dot_dtype = to_dtype(config.dot_dtype or config.dtype)
        self.kernel = nnx.Param(
            _normal(rngs, _shape(stack, (in_features, out_features)), config.initializer_range,
                    to_dtype(config.param_dtype)),
            out_sharding=_axes(stack, axes))
        self.adapters = nnx.Dict()

    def __call__(self, x):
        # Rows are flattened to one [N, in] matrix first: with LoRA adapters, XLA:CPU otherwise contracts
        # their gradients over two batch-like dims and materialises transposes of [B, T, out] activations
        # (measured in docs/llama.md). A reshape is free; numerics are unchanged.
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]) if len(lead) > 1 else x
        y = mixed_dot(x2, self.kernel[...], self.dot_dtype, self.dtype)
        for name in sorted(self.adapters.keys()):
            y = y + self.adapters[name](x2).astype(y.dtype)
        return y.reshape(*lead, y.shape[-1]) if len(lead) > 1 else y


def mixed_dot(x, w, dot_dtype, out_dtype):
    """x @ w with both operands in `dot_dtype` and the products accumulated and returned in `out_dtype`
    (`LlamaConfig.dot_dtype`); the plain `out_dtype` matmul when the two are equal."""
    if dot_dtype == out_dtype:
        return jnp.dot(x.astype(out_dtype), w.astype(out_dtype))
    return jnp.dot(x.astype(dot_dtype), w.astype(dot_dtype), preferred_element_type=out_dtype)


class Embed(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.dtype = to_dtype(config.dtype)
        self.dot_dtype = to_dtype(config.dot_dtype or config.dtype)
        self.embedding = nnx.Param(
            _normal(rngs, (config.vocab_size, config.hidden_size), config.initializer_range,
                    to_dtype(config.param_dtype)),
            out_sharding=("vocab", "embed"))

    def __call__(self, ids):
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, h):
        """Tied LM head: h @ embedding.T."""
        return mixed_dot(h, self.embedding[...].T, self.dot_dtype, h.dtype)


class RMSNorm(nnx.Module):
    """HF order: normalise in fp32, cast back to the input dtype, then multiply by the weight."""

    def __init__(self, dim: int, eps: float, config: LlamaConfig, stack: int | None = None):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones(_shape(stack, (dim,)), to_dtype(config.param_dtype)),
                                out_sharding=_axes(stack, ("norm",)))

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * xf.astype(x.dtype)


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """HF inverse frequencies (fp32), with `llama3` scaling applied when configured."""
    hd = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd))
    inv = inv.astype(np.float32)
    sc = config.rope_scaling_dict
    if sc is not None and sc.get("rope_type") == "llama3":
        factor, low, high = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        orig = sc["original_max_position_embeddings"]
        low_wl, high_wl = orig / low, orig / high
        wavelen = 2 * math.pi / inv
        out = np.where(wavelen > low_wl, inv / factor, inv)
        smooth = (orig / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        inv = np.where(medium, smoothed, out).astype(np.float32)
    return inv


def rope_cos_sin(config: LlamaConfig, positions, dtype):
    """cos, sin of shape [T, head_dim] (fp32 maths, cast to `dtype`), HF `concat(freqs, freqs)`."""
    inv = jnp.asarray(rope_inv_freq(config))
    freqs = positions.astype(jnp.float32)[:, None] * inv[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x, cos, sin):
    """x: [B, T, H, hd]; HF rotate_half: concat(-x2, x1)."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[None, :, None, :] + rot * sin[None, :, None, :]


class Attention(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, stack: int | None = None):
        c = config
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.impl = c.attention_impl or None  # None = XLA (any backend); "cudnn" = GPU flash path
        if self.impl == "xla":
            self.impl = None
        d = c.hidden_size
        self.q_proj = Linear(d, self.n_heads * self.head_dim, axes=("embed", "heads"), config=c, rngs=rngs,
                             stack=stack)
        self.k_proj = Linear(d, self.n_kv * self.head_dim, axes=("embed", "kv_heads"), config=c, rngs=rngs,
                             stack=stack)
        self.v_proj = Linear(d, self.n_kv * self.head_dim, axes=("embed", "kv_heads"), config=c, rngs=rngs,
                             stack=stack)
        self.o_proj = Linear(self.n_heads * self.head_dim, d, axes=("heads", "embed"), config=c, rngs=rngs,
                             stack=stack)

    def __call__(self, x, cos, sin, lengths):
        b, t, _ = x.shape
        name = checkpoint_name
        q = name(self.q_proj(x), "query_proj").reshape(b, t, self.n_heads, self.head_dim)
        k = name(self.k_proj(x), "key_proj").reshape(b, t, self.n_kv, self.head_dim)
        v = name(self.v_proj(x), "value_proj").reshape(b, t, self.n_kv, self.head_dim)
        q = shd.with_logical_constraint(apply_rope(q, cos, sin), ("batch", "length", "act_heads", None))
        k = shd.with_logical_constraint(apply_rope(k, cos, sin), ("batch", "length", "act_kv_heads", None))
        v = shd.with_logical_constraint(v, ("batch", "length", "act_kv_heads", None))
        out = jax.nn.dot_product_attention(q, k, v, scale=self.head_dim ** -0.5, is_causal=True,
                                           key_value_seq_lengths=lengths, implementation=self.impl)
        out = name(out.reshape(b, t, self.n_heads * self.head_dim), "attn_out")
        return self.o_proj(out)


class MLP(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, stack: int | None = None):
        c = config
        d, f = c.hidden_size, c.intermediate_size
        self.gate_proj = Linear(d, f, axes=("embed", "mlp"), config=c, rngs=rngs, stack=stack)
        self.up_proj = Linear(d, f, axes=("embed", "mlp"), config=c, rngs=rngs, stack=stack)
        self.down_proj = Linear(f, d, axes=("mlp", "embed"), config=c, rngs=rngs, stack=stack)

    def __call__(self, x):
        name = checkpoint_name
        g = name(self.gate_proj(x), "mlp_gate")
        u = name(self.up_proj(x), "mlp_up")
        h = shd.with_logical_constraint(jax.nn.silu(g) * u, ("batch", "length", "act_mlp"))
        return self.down_proj(h)


class DecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, stack: int | None = None):
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, c, stack=stack)
        self.self_attn = Attention(c, rngs=rngs, stack=stack)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, c, stack=stack)
        self.mlp = MLP(c, rngs=rngs, stack=stack)

    def __call__(self, x, cos, sin, lengths):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, lengths)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return shd.with_logical_constraint(x, ("batch", "length", "act_embed"))


# ----------------------------------------------------------------------------------------- model
class Llama(nnx.Module):
    """LLaMA decoder. `model(ids, mask)` -> fp32 logits [B,T,V]; `model.hidden_states(ids, mask)` ->
    final-norm hidden states [B,T,D] (compute dtype). Right padding: `attention_mask` is 1 on the first
    `length` tokens of each row; padded positions produce finite garbage and must be ignored."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        self.embed_tokens = Embed(c, rngs=rngs)
        if c.scan_layers:
            self.layers = DecoderLayer(c, rngs=rngs, stack=c.num_hidden_layers)
        else:
            self.layers = nnx.List([DecoderLayer(c, rngs=rngs) for _ in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, c)
        if c.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(c.hidden_size, c.vocab_size, axes=("embed", "vocab"), config=c, rngs=rngs)

    def _run_layers(self, h, cos, sin, lengths):
        c = self.config
        policy_fn = REMAT_POLICIES[c.remat]

        def call(graphdef, state, x):
            return nnx.merge(graphdef, state)(x, cos, sin, lengths)

        if policy_fn is not None:
            call = jax.checkpoint(call, policy=policy_fn(), static_argnums=(0,))
        if c.scan_layers:
            graphdef, state = nnx.split(self.layers)
            h, _ = jax.lax.scan(lambda x, st: (call(graphdef, st, x), None), h, state)
            return h
        for layer in self.layers:
            if policy_fn is None:
                h = layer(h, cos, sin, lengths)
            else:
                graphdef, state = nnx.split(layer)
                h = call(graphdef, state, h)
        return h

    def hidden_states(self, input_ids, attention_mask=None):
        """Final-RMSNorm hidden states [B, T, D] in the compute dtype."""
        c = self.config
        b, t = input_ids.shape
        if attention_mask is None:
            lengths = jnp.full((b,), t, jnp.int32)
        else:
            lengths = jnp.maximum(jnp.sum(attention_mask.astype(jnp.int32), axis=-1), 1)
        h = self.embed_tokens(input_ids)
        h = shd.with_logical_constraint(h, ("batch", "length", "act_embed"))
        cos, sin = rope_cos_sin(c, jnp.arange(t), to_dtype(c.dtype))
        h = self._run_layers(h, cos, sin, lengths)
        return self.norm(h)

    def logits(self, hidden):
        if self.lm_head is None:
            out = self.embed_tokens.attend(hidden)
        else:
            out = self.lm_head(hidden)
        return out.astype(jnp.float32)

    def __call__(self, input_ids, attention_mask=None):
        return self.logits(self.hidden_states(input_ids, attention_mask))


def pool_last(hidden, attention_mask):
    """hidden [B,T,D] at the last real token of each row (right padding; index = sum(mask) - 1)."""
    lengths = jnp.sum(attention_mask.astype(jnp.int32), axis=-1)
    idx = jnp.maximum(lengths - 1, 0)
    return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0, :]


# ----------------------------------------------------------------------------------------- construction
def abstract_model(config: LlamaConfig, mesh=None):
    """(graphdef, abstract state, shardings) without allocating weights."""
    with nnx.use_eager_sharding(False):
        abs_model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abs_model)
    if mesh is None:
        mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    return graphdef, abs_state, shd.state_shardings(abs_state, mesh)


def init_model(config: LlamaConfig, rngs: nnx.Rngs | int | None = None, mesh=None, seed: int = 0) -> Llama:
    """Randomly initialised Llama (HF init: N(0, initializer_range), norms 1). With a mesh, weights are
    created directly in their sharded layout (jit with out_shardings); without, on the default device."""
    if isinstance(rngs, int):
        seed, rngs = rngs, None
    if mesh is None:
        with nnx.use_eager_sharding(False):
            return Llama(config, rngs=rngs if rngs is not None else nnx.Rngs(seed))
    if rngs is not None:
        seed = int(jax.random.randint(rngs.params(), (), 0, 2**31 - 1))
    graphdef, _, shardings = abstract_model(config, mesh)

    def make():
        with nnx.use_eager_sharding(False):
            return nnx.state(Llama(config, rngs=nnx.Rngs(seed)))

    with shd.use_mesh(mesh):
        state = jax.jit(make, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------------------- HF mapping
def hf_key_to_path(key: str, config: LlamaConfig) -> tuple[tuple, int | None, bool] | None:
    """HF tensor name -> (state path, layer index for stacked layers or None, transpose?).
    Returns None for keys that are known and ignored (rotary inv_freq buffers)."""
    parts = key.split(".")
    if key.endswith("rotary_emb.inv_freq"):
        return None
    if key == "lm_head.weight":
        if config.tie_word_embeddings:
            raise KeyError(key)
        return ("lm_head", "kernel"), None, True
    if parts[0] != "model":
        raise KeyError(key)
    parts = parts[1:]
    if parts == ["embed_tokens", "weight"]:
        return ("embed_tokens", "embedding"), None, False
    if parts == ["norm", "weight"]:
        return ("norm", "weight"), None, False
    if len(parts) >= 4 and parts[0] == "layers" and parts[-1] == "weight" and parts[1].isdigit():
        i = int(parts[1])
        if i >= config.num_hidden_layers:
            raise KeyError(key)
        rest = tuple(parts[2:-1])
        if rest in (("input_layernorm",), ("post_attention_layernorm",)):
            leaf, transpose = "weight", False
        elif rest in tuple(("self_attn", p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) + tuple(
                ("mlp", p) for p in ("gate_proj", "up_proj", "down_proj")):
            leaf, transpose = "kernel", True
        else:
            raise KeyError(key)
        if config.scan_layers:
            return ("layers",) + rest + (leaf,), i, transpose
        return ("layers", i) + rest + (leaf,), None, transpose
    raise KeyError(key)


def hf_keys(config: LlamaConfig) -> list[str]:
    """All HF tensor names of a LlamaForCausalLM with this config."""
    keys = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        keys += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        keys += [p + f"self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        keys += [p + f"mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")]
    if not config.tie_word_embeddings:
        keys.append("lm_head.weight")
    return keys


def load_hf(path, dtype: str = "float32", mesh=None, compute_dtype: str | None = None, **overrides):
    """Load an HF LLaMA directory -> (LlamaConfig, Llama). `dtype` is the parameter dtype (and the compute
    dtype unless `compute_dtype` is given); `overrides` set other LlamaConfig fields (remat, scan_layers,
    attention_impl, dot_dtype). Tensors are read one at a time and put straight into their (sharded) device
    arrays."""
    from leader_jax.checkpoints import hf as hfio

    config = LlamaConfig.from_pretrained(path, param_dtype=dtype_name(dtype),
                                         dtype=dtype_name(compute_dtype or dtype), **overrides)
    graphdef, abs_state, shardings = abstract_model(config, mesh)
    state = hfio.load_state(path, abs_state, shardings, lambda k: hf_key_to_path(k, config),
                            expected_keys=hf_keys(config))
    return config, nnx.merge(graphdef, state)


def save_hf(model: Llama, config: LlamaConfig | None = None, path=None, dtype: str | None = None,
            max_shard_bytes: int | None = None) -> Path:
    """Write an HF directory (config.json + model.safetensors or sharded index) from the base weights
    (adapters are not written). `dtype` defaults to the parameter dtype; tensors go to host one by one."""
    from leader_jax.checkpoints import hf as hfio

    if path is None:
        raise ValueError("save_hf: path is required")
    config = config or model.config
    state = nnx.state(model)
    out_dtype = to_dtype(dtype or config.param_dtype)
    return hfio.save_state(path, state, hf_keys(config), lambda k: hf_key_to_path(k, config),
                           config.to_hf_dict(dtype_name(out_dtype)), out_dtype, max_shard_bytes)
