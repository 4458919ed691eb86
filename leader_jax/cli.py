"""Shared command-line plumbing: every stage is `python -m leader_jax.X --config configs/X.py
--config.field=value [--out RUN]`, built on ml_collections config files and absl flags."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from absl import app, flags
from ml_collections import ConfigDict, config_flags

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"


def config_path(name: str) -> str:
    """Absolute path of a bundled config file, e.g. config_path("data.py")."""
    return str(CONFIG_DIR / name)


class UserError(Exception):
    """An error caused by input or configuration: printed as one clear line, no traceback."""


def run(main: Callable[[ConfigDict, list[str]], None], default_config: str,
        out_flag: bool = True, argv: list[str] | None = None) -> None:
    """Define `--config` (default `configs/<default_config>`) and optionally `--out`, then run
    `main(config, positional_args)`. A UserError exits with status 2 and a one-line message."""
    config_flags.DEFINE_config_file("config", default=config_path(default_config),
                                    help_string="ml_collections config file", lock_config=False)
    if out_flag and "out" not in flags.FLAGS:
        flags.DEFINE_string("out", None, "output (run) directory")

    def _main(args: list[str]) -> None:
        from absl import logging

        if not flags.FLAGS["verbosity"].present:     # library INFO logs (orbax, absl) only on request
            logging.set_verbosity(logging.WARNING)
        cfg = flags.FLAGS.config
        if out_flag and flags.FLAGS.out is not None:
            with cfg.unlocked():
                cfg.out = flags.FLAGS.out
        try:
            main(cfg, list(args[1:]))
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(_main, argv=argv)


def load_config(name: str, overrides: Mapping[str, Any] | ConfigDict | None = None) -> ConfigDict:
    """Load `configs/<name>` (`file.py` or `file.py:preset`) and deep-merge `overrides` into it:
    the in-process equivalent of `--config configs/<name> --config.a.b=value ...`. Unknown fields are an
    error, so a typo never silently does nothing."""
    import importlib.util

    file, _, preset = name.partition(":")
    path = Path(file) if Path(file).is_absolute() else CONFIG_DIR / file
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"leader_jax_config_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config(preset) if preset else mod.get_config()
    if overrides:
        _merge(cfg, overrides.to_dict() if isinstance(overrides, ConfigDict) else dict(overrides), name)
    return cfg


def _merge(cfg: ConfigDict, overrides: Mapping[str, Any], where: str) -> None:
    with cfg.unlocked():
        for key, value in overrides.items():
            if key not in cfg:
                raise UserError(f"{where}: unknown config field {key!r}")
            if isinstance(cfg[key], ConfigDict) and isinstance(value, (Mapping, ConfigDict)):
                _merge(cfg[key], value.to_dict() if isinstance(value, ConfigDict) else value, f"{where}.{key}")
            else:
                cfg[key] = tuple(value) if isinstance(value, list) else value
