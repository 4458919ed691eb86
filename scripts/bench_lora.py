"""CPU benchmark of the teacher's training and inference paths, side by side in one process (medians).

1. LoRA train step: leader_jax's production `Engine` (jitted: task LoRA r 8 on all seven projections +
   bias-free drug head, sigmoid BCE on the last-token state, AdamW on adapters + head only) vs
   transformers `LlamaForSequenceClassification` + `peft` LoRA (same rank/alpha/targets, torch AdamW),
   same random base weights and batch. Repetitions alternate JAX / torch; ratio = torch / JAX
   (> 1: leader_jax faster).
2. Teacher vs student inference per patient: the teacher forward (prompt tokens → drug probabilities)
   vs the LEADER(S) student's compiled predict on MIMIC-III-sized synthetic patients; ratio =
   teacher time per patient / student time per patient.

    python scripts/bench_lora.py [--size s] [--batch 8] [--seq 128] [--reps 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SIZES = {
    "tiny": dict(vocab_size=2048, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),           # configs/teacher_tiny.py
    "s": dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
              num_attention_heads=8, num_key_value_heads=4),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def interleaved(fns: dict, reps: int) -> dict[str, float]:
    """Median seconds of each callable, repetitions alternating between them."""
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_lora_step(size: str, batch: int, seq: int, n_med: int, reps: int) -> dict:
    import jax.numpy as jnp
    import numpy as np
    import optax
    import torch
    from flax import nnx
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    from leader_jax import sharding
    from leader_jax.models import lora
    from leader_jax.models.llama import load_hf
    from leader_jax.models.teacher import HeadParam, Teacher, bce_loss
    from leader_jax.train.engine import Engine, place

    hf_cfg = HFConfig(**SIZES[size], max_position_embeddings=max(512, seq), pad_token_id=0)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        LlamaForCausalLM(hf_cfg).save_pretrained(d)
        cls = LlamaForSequenceClassification.from_pretrained(d, num_labels=n_med,
                                                             problem_type="multi_label_classification")
        _, llama = load_hf(d)
    mesh = sharding.make_mesh((1, 1, 1))
    lora.add_adapter(llama, "task", "q,k,v,o,gate,up,down", rank=8, alpha=32.0, dropout=0.0,
                     param_type=lora.TaskLoRA, seed=1)
    with nnx.use_eager_sharding(False):
        teacher = place(Teacher(llama, n_med, rngs=nnx.Rngs(0)), mesh)
    with torch.no_grad():                                  # same head weights on both sides
        cls.score.weight.copy_(torch.tensor(np.asarray(teacher.head[...]).T))

    def loss_fn(model, mb):
        logits, _ = model(mb["input_ids"], mb["attention_mask"])
        return bce_loss(logits, mb["labels"]), {}

    tx = optax.adamw(1e-4, weight_decay=0.0)
    engine = Engine(teacher, nnx.Any(lora.TaskLoRA, HeadParam), tx, mesh, loss_fn)
    peft_model = get_peft_model(cls, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=list(TARGETS),
                                                task_type="SEQ_CLS"))
    peft_model.train()
    t_opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)

    rs = np.random.RandomState(0)
    ids = rs.randint(4, SIZES[size]["vocab_size"], (batch, seq)).astype(np.int32)
    lengths = rs.randint(seq // 2, seq + 1, batch)
    mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int32)
    ids = ids * mask                                       # right padding with id 0
    labels = (rs.rand(batch, n_med) < 0.1).astype(np.float32)
    jb = {"input_ids": jnp.asarray(ids[None]), "attention_mask": jnp.asarray(mask[None]),
          "labels": jnp.asarray(labels[None])}
    t_ids, t_mask, t_lab = torch.tensor(ids, dtype=torch.long), torch.tensor(mask), torch.tensor(labels)

    def t_step():
        t_opt.zero_grad(set_to_none=True)
        loss = peft_model(input_ids=t_ids, attention_mask=t_mask, labels=t_lab).loss
        loss.backward()
        t_opt.step()
        return float(loss.detach())

    t0 = time.perf_counter()
    jl = engine.train_step(jb)["loss"]
    compile_s = time.perf_counter() - t0
    tl = t_step()
    med = interleaved({"jax": lambda: engine.train_step(jb), "torch": t_step}, reps)
    n_train = engine.n_trainable()
    return {"size": size, "base_params_M": round(engine.n_frozen() / 1e6, 2), "trainable_params": n_train,
            "batch": batch, "seq": seq, "n_med": n_med, "jax_step_s": round(med["jax"], 4),
            "torch_peft_step_s": round(med["torch"], 4), "ratio": round(med["torch"] / med["jax"], 2),
            "jax_compile_s": round(compile_s, 1), "first_loss_jax": jl, "first_loss_torch": tl}


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="s", choices=sorted(SIZES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--n_med", type=int, default=151)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--student_patients", type=int, default=4096)
    ap.add_argument("--teacher_seq", type=int, default=192, help="prompt length (demo: 192; paper up to 2048)")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)

    import jax
    import torch

    torch.set_num_threads(os.cpu_count())
    res = {"env": {"jax": jax.__version__, "torch": torch.__version__, "cpu_count": os.cpu_count(),
                   "torch_threads": torch.get_num_threads()}}
    res["lora_step"] = bench_lora_step(a.size, a.batch, a.seq, a.n_med, a.reps)
    print(json.dumps(res["lora_step"]), flush=True)
    res["teacher_vs_student"] = [bench_teacher_vs_student(s, a.teacher_seq, a.student_patients, a.reps)
                                 for s in dict.fromkeys(("tiny", a.size))]
    for r in res["teacher_vs_student"]:
        print(json.dumps(r), flush=True)
    if a.json:
        from leader_jax.io import atomic_write_json
        atomic_write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
