"""Shared command-line plumbing: every stage is `python -m leader_jax.X --config configs/X.py
--config.field=value [--out RUN]`, built on ml_collections config files and absl flags.

Every error a user can cause on the command line (an unknown config field, a value of the wrong type,
an unknown flag) and every `UserError` a stage raises ends as one line `error: ...` on stderr and exit
status 2, never a traceback."""
from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

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
    `main(config, positional_args)`. A UserError, an unknown config field, a bad flag value or a config
    file that does not load exits with status 2 and a one-line message."""
    args = list(sys.argv if argv is None else argv)
    default_file = config_path(default_config)
    try:   # without --config on the command line, the default file and its overrides are parsed here
        config_flags.DEFINE_config_file("config", default=default_file, help_string="ml_collections config file",
                                        lock_config=False, sys_argv=args)
    except Exception as e:  # noqa: BLE001 -- classified by _flag_error, which re-raises the unexplained
        _fail(_flag_error(args, default_file, e))
    if out_flag and "out" not in flags.FLAGS:
        flags.DEFINE_string("out", None, "output (run) directory")

    def _parse(a: list[str]) -> list[str]:
        try:
            return flags.FLAGS(a)
        except Exception as e:  # noqa: BLE001
            _fail(_flag_error(a, default_file, e))

    def _main(rest: list[str]) -> None:
        from absl import logging

        if not flags.FLAGS["verbosity"].present:     # library INFO logs (orbax, absl) only on request
            logging.set_verbosity(logging.WARNING)
        cfg = flags.FLAGS.config
        if not isinstance(cfg, ConfigDict):          # ml_collections' stand-in for a file that failed to load
            try:
                cfg.keys()
            except OSError as e:
                _fail(_load_error(args, default_file, e))
        if out_flag and flags.FLAGS.out is not None:
            with cfg.unlocked():
                cfg.out = flags.FLAGS.out
        try:
            from leader_jax import compile_cache
            compile_cache.enable()       # persistent XLA cache (LEADER_JAX_COMPILE_CACHE=off turns it off)
            main(cfg, list(rest[1:]))
        except UserError as e:
            _fail(str(e))
        except Exception as e:  # noqa: BLE001 -- only the accelerator's out-of-memory error is explained
            message = out_of_memory_message(e)
            if message is None:
                raise
            _fail(message)

    app.run(_main, argv=args, flags_parser=_parse)


OOM_MARK = "RESOURCE_EXHAUSTED"
_BYTES = re.compile(r"allocating (\d+) bytes")


def out_of_memory_message(e: Exception) -> str | None:
    """The one-line explanation of XLA's out-of-memory error (RESOURCE_EXHAUSTED), or None for any other
    exception. A run killed here keeps its last checkpoint; the same command resumes it."""
    text = str(e)
    if OOM_MARK not in text:
        return None
    m = _BYTES.search(text)
    size = f" ({int(m.group(1)) / 1e9:.1f} GB in one allocation)" if m else ""
    return (f"out of memory{size}: lower train.micro_batch (train.accum keeps the batch: micro_batch x accum), "
            f"eval.batch_size, data.max_len / data.eval_max_len, or retrieval.joint.m; a checkpointed run "
            f"resumes with the same command")


def _fail(message: str) -> None:
    print("error: " + " ".join(str(message).split()), file=sys.stderr)    # always one line
    sys.exit(2)


def _flag_error(argv: list[str], default_file: str, e: Exception) -> str:
    """One line for an error raised while parsing flags: an unknown `--config.x` (ml_collections raises a
    plain KeyError/AttributeError for it) names the field and the nearest valid one; a bad value or an
    unknown flag keeps absl's message; anything else comes from loading the config file."""
    msg = _unknown_override(argv, default_file)
    if msg is not None:
        return msg
    if isinstance(e, (flags.Error, ValueError, TypeError, KeyError, AttributeError)) and not isinstance(e, OSError):
        return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return _load_error(argv, default_file, e)     # the config file itself failed (missing, syntax, get_config)


