"""Two processes on loopback (jax.distributed, CPU gloo collectives, 2 devices each) run the teacher CLI
and reproduce the single-process losses on a 4-device mesh; only process 0 writes the logs."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from leader_jax.io import read_jsonl

REPO = Path(__file__).resolve().parents[1]
STEPS = 3


def _overrides(root, data_dir):
    o = dict(data_dir=data_dir, tokenizer=root / "tok" / "tokenizer.json", mesh="(1,-1,1)", seed=0,
             **{"model.source": "scratch", "model.arch.vocab_size": 400, "model.arch.hidden_size": 32,
                "model.arch.intermediate_size": 64, "data.max_len": 160, "data.eval_max_len": 256,
                "data.max_history": 1, "lora.task.rank": 4, "train.steps": STEPS, "train.micro_batch": 8,
                "train.accum": 2, "train.eval_every": 0, "train.ckpt_every": STEPS, "train.optim.lr": 1e-2,
                "train.optim.warmup_steps": 1, "eval.batch_size": 8, "eval.splits": "('val',)"})
    return o


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(prepared_synthetic, tmp_path_factory):
    from configs.teacher_tiny import get_config
    from leader_jax.data.dataset import PreparedData
    from leader_jax.data.prompts import build_prompt
    from leader_jax.train.pretrain import train_tokenizer
    from leader_jax.train.teacher import train

    root = tmp_path_factory.mktemp("multihost")
    data = PreparedData.load(prepared_synthetic)
    train_tokenizer([build_prompt(s, data.vocab, max_history=1) for s in data.splits["train"]], 400, root / "tok")
    ov = _overrides(root, str(prepared_synthetic))

    # two processes x 2 CPU devices, launched through the real CLI
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(LEADER_JAX_NO_PROGRESS="1", PYTHONPATH=str(REPO), LEADER_JAX_LOCAL_CPU_DEVICES="2",
               JAX_PLATFORMS="cpu")
    args = [f"--config.{k}={v}" for k, v in ov.items()]
    procs = []
    for pid in range(2):
        cmd = [sys.executable, "-m", "leader_jax.train.teacher", "--config", str(REPO / "configs/teacher_tiny.py"),
               *args, f"--config.distributed.coordinator=127.0.0.1:{port}",
               "--config.distributed.num_processes=2", f"--config.distributed.process_id={pid}",
               "--out", str(root / "multi")]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("two-process run timed out")
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]

    # single process, 4 of the 8 virtual devices, same global batch
    c = get_config()
    c.out = str(root / "single")
    for k, v in ov.items():
        parts = k.split(".")
        target = c
        for part in parts[:-1]:
            target = target[part]
        target[parts[-1]] = {"mesh": (1, 4, 1), "eval.splits": ("val",)}.get(k, str(v) if isinstance(v, Path) else v)
    summary = train(c)
    return root, summary


def test_two_processes_match_single_process(runs):
    root, summary = runs
    multi = read_jsonl(root / "multi" / "metrics.jsonl")
    single = read_jsonl(root / "single" / "metrics.jsonl")
    assert [r["step"] for r in multi] == list(range(1, STEPS + 1))       # process 0 only, no duplicates
    np.testing.assert_allclose([r["loss"] for r in multi], [r["loss"] for r in single], rtol=1e-4)
    import json
    s = json.loads((root / "multi" / "summary.json").read_text())
    assert s["processes"] == 2 and s["devices"] == 4
    from leader_jax.io import load_npz
    pm, ps = load_npz(root / "multi" / "predictions" / "val.npz"), load_npz(root / "single" / "predictions" / "val.npz")
    assert pm["ids"].tolist() == ps["ids"].tolist()
    np.testing.assert_allclose(pm["y_prob"], ps["y_prob"], rtol=1e-4, atol=1e-5)
