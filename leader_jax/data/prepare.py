"""CLI: raw tables → prepared dataset folder.

    python -m leader_jax.data.prepare --config configs/data.py --config.dataset=mimic3|mimic4|eicu|meds \
        [--config.raw_dir=DIR] [--config.meds.preset=...] --out OUT

Writes vocab.json, samples.jsonl, splits.json, ddi.npy (MIMIC), stats.json, report.md into OUT.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from leader_jax.cli import REPO_ROOT, UserError, run
from leader_jax.data.build import build
from leader_jax.data.dataset import PreparedData

DEMO = {"mimic3": "mimic3_demo", "mimic4": "mimic4_demo", "eicu": "eicu_demo", "synthetic": None,
        "meds": "eicu_demo"}   # meds without raw_dir: the eICU demo, exported to MEDS first
CHOICES = {"protocol": ("last_visit", "per_visit"), "visit_order": ("admittime", "hadm_id"),
           "split": ("random", "sequential")}


def default_config(**overrides):
    """configs/data.py's config with field overrides (for scripts and tests)."""
    from leader_jax.cli import load_config

    return load_config("data.py", overrides)


def validate_config(cfg) -> None:
    """Refuse a bad data config before any table is read (UserError naming the field and value)."""
    def bad(field, why):
        raise UserError(f"config {field}={cfg[field]!r}: {why}")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if cfg.dataset not in DEMO:
        bad("dataset", f"expected one of {', '.join(DEMO)}")
    for field, allowed in CHOICES.items():
        if cfg[field] not in allowed:
            bad(field, f"expected one of {', '.join(allowed)}")
    if not isinstance(cfg.raw_dir, str):
        bad("raw_dir", "expected a folder path (a string; '' = the bundled demo)")
    if cfg.dataset == "synthetic" and not cfg.raw_dir:
        bad("raw_dir", "required for dataset=synthetic (a folder written by data.synthetic.write_mimic3)")
    fr = cfg.split_fractions
    try:
        ok = (len(fr) == 3 and all(float(x) >= 0 for x in fr) and abs(sum(float(x) for x in fr) - 1.0) <= 1e-6)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        bad("split_fractions", "need 3 non-negative numbers summing to 1")
    for field in ("split_seed", "sample_seed"):
        if not is_int(cfg[field]):
            bad(field, "expected an integer")
    if not is_int(cfg.top_k_med) or cfg.top_k_med < -1:
        bad("top_k_med", "expected a positive size, 0 (no limit) or -1 (dataset default)")
    for field in ("top_k_diag", "top_k_proc"):
        if not is_int(cfg[field]) or cfg[field] < 0:
            bad(field, "expected a positive size or 0 (no limit)")
    if not is_int(cfg.min_admissions) or cfg.min_admissions < 1:
        bad("min_admissions", "expected an integer >= 1")
    if isinstance(cfg.sample_fraction, bool) or not isinstance(cfg.sample_fraction, (int, float)) \
            or not 0 < cfg.sample_fraction <= 1:
        bad("sample_fraction", "expected a number in (0, 1]")
    if not isinstance(cfg.eicu_drop_cancelled, bool):
        bad("eicu_drop_cancelled", "expected True or False")
    for field in ("ndc_map", "rxcui_atc", "ddi_pairs", "atc_names"):
        if not isinstance(cfg[field], str) or not cfg[field]:
            bad(field, "expected a file path")
    validate_meds(cfg.meds)


def validate_meds(m) -> None:
    """The `meds` block: known preset, regexes that compile, templates that fit them, known channels."""
    from leader_jax.data import meds_presets

    if m.preset != "auto" and m.preset not in meds_presets.PRESETS:
        raise UserError(f"config meds.preset={m.preset!r}: expected auto or one of {', '.join(meds_presets.PRESETS)}")
    if isinstance(m.gap_hours, bool) or not isinstance(m.gap_hours, (int, float)):
        raise UserError(f"config meds.gap_hours={m.gap_hours!r}: expected hours (-1: the preset's, 0: off)")
    if not isinstance(m.use_split_file, bool):
        raise UserError(f"config meds.use_split_file={m.use_split_file!r}: expected True or False")
    if m.preset != "auto":
        try:
            meds_presets.check(meds_presets.settings(m))
        except (ValueError, TypeError) as e:
            raise UserError(str(e)) from None


