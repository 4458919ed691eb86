"""Config of `python -m leader_jax.baselines` (override any field with --config.<field>=value)."""
from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.data_dir = ""                  # prepared data folder (python -m leader_jax.data.prepare)
    c.name = "most_frequent"         # most_frequent | previous_visit | cooccurrence | logistic
    c.splits = ("val", "test")       # prediction files written into RUN/predictions/
    c.seed = 0
    c.logistic = ConfigDict()
    c.logistic.lr = 0.05             # full-batch Adam
    c.logistic.l2 = 3e-3             # per drug: mean BCE + l2·|w|² (3e-3 = best val PRAUC of 1e-2..3e-4 on eICU)
    c.logistic.steps = 150
    c.logistic.eval_every = 10       # validation PRAUC every N steps; the best step is kept
    return c
