#!/usr/bin/env bash
# Creates/reuses .venv, installs runtime + dev requirements, runs the whole pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
