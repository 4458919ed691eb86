#!/usr/bin/env bash
# Creates/reuses .venv and installs, then runs the end-to-end demo on the bundled eICU demo:
# prepare data → SmolLM2 stage 1 (domain adapter) → stage 2 teacher → feature store → students (KD / no KD) →
# baselines → evaluation; prints the comparison table and writes runs/demo/report.md.
# Extra arguments go to the demo, e.g. scripts/demo.sh --config.dataset=mimic3 or --config.fresh=True.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec .venv/bin/python -m leader_jax.demo "$@"
