"""Benchmark LEADER(S): inference throughput (patients/s at batch 512) and one training epoch on
synthetic patients, with the default model (d 64, 4 heads, FFN 300, 10 visits). Prints medians.

    PYTHONPATH=. .venv/bin/python scripts/bench_student.py [--patients 46000] [--repeats 5] \
        [--padded] [--train_epochs 0]

Inference uses the default path (`StudentTrainer.predict`: the CPU FFI kernel on flat batches when it
is available, see `leader_jax/kernels`), timed pass by pass interleaved with the pure-XLA packed path
(`predict(kernel=False)`) so both see the same machine load and their ratio is meaningful; `--padded`
also interleaves the bucketed, padded reference path (`predict(packed=False)`). `--train_epochs 0`
skips the (long) timed training epoch.

Patients are built in memory with MIMIC-III-like sizes (2,000 diagnosis / 1,430 procedure / 131 drug
codes, 1 + Geometric(0.6) visits capped at 30, per-visit set sizes Poisson(13 / 4 / 15)) as real
`Sample` objects, then encoded with the production `encode_samples` (timed too), so the numbers cover
the whole path: index arrays → bucketed, padded batches → compiled predict / train step.

`--train` instead measures student TRAINING on the prepared eICU demo against a PyTorch re-statement of
the original LEADER student loop (`scripts/original_student_torch.py`: per-sample Python batching, sets
padded to 100 codes, Adam, one step per batch): per batch size (default 4 and 16) one untimed warm-up
epoch of ours (compiles every bucket), then `--epochs` epochs of each, interleaved; an epoch = a
training pass over the train split + a prediction pass over val (ours: multi-step compiled chunks and
the fast inference path; no checkpoint). Prints medians, steps/s, the per-epoch ratio, start-up (process
start → first optimizer step, compile count and seconds) and where our epoch's time goes. Pin the
process to N cores with `--threads N` (also torch's thread count); run once per thread count:

    PYTHONPATH=. .venv/bin/python scripts/bench_student.py --train --threads 1 [--data_dir PREP] [--epochs 3]
    PYTHONPATH=. .venv/bin/python scripts/bench_student.py --train --threads 2 --cache /tmp/xla_cache

`--cache DIR` uses DIR as the persistent compilation cache (run twice: fresh, then warm start-up);
default a fresh temporary folder. `--train_patients N` trains on the first N train patients only
(shorter runs on a loaded machine; the ratio is per step).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np


def make_samples(n: int, seed: int):
    from leader_jax.data.dataset import Sample, Vocab
    from leader_jax.data.records import Visit

    rng = np.random.default_rng(seed)
    vocab = Vocab(diag=tuple(f"dx9:{i}" for i in range(2000)), proc=tuple(f"px9:{i}" for i in range(1430)),
                  med=tuple(f"atc:{i}" for i in range(131)), names={},
                  profile={f: ("unknown",) + tuple(f"{f}{i}" for i in range(6))
                           for f in ("insurance", "language", "religion", "marital_status", "ethnicity",
                                     "gender", "age")})
    n_vis = np.minimum(1 + rng.geometric(0.6, n) - 1, 30)
    samples = []
    for i in range(n):
        visits = []
        for j in range(int(n_vis[i])):
            nd, npx, nm = (max(1, min(int(k), cap)) for k, cap in zip(rng.poisson((13, 4, 15)), (39, 30, 60)))
            visits.append(Visit(id=f"{i}-{j}", time=f"{j:03d}",
                                diagnoses=tuple(vocab.diag[k] for k in rng.choice(2000, nd, replace=False)),
                                procedures=tuple(vocab.proc[k] for k in rng.choice(1430, npx, replace=False)),
                                medications=tuple(vocab.med[k] for k in rng.choice(131, nm, replace=False))))
        prof = {f: f"{f}{rng.integers(6)}" for f in vocab.profile}
        samples.append(Sample(id=str(i), patient_id=str(i), visits=tuple(visits), profile=prof))
    return samples, vocab


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


PROCESS_START = time.perf_counter()


def train_bench(args) -> dict:
    """Ours vs the PyTorch re-statement of the original student loop, per batch size (see the doc)."""
    import tempfile
    from pathlib import Path

    if args.threads:
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.threads]))
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from leader_jax import compile_cache
    cache = compile_cache.enable(args.cache or tempfile.mkdtemp(prefix="bench_xla_"))
    before = compile_cache.CompileStats.snapshot()

    import jax
    from leader_jax.cli import load_config
    from leader_jax.data.dataset import PreparedData
    from leader_jax.train import student_inputs as si
    from leader_jax.train import student_trainer as st
    from leader_jax.train.student_trainer import split_metrics
    from original_student_torch import OriginalTrainer

    prep = Path(args.data_dir)
    if not (prep / "vocab.json").exists():
        from leader_jax.data.prepare import prepare_to
        prepare_to(prep, dataset="eicu")
    data = PreparedData.load(prep)
    train_samples = list(data.splits["train"])[: args.train_patients or None]
    val_samples = list(data.splits["val"])
    cfg = load_config("student.py:eicu", {"distill": False, "data_dir": str(prep)})
    encs = {"train": si.encode_samples(train_samples, data.vocab, cfg.model.max_visits),
            "val": si.encode_samples(val_samples, data.vocab, cfg.model.max_visits)}
    caps = si.bucket_caps(np.concatenate([e.needs for e in encs.values()]), cfg.model.bucket_levels)
    buckets = si.assign_buckets(encs["train"].needs, caps)
    res = {"threads": args.threads or len(os.sched_getaffinity(0)), "train_patients": len(train_samples),
           "val_patients": len(val_samples), "buckets": [list(c) for c in caps], "compile_cache": str(cache),
           "epochs": args.epochs, "by_batch": {}}
    for bs in args.batch_sizes:
        trainer = st.StudentTrainer(st.model_config(cfg, data.vocab, None), st.loss_config(cfg), lr=5e-4,
                                    seed=cfg.seed)
        first, last_train = {}, [0.0]

        def ours(epoch: int, timing: dict | None = None) -> int:
            t = time.perf_counter()
            sums, steps, build = [], 0, 0.0
            for chunk in si.chunk_plan(buckets, bs, cfg.train.steps_per_call, np.random.default_rng([0, epoch + 1])):
                b0 = time.perf_counter()
                arrays = si.make_chunk(encs["train"], chunk.rows, caps[chunk.bucket])
                build += time.perf_counter() - b0
                sums.append(trainer.train_chunk(arrays, chunk.steps))
                steps += chunk.steps
                if "first_step_s" not in first:
                    jax.block_until_ready(sums[-1])
                    first["first_step_s"] = time.perf_counter() - PROCESS_START
            jax.device_get(sums)
            t_train = time.perf_counter() - t
            last_train[0] = t_train
            split_metrics(encs["val"].labels, trainer.predict(encs["val"], caps, cfg.eval.batch_size), 0.5)
            if timing is not None:
                timing.update(build_batches_s=build, train_s=t_train - build,
                              validate_s=time.perf_counter() - t - t_train)
            return steps

        t = time.perf_counter()
        ours(-1)                                             # warm-up: compiles every bucket
        warm_epoch = time.perf_counter() - t
        torch_trainer = OriginalTrainer(train_samples, val_samples, data.vocab, batch_size=bs, lr=5e-4)
        t_ours, t_torch, torch_train, ours_train, breakdown = [], [], [], [], {}
        for e in range(args.epochs):                         # interleaved: both see the same load
            t = time.perf_counter()
            steps = ours(e, breakdown if e == 0 else None)
            t_ours.append(time.perf_counter() - t)
            ours_train.append(last_train[0])
            t = time.perf_counter()
            torch_steps = torch_trainer.train_steps()
            torch_train.append(time.perf_counter() - t)
            torch_trainer.evaluate()
            t_torch.append(time.perf_counter() - t)
            print(f"batch {bs} epoch {e}: ours {t_ours[-1]:.2f} s ({steps} steps), original {t_torch[-1]:.2f} s "
                  f"({torch_steps} steps)", flush=True)
        mo, mt = statistics.median(t_ours), statistics.median(t_torch)
        row = {"ours_epoch_median_s": round(mo, 3), "original_epoch_median_s": round(mt, 3),
               "ours_epoch_s": [round(x, 3) for x in t_ours], "original_epoch_s": [round(x, 3) for x in t_torch],
               "ratio_median": round(mt / mo, 1),
               "ratio_median_of_pairs": round(statistics.median(b / a for a, b in zip(t_ours, t_torch)), 1),
               "ours_steps_per_s": round(steps / mo, 1), "original_steps_per_s": round(torch_steps / mt, 2),
               "original_train_pass_median_s": round(statistics.median(torch_train), 3),
               "train_pass_ratio_median": round(statistics.median(torch_train) / statistics.median(
                   [x for x in ours_train]), 1),
               "ours_warmup_epoch_s": round(warm_epoch, 2),
               "ours_epoch_breakdown_s": {k: round(v, 3) for k, v in breakdown.items()}, **first}
        res["by_batch"][str(bs)] = row
        print(f"batch {bs}: per-epoch median ours {mo:.2f} s vs original {mt:.2f} s = {mt / mo:.1f}x "
              f"({row['ours_steps_per_s']} vs {row['original_steps_per_s']} steps/s)", flush=True)
    first_bs = str(args.batch_sizes[0])
    res["startup_s"] = round(res["by_batch"][first_bs]["first_step_s"], 2)
    res["compile"] = compile_cache.CompileStats.since(before)
    print(f"start-up (process start → first optimizer step, batch {first_bs}): {res['startup_s']} s; "
          f"compiles {res['compile']['compiles']} ({res['compile']['compile_seconds']} s, "
          f"{res['compile']['cache_hits']} persistent-cache hits)", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", action="store_true", help="training: ours vs the original loop (see above)")
    ap.add_argument("--data_dir", default="runs/eicu_prep", help="--train: prepared eICU demo (made if missing)")
    ap.add_argument("--threads", type=int, default=0, help="--train: pin to this many cores (0 = all)")
    ap.add_argument("--epochs", type=int, default=3, help="--train: timed epochs per batch size")
    ap.add_argument("--batch_sizes", type=lambda s: [int(x) for x in s.split(",")], default=[4, 16])
    ap.add_argument("--train_patients", type=int, default=0, help="--train: first N train patients (0 = all)")
    ap.add_argument("--cache", default="", help="--train: persistent compilation cache folder (default: fresh)")
    ap.add_argument("--patients", type=int, default=46000)
    ap.add_argument("--repeats", type=int, default=5, help="inference repeats (median reported)")
    ap.add_argument("--train_epochs", type=int, default=1, help="timed training epochs (median; 0 = skip)")
    ap.add_argument("--padded", action="store_true", help="also time the padded reference inference path")
    ap.add_argument("--batch_size", type=int, default=16, help="training batch (config default 16)")
    ap.add_argument("--eval_batch_size", type=int, default=512)
    ap.add_argument("--teacher_dim", type=int, default=4096, help="KD target size (LLaMA-7B: 4096)")
    ap.add_argument("--json", default="", help="also write the results to this file")
    args = ap.parse_args()
    if args.train:
        res = train_bench(args)
        print(json.dumps(res, indent=2))
        if args.json:
            from leader_jax.io import atomic_write_json
            atomic_write_json(args.json, res)
        return

    import jax
    from configs.student import get_config
    from leader_jax.io import progress
    from leader_jax.train import student_inputs as si
    from leader_jax.train import student_trainer as st

    cfg = get_config()
    t0 = time.perf_counter()
    samples, vocab = make_samples(args.patients, seed=0)
    t_make = time.perf_counter() - t0
    t_enc, _ = median_time(lambda: si.encode_samples(samples, vocab, cfg.model.max_visits), 1)
    enc = si.encode_samples(samples, vocab, cfg.model.max_visits)
    enc.teacher = np.random.default_rng(1).standard_normal((len(enc), args.teacher_dim)).astype(np.float16)
    caps = si.bucket_caps(enc.needs, cfg.model.bucket_levels)
    buckets = si.assign_buckets(enc.needs, caps)
    trainer = st.StudentTrainer(st.model_config(cfg, vocab, args.teacher_dim), st.loss_config(cfg),
                                lr=cfg.train.lr, seed=0)
    n_params = int(sum(np.prod(a.shape) for a in jax.tree.leaves(trainer.params)))

    # inference: warm up (compile every bucket), then time whole passes over all patients
    t = time.perf_counter()
    trainer.predict(enc, caps, args.eval_batch_size)
    t_warm = time.perf_counter() - t
    t = time.perf_counter()
    xla_ref = trainer.predict(enc, caps, args.eval_batch_size, kernel=False)
    t_xla_warm = time.perf_counter() - t
    pad_res = {"inference_path": "kernel" if trainer.kernel else f"xla ({trainer.kernel_note})",
               "xla_compile_and_first_pass_s": round(t_xla_warm, 2),
               "default_vs_xla_max_abs_diff": float(np.abs(xla_ref - trainer.predict(enc, caps, args.eval_batch_size)).max())}
    if args.padded:
        t = time.perf_counter()
        ref = trainer.predict(enc, caps, args.eval_batch_size, packed=False)
        pad_res["padded_compile_and_first_pass_s"] = round(time.perf_counter() - t, 2)
        pad_res["packed_vs_padded_max_abs_diff"] = float(np.abs(ref - trainer.predict(enc, caps, args.eval_batch_size)).max())
    inf_times, xla_times, pad_times = [], [], []
    for _ in range(args.repeats):       # interleaved: every path sees the same load
        inf_times.append(median_time(lambda: trainer.predict(enc, caps, args.eval_batch_size), 1)[0])
        xla_times.append(median_time(lambda: trainer.predict(enc, caps, args.eval_batch_size, kernel=False), 1)[0])
        if args.padded:
            pad_times.append(median_time(lambda: trainer.predict(enc, caps, args.eval_batch_size, packed=False), 1)[0])
    t_inf = statistics.median(inf_times)
    t_xla = statistics.median(xla_times)
    print(f"inference ({pad_res['inference_path']}): median {t_inf:.3f} s for {args.patients} patients at batch "
          f"{args.eval_batch_size} = {args.patients / t_inf:,.0f} patients/s (passes {[round(x, 3) for x in inf_times]})",
          flush=True)
    print(f"pure-XLA packed path: median {t_xla:.3f} s = {args.patients / t_xla:,.0f} patients/s; "
          f"default / XLA speed-up {t_xla / t_inf:.2f}x (median of per-pass ratios "
          f"{statistics.median(x / i for x, i in zip(xla_times, inf_times)):.2f}x)", flush=True)
    pad_res.update(xla_predict_median_s=round(t_xla, 3), xla_predict_times_s=[round(x, 3) for x in xla_times],
                   xla_patients_per_s=round(args.patients / t_xla),
                   speedup_vs_xla=round(statistics.median(x / i for x, i in zip(xla_times, inf_times)), 2))
    if args.padded:
        t_pad = statistics.median(pad_times)
        pad_res.update(padded_predict_median_s=round(t_pad, 3), padded_predict_times_s=[round(x, 3) for x in pad_times],
                       padded_patients_per_s=round(args.patients / t_pad))
        print(f"padded reference: median {t_pad:.3f} s = {args.patients / t_pad:,.0f} patients/s", flush=True)

    # training (multi-step chunks, as the CLI): one warm-up chunk per bucket (compiles), then timed epochs
    t = time.perf_counter()
    for b in np.unique(buckets):
        rows = np.full((cfg.train.steps_per_call, args.batch_size), -1)
        first = np.nonzero(buckets == b)[0][: args.batch_size]
        rows[0, : len(first)] = first
        jax.block_until_ready(trainer.train_chunk(si.make_chunk(enc, rows, caps[b], True), 1))
    t_train_warm = time.perf_counter() - t

    def epoch():
        plan = si.chunk_plan(buckets, args.batch_size, cfg.train.steps_per_call, np.random.default_rng(trainer.step))
        sums = None
        for c in progress(plan, desc="train epoch", unit="chunk"):
            sums = trainer.train_chunk(si.make_chunk(enc, c.rows, caps[c.bucket], True), c.steps)
        jax.block_until_ready(sums)

    t_epoch, epoch_times = median_time(epoch, args.train_epochs) if args.train_epochs > 0 else (float("nan"), [])
    res = {
        "patients": args.patients, "devices": str(jax.devices()[0].platform), "cpu_count": os.cpu_count(),
        "n_params": n_params, "buckets": [list(c) for c in caps],
        "bucket_sizes": np.bincount(buckets, minlength=len(caps)).tolist(),
        "mean_visits": float(enc.n_visits.mean()),
        "make_samples_s": round(t_make, 2), "encode_s": round(t_enc, 2),
        "encode_patients_per_s": round(args.patients / t_enc),
        "predict_compile_and_first_pass_s": round(t_warm, 2),
        "predict_median_s": round(t_inf, 3), "predict_times_s": [round(x, 3) for x in inf_times],
        "inference_patients_per_s": round(args.patients / t_inf), **pad_res,
        "train_compile_s": round(t_train_warm, 2), "train_batch_size": args.batch_size,
        "train_epoch_median_s": round(t_epoch, 2) if epoch_times else None, "train_epoch_times_s": [round(x, 2) for x in epoch_times],
        "train_patients_per_s": round(args.patients / t_epoch) if epoch_times else None,
        "compile_counts": trainer.compile_counts(),
    }
    print(json.dumps(res, indent=2))
    if args.json:
        from leader_jax.io import atomic_write_json
        atomic_write_json(args.json, res)


if __name__ == "__main__":
    main()
