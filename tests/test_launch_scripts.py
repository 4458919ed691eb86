"""The GPU and TPU launch scripts in DRY_RUN mode: the real configs' mesh is built over 8 CPU devices and
one training step of a tiny random LLaMA runs through the same CLI the scripts launch for real. The two
dry runs are independent processes, started together (they overlap on a multi-core machine); each test
waits for its own."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# name: (script, config, --config.mesh override or None, expected (data, fsdp, tensor))
CASES = {
    "gpu": ("train_teacher_gpu.sh", "configs/teacher_llama7b.py", None, (1, 8, 1)),
    "tpu": ("train_teacher_tpu.sh", "configs/teacher_llama3_8b.py", "(2,2,2)", (2, 2, 2)),
}


@pytest.fixture(scope="module")
def tokenizer_dir(prepared_synthetic, tmp_path_factory):
    from leader_jax.data.dataset import PreparedData
    from leader_jax.data.prompts import build_prompt
    from leader_jax.tokenizer import train_bpe_tokenizer

    data = PreparedData.load(prepared_synthetic)
    texts = [build_prompt(s, data.vocab) for s in data.splits["train"]]
    return train_bpe_tokenizer(texts, 300, tmp_path_factory.mktemp("tok") / "tok")


@pytest.fixture(scope="module")
def dry_runs(prepared_synthetic, tokenizer_dir, tmp_path_factory):
    """{name: (process, run root, log file)}: every case's script started at once with DRY_RUN=1 (output to
    a log file, so neither blocks on a full pipe while the other is awaited); killed at teardown if alive."""
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "LEADER_JAX_NO_PROGRESS": "1",
           "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    started = {}
    for name, (script, config, mesh, _) in CASES.items():
        out = tmp_path_factory.mktemp(f"dry_{name}")
        extra = [f"--config.mesh={mesh}"] if mesh else []
        log = open(out / "script.log", "w")
        proc = subprocess.Popen(["bash", str(ROOT / "scripts" / script), str(prepared_synthetic),
                                 str(tokenizer_dir), str(out), config, "--config.train.micro_batch=8", *extra],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        started[name] = (proc, out, log)
    yield started
    for proc, _, log in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.parametrize("name", list(CASES))
def test_dry_run_builds_the_mesh_and_runs_one_step(name, dry_runs):
    script, config, _, expect = CASES[name]
    proc, root, log = dry_runs[name]
    try:
        rc = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{script} dry run timed out")
    assert rc == 0, (root / "script.log").read_text()[-3000:]
    run = root / "dry_run"
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1]
    assert math.isfinite(steps[0]["loss"]) and steps[0]["loss"] > 0
    summary = json.loads((run / "summary.json").read_text())
    assert tuple(summary["mesh"].values()) == expect and list(summary["mesh"]) == ["data", "fsdp", "tensor"]
    assert summary["devices"] == 8 and summary["platform"] == "cpu"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["config_name"] == Path(config).stem and cfg["lora"]["task"]["rank"] == 8   # the paper's LoRA
    assert (run / "predictions" / "test.npz").is_file()
