"""LEADER(S) student training (`python -m leader_jax.train.student --config configs/student.py ...`).

Defaults follow the paper's MIMIC-III offline script (d 64, α 0.4, w 0.005, Adam 5e-4, patience 10);
`--config configs/student.py:mimic4` selects the MIMIC-IV weights (α 0.8, w 0.01)."""
from ml_collections import ConfigDict

from leader_jax.cli import load_config

PRESETS = {   # per dataset: updates of the nested fields
    "mimic3": {"loss": dict(alpha=0.4, align_weight=0.005)},
    "mimic4": {"loss": dict(alpha=0.8, align_weight=0.01)},
    "eicu": {"loss": dict(alpha=0.4, align_weight=0.005)},
}


def get_config(preset: str | None = None) -> ConfigDict:
    c = ConfigDict()
    c.data_dir = ""          # prepared-data folder (python -m leader_jax.data.prepare)
    c.features = ""          # teacher feature store (python -m leader_jax.train.extract_features)
    c.out = ""               # run directory (set by --out)
    c.distill = True         # False = the no-KD ablation (no teacher needed)
    c.seed = 42
    c.mesh = (1, 1, 1)       # (data, fsdp, tensor); (-1, 1, 1) = data parallel over all devices

    c.model = ConfigDict()
    c.model.d = 64
    c.model.heads = 4
    c.model.ffn = 300
    c.model.head_hidden = 128
    c.model.max_visits = 10          # keep the LAST N visits (the target visit always included)
    c.model.visit_position = "none"  # "none" (original) | "recency" (learned embedding of visits-ago)
    c.model.use_profile = True
    c.model.shared_embedding = False  # True: one table for dx/px/drug codes (per-type row offsets, no collisions)
    c.model.dropout = 0.4
    c.model.attn_dropout = 0.1
    c.model.bucket_levels = 4        # fixed shape buckets (visits, codes per set): one compile per bucket
    c.model.inference_kernel = "auto"  # "auto" | "on" | "off": CPU FFI kernel for packed inference
    #   (leader_jax/kernels, compiled on first use; auto = when available on a 1-device CPU mesh)

    c.loss = ConfigDict()
    c.loss.alpha = 0.4               # KD weight
    c.loss.align_weight = 0.005      # profile-alignment weight w
    c.loss.tau = 1.0
    c.loss.align_loss = "infonce"    # "infonce" (positive included) | "paper" (original denominator)

    c.train = ConfigDict()
    c.train.lr = 5e-4
    c.train.batch_size = 16          # a multiple of the mesh's batch parallelism
    c.train.steps_per_call = 32      # optimizer steps per dispatch (one compiled loop over stacked batches)
    c.train.epochs = 100
    c.train.patience = 10            # early stopping: epochs without a better validation PRAUC
    c.train.resume = True            # continue from RUN/checkpoints; False = start afresh in RUN
    c.train.stop_after = 0           # >0: stop after this many epochs without finishing (kill simulation)

    c.eval = ConfigDict()
    c.eval.batch_size = 512          # patients per packed inference batch
    c.eval.threshold = 0.5           # p >= θ for the validation Jaccard/F1 (selection is by PRAUC)

    # Neighbours' drug sets as an extra input (docs/student.md): mode none = the plain student; fixed = the
    # mean multi-hot of the drugs of the k most code-similar training visits (pools of `similarity`, never
    # the sample's own patient); joint is not available for the student. similarity=oracle uses the
    # query's own drugs: an upper bound for evaluation only (prediction refuses such a run).
    c.retrieval = load_config("retrieval.py")

    c.distributed = ConfigDict(dict(coordinator="", num_processes=0, process_id=0, auto=False))
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"unknown student preset {preset!r}; choose from {sorted(PRESETS)}")
        c.update(PRESETS[preset])
    return c
