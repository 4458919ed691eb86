"""Benchmark `python -m leader_jax.predict`: patients/s end to end from JSONL (parse → encode → model →
render → write), the new renderer and pipeline side by side with the previous ones and with the in-memory
student inference of the same model, all in the same process.

    PYTHONPATH=. .venv/bin/python scripts/bench_predict.py [--patients 46000] [--repeats 3] [--work DIR]

Set-up (reused when DIR holds it): synthetic MIMIC-III-format tables (`leader_jax.data.synthetic`,
2,000 patients) are prepared, and a student with the default model (d 64, 4 heads, FFN 300, configs/
student.py) is trained for one epoch without KD: the speed does not depend on the weights. Then
`--patients` synthetic patients are written as JSONL from that vocabulary with MIMIC-III-like sizes
(1 + Geometric(0.6) visits capped at 30, per-visit sets Poisson(13 / 4 / 15)), codes written bare
("4019", as a user would) so every code goes through the resolver.

Timed passes, interleaved so all see the same machine load (medians reported):
- `e2e`: `leader_jax.predict.run_predict` on the JSONL file into an output JSONL file, as the CLI runs
  it (`predict_render.Renderer`, model and writes overlapped with parsing and rendering);
- `e2e_sequential`: the same, one stage at a time (`overlap=False`);
- `e2e_before`: one stage at a time with the previous renderer (`predict_render.ReferenceRenderer`), i.e.
  the CLI before this renderer and the overlap;
- `in_memory`: the student's `StudentTrainer.predict` on the already encoded patients (what
  scripts/bench_student.py measures).
The outputs of `e2e` and `e2e_before` are checked to be the same bytes. A stage pass over all patients
in one chunk (no pipelining), repeated and interleaved the same way, splits the time into parse + encode
(`leader_jax.patient_columns`), model, render with each renderer, and write.
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

    import filecmp

    from leader_jax import Recommender
    from leader_jax.cli import load_config
    from leader_jax.patient_input import parse_lines
    from leader_jax.predict import run_predict
    from leader_jax.predict_render import ReferenceRenderer

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    run = build_run(work)
    rec = Recommender.load(run, threshold=args.threshold)
    inp = work / f"patients_{args.patients}.jsonl"
    if not inp.is_file():
        write_patients(inp, rec.vocab, args.patients, seed=1)
    new = rec.renderer
    old = ReferenceRenderer(rec.vocab, rec.threshold, rec.ddi, rec.ddi_graph, rec.cfg)
    backend = rec._predict_fn
    lines = inp.read_text(encoding="utf-8").splitlines(keepends=True)
    samples = [p.patient.sample for p in parse_lines(lines, rec.resolver)]
    enc = backend.encode(samples)
    n = args.patients

    def e2e(renderer, overlap: bool, out: Path):
        rec.__dict__["renderer"] = renderer                # the Recommender's cached renderer
        cfg = load_config("predict.py", {"run_dir": str(run), "input": str(inp), "out": str(out),
                                         "threshold": args.threshold})
        counts = run_predict(cfg, recommender=rec, overlap=overlap)
        assert counts["ok"] == n, counts

    passes = {"e2e": lambda: e2e(new, True, work / "recs.jsonl"),
              "e2e_sequential": lambda: e2e(new, False, work / "recs_sequential.jsonl"),
              "e2e_before": lambda: e2e(old, False, work / "recs_before.jsonl"),
              "in_memory": lambda: backend.model(enc)}
    t = time.perf_counter()
    passes["e2e"]()
    warm = time.perf_counter() - t
    passes["in_memory"]()
    times: dict[str, list[float]] = {k: [] for k in passes}
    stage_t: dict[str, list[float]] = {k: [] for k in ("parse_and_encode", "model", "render_before", "render", "write")}
    stage_cpu: dict[str, list[float]] = {k: [] for k in stage_t}

    def stage(name, f, *args):
        """f(*args), timed as one stage: wall and process CPU time."""
        t, c = time.perf_counter(), time.process_time()
        r = f(*args)
        stage_t[name].append(time.perf_counter() - t)
        stage_cpu[name].append(time.process_time() - c)
        return r

    def write(text):
        with open(work / "stage_pass.jsonl", "wb") as f:
            f.write(text)

    for _ in range(args.repeats):          # interleaved: all see the same load
        for name, f in passes.items():
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
        # one stage at a time over all patients, one chunk
        records = stage("parse_and_encode", rec.parse_chunk, lines)
        probs = stage("model", backend.model, records.enc)
        stage("render_before", old.render, records, probs)
        text = stage("render", new.render_view, records, probs)
        stage("write", write, text)
    rec.__dict__["renderer"] = new
    same = filecmp.cmp(work / "recs.jsonl", work / "recs_before.jsonl", shallow=False) and \
        filecmp.cmp(work / "recs_sequential.jsonl", work / "recs_before.jsonl", shallow=False)
    head = [x for x in bytes(text[:20_000_000]).split(b"\n")[:2000] if x]
    n_rec = sum(len(json.loads(x)["recommended"]) for x in head[:-1]) / max(len(head) - 1, 1)
    med = {k: statistics.median(v) for k, v in times.items()}
    stages = {k: statistics.median(v) for k, v in stage_t.items()}
    cpu = {k: statistics.median(v) for k, v in stage_cpu.items()}
    out_res = {"patients": n, "threshold": rec.threshold, "cpu_count": os.cpu_count(),
               "load_avg_1m": os.getloadavg()[0],
               "inference_path": "kernel" if backend.trainer.kernel else f"xla ({backend.trainer.kernel_note})",
               "mean_visits": float(enc.n_visits.mean()), "first_e2e_pass_s": round(warm, 2),
               "times_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
               "patients_per_s": {k: round(n / v) for k, v in med.items()},
               "e2e_speedup_over_before": round(med["e2e_before"] / med["e2e"], 2),
               "e2e_over_in_memory_time": round(med["e2e"] / med["in_memory"], 2),
               "same_bytes_as_before": same,
               "output_mb": round(len(text) / 2**20, 1), "recommended_per_patient": round(n_rec, 1),
               "stage_pass_s": {k: round(v, 3) for k, v in stages.items()},
               "stage_pass_cpu_s": {k: round(v, 3) for k, v in cpu.items()},
               "render_speedup": round(stages["render_before"] / stages["render"], 2),
               "render_speedup_cpu": round(cpu["render_before"] / cpu["render"], 2),
               "load_avg_end": os.getloadavg()}
    pps = out_res["patients_per_s"]
    print(f"end to end (JSONL → JSONL): {pps['e2e']:,} patients/s (median {med['e2e']:.2f} s); one stage at a "
          f"time {pps['e2e_sequential']:,}/s; before {pps['e2e_before']:,}/s ({out_res['e2e_speedup_over_before']}×"
          f" faster now); in-memory student inference {pps['in_memory']:,}/s; render "
          f"{out_res['render_speedup']}× faster ({out_res['render_speedup_cpu']}× in CPU time); same bytes as before: {same}")
    print(json.dumps(out_res, indent=2))
    if args.json:
        from leader_jax.io import atomic_write_json
        atomic_write_json(args.json, out_res)


if __name__ == "__main__":
    main()
