"""Stage 1 on a real base (Clinical LLaMA-LoRA step 1): a DomainLoRA adapter (r 16, alpha 32, dropout 0,
q and v: the paper's choice) on the frozen LLaMA-7B, causal LM over the training-split prompts + ICD/ATC
titles, lr 3e-4, 6 % warmup. Writes PRE/domain_adapter for configs/teacher_llama7b.py (lora.domain_path)."""
from leader_jax.cli import load_config


def _tiny():
    return load_config("pretrain_tiny.py")


def get_config():
    c = _tiny()
    c.config_name = "pretrain_llama7b"
    c.mode = "adapter"
    c.model.source = "hf"
    c.model.path = ""
    c.model.param_dtype = "bfloat16"
    c.model.dtype = "bfloat16"
    c.model.frozen_dtype = "bfloat16"
    c.model.remat = "minimal"
    c.model.attention_impl = "cudnn"
    c.tokenizer.train = False             # the base model's tokenizer
    c.domain.update(dict(rank=16, alpha=32.0, dropout=0.0, targets="q,v"))
    c.corpus.max_titles = 0               # every title
    c.corpus.with_targets = False         # plain domain text, as the paper's step 1
    c.corpus.pack_chars = 4000
    c.data.max_len = 1024
    c.data.length_buckets = (256, 512)
    c.train.steps = 1000
    c.train.micro_batch = 16
    c.train.accum = 2
    c.train.optim.update(dict(lr=3e-4, warmup_steps=60, weight_decay=0.0, b1=0.9, b2=0.999, clip_norm=1.0))
    c.train.ckpt_every = 200
    c.eval.batch_size = 16
    return c
