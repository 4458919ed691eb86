#!/usr/bin/env bash
# Creates/reuses .venv, installs runtime + dev requirements, runs the whole pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1
# Two workers, one test file each at a time (module fixtures stay whole): on the 2-core CI machine the
# suite is mostly single-threaded tracing and compiling, so two files side by side take ~0.8x the time.
# LEADER_JAX_TEST_WORKERS=0 runs it in this process.
exec .venv/bin/python -m pytest -q -n "${LEADER_JAX_TEST_WORKERS:-2}" --dist loadfile "$@"
