"""CPU fast path for LEADER(S) inference: the `set_block.cc` XLA FFI kernel, compiled on first use.

XLA:CPU runs the student's per-set attention as thousands of tiny batched matmuls and spends most of
its time in per-matrix overhead; `set_block_means` computes one transformer block for many small sets
in cache (register-blocked FFN, fused GELU + set mean) on every core. It is an optional accelerator
for CPU devices: `available()` says whether it can be built and registered here (a C++17 compiler,
the jaxlib FFI headers) and why not; callers fall back to the pure-JAX path, which stays the
reference (tests assert both agree to 1e-5).

The shared library is built with `$CXX` (default g++) `-O3 -march=native` into
`$LEADER_JAX_CACHE/kernels` (default `~/.cache/leader_jax/kernels`), named by a hash of the source,
jaxlib version, compiler and CPU flags, written atomically (temp file + rename), so concurrent
processes and upgrades never load a stale or half-written build.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

TARGET = "leader_jax_set_block_means"
SOURCE = Path(__file__).with_name("set_block.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def cache_dir() -> Path:
    return Path(os.environ.get("LEADER_JAX_CACHE", Path.home() / ".cache" / "leader_jax")) / "kernels"


def build(cxx: str | None = None) -> Path:
    """Compile set_block.cc (if this exact build is not cached yet) and return the library path."""
    cxx = cxx or os.environ.get("CXX", "g++")
    exe = shutil.which(cxx)
    if exe is None:
        raise RuntimeError(f"no C++ compiler {cxx!r} on PATH (set $CXX)")
    import jaxlib
    key = hashlib.sha256("\0".join([SOURCE.read_text(), jaxlib.__version__, exe, " ".join(FLAGS),
                                    platform.machine(), _cpu_flags()]).encode()).hexdigest()[:16]
    out = cache_dir() / f"set_block-{key}.so"
    if out.exists():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError:                             # read-only home: a per-user temp folder instead
        out = Path(tempfile.gettempdir()) / f"leader_jax-kernels-{os.getuid()}" / out.name
        if out.exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [exe, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed ({' '.join(cmd)}):\n{res.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.lru_cache(maxsize=1)
def _register() -> str:
    """'' once the FFI target is registered (for the CPU platform), else the reason it cannot be."""
    try:
        lib = ctypes.CDLL(str(build()))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.SetBlockMeans), platform="cpu")
    except Exception as e:  # noqa: BLE001 - any build/load failure means "use the XLA path"
        return f"{type(e).__name__}: {e}"
    return ""


def available() -> tuple[bool, str]:
    """(usable, reason if not). Builds and registers the kernel on the first call."""
    why = _register()
    return not why, why


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def set_block_means(block, rows, idx, starts, counts, threads: int | None = None):
    """Per set, the mean over its tokens of `block`'s output (a student TransformerBlock at inference,
    i.e. without dropout) → [S, d]; an empty set gives zeros.

    rows [N, 4d] = x | LN1(x) @ Wqkv per row; idx [T] int32 row of each token; starts, counts [S] int32
    (set s = rows idx[starts[s] : starts[s] + counts[s]])."""
    ok, why = available()
    if not ok:
        raise RuntimeError(f"the set_block kernel is not available: {why}")
    d = rows.shape[1] // 4
    f = block.w1.kernel.shape[1]
    fp = -(-f // 16) * 16                       # FFN width padded to whole vectors (zeros: exact)
    w1 = jnp.pad(block.w1.kernel[...], ((0, 0), (0, fp - f)))
    b1 = jnp.pad(block.w1.bias[...], (0, fp - f))
    w2 = jnp.pad(block.w2.kernel[...], ((0, fp - f), (0, 0)))
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((starts.shape[0], d), jnp.float32))
    return call(rows.astype(jnp.float32), idx.astype(jnp.int32), starts.astype(jnp.int32),
                counts.astype(jnp.int32), block.o.kernel[...], block.o.bias[...], block.ln2.scale[...],
                block.ln2.bias[...], w1, b1, w2, block.w2.bias[...],
                heads=int(block.heads), eps=np.float32(block.ln2.eps), threads=int(threads or default_threads()))
