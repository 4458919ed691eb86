#!/usr/bin/env bash
# Creates/reuses .venv, installs, then runs the main job. Until the end-to-end demo exists this
# prepares the bundled eICU demo into runs/demo/data and prints its statistics.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
out=runs/demo/data
.venv/bin/python -m leader_jax.data.prepare --config configs/data.py --config.dataset=eicu --out "$out"
echo "[demo] statistics ($out/stats.json):"
.venv/bin/python - "$out/stats.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
for k in ("dataset", "n_patients", "n_visits", "n_samples", "n_single_visit", "n_diag", "n_proc", "n_med",
          "avg_meds_per_visit", "avg_visits_per_patient"):
    print(f"  {k}: {s[k]}")
print(f"  ddi: {s['ddi'].get('note') or s['ddi']['graph']}")
print(f"  dropped: {sum(s['dropped'].values())} rows/visits over {len(s['dropped'])} reasons (see {sys.argv[1].rsplit('/', 1)[0]}/report.md)")
PY
