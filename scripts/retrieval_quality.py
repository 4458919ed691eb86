"""Retrieval quality of a teacher run's neighbours on a split (drug overlap with the true drugs; labels are
used only to measure): fixed runs give their pools' top-k, joint runs the pool order (before joint training)
and the trained re-ranker's top-k. One JSON line per ranking (`leader_jax.retrieval.run_quality`).

    PYTHONPATH=. .venv/bin/python scripts/retrieval_quality.py --run RUN [--split val] [--checkpoint best]
"""
from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="teacher run folder (retrieval.mode fixed or joint)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--checkpoint", default="best", choices=("best", "last"))
    a = ap.parse_args()
    from leader_jax.retrieval.run_quality import teacher_run_quality

    for rec in teacher_run_quality(a.run, a.split, a.checkpoint):
        print(json.dumps({"run": a.run, "split": a.split, **rec}))


if __name__ == "__main__":
    main()
