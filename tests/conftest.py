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
