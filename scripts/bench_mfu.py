"""Teacher LoRA-training MFU on a 7B-shaped LLaMA layer stack (bf16 frozen base, fp32 LoRA + head + AdamW).

Builds a randomly initialised LLaMA with LLaMA-7B layer shapes (D 4096, FFN 11008, 32 heads; `--layers`
of them), adds the paper's task adapter (r 8, alpha 32, all seven projections) and the drug head, and
times the production training step (`leader_jax.train.engine.Engine`: jitted, sharded over all local
devices on the FSDP axis, remat). Model FLOPs per token = 4·N_frozen (forward + activation gradients; a
frozen base needs no weight gradients) + 6·N_trainable + attention 12·L·T·D (fwd 4·L·T·D, bwd ×2), the
usual MFU accounting (PaLM appendix B) adapted to LoRA. MFU = achieved FLOP/s ÷ peak bf16 dense FLOP/s.

    python scripts/bench_mfu.py [--layers 32] [--seq 2048] [--micro_batch 4] [--steps 5] [--json out.json]
On CPU use tiny shapes for a smoke run: --hidden 64 --ffn 176 --heads 4 --layers 2 --seq 64 --peak_tflops 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "TPU v4": 275.0, "TPU v5e": 197.0,
                    "TPU v5p": 459.0}


def peak_tflops(device_kind: str) -> float | None:
    for key, v in PEAK_BF16_TFLOPS.items():
        if key.lower() in device_kind.lower():
            return v
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro_batch", type=int, default=4, help="global sequences per step")
    ap.add_argument("--n_med", type=int, default=151)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--remat", default="minimal")
    ap.add_argument("--attention", default="", help="'' = xla; cudnn on GPU")
    ap.add_argument("--peak_tflops", type=float, default=0.0, help="override the device's peak bf16 TFLOP/s")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)

    import jax
    import numpy as np
    import optax
    from flax import nnx

    from leader_jax import sharding
    from leader_jax.models import lora
    from leader_jax.models.llama import LlamaConfig, init_model
    from leader_jax.models.teacher import HeadParam, Teacher, bce_loss
    from leader_jax.train.engine import Engine, place, stacked_batch_sharding

    dev = jax.devices()[0]
    attention = a.attention or ("cudnn" if dev.platform == "gpu" else "")
    conf = LlamaConfig.from_hf_dict({
        "model_type": "llama", "vocab_size": a.vocab, "hidden_size": a.hidden, "intermediate_size": a.ffn,
        "num_hidden_layers": a.layers, "num_attention_heads": a.heads, "num_key_value_heads": a.heads,
        "max_position_embeddings": max(2048, a.seq), "rms_norm_eps": 1e-6},
        param_dtype="bfloat16", dtype="bfloat16", remat=a.remat, attention_impl=attention or None)
    mesh = sharding.make_mesh((1, -1, 1))
    llama = init_model(conf, 0, mesh=mesh)
    lora.add_adapter(llama, "task", "q,k,v,o,gate,up,down", rank=8, alpha=32.0, dropout=0.1,
                     param_type=lora.TaskLoRA, seed=1)
    with nnx.use_eager_sharding(False):
        teacher = place(Teacher(llama, a.n_med, rngs=nnx.Rngs(2)), mesh)

    def loss_fn(model, mb):
        logits, _ = model(mb["input_ids"], mb["attention_mask"])
        return bce_loss(logits, mb["labels"]), {}

    engine = Engine(teacher, nnx.Any(lora.TaskLoRA, HeadParam), optax.adamw(2e-4), mesh, loss_fn,
                    frozen_dtype="bfloat16")
    rs = np.random.RandomState(0)
    batch = {"input_ids": rs.randint(3, a.vocab, (1, a.micro_batch, a.seq)).astype(np.int32),
             "attention_mask": np.ones((1, a.micro_batch, a.seq), np.int32),
             "labels": (rs.rand(1, a.micro_batch, a.n_med) < 0.1).astype(np.float32)}
    batch = {k: jax.device_put(v, stacked_batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
    t0 = time.perf_counter()
    engine.train_step(batch)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        engine.train_step(batch)          # returns host floats: synchronises
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    n_frozen, n_train = engine.n_frozen(), engine.n_trainable()
    n_embed = a.vocab * a.hidden             # a lookup, not a matmul: no FLOPs
    tokens = a.micro_batch * a.seq
    flops_per_token = 4 * (n_frozen - n_embed) + 6 * n_train + 12 * a.layers * a.seq * a.hidden
    achieved = flops_per_token * tokens / step_s
    n_dev = len(jax.devices())
    peak = (a.peak_tflops or peak_tflops(dev.device_kind) or 0.0) * 1e12 * n_dev
    res = {"device": f"{n_dev} × {dev.device_kind}", "platform": dev.platform, "jax": jax.__version__,
           "layers": a.layers, "hidden": a.hidden, "ffn": a.ffn, "seq": a.seq, "micro_batch": a.micro_batch,
           "remat": a.remat, "attention": attention or "xla", "frozen_params": n_frozen,
           "trainable_params": n_train, "compile_s": round(compile_s, 1), "step_s": round(step_s, 4),
           "step_times_s": [round(t, 4) for t in times], "tokens_per_s": round(tokens / step_s, 1),
           "model_tflops_per_s": round(achieved / 1e12, 2), "peak_tflops": peak / 1e12 or None,
           "mfu": round(achieved / peak, 4) if peak else None,
           "flops_note": "4*N_frozen(no embedding) + 6*N_trainable + 12*L*T*D per token"}
    print(json.dumps(res, indent=1))
    if a.json:
        from leader_jax.io import atomic_write_json
        atomic_write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
