"""CLI: raw tables → prepared dataset folder.

    python -m leader_jax.data.prepare --config configs/data.py --config.dataset=mimic3|mimic4|eicu \
        [--config.raw_dir=DIR] --out OUT

Writes vocab.json, samples.jsonl, splits.json, ddi.npy (MIMIC), stats.json, report.md into OUT.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from leader_jax.cli import REPO_ROOT, UserError, run
from leader_jax.data.build import build
from leader_jax.data.dataset import PreparedData

DEMO = {"mimic3": "mimic3_demo", "mimic4": "mimic4_demo", "eicu": "eicu_demo", "synthetic": None}


def default_config(**overrides):
    """configs/data.py's config with field overrides (for scripts and tests)."""
    import importlib.util

    from leader_jax.cli import config_path

    spec = importlib.util.spec_from_file_location("leader_jax_data_config", config_path("data.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    for k, v in overrides.items():
        if k not in cfg:
            raise UserError(f"unknown data config field {k!r}")
        setattr(cfg, k, v)
    return cfg


def prepare_to(out, **overrides) -> PreparedData:
    """Prepare with configs/data.py + overrides and save into `out` (what the CLI does)."""
    data = prepare(default_config(**overrides))
    data.save(out)
    return data


def read_raw(cfg):
    """Dispatch to the reader of cfg.dataset ('synthetic' = MIMIC-III-format tables)."""
    from leader_jax.data import eicu, mimic

    ds = cfg.dataset
    if ds not in DEMO:
        raise UserError(f"config dataset={ds!r}: expected one of {', '.join(DEMO)}")
    raw_dir = cfg.get("raw_dir") or ""
    if not raw_dir:
        if DEMO[ds] is None:
            raise UserError("config raw_dir: required for dataset=synthetic")
        raw_dir = str(REPO_ROOT / "data" / DEMO[ds])
    if ds in ("mimic3", "synthetic"):
        raw = mimic.read_mimic3(raw_dir, cfg)
        raw.dataset = ds
        return raw
    if ds == "mimic4":
        return mimic.read_mimic4(raw_dir, cfg)
    return eicu.read_eicu(raw_dir, cfg)


def prepare(cfg) -> PreparedData:
    """Read, build and return the prepared dataset (no writing)."""
    try:
        return build(read_raw(cfg), cfg)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None


def main(cfg, argv) -> None:
    if argv:
        raise UserError(f"unexpected arguments: {argv}")
    if not cfg.get("out"):
        raise UserError("--out OUT is required")
    data = prepare(cfg)
    try:
        data.save(cfg.out)
    except ValueError as e:
        raise UserError(str(e)) from None
    s = data.stats
    summary = {k: s[k] for k in ("dataset", "n_patients", "n_visits", "n_samples", "n_diag", "n_proc", "n_med",
                                 "avg_meds_per_visit", "n_single_visit")}
    print(json.dumps(summary, sort_keys=True))
    print(f"wrote {Path(cfg.out)} (fingerprint {data.fingerprint()[:16]})", file=sys.stderr)


if __name__ == "__main__":
    run(main, "data.py")
