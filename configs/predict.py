"""Config of `python -m leader_jax.predict` (recommendations for new patients from a trained run).

    python -m leader_jax.predict --config.run_dir=RUN --config.input=patients.jsonl [--config.out=recs.jsonl]
    python -m leader_jax.predict --config.run_dir=RUN --config.input=MEDS_ROOT [--config.meds.preset=...]
"""
from ml_collections import ConfigDict

from leader_jax.cli import load_config


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.run_dir = ""             # a finished student or teacher run (python -m leader_jax.train.student / .teacher)
    c.input = ""               # JSONL file, one patient per line (schema: docs/predict.md); "-" = stdin;
                               #     or a MEDS folder (data/**/*.parquet): each subject's last visit is predicted
    c.out = ""                 # JSONL output, one result per input line; "" = stdout
    c.top_k = 10               # drugs listed in "ranked" (0 = every drug)
    c.threshold = "val"        # "val" = tuned on the run's predictions/val.npz (as the eval CLI); or a number
    c.ddi_filter = "off"       # off | drop_lower | penalty (needs a DDI graph: MIMIC datasets)
    c.ddi_penalty = 0.25       # penalty strength λ (ddi_filter=penalty): a_i = p_i − λ·Σ p_j over kept partners
    c.batch_size = 512         # patients per inference batch
    c.chunk_size = 16384       # input lines read, predicted and written at a time
    # MEDS input: how codes become visits and tokens, as in data preparation (the `meds` block of
    # configs/data.py: preset auto | mimic_iv_meds | meds_etl | eicu_meds | leader_*, regexes, visit rules)
    c.meds = load_config("data.py").meds
    c.meds_split = ""          # MEDS input: "" = every subject; train | val | test = that split of its split file
    c.teacher_checkpoint = "best"   # teacher runs: best | last
    c.mesh = (1, 1, 1)         # teacher runs: (data, fsdp, tensor); the student predicts on one device
    return c
