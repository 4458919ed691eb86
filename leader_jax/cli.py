"""Shared command-line plumbing: every stage is `python -m leader_jax.X --config configs/X.py
--config.field=value [--out RUN]`, built on ml_collections config files and absl flags."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

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
