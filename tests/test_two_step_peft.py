"""Two-step PEFT end to end through the command lines, on a tiny HF-format LLaMA: stage 1 in
`mode=adapter` (killed after one step in-process, resumed by the CLI: the held-out perplexity before
training survives the resume), then stage 2 with `lora.domain_path`, once with the domain adapter frozen
and once trainable. The frozen run leaves the stage-1 adapter untouched, the trainable one changes it,
and in both the teacher's predictions equal a forward pass of the base with both exported deltas
(domain + task) merged into its weights, plus the exported head."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

STAGE1 = {"mode": "adapter", "model.source": "hf", "tokenizer.train": False, "corpus.title_sources": (),
          "data.max_len": 128, "data.max_history": 1, "domain.rank": 4, "domain.alpha": 8.0,
          "train.steps": 3, "train.micro_batch": 8, "train.ckpt_every": 1, "train.optim.lr": 0.03,
          "train.optim.warmup_steps": 0, "eval.batch_size": 8}
STAGE2 = {"model.head_norm": False, "data.max_len": 160, "data.eval_max_len": 256, "data.max_history": 1,
          "lora.task.rank": 4, "train.steps": 2, "train.micro_batch": 8, "train.eval_every": 0,
          "train.ckpt_every": 0, "train.optim.lr": 0.03, "train.optim.warmup_steps": 0, "eval.batch_size": 8,
          "eval.splits": ("val",)}


def _start(module, config, overrides, out):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}          # one CPU device, as a user
    env.update(LEADER_JAX_NO_PROGRESS="1", PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    args = [f"--config.{k}={v}" for k, v in overrides.items()]
    return subprocess.Popen([sys.executable, "-m", module, "--config", str(REPO / "configs" / config), *args,
                             "--out", str(out)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(p):
    try:
        out, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail(f"{p.args[2]} timed out")
    assert p.returncode == 0, out[-2000:] + err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def flow(prepared_synthetic, tmp_path_factory):
    from leader_jax.cli import load_config
    from leader_jax.data.dataset import PreparedData
    from leader_jax.data.prompts import build_prompt
    from leader_jax.models.llama import LlamaConfig, init_model, save_hf
    from leader_jax.tokenizer import train_bpe_tokenizer
    from leader_jax.train import pretrain

    root = tmp_path_factory.mktemp("two_step")
    data = PreparedData.load(prepared_synthetic)
    tok = train_bpe_tokenizer([build_prompt(s, data.vocab, max_history=1) for s in data.splits["train"]], 400,
                              root / "tok")
    base = root / "base"
    save_hf(init_model(LlamaConfig.tiny(vocab_size=400, hidden_size=32, intermediate_size=64), seed=0),
            path=base, dtype="float32")
    shutil.copy(Path(tok) / "tokenizer.json", base / "tokenizer.json")   # `tokenizers` alone: no transformers import

    s1 = {**STAGE1, "data_dir": str(prepared_synthetic), "model.path": str(base)}
    cfg = load_config("pretrain_tiny.py", _nest({**s1, "train.stop_after": 1}))
    cfg.out = str(root / "pre")
    killed = pretrain.train(cfg)                                    # in-process, 8 devices, stopped at 1
    pre = _result(_start("leader_jax.train.pretrain", "pretrain_tiny.py", s1, root / "pre"))  # resumed
    procs = {name: _start("leader_jax.train.teacher", "teacher_tiny.py",
                          {**STAGE2, "data_dir": str(prepared_synthetic), "model.path": str(base),
                           "lora.domain_path": str(root / "pre" / "domain_adapter"),
                           "lora.domain_trainable": trainable}, root / name)
             for name, trainable in (("frozen", False), ("trainable", True))}       # independent: in parallel
    runs = {name: _result(p) for name, p in procs.items()}
    return root, data, killed, pre, runs


def _nest(flat):
    out = {}
    for k, v in flat.items():
        *parents, last = k.split(".")
        d = out
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = v
    return out


def _adapter(folder):
    from safetensors.numpy import load_file
    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def test_stage1_resume_keeps_ppl_before(flow):
    root, _, killed, pre, _ = flow
    assert killed["steps_done"] == 1 and killed["heldout_ppl_before"] > 1
    assert pre["steps_done"] == 3
    assert pre["heldout_ppl_before"] == pytest.approx(killed["heldout_ppl_before"], rel=1e-9)
    assert pre["heldout_ppl_after"] < pre["heldout_ppl_before"]
    summary = json.loads((root / "pre" / "summary.json").read_text())
    assert summary["finished"] and summary["heldout_ppl_before"] == pre["heldout_ppl_before"]
    dom = _adapter(root / "pre" / "domain_adapter")
    assert any("lora_B" in k and np.abs(v).max() > 0 for k, v in dom.items())     # stage 1 trained it


def test_frozen_domain_unchanged_trainable_changed(flow):
    root, *_ = flow
    stage1 = _adapter(root / "pre" / "domain_adapter")
    assert not (root / "frozen" / "adapters" / "domain").exists()           # not trained: not exported
    trained = _adapter(root / "trainable" / "adapters" / "domain")
    assert trained.keys() == stage1.keys()
    assert max(np.abs(trained[k] - stage1[k]).max() for k in stage1) > 1e-4


@pytest.mark.parametrize("name", ["frozen", "trainable"])
def test_predictions_are_base_plus_both_deltas(flow, name):
    """Merge the domain adapter (stage 1's file when frozen, the exported one when trainable) and the task
    adapter into the frozen base; the head on its EOS state reproduces the run's validation predictions."""
    import jax
    from flax import nnx
    from ml_collections import ConfigDict

    from leader_jax.eval import read_predictions
    from leader_jax.models import lora
    from leader_jax.models.llama import load_hf
    from leader_jax.models.teacher import Teacher
    from leader_jax.train import common, text_batches as tdata
    from leader_jax.train.teacher import encode_split

    root, data, *_ = flow
    run = root / name
    tcfg = ConfigDict(json.loads((run / "config.json").read_text()))
    domain = root / "pre" / "domain_adapter" if name == "frozen" else run / "adapters" / "domain"
    _, base = load_hf(tcfg.model.path, dtype="float32")
    lora.load_adapter(base, domain, name="domain", param_type=lora.DomainLoRA)
    lora.load_adapter(base, run / "adapters" / "task", name="task", param_type=lora.TaskLoRA)
    lora.merge_adapter(base, "domain")
    lora.merge_adapter(base, "task")
    assert lora.adapter_names(base) == []
    with nnx.use_eager_sharding(False):
        teacher = Teacher(base, data.vocab.n_med, rngs=nnx.Rngs(0), pool="last", head_norm=False)
    teacher.head[...] = jnp.asarray(np.load(run / "head.npy"))
    tok = common.load_tokenizer(tcfg.model.path)
    enc = encode_split(tcfg, data, "val", tok, tdata.SpecialIds.from_tokenizer(tok))
    logits, _ = teacher(jnp.asarray(enc.ids), jnp.asarray(enc.mask()))
    pred = read_predictions(run / "predictions" / "val.npz")
    assert pred["ids"].tolist() == enc.sample_ids
    np.testing.assert_allclose(np.asarray(jax.nn.sigmoid(logits)), pred["y_prob"], rtol=1e-4, atol=1e-5)
