"""Test-session set-up: 8 virtual CPU devices (set before jax is imported), quiet progress bars,
exact fp32 matmuls for parity tests. Shared data fixtures live further down."""
import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("LEADER_JAX_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LEADER_JAX_COMPILE_CACHE", "off")   # CLIs run in tests never write ~/.cache

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# ---------------------------------------------------------------- shared data fixtures
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def data(prepared_synthetic):
    """`prepared_synthetic` loaded (PreparedData), once per test module."""
    from leader_jax.data.dataset import PreparedData
    return PreparedData.load(prepared_synthetic)


@pytest.fixture(scope="session")
def prepared_synthetic(tmp_path_factory):
    """A small synthetic MIMIC-III-format dataset (200 patients, seed 0) prepared with the default
    config (dataset=synthetic); returns the prepared folder (load with PreparedData.load)."""
    from leader_jax.data.prepare import prepare_to
    from leader_jax.data.synthetic import write_mimic3

    base = tmp_path_factory.mktemp("synthetic")
    raw = write_mimic3(base / "raw", n_patients=200, seed=0)
    prepare_to(base / "prepared", dataset="synthetic", raw_dir=str(raw))
    return base / "prepared"


@pytest.fixture(scope="session")
def prepared_eicu(tmp_path_factory):
    """The bundled eICU demo prepared with the default config; returns the prepared folder."""
    from leader_jax.data.prepare import prepare_to

    out = tmp_path_factory.mktemp("eicu") / "prepared"
    prepare_to(out, dataset="eicu")
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(prepared_synthetic, tmp_path_factory):
    """The tiny teachers' tokenizer: a 400-token BPE trained on the synthetic training prompts (max_history
    1); returns its folder."""
    from leader_jax.data.dataset import PreparedData
    from leader_jax.data.prompts import build_prompt
    from leader_jax.train.pretrain import train_tokenizer

    data = PreparedData.load(prepared_synthetic)
    out = tmp_path_factory.mktemp("tiny_tokenizer") / "tok"
    train_tokenizer([build_prompt(s, data.vocab, max_history=1) for s in data.splits["train"]], 400, out)
    return out


@pytest.fixture(scope="session")
def tiny_teacher_run(prepared_synthetic, tiny_tokenizer, tmp_path_factory):
    """One tiny teacher run shared by the feature-store and teacher-resume tests (trained once per session):
    `test_teacher.shared_run_cfg` (head_norm, mesh (2,2,2), 10 steps, validation every 5 steps, validation
    predictions). Returns (its config, run folder, summary dict). Read it only; copy it before changing it."""
    from pathlib import Path

    from test_teacher import shared_run_cfg
    from leader_jax.train.teacher import train

    cfg = shared_run_cfg((tmp_path_factory.mktemp("tiny_teacher"), prepared_synthetic, tiny_tokenizer), "run")
    summary = train(cfg)
    return cfg, Path(cfg.out), summary
