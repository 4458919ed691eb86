"""Stage 1 on CPU: a tiny LLaMA trained from scratch (all weights) + a byte-level BPE tokenizer, on the
training-split prompts + ICD/ATC titles. Output PRE/base feeds configs/teacher_tiny.py (model.path).

python -m leader_jax.train.pretrain --config configs/pretrain_tiny.py --config.data_dir=PREPARED --out PRE
"""
from pathlib import Path

from ml_collections import ConfigDict

DATA = Path(__file__).resolve().parents[1] / "data"


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.config_name = "pretrain_tiny"
    c.data_dir = ""
    c.out = ""
    c.seed = 0
    c.mesh = (1, -1, 1)
    c.mode = "full"                      # full (all weights) | adapter (DomainLoRA on a frozen HF base)

    c.model = ConfigDict()
    c.model.source = "scratch"           # scratch | hf
    c.model.path = ""
    c.model.param_dtype = "float32"
    c.model.dtype = "float32"
    c.model.frozen_dtype = "float32"
    c.model.remat = "none"
    c.model.attention_impl = ""
    c.model.dot_dtype = ""               # "" = model.dtype; bfloat16: bf16 matmul operands, fp32 sums
    c.model.cache_prefix = False         # mode=adapter: run the frozen layers below domain.first_layer once per
                                         # document and train on their cached output (same loss, less compute)
    # the tiny LLaMA shape (model.source=scratch), also used by configs/teacher_tiny.py; vocab_size is
    # raised to the trained tokenizer's size and the special ids are taken from it
    c.model.arch = ConfigDict(dict(vocab_size=2048, hidden_size=64, intermediate_size=176,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                                   pad_token_id=0))

    c.tokenizer = ConfigDict(dict(train=True, vocab_size=2048, path=""))

    # mode=adapter (paper A.1); first_layer: the adapter goes on layers first_layer.. only (0 = every layer)
    c.domain = ConfigDict(dict(rank=16, alpha=32.0, dropout=0.0, targets="q,v", first_layer=0))

    c.corpus = ConfigDict()
    c.corpus.title_sources = (str(DATA / "mimic3_demo" / "D_ICD_DIAGNOSES.csv.gz") + ":long_title",
                              str(DATA / "mimic3_demo" / "D_ICD_PROCEDURES.csv.gz") + ":long_title",
                              str(DATA / "mappings" / "WHO ATC-DDD 2021-12-03.csv") + ":atc_name")
    c.corpus.max_titles = 8000           # random subset of the titles (0 = all)
    c.corpus.pack_chars = 500            # titles joined into documents of about this many characters
    c.corpus.heldout_fraction = 0.05
    c.corpus.with_targets = True         # TRAIN prompts as "BOS prompt EOS drugs EOS" (the EOS state learns
                                         # to predict the drugs); val/test never enter the corpus

    # length_buckets: pad each batch to the smallest of these (and max_len) that holds it; () = max_len
    c.data = ConfigDict(dict(max_len=192, max_history=3, profile=False, length_buckets=(64, 128)))

    c.train = ConfigDict()
    c.train.steps = 150
    c.train.micro_batch = 16
    c.train.accum = 1
    c.train.optim = ConfigDict(dict(lr=3e-3, warmup_steps=15, weight_decay=0.0, b1=0.9, b2=0.95,
                                    eps=1e-8, clip_norm=1.0, head_lr_mult=1.0))
    c.train.ckpt_every = 100
    c.train.resume = True
    c.train.stop_after = 0
    c.eval = ConfigDict()
    c.eval.batch_size = 64             # held-out perplexity batch (multiple of the batch parallelism)

    c.distributed = ConfigDict(dict(coordinator="", num_processes=0, process_id=0, auto=False))
    return c