def _config_spec(argv: list[str], default_file: str) -> str:
    spec = default_file
    for i, a in enumerate(argv):
        m = re.match(r"^-{1,2}config(?:=(.*))?$", a)
        if m:
            spec = m.group(1) if m.group(1) is not None else (argv[i + 1] if i + 1 < len(argv) else spec)
    return spec


def _load_error(argv: list[str], default_file: str, e: Exception) -> str:
    file = _config_spec(argv, default_file).partition(":")[0]
    if not Path(file).is_file():
        return f"config file not found: {file}"
    cause = e.__cause__ or e
    return f"cannot load config file {file}: {type(cause).__name__}: {cause}"


def _unknown_override(argv: list[str], default_file: str) -> str | None:
    """The message for the first `--config.<path>` of argv that names no field of the config, if any."""
    file, sep, preset = _config_spec(argv, default_file).partition(":")
    if Path(file).is_file():
        spec = str(Path(file).resolve()) + sep + preset
    try:
        cfg = load_config(spec)
    except Exception:  # noqa: BLE001 -- the config itself is broken: let the original error speak
        return None
    for a in argv:
        m = re.match(r"^-{1,2}(?:no)?config\.([^=]+)", a)
        if m:
            msg = unknown_field(cfg, m.group(1))
            if msg:
                return msg
    return None


def _paths(cfg: Mapping, prefix: str = "") -> Iterator[str]:
    for k in cfg.keys():
        p = f"{prefix}{k}"
        yield p
        if isinstance(cfg[k], (ConfigDict, dict)):
            yield from _paths(cfg[k], p + ".")


def unknown_field(cfg: Mapping, path: str) -> str | None:
    """None if the dotted `path` names a field (or group) of cfg; else
    "unknown config field 'datset' (did you mean 'dataset'?)" with the nearest valid dotted path."""
    node = cfg
    for part in path.split("."):
        if not isinstance(node, (ConfigDict, dict)) or part not in node:
            return f"unknown config field {path!r}" + (f" (did you mean {near!r}?)" if (near := _nearest(cfg, path))
                                                         else "")
        node = node[part]
    return None


def _nearest(cfg: Mapping, path: str) -> str | None:
    """The valid dotted path closest to `path` (difflib), else the one whose last part is closest."""
    paths = list(_paths(cfg))
    near = difflib.get_close_matches(path, paths, n=1, cutoff=0.6)
    if near:
        return near[0]
    leaf = {}
    for p in paths:
        leaf.setdefault(p.rsplit(".", 1)[-1], p)
    near = difflib.get_close_matches(path.rsplit(".", 1)[-1], list(leaf), n=1, cutoff=0.6)
    return leaf[near[0]] if near else None


def load_config(name: str, overrides: Mapping[str, Any] | ConfigDict | None = None) -> ConfigDict:
    """Load `configs/<name>` (`file.py` or `file.py:preset`) and deep-merge `overrides` into it:
    the in-process equivalent of `--config configs/<name> --config.a.b=value ...`. Unknown fields are an
    error naming the nearest valid field, so a typo never silently does nothing."""
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
        _merge(cfg, overrides.to_dict() if isinstance(overrides, ConfigDict) else dict(overrides), name, cfg, "")
    return cfg


def _merge(cfg: ConfigDict, overrides: Mapping[str, Any], where: str, root: ConfigDict, prefix: str) -> None:
    with cfg.unlocked():
        for key, value in overrides.items():
            if key not in cfg:
                raise UserError(f"{where}: {unknown_field(root, prefix + key)}")
            if isinstance(cfg[key], ConfigDict) and isinstance(value, (Mapping, ConfigDict)):
                _merge(cfg[key], value.to_dict() if isinstance(value, ConfigDict) else value, where, root,
                       f"{prefix}{key}.")
            else:
                cfg[key] = tuple(value) if isinstance(value, list) else value
