"""The GPU and TPU launch scripts in DRY_RUN mode: the real configs' mesh is built over 8 CPU devices and
one training step of a tiny random LLaMA runs through the same CLI the scripts launch for real."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer_dir(prepared_synthetic, tmp_path_factory):
    from leader_jax.data.dataset import PreparedData
    from leader_jax.data.prompts import build_prompt
    from leader_jax.tokenizer import train_bpe_tokenizer

    data = PreparedData.load(prepared_synthetic)
    texts = [build_prompt(s, data.vocab) for s in data.splits["train"]]
    return train_bpe_tokenizer(texts, 300, tmp_path_factory.mktemp("tok") / "tok")


@pytest.mark.parametrize("script,config,mesh,expect", [
    ("train_teacher_gpu.sh", "configs/teacher_llama7b.py", None, (1, 8, 1)),
    ("train_teacher_tpu.sh", "configs/teacher_llama3_8b.py", "(2,2,2)", (2, 2, 2)),
])
def test_dry_run_builds_the_mesh_and_runs_one_step(script, config, mesh, expect, prepared_synthetic,
                                                   tokenizer_dir, tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "LEADER_JAX_NO_PROGRESS": "1",
           "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    extra = [f"--config.mesh={mesh}"] if mesh else []
    proc = subprocess.run(["bash", str(ROOT / "scripts" / script), str(prepared_synthetic), str(tokenizer_dir),
                           str(tmp_path), config, "--config.train.micro_batch=8", *extra],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "dry_run"
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1]
    assert math.isfinite(steps[0]["loss"]) and steps[0]["loss"] > 0
    summary = json.loads((run / "summary.json").read_text())
    assert tuple(summary["mesh"].values()) == expect and list(summary["mesh"]) == ["data", "fsdp", "tensor"]
    assert summary["devices"] == 8 and summary["platform"] == "cpu"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["config_name"] == Path(config).stem and cfg["lora"]["task"]["rank"] == 8   # the paper's LoRA
    assert (run / "predictions" / "test.npz").is_file()
