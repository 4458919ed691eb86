"""Traced programs kept across processes (`jax.export`), so that a warm start skips Python tracing.

JAX's persistent compilation cache (`leader_jax.compile_cache`) spares a rerun XLA's compilation, but not the
tracing and lowering that produce the program and its cache key. For the student's training loop (forward,
backward and Adam, looped over a chunk of steps) that tracing is the largest cost of a warm start.
`ExportedJit` traces a function once per input signature, stores the lowered program (StableHLO, serialized
by `jax.export` as flatbuffers: no pickle) in the folder `<compile cache>_exported`, and later processes
deserialize it instead of tracing; the executable itself still comes from the compilation cache.

The file name is a hash of everything the program depends on: the source of the modules that define it, the
versions of jax, jaxlib, flax and optax, the caller's structural key (model graph, loss, learning rate, mesh)
and every argument's shape, dtype and sharding. Anything else that changes gives another file, never a stale
program. With the compilation cache off it is the plain jitted function.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax

log = logging.getLogger(__name__)
SUFFIX = ".jaxexport"


def exported_dir() -> Path | None:
    """`<compile cache folder>_exported` (created 0o700 and checked like the cache itself: it holds code this
    process runs), or None when the compilation cache is off. Checked once per folder, not per call."""
    from leader_jax.compile_cache import active_dir

    cache = active_dir()
    return None if cache is None else _checked(cache.with_name(cache.name + "_exported"))


@functools.lru_cache(maxsize=None)
def _checked(folder: Path) -> Path:
    from leader_jax.compile_cache import checked_dir

    return checked_dir(folder)


@functools.lru_cache(maxsize=None)
def source_digest(modules: tuple[str, ...]) -> str:
    """sha256 over the source files of `modules` and the versions of the libraries that trace and lower them."""
    h = hashlib.sha256()
    for name in ("jax", "jaxlib", "flax", "optax"):
        h.update(f"{name}={importlib.import_module(name).__version__};".encode())
    for name in modules:
        h.update(Path(inspect.getfile(importlib.import_module(name))).read_bytes())
    return h.hexdigest()


class ExportedJit:
    """`jitted` (= jax.jit(fn, ...)) with its traced program kept on disk: in a process with the compilation
    cache on, a call deserializes the program of its input signature from `exported_dir()` (or traces and
    writes it once); with the cache off it is `jitted` itself. Results are those of `jitted`.

    `shardings(*args)` -> (in, out): pytrees of shardings with exactly the structure of the arguments and of
    the result (so that neither needs tracing to be known); `key`: what else the program depends on, a string
    the caller builds; `modules`: the modules whose source defines `fn`."""

    def __init__(self, jitted: Callable, fn: Callable, *, name: str, key: str, modules: Sequence[str],
                 shardings: Callable[..., tuple[Any, Any]], donate_argnums: tuple[int, ...] = ()):
        self.jitted, self.fn, self.name, self.key, self.modules = jitted, fn, name, key, tuple(modules)
        self.shardings, self.donate_argnums = shardings, tuple(donate_argnums)
        self._programs: dict[tuple, tuple[Callable, Any]] = {}
        self.loaded = self.traced = 0               # programs read from disk / traced and written, this process

    def __call__(self, *args):
        folder = exported_dir()
        if folder is None:
            return self.jitted(*args)
        leaves, treedef = jax.tree.flatten(args)
        in_sh, out_sh = self.shardings(*args)
        sig = (treedef, tuple(f"{jax.typeof(x)}@{s}" for x, s in zip(leaves, jax.tree.leaves(in_sh), strict=True)))
        if sig not in self._programs:
            self._programs[sig] = self._program(folder, args, treedef, sig[1], in_sh, out_sh)
        call, out_def = self._programs[sig]
        return jax.tree.unflatten(out_def, call(*leaves))

    def cache_size(self) -> int:
        """Distinct programs run so far (one per input signature), through either path."""
        return len(self._programs) + int(self.jitted._cache_size())

    def _program(self, folder: Path, args, treedef, sig: tuple[str, ...], in_sh, out_sh):
        from jax import export

        digest = hashlib.sha256("\n".join([source_digest(self.modules), self.key, str(treedef), *sig]).encode())
        path = folder / f"{self.name}-{digest.hexdigest()[:40]}{SUFFIX}"
        in_leaves = jax.tree.leaves(in_sh)
        out_leaves, out_def = jax.tree.flatten(out_sh)
        exp = None
        if path.is_file():
            try:
                exp = export.deserialize(bytearray(path.read_bytes()))
                self.loaded += 1
            except Exception as e:                  # noqa: BLE001 (a damaged file is traced again)
                log.warning("tracing %s again: %s is unreadable (%s)", self.name, path, e)
        if exp is None:
            def flat(*leaves):
                return tuple(jax.tree.leaves(self.fn(*jax.tree.unflatten(treedef, leaves))))
            avals = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                     for x, s in zip(jax.tree.leaves(args), in_leaves, strict=True)]
            exp = export.export(jax.jit(flat, in_shardings=tuple(in_leaves), out_shardings=tuple(out_leaves)))(*avals)
            _atomic_write(path, exp.serialize())
            self.traced += 1

        def call(*leaves):
            return exp.call(*leaves)
        call.__name__ = call.__qualname__ = self.name      # compile events are named after the function
        arg_of_leaf = [i for i, a in enumerate(args) for _ in jax.tree.leaves(a)]
        donate = tuple(j for j, i in enumerate(arg_of_leaf) if i in self.donate_argnums)
        return jax.jit(call, in_shardings=tuple(in_leaves), out_shardings=tuple(out_leaves),
                       donate_argnums=donate), out_def


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
