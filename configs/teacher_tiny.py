"""Stage 2 (teacher) on CPU: the tiny LLaMA from stage 1 (`configs/pretrain_tiny.py`) + task LoRA + head.

python -m leader_jax.train.teacher --config configs/teacher_tiny.py \
    --config.data_dir=PREPARED --config.model.path=PRE/base --out RUN
"""
from ml_collections import ConfigDict

from leader_jax.cli import load_config


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.config_name = "teacher_tiny"
    c.data_dir = ""                    # prepared data folder (python -m leader_jax.data.prepare)
    c.out = ""                         # run folder (--out)
    c.seed = 0
    c.mesh = (1, -1, 1)                # (data, fsdp, tensor); -1 = all remaining devices

    c.model = ConfigDict()
    c.model.source = "hf"              # hf (an HF LLaMA folder, e.g. stage 1's PRE/base) | scratch
    c.model.path = ""
    c.model.param_dtype = "float32"    # dtype the base is loaded in
    c.model.dtype = "float32"          # compute dtype
    c.model.pool = "last"              # last = final-norm state at EOS (the paper); mean = over real tokens;
                                       # query = mean without the retrieved neighbours' block (still attended
                                       # to; = mean when a prompt shows no neighbour; docs/retrieval.md)
    c.model.head_norm = True           # standardise the pooled state (train-split stats) before the head
    c.model.head_init = "normal"       # normal = N(0, 0.02) | zero (with head_norm: step 0 = the priors) |
                                       # probe = logistic regression on the frozen pooled states (LP-FT;
                                       # needs head_norm); zero and probe make step 0 a validated candidate
    c.model.head_probe_l2 = (1e-2,)    # probe: L2 strength(s); several = the best validation PRAUC wins
    c.model.head_probe_iters = 100     # probe: L-BFGS iterations (full batch)
    c.model.trainable_base = False     # True: train every base weight too (full fine-tuning of a tiny
                                       # model); a frozen domain adapter stays frozen
    c.model.frozen_dtype = "float32"   # float32 | bfloat16 | float16: cast of the frozen base weights in the
                                       # engine (bfloat16 on GPU/TPU); adapters, head, optimizer stay fp32
    c.model.remat = "none"             # none | full | dots | minimal | ... (llama.REMAT_POLICIES)
    c.model.attention_impl = ""        # "" = xla; "cudnn" on GPU
    c.model.dot_dtype = ""           # "" = model.dtype; bfloat16: matmul operands rounded to bf16, fp32
                                       # accumulation (~1.5x on CPUs with AVX512-BF16; docs/teacher.md)
    c.model.cache_prefix = False       # True: run the frozen layers below lora.task.first_layer once per
                                       # sample and train on their cached output (same loss, less compute)
    c.model.arch = load_config("pretrain_tiny.py").model.arch   # the tiny shape (source=scratch only)
    c.tokenizer = ""                   # "" = model.path

    c.data = ConfigDict()
    c.data.max_len = 192               # BOS + prompt + EOS; oldest history visits dropped to fit;
                                       # a train sample whose current visit alone is longer is dropped (counted)
    c.data.eval_max_len = 512          # val/test/features (never dropped: too long is an error); 0 = max_len
    c.data.max_history = 3
    c.data.profile = False
    c.data.length_buckets = (64, 128, 256)  # pad each batch to the smallest of these (and max_len /
                                       # eval_max_len) holding it; each length compiles once; () = pad to max_len

    c.lora = ConfigDict()
    c.lora.domain_path = ""            # stage-1 domain adapter (PEFT folder); "" = none
    c.lora.domain_trainable = False    # True: the domain adapter is trained further (saved in adapters/domain)
    # first_layer: the adapter goes on layers first_layer.. only (0 = every layer)
    c.lora.task = ConfigDict(dict(rank=8, alpha=32.0, dropout=0.1, targets="q,k,v,o,gate,up,down", first_layer=0))

    c.train = ConfigDict()
    c.train.steps = 800
    c.train.micro_batch = 16           # sequences per micro-batch (multiple of data*fsdp)
    c.train.accum = 1                  # gradient accumulation (the paper: 32 sequences / step)
    c.train.optim = ConfigDict(dict(lr=2e-3, warmup_steps=10, weight_decay=0.0, b1=0.9, b2=0.999,
                                    eps=1e-8, clip_norm=1.0, head_lr_mult=1.0))
    c.train.eval_every = 100           # validation PRAUC; the best step's weights are kept; 0 = keep last
    c.train.ckpt_every = 100
    c.train.resume = True
    c.train.stop_after = 0             # >0: stop after this step without finishing (kill simulation)

    c.retrieval = load_config("retrieval.py")   # similar past patients in the prompt: mode none | fixed
                                       # | joint (B1: a trained re-ranker); docs/retrieval.md

    c.eval = ConfigDict()
    c.eval.batch_size = 64
    c.eval.splits = ("val", "test")

    c.distributed = ConfigDict(dict(coordinator="", num_processes=0, process_id=0, auto=False))
    return c
