"""Benchmark `python -m leader_jax.predict`: patients/s end to end from JSONL (parse → encode → model →
write), side by side with the in-memory student inference of the same model in the same process.

    PYTHONPATH=. .venv/bin/python scripts/bench_predict.py [--patients 46000] [--repeats 3] [--work DIR]

Set-up (reused when DIR holds it): synthetic MIMIC-III-format tables (`leader_jax.data.synthetic`,
2,000 patients) are prepared, and a student with the default model (d 64, 4 heads, FFN 300, configs/
student.py) is trained for one epoch without KD: the speed does not depend on the weights. Then
`--patients` synthetic patients are written as JSONL from that vocabulary with MIMIC-III-like sizes
(1 + Geometric(0.6) visits capped at 30, per-visit sets Poisson(13 / 4 / 15)), codes written bare
("4019", as a user would) so every code goes through the resolver.

Timed passes, interleaved so both see the same machine load (medians reported):
- end to end: `leader_jax.predict.run_predict` on the JSONL file into an output JSONL file;
- in memory: the student's `StudentTrainer.predict` on the already encoded patients (what
  scripts/bench_student.py measures).
A further pass, one stage at a time over all patients in one chunk (no pipelining), splits the
end-to-end time into parse + encode (`leader_jax.patient_columns`), model, render
(`leader_jax.predict_render`) and write.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np


def build_run(work: Path) -> Path:
    from leader_jax.cli import load_config
    from leader_jax.data.prepare import prepare_to
    from leader_jax.data.synthetic import write_mimic3
    from leader_jax.eval import read_run_json
    from leader_jax.train import student as ts

    prep, run = work / "prepared", work / "student"
    if not (prep / "vocab.json").is_file():
        prepare_to(prep, dataset="synthetic", raw_dir=str(write_mimic3(work / "raw", n_patients=2000, seed=0)))
    if not read_run_json(run).get("finished"):
        cfg = load_config("student.py", {"data_dir": str(prep), "distill": False,
                                         "train": {"epochs": 1}, "model": {"bucket_levels": 1}})
        with cfg.unlocked():
            cfg.out = str(run)
        ts.train(cfg)
    return run


def write_patients(path: Path, vocab, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    bare = {k: [t.partition(":")[2] for t in getattr(vocab, k)] for k in ("diag", "proc", "med")}
    n_vis = np.minimum(rng.geometric(0.6, n), 30)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            visits = []
            for _ in range(int(n_vis[i])):
                sizes = [max(1, min(int(x), len(bare[k]))) for x, k in zip(rng.poisson((13, 4, 15)), ("diag", "proc", "med"))]
                visits.append({f: [bare[k][j] for j in rng.choice(len(bare[k]), s, replace=False)]
                               for f, k, s in zip(("diagnoses", "procedures", "medications"), ("diag", "proc", "med"), sizes)})
            prof = {k: v[int(rng.integers(len(v)))] for k, v in vocab.profile.items()}
            f.write(json.dumps({"id": f"p{i}", "profile": prof, "visits": visits}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=46000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default="runs/bench_predict")
    ap.add_argument("--json", default="", help="also write the results to this file")
    ap.add_argument("--threshold", default="val", help="predict config threshold (val = the run's val-tuned θ, "
                    "0.16 here: ~30 recommended drugs and ~50 DDI pairs, 10 KB of output per patient)")
    args = ap.parse_args()

    from leader_jax import Recommender
    from leader_jax.cli import load_config
    from leader_jax.patient_input import parse_lines
    from leader_jax.predict import run_predict

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    run = build_run(work)
    rec = Recommender.load(run, threshold=args.threshold)
    inp, out = work / f"patients_{args.patients}.jsonl", work / "recs.jsonl"
    if not inp.is_file():
        write_patients(inp, rec.vocab, args.patients, seed=1)
    cfg = load_config("predict.py", {"run_dir": str(run), "input": str(inp), "out": str(out),
                                     "threshold": args.threshold})
    backend = rec._predict_fn
    lines = inp.read_text(encoding="utf-8").splitlines(keepends=True)
    samples = [p.patient.sample for p in parse_lines(lines, rec.resolver)]
    enc = backend.encode(samples)

    def e2e():
        counts = run_predict(cfg, recommender=rec)
        assert counts["ok"] == args.patients, counts

    def in_memory():
        backend.model(enc)

    t = time.perf_counter()
    e2e()
    warm = time.perf_counter() - t
    in_memory()
    t_e2e, t_mem = [], []
    for _ in range(args.repeats):          # interleaved: both see the same load
        t = time.perf_counter(); e2e(); t_e2e.append(time.perf_counter() - t)                      # noqa: E702
        t = time.perf_counter(); in_memory(); t_mem.append(time.perf_counter() - t)                # noqa: E702
    stages = {}                     # one stage at a time over all patients, one chunk
    t = time.perf_counter(); records = rec.parse_chunk(lines); stages["parse_and_encode"] = time.perf_counter() - t  # noqa
    t = time.perf_counter(); probs = backend.model(records.enc); stages["model"] = time.perf_counter() - t  # noqa
    t = time.perf_counter(); text = rec.renderer.render(records, probs); stages["render"] = time.perf_counter() - t  # noqa
    t = time.perf_counter(); (work / "stage_pass.jsonl").write_bytes(text); stages["write"] = time.perf_counter() - t  # noqa
    head = text.split(b"\n", 2000)[:2000]
    head = [x for x in head if x]
    n_rec = sum(len(json.loads(x)["recommended"]) for x in head) / max(len(head), 1)
    m_e2e, m_mem = statistics.median(t_e2e), statistics.median(t_mem)
    n = args.patients
    out_res = {"patients": n, "threshold": rec.threshold, "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
               "inference_path": "kernel" if backend.trainer.kernel else f"xla ({backend.trainer.kernel_note})",
               "mean_visits": float(enc.n_visits.mean()), "first_e2e_pass_s": round(warm, 2),
               "e2e_times_s": [round(x, 3) for x in t_e2e], "in_memory_times_s": [round(x, 3) for x in t_mem],
               "e2e_patients_per_s": round(n / m_e2e), "in_memory_patients_per_s": round(n / m_mem),
               "e2e_over_in_memory_time": round(m_e2e / m_mem, 2),
               "output_mb": round(len(text) / 2**20, 1), "recommended_per_patient": round(n_rec, 1),
               "stage_pass_s": {k: round(v, 3) for k, v in stages.items()}}
    print(f"end to end (JSONL → JSONL): median {m_e2e:.2f} s = {n / m_e2e:,.0f} patients/s; in-memory student "
          f"inference: median {m_mem:.2f} s = {n / m_mem:,.0f} patients/s; end to end takes "
          f"{m_e2e / m_mem:.2f}× the in-memory time")
    print(json.dumps(out_res, indent=2))
    if args.json:
        from leader_jax.io import atomic_write_json
        atomic_write_json(args.json, out_res)


if __name__ == "__main__":
    main()
