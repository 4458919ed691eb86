"""DDI trade-off of the predict CLI's DDI filters on the bundled MIMIC demos (test split, eval CLI).

    PYTHONPATH=. .venv/bin/python scripts/ddi_tradeoff.py [--root runs/ddi_tradeoff] [--datasets mimic3 mimic4]

Per dataset: prepare the bundled demo (configs/data.py), train a no-KD student (configs/student.py with
that dataset's preset, one shape bucket), then write the test (and val) predictions filtered off / drop_lower / penalty at
three strengths into separate run folders (`leader_jax.ddi_safety.write_filtered_run`) and score each
with the eval CLI's `evaluate_run` at the unfiltered run's val-tuned threshold (no re-tuning). Prints a
markdown table (DDI rate, Jaccard, F1, PRAUC, #meds; mean ± std over the eval CLI's rounds). Stages
already done are reused.
"""
from __future__ import annotations

import argparse
from pathlib import Path

STRENGTHS = (0.05, 0.1, 0.25)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/ddi_tradeoff")
    ap.add_argument("--datasets", nargs="+", default=["mimic3", "mimic4"])
    ap.add_argument("--bucket_levels", type=int, default=1,
                    help="student model.bucket_levels (1: one compile; the demos are tiny)")
    args = ap.parse_args()

    from leader_jax import ddi_safety
    from leader_jax.cli import load_config
    from leader_jax.data.prepare import prepare_to
    from leader_jax.eval import evaluate_run, read_run_json
    from leader_jax.recommender import resolve_threshold
    from leader_jax.train import student as ts

    rows = ["| dataset | filter | DDI rate | Jaccard | F1 | PRAUC | #meds |", "|---|---|---:|---:|---:|---:|---:|"]
    for ds in args.datasets:
        root = Path(args.root) / ds
        prep = root / "prepared"
        if not (prep / "vocab.json").is_file():
            prepare_to(prep, dataset=ds)
        run = root / "student_nokd"
        if not read_run_json(run).get("finished"):
            cfg = load_config(f"student.py:{ds}", {"data_dir": str(prep), "distill": False,
                                                   "model": {"bucket_levels": args.bucket_levels}})
            with cfg.unlocked():
                cfg.out = str(run)
            ts.train(cfg)
        theta, _ = resolve_threshold("val", run)
        variants = [("off", 0.0, run)]
        variants += [("drop_lower", 0.0, root / "drop_lower")]
        variants += [("penalty", s, root / f"penalty_{s:g}") for s in STRENGTHS]
        for mode, strength, folder in variants:
            if mode != "off":
                ddi_safety.write_filtered_run(run, folder, mode, strength, theta)
            res = evaluate_run(load_config("eval.py", {"run_dir": str(folder), "threshold": theta,
                                                       "tune_threshold": False, "plots": False}))
            r = res["rounds"]

            def pm(k, d=4, r=r):
                return f"{r[k]['mean']:.{d}f} ± {r[k]['std']:.{d}f}"
            name = mode if mode != "penalty" else f"penalty λ={strength:g}"
            rows.append(f"| {ds} (test {res['n']}, θ={theta:g}) | {name} | {pm('ddi_rate')} | {pm('jaccard')} | "
                        f"{pm('f1')} | {pm('prauc')} | {pm('avg_meds', 2)} |")
            print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
