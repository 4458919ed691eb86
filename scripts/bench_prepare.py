"""Benchmark: prepare N synthetic MIMIC-III-format patients (default 46,000 ≈ MIMIC-III scale).

    PYTHONPATH=. .venv/bin/python scripts/bench_prepare.py [--patients 46000] [--workdir DIR] [--keep] [--meds]

--meds adds the MEDS row: the same tables exported to MEDS (export_meds, not timed), then the native
MIMIC-III reader and the MEDS reader each prepare them in a fresh child process, interleaved `--repeats`
times; it prints the median seconds of each, their ratio and each child's peak resident memory.

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


def _child(kind: str, raw: str) -> None:
    """One timed prepare in this (fresh) process; prints seconds and peak RSS as JSON."""
    import resource

    cfg = default_config(dataset="synthetic", raw_dir=raw) if kind == "native" else \
        default_config(dataset="meds", raw_dir=raw, top_k_med=300)
    t0 = time.perf_counter()
    data = prepare(cfg)
    dt = time.perf_counter() - t0
    print(json.dumps({"s": dt, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "n_patients": data.stats["n_patients"], "samples_sha": __import__("hashlib").sha256(
                          data._files()["samples.jsonl"]).hexdigest()}))


def meds_row(raw: Path, work: Path, repeats: int) -> dict:
    import statistics
    import subprocess

    from leader_jax.data.export_meds import export

    t0 = time.perf_counter()
    meds = export("mimic3", work / "meds", raw_dir=str(raw), splits="none", shard_subjects=5000)
    t_export = time.perf_counter() - t0
    runs = {"native": [], "meds": []}
    for _ in range(repeats):
        for kind, path in (("native", raw), ("meds", meds)):
            out = subprocess.run([sys.executable, __file__, "--_child", kind, str(path)], check=True,
                                 capture_output=True, text=True, env={**os.environ, "LEADER_JAX_NO_PROGRESS": "1"})
            runs[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {k: statistics.median(r["s"] for r in v) for k, v in runs.items()}
    return {"meds_export_s": round(t_export, 1), "native_prepare_s": round(med["native"], 1),
            "meds_prepare_s": round(med["meds"], 1), "meds_over_native": round(med["meds"] / med["native"], 2),
            "native_peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs["native"])),
            "meds_peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs["meds"])),
            "same_samples": runs["native"][0]["samples_sha"] == runs["meds"][0]["samples_sha"],
            "repeats": repeats}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--_child":
        return _child(sys.argv[2], sys.argv[3])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=46000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="folder for raw + prepared data (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--json", default="", help="also write the results to this file")
    ap.add_argument("--meds", action="store_true", help="add the MEDS row (export, then native vs MEDS reader)")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats of the MEDS row")
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
        if a.meds:
            res["meds"] = meds_row(raw, work, a.repeats)
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
