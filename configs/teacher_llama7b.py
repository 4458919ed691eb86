"""LEADER(T) as in the paper: LLaMA-7B (HF folder, e.g. huggyllama/llama-7b downloaded by the user) +
LoRA r 8, alpha 32, dropout 0.1 on q, k, v, o, gate, up, down; lr 2e-4 with linear decay, no warmup;
32 sequences per step; 3000 steps; max length 2048; bf16 frozen base, fp32 adapters/head/optimizer state.

scripts/train_teacher_gpu.sh PREPARED /models/llama-7b RUN configs/teacher_llama7b.py
"""
from leader_jax.cli import load_config


def _tiny():
    return load_config("teacher_tiny.py")


def get_config():
    c = _tiny()
    c.config_name = "teacher_llama7b"
    c.mesh = (1, -1, 1)                   # FSDP over every device (ZeRO-3 style); (1, -1, 2) adds tensor parallel
    c.model.source = "hf"
    c.model.path = ""                     # the LLaMA-7B HF folder (config.json, safetensors, tokenizer)
    c.model.param_dtype = "bfloat16"
    c.model.dtype = "bfloat16"
    c.model.frozen_dtype = "bfloat16"
    c.model.remat = "minimal"             # recompute the MLP, keep q/k/v/attention outputs
    c.model.attention_impl = "cudnn"      # "" on TPU/CPU
    c.model.head_norm = False             # the paper's plain linear head on the EOS state
    c.data.max_len = 2048
    c.data.eval_max_len = 2048
    c.data.max_history = 3
    c.data.length_buckets = (256, 512, 1024)
    c.lora.task.update(dict(rank=8, alpha=32.0, dropout=0.1, targets="q,k,v,o,gate,up,down"))
    c.train.steps = 3000
    c.train.micro_batch = 16              # global sequences per micro-batch (multiple of data*fsdp)
    c.train.accum = 2                     # -> 32 sequences / step
    c.train.optim.update(dict(lr=2e-4, warmup_steps=0, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
                              clip_norm=1.0))
    c.train.eval_every = 200              # validation PRAUC, best step kept (the original keeps the last)
    c.train.ckpt_every = 200
    c.eval.batch_size = 32
    return c