def prepare_to(out, **overrides) -> PreparedData:
    """Prepare with configs/data.py + overrides and save into `out` (what the CLI does)."""
    data = prepare(default_config(**overrides))
    save(data, out)
    return data


def read_raw(cfg):
    """Dispatch to the reader of cfg.dataset ('synthetic' = MIMIC-III-format tables)."""
    from leader_jax.data import eicu, mimic

    ds = cfg.dataset
    if ds not in DEMO:
        raise UserError(f"config dataset={ds!r}: expected one of {', '.join(DEMO)}")
    raw_dir = cfg.raw_dir
    if not raw_dir:
        if DEMO[ds] is None:
            raise UserError("config raw_dir: required for dataset=synthetic")
        raw_dir = str(REPO_ROOT / "data" / DEMO[ds])
    if ds == "meds":
        return read_meds(cfg)
    if ds in ("mimic3", "synthetic"):
        raw = mimic.read_mimic3(raw_dir, cfg)
        raw.dataset = ds
        return raw
    if ds == "mimic4":
        return mimic.read_mimic4(raw_dir, cfg)
    return eicu.read_eicu(raw_dir, cfg)


def read_meds(cfg):
    """A MEDS dataset; without raw_dir, the bundled eICU demo exported to MEDS (a temporary folder)."""
    from leader_jax.data import meds
    from leader_jax.data.export_meds import export

    if cfg.raw_dir:
        return meds.read_meds(cfg.raw_dir, cfg)
    with tempfile.TemporaryDirectory(prefix="leader_jax_meds_") as tmp:
        export("eicu", Path(tmp) / "eicu_demo_meds")
        return meds.read_meds(Path(tmp) / "eicu_demo_meds", cfg)


def prepare(cfg) -> PreparedData:
    """Validate the config, read, build and return the prepared dataset (no writing)."""
    validate_config(cfg)
    try:
        return build(read_raw(cfg), cfg)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None


def check_writable(out) -> None:
    """Fail fast (before reading any table) when the output folder cannot be written: the folder
    itself when it exists, else its nearest existing parent, must accept a new file."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: output exists and is not a folder")
    probe = [p for p in (path, *path.parents) if p.exists()][0]
    targets = [probe] if probe != path else [path, path.parent]   # atomic replace needs both
    for d in targets:
        try:
            fd, tmp = tempfile.mkstemp(prefix=".leader_jax_probe.", dir=d)
            os.close(fd)
            os.unlink(tmp)
        except OSError as e:
            raise UserError(f"{path}: output folder is not writable ({d}: {e.strerror or e})") from None


def save(data: PreparedData, out) -> None:
    """data.save(out), with refusals and OS errors (read-only folder, full disk) as a UserError."""
    try:
        data.save(out)
    except ValueError as e:
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"{out}: cannot write the prepared folder ({e.strerror or e})") from None


def main(cfg, argv) -> None:
    if argv:
        raise UserError(f"unexpected arguments: {argv}")
    if not cfg.out:
        raise UserError("--out OUT is required")
    validate_config(cfg)
    check_writable(cfg.out)
    data = prepare(cfg)
    save(data, cfg.out)
    s = data.stats
    summary = {k: s[k] for k in ("dataset", "n_patients", "n_visits", "n_samples", "n_diag", "n_proc", "n_med",
                                 "avg_meds_per_visit", "n_single_visit")}
    print(json.dumps(summary, sort_keys=True))
    print(f"wrote {Path(cfg.out)} (fingerprint {data.fingerprint()[:16]})", file=sys.stderr)


if __name__ == "__main__":
    run(main, "data.py")
