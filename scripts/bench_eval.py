"""Time leader_jax.metrics.summarize on 100,000 samples × 300 drugs with 10 rounds (budget: ≤ 10 s
on 2 cores). Random labels (~5 % positive), random probabilities, a random DDI matrix and visit groups,
i.e. the full work `python -m leader_jax.eval` does per threshold. Prints every run and the median.

    PYTHONPATH=. .venv/bin/python scripts/bench_eval.py [--n 100000] [--m 300] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from leader_jax import metrics as M


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--m", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default="", help="also write the results to this file")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    y = (rng.random((args.n, args.m)) < 0.05).astype(np.uint8)
    p = rng.random((args.n, args.m), dtype=np.float32)
    sv = rng.random(args.n) < 0.3
    a = np.triu((rng.random((args.m, args.m)) < 0.05).astype(np.uint8), 1)
    a = a | a.T
    times = []
    for i in range(args.repeats):
        t = time.perf_counter()
        res = M.summarize(y, p, threshold=0.5, ddi=a, single_visit=sv, rounds=args.rounds)
        times.append(time.perf_counter() - t)
        print(f"run {i + 1}: {times[-1]:.2f} s")
    t = time.perf_counter()
    M.best_threshold(y, p)
    t_best = time.perf_counter() - t
    print(f"summarize {args.n:,} x {args.m} with {args.rounds} rounds: median {statistics.median(times):.2f} s "
          f"over {args.repeats} runs (min {min(times):.2f}, max {max(times):.2f}); "
          f"best_threshold (99-point grid) {t_best:.2f} s; cpus visible: {os.cpu_count()} "
          f"(shared machine: timings are indicative); overall PRAUC {res['overall']['prauc']:.4f}")
    if args.json:
        from leader_jax.io import atomic_write_json
        atomic_write_json(args.json, {"n": args.n, "m": args.m, "rounds": args.rounds, "repeats": args.repeats,
                                      "summarize_median_s": round(statistics.median(times), 3),
                                      "summarize_times_s": [round(t, 3) for t in times],
                                      "samples_per_s": round(args.n / statistics.median(times)),
                                      "best_threshold_s": round(t_best, 3), "cpu_count": os.cpu_count()})


if __name__ == "__main__":
    main()
