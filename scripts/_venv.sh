# Sourced by scripts/test.sh and scripts/demo.sh: create/reuse .venv and install runtime + dev
# requirements and the package (editable), re-installing only when a requirements file changed.
# Expects the current directory to be the repository root; fails loudly (set -euo pipefail upstream).
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[venv] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.leader_jax_installed
want=$(cat requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[venv] installing requirements"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r requirements-dev.txt
  .venv/bin/python -m pip install --quiet --no-deps -e .
  echo "$want" > "$stamp"
fi
