"""Config of `python -m leader_jax.eval` (override any field with --config.<field>=value)."""
from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.run_dir = ""            # run folder holding predictions/<split>.npz and run.json
    c.split = "test"          # which predictions file to score
    c.data_dir = ""           # prepared data folder; empty = take it from RUN/run.json
    c.require_data = True     # False: score without vocab/DDI (DDI rate null, drug ids as labels)
    c.threshold = 0.5         # a drug is predicted when p >= threshold (same for every model)
    c.tune_threshold = True   # also report the threshold maximising mean Jaccard on val_split
    c.val_split = "val"
    c.threshold_step = 0.01   # grid step of the tuned threshold
    c.rounds = 10             # subsampling rounds (0 = none)
    c.fraction = 0.8          # fraction of samples per round, drawn without replacement
    c.seed = 0
    c.plots = True
    c.n_top_drugs = 30        # per-drug F1 plot: the most frequent drugs of the split
    return c
