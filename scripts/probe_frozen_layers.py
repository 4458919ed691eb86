"""Which frozen states of the teacher's LLM carry drug signal? Linear probes per layer and pooling.

One pass of the frozen base model (no adapters, no head) over the training and validation prompts of a
teacher config collects, for each layer in `--layers`, the pooled hidden state two ways: `last` (the state at
EOS, the teacher's `model.pool=last`) and `mean` (over real tokens, `model.pool=mean`); the final layer is
taken after the final RMSNorm, as the teacher sees it. Each feature set is standardised with training-split
statistics and fitted by the teacher's own probe (`train/head_probe.py`: L2 logistic regression, L-BFGS) at
each `--l2`; the report is the validation PRAUC of every (layer, pooling, l2). Validation only: use it to
choose `model.pool` / `lora.task.first_layer`, never the test split.

    python scripts/probe_frozen_layers.py --data PREPARED --out probe.json \
        --config teacher_smollm2.py --layers 16,20,24,27,30 --l2 0.1,0.3,1,3
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leader_jax.cli import load_config  # noqa: E402
from leader_jax.data.dataset import PreparedData  # noqa: E402
from leader_jax.io import atomic_write_json  # noqa: E402
from leader_jax.models.frozen_prefix import run_layers  # noqa: E402
from leader_jax.models.llama import pool_last  # noqa: E402
from leader_jax.train import common, head_probe, loop  # noqa: E402
from leader_jax.train import text_batches as tdata  # noqa: E402
from leader_jax.train.engine import Engine  # noqa: E402
from leader_jax.train.teacher import (build_teacher, encode_split, eval_max_len, teacher_loss,  # noqa: E402
                                     tokenizer_path, trainable_filter, val_prauc)


class LayerStates:
    """fn(model, batch) -> [B, 2 * len(layers), D]: per layer, the EOS state then the mean over real tokens."""

    def __init__(self, layers: tuple[int, ...]):
        self.layers = layers

    def __call__(self, model, batch):
        llama, mask = model.llama, batch["attention_mask"]
        m = mask.astype(jnp.float32)[..., None]
        h, done, out = llama.embed_tokens(batch["input_ids"]), 0, []
        for layer in self.layers:
            h = run_layers(llama, h, mask, done, layer)
            done = layer
            x = (llama.norm(h) if layer == llama.config.num_hidden_layers else h).astype(jnp.float32)
            out += [pool_last(x, mask), jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)]
        return (jnp.stack(out, axis=1),)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="prepared data folder")
    ap.add_argument("--out", required=True, help="report (json); its folder also holds the run's tokenizer")
    ap.add_argument("--config", default="teacher_smollm2.py", help="a file in configs/")
    ap.add_argument("--layers", default="16,20,24,27,30", help="comma list; L = after the final norm")
    ap.add_argument("--l2", default="0.1,0.3,1,3")
    ap.add_argument("--model", default="", help="model.path override (e.g. a stage-1 PRE/base folder)")
    ap.add_argument("--max-len", type=int, default=0, help="prompt length limit (0 = the config's eval limit)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=100, help="L-BFGS steps per probe")
    args = ap.parse_args()

    cfg = load_config(args.config)
    cfg.data_dir, cfg.mesh = args.data, (1, 1, 1)
    cfg.lora.task.rank, cfg.lora.domain_path, cfg.model.cache_prefix = 0, "", False
    if args.model:
        cfg.model.path = args.model
    if args.max_len:
        cfg.data.max_len = cfg.data.eval_max_len = args.max_len
    layers = tuple(int(x) for x in args.layers.split(","))
    l2s = [float(x) for x in args.l2.split(",")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prepared = PreparedData.load(args.data)
    mesh = common.make_mesh(cfg)
    tok = common.load_run_tokenizer(tokenizer_path(cfg), out.parent)
    special = tdata.SpecialIds.from_tokenizer(tok)
    encs = {s: encode_split(cfg, prepared, s, tok, special, training=False) for s in ("train", "val")}
    teacher = build_teacher(cfg, prepared.vocab.n_med, mesh)
    if not all(0 < k <= teacher.llama.config.num_hidden_layers for k in layers):
        raise SystemExit(f"--layers must lie in 1..{teacher.llama.config.num_hidden_layers}")
    engine = Engine(teacher, trainable_filter(cfg), optax.set_to_zero(), mesh, teacher_loss,
                    frozen_dtype=cfg.model.frozen_dtype)              # the head only: never trained here
    buckets = tuple(int(b) for b in cfg.data.length_buckets) or None
    t0 = time.perf_counter()
    feats = {s: loop.gather(engine, e, args.batch, desc=f"states {s}", buckets=buckets, fn=LayerStates(layers))[0]
             for s, e in encs.items()}
    seconds = time.perf_counter() - t0
    rows = []
    for j, (layer, pool) in enumerate((k, p) for k in layers for p in ("last", "mean")):
        x, v = feats["train"][:, j], feats["val"][:, j]
        mean, inv = x.mean(0), 1.0 / (x.std(0) + 1e-6)
        for l2 in l2s:
            w, b, _ = head_probe.fit((x - mean) * inv, encs["train"].labels, l2, args.iters)
            score = val_prauc(encs["val"].labels, head_probe.predict((v - mean) * inv, w, b))
            rows.append({"layer": layer, "pool": pool, "l2": l2, "val_prauc": round(float(score), 4)})
            print(json.dumps(rows[-1]), flush=True)
    best = max(rows, key=lambda r: r["val_prauc"])
    atomic_write_json(out, {"config": args.config, "data": str(Path(args.data).resolve()),
                            "max_len": eval_max_len(cfg), "n_train": len(encs["train"]), "n_val": len(encs["val"]),
                            "prior_val_prauc": round(float(val_prauc(encs["val"].labels, np.broadcast_to(
                                encs["train"].labels.mean(0), encs["val"].labels.shape))), 4),
                            "state_seconds": round(seconds, 1), "best": best, "rows": rows})
    print("best", json.dumps(best))


if __name__ == "__main__":
    main()
