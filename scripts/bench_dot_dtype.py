"""SmolLM2 forward with fp32 matmuls vs `model.dot_dtype=bfloat16` (bf16 operands, fp32 sums), side by side.

    python scripts/bench_dot_dtype.py --data PREPARED [--model smollm2] [--batch 16] [--length 256] [--reps 5]

Builds the model twice from the same weights (the only difference is `dot_dtype`), runs the full 30-layer
forward on one batch of real validation prompts (the `--batch` prompts around the split's median length, cut to
`--length` tokens), alternating the two for `--reps` rounds, and prints the median times, their ratio and how far
the mean-pooled final states (what `model.pool=mean` feeds the head) and the per-token states move.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    from flax import nnx

    from leader_jax.cli import load_config
    from leader_jax.data.dataset import PreparedData
    from leader_jax.train import common, text_batches as tdata
    from leader_jax.train.teacher import encode_split

    cfg = load_config("teacher_smollm2.py")
    cfg.model.path, cfg.mesh = args.model, (1, 1, 1)
    prepared = PreparedData.load(args.data)
    tok = common.load_tokenizer(args.model)
    enc = encode_split(cfg, prepared, "val", tok, tdata.SpecialIds.from_tokenizer(tok), training=False)
    order = np.argsort(enc.lengths, kind="stable")
    mid = len(order) // 2
    rows = order[max(0, mid - args.batch // 2):][:args.batch]
    t = args.length
    ids = jnp.asarray(enc.ids[rows][:, :t])
    mask_np = (np.arange(t)[None] < np.minimum(enc.lengths[rows], t)[:, None]).astype(np.int32)
    mask = jnp.asarray(mask_np)
    mesh = common.make_mesh(cfg)
    fns, states = {}, {}
    for name, dot in (("fp32", ""), ("bf16_dot", "bfloat16")):
        cfg.model.dot_dtype = dot
        _, model = common.load_base(cfg.model, mesh, 0)
        graph, states[name] = nnx.split(model)
        fns[name] = jax.jit(lambda st, i, m, g=graph: nnx.merge(g, st).hidden_states(i, m))
    hidden = {n: np.asarray(jax.block_until_ready(f(states[n], ids, mask)), np.float32) for n, f in fns.items()}
    times = {n: [] for n in fns}
    for _ in range(args.reps):
        for n, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(states[n], ids, mask))
            times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    m = mask_np[..., None].astype(np.float32)
    pooled = {n: (h * m).sum(1) / m.sum(1) for n, h in hidden.items()}
    a, b = pooled["fp32"], pooled["bf16_dot"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    valid = mask_np.astype(bool)
    tok_err = np.linalg.norm((hidden["fp32"] - hidden["bf16_dot"])[valid]) / np.linalg.norm(hidden["fp32"][valid])
    print(json.dumps({"batch": len(rows), "length": t, "real_tokens": int(mask_np.sum()), "reps": args.reps,
                      "load_average": list(__import__("os").getloadavg()),
                      "median_s": {n: round(v, 3) for n, v in med.items()},
                      "speedup_bf16_dot": round(med["fp32"] / med["bf16_dot"], 2),
                      "pooled_mean_rel_err": float(np.linalg.norm(a - b) / np.linalg.norm(a)),
                      "pooled_mean_min_cosine": float(cos.min()), "token_rel_err": float(tok_err)}, indent=1))


if __name__ == "__main__":
    main()
