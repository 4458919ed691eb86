"""The one-command demo: `python -m leader_jax.demo [--config.dataset=mimic3|mimic4] [--config.fresh=True]`.

Each stage block is that stage's own config file, loaded here, so any stage setting can be changed from
the demo's command line: e.g. `--config.teacher.train.steps=100` or `--config.student.train.epochs=20`. Paths
between stages (data_dir, out, model.path, features, ...) are filled in by `leader_jax.demo`."""
from ml_collections import ConfigDict

from leader_jax.cli import load_config


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.dataset = "eicu"            # eicu (bundled demo, default) | mimic3 | mimic4
    c.raw_dir = ""                # "" = the bundled demo tables
    c.out = "runs/demo"           # everything goes here; report.md at the top
    c.fresh = False               # True: rerun every stage (otherwise finished stages are reused)
    c.tokenizer_vocab = 2048      # byte-level BPE trained on the stage-1 training corpus
    c.baselines = ("most_frequent", "previous_visit", "cooccurrence", "logistic")
    c.split = "test"              # split of the comparison table (threshold tuned on val)

    # the stages' own configs (dataset-specific student weights are applied by leader_jax.demo)
    c.data = load_config("data.py")
    c.pretrain = load_config("pretrain_tiny.py")
    c.teacher = load_config("teacher_tiny.py")
    c.features = load_config("extract_features.py")
    c.student = load_config("student.py")
    c.student.train.lr = 2e-3     # the paper's 5e-4 stays at the label prior for epochs on the small demos
    c.baseline = load_config("baselines.py")
    c.eval = load_config("eval.py")
    return c
