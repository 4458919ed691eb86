"""Benchmark: prepare N synthetic MIMIC-III-format patients (default 46,000 ≈ MIMIC-III scale).

    PYTHONPATH=. .venv/bin/python scripts/bench_prepare.py [--patients 46000] [--workdir DIR] [--keep]

Generates the raw tables (not timed), then times `prepare` (read + map + build + save) end to end
and prints the figure with the table sizes. The target is ≤ 120 s on 2 CPU cores."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leader_jax.data.prepare import default_config, prepare  # noqa: E402
from leader_jax.data.synthetic import write_mimic3  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=46000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="folder for raw + prepared data (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--json", default="", help="also write the results to this file")
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="leader_jax_bench_"))
    try:
        t0 = time.perf_counter()
        raw = write_mimic3(work / "raw", a.patients, a.seed)
        t_gen = time.perf_counter() - t0
        sizes = {p.name: sum(1 for _ in open(p)) - 1 for p in sorted(raw.iterdir())}
        t0 = time.perf_counter()
        data = prepare(default_config(dataset="synthetic", raw_dir=str(raw)))
        t_read = time.perf_counter() - t0
        data.save(work / "prepared")
        t_total = time.perf_counter() - t0
        s = data.stats
        res = {"patients_generated": a.patients, "raw_rows": sizes, "generate_s": round(t_gen, 1),
               "n_patients": s["n_patients"], "n_visits": s["n_visits"], "n_med": s["n_med"],
               "prepare_s": round(t_read, 1), "prepare_and_save_s": round(t_total, 1),
               "patients_per_s": round(s["n_patients"] / t_total), "cpu_count": os.cpu_count()}
        print(json.dumps(res, indent=1))
        if a.json:
            from leader_jax.io import atomic_write_json
            atomic_write_json(a.json, res)
        verdict = "OK" if t_total <= 120 else "SLOWER THAN TARGET"
        print(f"prepare of {a.patients} synthetic patients: {t_total:.1f} s (target <= 120 s; {verdict})")
    finally:
        if not a.keep and not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
