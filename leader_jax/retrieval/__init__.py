"""Retrieval-augmented teacher: similar past patients from the training split, shown in the prompt.

- `memory`: the training-split visit memory and the leakage rules (which memory visits a query may see);
- `candidates`: the fixed candidate pool per query (B0: Jaccard / BM25 over diagnosis + procedure tokens),
  precomputed once per split and saved with the data fingerprint;
- `render`: neighbours as prompt sentences inside a length budget (the current visit is never cut);
- `reranker`: the trainable code-bag scorer of the joint mode (B1) and its losses (RankNet, REPLUG KL);
- `quality`: how good the retrieved neighbours are (drug overlap with the query's true drugs).

The config block is `configs/retrieval.py`; `validate_config` checks it (see docs/retrieval.md).
"""
from __future__ import annotations

from ml_collections import ConfigDict

from leader_jax.cli import UserError

MODES = ("none", "fixed", "joint")
SIMILARITIES = ("bm25", "jaccard", "random", "oracle")
TIME_ORDERS = ("within_patient", "global")
JOINT_LOSSES = ("ranknet", "replug")


def validate_config(cfg: ConfigDict, prefix: str = "") -> None:
    """UserError naming the field (`prefix` + name) on a bad retrieval value."""
    def bad(field: str, value, expected: str):
        raise UserError(f"{prefix}{field}={value!r}; expected {expected}")

    for field, value, choices in (("mode", cfg.mode, MODES), ("similarity", cfg.similarity, SIMILARITIES),
                                  ("time_order", cfg.time_order, TIME_ORDERS),
                                  ("joint.loss", cfg.joint.loss, JOINT_LOSSES)):
        if value not in choices:
            bad(field, value, " | ".join(choices))
    if int(cfg.pool) < 1:
        bad("pool", cfg.pool, "a positive number of candidates")
    if not 1 <= int(cfg.k) <= int(cfg.pool):
        bad("k", cfg.k, f"1 <= k <= pool ({cfg.pool})")
    if int(cfg.budget) < 0:
        bad("budget", cfg.budget, "a token count >= 0 (0 = whatever fits under max_len)")
    if float(cfg.bm25.k1) < 0 or not 0.0 <= float(cfg.bm25.b) <= 1.0:
        bad("bm25", dict(cfg.bm25), "k1 >= 0 and 0 <= b <= 1")
    j = cfg.joint
    if not 2 <= int(j.m) <= int(cfg.pool):
        bad("joint.m", j.m, f"2 <= m <= pool ({cfg.pool}) (the pairwise loss needs two candidates)")
    for field in ("gamma", "replug_tau", "lr"):
        if not float(j[field]) > 0:
            bad(f"joint.{field}", j[field], "a positive number")
    for field in ("lam", "margin"):
        if float(j[field]) < 0:
            bad(f"joint.{field}", j[field], "a number >= 0")
    for field in ("d", "hidden"):
        if int(j[field]) < 1:
            bad(f"joint.{field}", j[field], "a positive width")
