"""JAX's persistent compilation cache for the CLIs, and compile accounting.

`enable()` (called by `leader_jax.cli.run` before a stage starts) points JAX at a cache folder so that a
rerun with the same shapes loads its executables from disk instead of compiling them again:

- folder: `$LEADER_JAX_COMPILE_CACHE` if it names a folder, else `$LEADER_JAX_CACHE/xla` (default
  `~/.cache/leader_jax/xla`); `LEADER_JAX_COMPILE_CACHE=off` (or `0`, `false`, `no`) turns it off;
- created with mode 0o700; an existing folder is refused (a one-line `UserError` naming it) when it is
  a symlink, owned by another user, or writable by group/others (the same check as the kernel cache,
  `leader_jax.kernels.set_block`): a cached executable is code this process runs;
- every program is cached (no minimum compile time or size), since the student's CPU programs are small
  but many, and together cost tens of seconds.

`CompileStats` counts XLA compilations through `jax.monitoring` (one backend-compile event per executable,
whether compiled or loaded from the persistent cache; cache hits and misses are separate events), so a
stage can report how many programs it compiled, how long that took and how many came from the cache.
"""
from __future__ import annotations

import os
import threading
from collections import Counter
from pathlib import Path

OFF_VALUES = ("off", "0", "false", "no")
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
CACHE_HIT = "/jax/compilation_cache/cache_hits"
CACHE_MISS = "/jax/compilation_cache/cache_misses"

_state: dict = {"dir": None}


def default_dir() -> Path | None:
    """The cache folder the environment asks for (None: turned off)."""
    setting = os.environ.get("LEADER_JAX_COMPILE_CACHE", "").strip()
    if setting.lower() in OFF_VALUES:
        return None
    if setting:
        return Path(setting).expanduser()
    return Path(os.environ.get("LEADER_JAX_CACHE", Path.home() / ".cache" / "leader_jax")).expanduser() / "xla"


def checked_dir(path: Path) -> Path:
    """`path` created (0o700) and checked; UserError naming it when it is unsafe to load code from."""
    from leader_jax.cli import UserError
    from leader_jax.kernels.set_block import _unsafe_dir

    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise UserError(f"cannot create the compilation cache folder {path}: {e} "
                        f"(set LEADER_JAX_COMPILE_CACHE=off or to another folder)") from None
    why = _unsafe_dir(path, private=False)
    if why:
        raise UserError(f"refusing the compilation cache folder: {why} "
                        f"(fix it, or set LEADER_JAX_COMPILE_CACHE=off or to another folder)")
    return path


def enable(path: str | Path | None = None) -> Path | None:
    """Use the persistent compilation cache in `path` (default: `default_dir()`; None there = off).
    Returns the folder in use (None: off). Safe to call again with another folder (tests)."""
    import jax
    from jax._src import compilation_cache

    folder = default_dir() if path is None else Path(path)
    if folder is not None:
        folder = checked_dir(folder).resolve()
    if folder == _state["dir"]:
        return folder
    jax.config.update("jax_compilation_cache_dir", str(folder) if folder else None)
    jax.config.update("jax_enable_compilation_cache", folder is not None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    compilation_cache.reset_cache()      # JAX decides once per process whether the cache is used
    _state["dir"] = folder
    return folder


def active_dir() -> Path | None:
    """The folder `enable` set (None: the persistent cache is off)."""
    return _state["dir"]


class CompileStats:
    """Process-wide counters of XLA compilations (installed once; read with `snapshot()`)."""

    _lock = threading.Lock()
    _installed = False
    compiles = 0
    seconds = 0.0
    hits = 0
    misses = 0
    by_function: Counter = Counter()

    @classmethod
    def install(cls) -> None:
        with cls._lock:
            if cls._installed:
                return
            from jax import monitoring

            def on_duration(event: str, duration: float, **kw) -> None:
                if event == BACKEND_COMPILE:
                    with cls._lock:
                        cls.compiles += 1
                        cls.seconds += float(duration)
                        cls.by_function[str(kw.get("fun_name", "?"))] += 1

            def on_event(event: str, **kw) -> None:
                if event in (CACHE_HIT, CACHE_MISS):
                    with cls._lock:
                        if event == CACHE_HIT:
                            cls.hits += 1
                        else:
                            cls.misses += 1

            monitoring.register_event_duration_secs_listener(on_duration)
            monitoring.register_event_listener(on_event)
            cls._installed = True

    @classmethod
    def snapshot(cls) -> dict:
        cls.install()
        with cls._lock:
            return {"compiles": cls.compiles, "compile_seconds": cls.seconds, "cache_hits": cls.hits,
                    "cache_misses": cls.misses, "by_function": dict(cls.by_function)}

    @staticmethod
    def since(before: dict) -> dict:
        """What was compiled since `before` (a `snapshot()`): counts, seconds, cache hits/misses and
        compiles per jitted function name."""
        now = CompileStats.snapshot()
        by = {k: v - before["by_function"].get(k, 0) for k, v in now["by_function"].items()}
        return {"compiles": now["compiles"] - before["compiles"],
                "compile_seconds": round(now["compile_seconds"] - before["compile_seconds"], 3),
                "cache_hits": now["cache_hits"] - before["cache_hits"],
                "cache_misses": now["cache_misses"] - before["cache_misses"],
                "by_function": {k: v for k, v in sorted(by.items()) if v}}
