"""LEADER(S) student training (`python -m leader_jax.train.student --config configs/student.py ...`).

Defaults follow the paper's MIMIC-III offline script (d 64, α 0.4, w 0.005, Adam 5e-4, patience 10);
`--config configs/student.py:mimic4` selects the MIMIC-IV weights (α 0.8, w 0.01)."""
from ml_collections import ConfigDict

PRESETS = {
    "mimic3": dict(alpha=0.4, align_weight=0.005),
    "mimic4": dict(alpha=0.8, align_weight=0.01),
    "eicu": dict(alpha=0.4, align_weight=0.005),
}


def get_config(preset: str | None = None) -> ConfigDict:
    c = ConfigDict()
    c.data_dir = ""          # prepared-data folder (python -m leader_jax.data.prepare)
    c.features = ""          # teacher feature store (python -m leader_jax.train.extract_features)
    c.out = ""               # run directory (set by --out)
    c.distill = True         # False = the no-KD ablation (no teacher needed)
    c.seed = 42
    # model
    c.d = 64
    c.heads = 4
    c.ffn = 300
    c.head_hidden = 128
    c.max_visits = 10        # keep the LAST N visits (the target visit always included)
    c.visit_position = "none"  # "none" (original) | "recency" (learned embedding of visits-ago)
    c.use_profile = True
    c.dropout = 0.4
    c.attn_dropout = 0.1
    # losses
    c.alpha = 0.4            # KD weight
    c.align_weight = 0.005   # profile-alignment weight w
    c.tau = 1.0
    c.align_loss = "infonce"  # "infonce" (positive included) | "paper" (original denominator)
    # optimisation
    c.lr = 5e-4
    c.batch_size = 16
    c.eval_batch_size = 512
    c.epochs = 100
    c.patience = 10
    c.bucket_levels = 4      # fixed shape buckets (visits, codes per set): one compile per bucket
    c.mesh_shape = (1, 1, 1)  # (data, fsdp, tensor); (-1, 1, 1) = data parallel over all devices
    c.inference_kernel = "auto"  # "auto" | "on" | "off": CPU FFI kernel for packed inference
    #   (leader_jax/kernels, compiled on first use; auto = when available on a 1-device CPU mesh)
    # evaluation
    c.threshold = 0.5        # p >= θ (leader.md D6)
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"unknown student preset {preset!r}; choose from {sorted(PRESETS)}")
        c.update(PRESETS[preset])
    return c
