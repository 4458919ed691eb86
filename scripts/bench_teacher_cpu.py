"""Stage-2 train-step cost of the CPU teacher options on SmolLM2-135M, side by side in one process.

    python scripts/bench_teacher_cpu.py --data PREPARED [--model smollm2] [--rounds 3] [--out FILE.json]

One fixed batch of 16 training prompts (the shortest bucket that holds 16 typical prompts) is trained on by
each variant; rounds are interleaved (variant A, B, C, ... then again) and the median step time is
reported with its ratio to the first variant (LoRA on all 30 layers, padded to max_len: the former fixed
length path). Variants: padding to max_len vs to the length bucket; LoRA on every layer vs on the upper
layers only (first_layer); the frozen lower layers recomputed every step vs cached once
(`model.cache_prefix`); bf16 compute. Compile time is reported separately (first call).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np
import optax


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--first-layer", type=int, default=22)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--variants", default="all_T512,all_Tb,upper_Tb,upper_cached_Tb,upper_cached_Tb_bf16")
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    from leader_jax.cli import load_config
    from leader_jax.data.dataset import PreparedData
    from leader_jax.models import frozen_prefix as fp
    from leader_jax.train import common, text_batches as tdata
    from leader_jax.train.engine import Engine
    from leader_jax.train.length_buckets import bucket_set
    from leader_jax.train.teacher import build_teacher, encode_split, teacher_loss, trainable_filter

    base = load_config("teacher_smollm2.py")
    base.model.path = args.model
    prepared = PreparedData.load(args.data)
    tok = common.load_tokenizer(args.model)
    special = tdata.SpecialIds.from_tokenizer(tok)
    enc = encode_split(base, prepared, "train", tok, special)
    rng = np.random.default_rng(0)
    rows = rng.choice(len(enc), args.batch, replace=False)
    buckets = bucket_set(base.data.length_buckets, base.data.max_len)
    tb = int(next(b for b in buckets if b >= enc.lengths[rows].max()))
    real = int(enc.lengths[rows].sum())

    def make(name):
        cfg = load_config("teacher_smollm2.py")
        cfg.model.path, cfg.mesh = args.model, (1, 1, 1)
        upper, cached, bf16 = "upper" in name, "cached" in name, name.endswith("bf16")
        cfg.lora.task.first_layer = args.first_layer if upper else 0
        cfg.model.cache_prefix = cached
        if bf16:
            cfg.model.dtype, cfg.model.frozen_dtype = "bfloat16", "bfloat16"
        t = int(base.data.max_len) if name.endswith("T512") else tb
        mesh = common.make_mesh(cfg)
        k = args.first_layer if cached else 0
        eng = Engine(build_teacher(cfg, prepared.vocab.n_med, mesh), trainable_filter(cfg),
                     optax.adamw(1e-4), mesh, fp.UpperLoss(k) if k else teacher_loss,
                     frozen_dtype=cfg.model.frozen_dtype)
        ids = enc.ids[rows][:, :t]
        mask = (np.arange(t)[None] < enc.lengths[rows][:, None]).astype(np.int32)
        batch = {"input_ids": ids[None], "attention_mask": mask[None], "labels": enc.labels[rows][None]}
        if k:
            cache = fp.PrefixCache.build(eng, enc.subset(rows), k, args.batch)
            batch["hidden"] = cache.rows(np.arange(len(rows)), t)[None]
        batch = {n: jax.device_put(v) for n, v in batch.items()}
        t0 = time.perf_counter()
        eng.train_step(batch)
        return eng, batch, time.perf_counter() - t0, t

    names = args.variants.split(",")
    built, compile_s, times = {}, {}, {n: [] for n in names}
    for n in names:
        eng, batch, c, t = make(n)
        built[n], compile_s[n] = (eng, batch, t), round(c, 2)
        print(f"[bench] built {n} (T={t}, first step {c:.1f} s)", flush=True)
    for r in range(args.rounds):
        for n in names:
            eng, batch, _ = built[n]
            t0 = time.perf_counter()
            eng.train_step(batch)
            times[n].append(time.perf_counter() - t0)
        print(f"[bench] round {r + 1}/{args.rounds}", flush=True)
    med = {n: statistics.median(v) for n, v in times.items()}
    ref = med[names[0]]
    res = {"batch": args.batch, "real_tokens": real, "bucket": tb, "first_layer": args.first_layer,
           "platform": jax.devices()[0].platform, "load_average": list(__import__("os").getloadavg()),
           "variants": {n: {"T": built[n][2], "median_step_s": round(med[n], 3),
                            "speedup_vs_first": round(ref / med[n], 2), "first_step_s": compile_s[n],
                            "steps_s": [round(x, 3) for x in times[n]]} for n in names}}
    print(json.dumps(res, indent=1))
    if args.out:
        from leader_jax.io import atomic_write_json
        atomic_write_json(args.out, res)


if __name__ == "__main__":
    main()
