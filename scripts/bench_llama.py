"""CPU benchmark: jitted leader_jax LLaMA vs transformers/torch eager, same weights and inputs, fp32.

For each size, one random HF LlamaForCausalLM is built with torch, saved, and loaded with
`leader_jax.models.llama.load_hf`; both then time (a) the forward pass (logits) and (b) forward +
backward of the next-token cross-entropy w.r.t. all weights. Repetitions alternate JAX / torch so load
from other processes on a shared machine hits both alike; medians and the torch/JAX ratio are printed
(ratio > 1 = leader_jax faster) and written as JSON with --out.

python scripts/bench_llama.py [--sizes xs,s,m] [--batch 4] [--seq 128] [--reps 5] [--threads N | --single_thread]
    [--out bench.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

SIZES = {  # name: HF config kwargs (fp32 parameter counts printed at run time)
    "xs": dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=4),
    "s": dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
              num_attention_heads=8, num_key_value_heads=4),
    "m": dict(vocab_size=16000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
              num_attention_heads=12, num_key_value_heads=4),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="xs,s,m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = os.cpu_count(), as XLA)")
    ap.add_argument("--single_thread", action="store_true",
                    help="1 thread for both: torch.set_num_threads(1) and XLA without its Eigen pool")
    ap.add_argument("--out", "--json", dest="out", default="", help="write the results as JSON")
    a = ap.parse_args(argv)
    if a.single_thread:
        if "jax" in sys.modules:
            raise RuntimeError("--single_thread must be set before jax is imported")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                                   " intra_op_parallelism_threads=1").strip()
        a.threads = 1
    for s in a.sizes.split(","):
        if s not in SIZES:
            print(f"error: unknown size {s!r}; choose from {sorted(SIZES)}", file=sys.stderr)
            return 2

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import torch
    from flax import nnx
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    from leader_jax.models.llama import load_hf

    threads = a.threads or os.cpu_count()
    torch.set_num_threads(threads)
    env = {"jax": jax.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "jax_devices": str(jax.devices()), "batch": a.batch, "seq": a.seq,
           "reps": a.reps, "xla_flags": os.environ.get("XLA_FLAGS", "")}
    print(json.dumps(env))
    results = []
    for name in a.sizes.split(","):
        torch.manual_seed(0)
        hf = LlamaForCausalLM(HFConfig(**SIZES[name], max_position_embeddings=max(2048, a.seq))).eval()
        n_params = sum(p.numel() for p in hf.parameters())
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            _, model = load_hf(d)
        graphdef, state = nnx.split(model)
        rs = np.random.RandomState(0)
        ids_np = rs.randint(3, SIZES[name]["vocab_size"], (a.batch, a.seq)).astype(np.int32)
        mask_np = np.ones_like(ids_np)
        ids, mask = jnp.asarray(ids_np), jnp.asarray(mask_np)
        t_ids, t_mask = torch.tensor(ids_np, dtype=torch.long), torch.tensor(mask_np)

        @jax.jit
        def j_fwd(state, ids, mask):
            return nnx.merge(graphdef, state)(ids, mask)

        def loss_fn(state, ids, mask):
            logits = nnx.merge(graphdef, state)(ids, mask)[:, :-1]
            return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

        j_grad = jax.jit(jax.value_and_grad(loss_fn))

        def t_fwd():
            with torch.no_grad():
                return hf(t_ids, attention_mask=t_mask).logits

        def t_grad():
            hf.zero_grad(set_to_none=True)
            loss = hf(t_ids, attention_mask=t_mask, labels=t_ids).loss
            loss.backward()
            return loss

        # warm-up / compile + a correctness check on the same weights
        t0 = time.perf_counter()
        out = jax.block_until_ready(j_fwd(state, ids, mask))
        compile_fwd = time.perf_counter() - t0
        t0 = time.perf_counter()
        jl, _ = jax.block_until_ready(j_grad(state, ids, mask))
        compile_grad = time.perf_counter() - t0
        ref = t_fwd().numpy()
        max_diff = float(np.abs(np.asarray(out) - ref).max())
        tl = float(t_grad().detach())
        times = {"jax_fwd": [], "torch_fwd": [], "jax_fwdbwd": [], "torch_fwdbwd": []}
        for _ in range(a.reps):
            for key, fn in (("jax_fwd", lambda: jax.block_until_ready(j_fwd(state, ids, mask))),
                            ("torch_fwd", t_fwd),
                            ("jax_fwdbwd", lambda: jax.block_until_ready(j_grad(state, ids, mask))),
                            ("torch_fwdbwd", t_grad)):
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"size": name, "params_M": round(n_params / 1e6, 1), **{k + "_s": round(v, 4) for k, v in med.items()},
               "ratio_fwd": round(med["torch_fwd"] / med["jax_fwd"], 2),
               "ratio_fwdbwd": round(med["torch_fwdbwd"] / med["jax_fwdbwd"], 2),
               "compile_fwd_s": round(compile_fwd, 1), "compile_fwdbwd_s": round(compile_grad, 1),
               "max_abs_logit_diff": max_diff, "loss_jax": float(jl), "loss_torch": tl}
        results.append(row)
        print(json.dumps(row), flush=True)
        hf = model = state = None          # free this size before the next one
    print(f"\n{'size':>4} {'params':>8} {'fwd jax':>9} {'fwd torch':>10} {'ratio':>6} "
          f"{'f+b jax':>9} {'f+b torch':>10} {'ratio':>6}")
    for r in results:
        print(f"{r['size']:>4} {r['params_M']:>7}M {r['jax_fwd_s']:>8.3f}s {r['torch_fwd_s']:>9.3f}s "
              f"{r['ratio_fwd']:>5.2f}x {r['jax_fwdbwd_s']:>8.3f}s {r['torch_fwdbwd_s']:>9.3f}s "
              f"{r['ratio_fwdbwd']:>5.2f}x")
    if a.out:
        from leader_jax.io import atomic_write_json
        atomic_write_json(a.out, {"env": env, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
