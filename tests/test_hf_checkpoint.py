"""HF checkpoint I/O: bit-identical round trips (fp32, bf16, tied, scanned), bf16/fp16 loading, sharded
index files both ways, missing/unexpected/mis-shaped tensors, one read per tensor."""
import json
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import LlamaConfig as HFConfig
from transformers import LlamaForCausalLM

from leader_jax.checkpoints import hf as hfio
from leader_jax.models.llama import load_hf, save_hf


def make_hf(dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = HFConfig(**{**dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             pad_token_id=0), **kw})
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tensors(d):
    """All tensors of an HF dir (single or sharded) as numpy, via the safetensors library directly."""
    index = Path(d) / "model.safetensors.index.json"
    if not index.exists():
        return load_file(str(Path(d) / "model.safetensors"))
    out = {}
    for f in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        out.update(load_file(str(Path(d) / f)))
    return out


def assert_bit_identical(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


IDS = np.array([[5, 9, 17, 33, 64, 100, 3, 7]], np.int32)


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp32")
    make_hf().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def fwd():
    return nnx.jit(lambda m, i: m(i))


@pytest.mark.parametrize("kind", ["fp32", "tied", "scanned"])
def test_round_trip_bit_identical(fp32_dir, tmp_path, kind):
    src = fp32_dir
    if kind == "tied":
        src = tmp_path / "src"
        make_hf(tie_word_embeddings=True).save_pretrained(src)
    cfg, model = load_hf(src, scan_layers=(kind == "scanned"))
    save_hf(model, cfg, tmp_path / "out")
    assert_bit_identical(tensors(src), tensors(tmp_path / "out"))
    assert ("lm_head.weight" in tensors(tmp_path / "out")) == (kind != "tied")


def test_bf16_checkpoint_loads_and_round_trips(tmp_path):
    hf = make_hf(dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path / "bf16")
    src = tensors(tmp_path / "bf16")
    assert src["model.norm.weight"].dtype == ml_dtypes.bfloat16
    # fp32 load: exact upcast of the bf16 values
    cfg, m32 = load_hf(tmp_path / "bf16", dtype="float32")
    k = np.asarray(m32.layers[1].mlp.down_proj.kernel[...])
    assert k.dtype == np.float32
    np.testing.assert_array_equal(k, src["model.layers.1.mlp.down_proj.weight"].astype(np.float32).T)
    # bf16 load + save: bit-identical, and HF reads our file back to identical logits
    cfg16, m16 = load_hf(tmp_path / "bf16", dtype="bfloat16")
    assert m16.embed_tokens.embedding[...].dtype == jnp.bfloat16
    save_hf(m16, cfg16, tmp_path / "out")
    assert_bit_identical(src, tensors(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    back = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16).eval()
    orig = LlamaForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        a = orig(torch.tensor(IDS, dtype=torch.long)).logits.float().numpy()
        b = back(torch.tensor(IDS, dtype=torch.long)).logits.float().numpy()
    np.testing.assert_array_equal(a, b)


def test_fp16_checkpoint_loads(tmp_path):
    make_hf(dtype=torch.float16).save_pretrained(tmp_path)
    src = tensors(tmp_path)
    _, m = load_hf(tmp_path)
    np.testing.assert_array_equal(np.asarray(m.layers[0].self_attn.v_proj.kernel[...]),
                                  src["model.layers.0.self_attn.v_proj.weight"].astype(np.float32).T)


def test_sharded_index_both_ways(fp32_dir, tmp_path, fwd):
    hf = make_hf()
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    _, m_single = load_hf(fp32_dir)
    _, m_sharded = load_hf(tmp_path / "sharded")
    ids = jnp.asarray(IDS)
    np.testing.assert_array_equal(np.asarray(fwd(m_single, ids)), np.asarray(fwd(m_sharded, ids)))
    # our sharded writer: several files + index; transformers loads it to identical logits
    cfg = m_single.config
    save_hf(m_single, cfg, tmp_path / "ours", max_shard_bytes=60_000)
    files = sorted(p.name for p in (tmp_path / "ours").glob("*.safetensors"))
    assert len(files) > 2 and "model.safetensors" not in files
    assert_bit_identical(tensors(fp32_dir), tensors(tmp_path / "ours"))
    back = LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        np.testing.assert_array_equal(back(torch.tensor(IDS, dtype=torch.long)).logits.numpy(),
                                      hf(torch.tensor(IDS, dtype=torch.long)).logits.numpy())


def _rewrite(src, dst, edit):
    dst.mkdir()
    t = tensors(src)
    edit(t)
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text((src / "config.json").read_text())


def test_missing_and_unexpected_keys_listed(fp32_dir, tmp_path):
    def edit(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)

    _rewrite(fp32_dir, tmp_path / "bad", edit)
    with pytest.raises(hfio.CheckpointKeyError) as e:
        load_hf(tmp_path / "bad")
    msg = str(e.value)
    assert "missing keys (1): ['model.layers.1.mlp.up_proj.weight']" in msg
    assert "unexpected keys (1): ['model.layers.0.self_attn.q_proj.bias']" in msg


def test_wrong_shape_and_missing_files(fp32_dir, tmp_path):
    def edit(t):
        t["model.layers.0.mlp.gate_proj.weight"] = np.zeros((95, 64), np.float32)

    _rewrite(fp32_dir, tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj.weight.*\(95, 64\).*\(96, 64\)"):
        load_hf(tmp_path / "bad")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text((fp32_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf(tmp_path / "empty")


def test_each_tensor_read_once(fp32_dir, monkeypatch):
    reads = []
    orig = hfio.SafetensorsReader.get
    monkeypatch.setattr(hfio.SafetensorsReader, "get", lambda self, k: reads.append(k) or orig(self, k))
    load_hf(fp32_dir, scan_layers=True)
    assert sorted(reads) == sorted(tensors(fp32_dir))
