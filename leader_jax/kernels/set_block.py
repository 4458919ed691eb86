"""CPU fast path for LEADER(S) inference: the `set_block.cc` XLA FFI kernel, compiled on first use.

XLA:CPU runs the student's per-set attention as thousands of tiny batched matmuls and spends most of
its time in per-matrix overhead; `set_block_means` computes one transformer block for many small sets
in cache (register-blocked FFN, fused GELU + set mean) on every core. It is an optional accelerator
for CPU devices: `available()` says whether it can be built and registered here (a C++17 compiler,
the jaxlib FFI headers, a safe cache folder) and why not; callers fall back to the pure-JAX path,
which stays the reference (tests assert both agree to 1e-5).

The shared library is built with `$CXX` (default g++) `-O3 -march=native` into
`$LEADER_JAX_CACHE/kernels` (default `~/.cache/leader_jax/kernels`), named by a hash of the source,
jaxlib version, compiler and CPU flags, written atomically (temp file + rename), so concurrent
processes and upgrades never load a stale or half-written build.

Loading a shared library runs its code inside this process, so the cache is treated as untrusted
until checked:

- the folder must be a real directory (not a symlink) owned by the current user and not writable by
  group or others; otherwise the kernel is refused (the reason names the folder);
- when the cache folder cannot be created (read-only home), a per-user temp folder
  `<tmp>/leader_jax-kernels-<uid>` is used, created with mode 0o700 and adopted only if it is owned
  by this user with mode 0o700; otherwise a fresh private `tempfile.mkdtemp` folder for this process;
- right after a build, the library's sha256 is recorded in `<library>.sha256` (written atomically in
  the same folder); before every load the library is hashed again and compared: a missing or
  different record means the file is not ours, so it is rebuilt (with a warning), never loaded.
"""
from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

TARGET = "leader_jax_set_block_means"
SOURCE = Path(__file__).with_name("set_block.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread")
SIDECAR = ".sha256"                              # <library>.sha256 holds the library's hex digest


class UnsafeCacheError(RuntimeError):
    """The kernel cache folder or a file in it cannot be trusted (owner, mode, symlink)."""


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def cache_dir() -> Path:
    """The preferred kernel cache folder (it may not exist yet; `kernel_dir` creates and checks it)."""
    return Path(os.environ.get("LEADER_JAX_CACHE", Path.home() / ".cache" / "leader_jax")) / "kernels"


def _unsafe_dir(path: Path, private: bool) -> str:
    """'' when `path` is a real directory owned by this user and not writable by group/others
    (`private`: no group/other access at all, i.e. mode 0o700), else why not."""
    try:
        st = os.lstat(path)
    except OSError as e:
        return f"cannot stat {path}: {e}"
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid != os.getuid():
        return f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.getuid()})"
    mode = stat.S_IMODE(st.st_mode)
    if mode & (0o077 if private else 0o022):
        return (f"{path} has mode {mode:#o}; it must be "
                + ("0o700 (private to this user)" if private else "writable only by its owner"))
    return ""


def _temp_kernel_dir() -> Path:
    """A folder private to this user under the temp dir: `leader_jax-kernels-<uid>` (created 0o700 or
    adopted only when owned by us with mode 0o700), else a fresh `mkdtemp` folder removed at exit."""
    path = Path(tempfile.gettempdir()) / f"leader_jax-kernels-{os.getuid()}"
    try:
        os.mkdir(path, 0o700)
    except OSError:                             # exists already (checked below) or cannot be made
        pass
    why = _unsafe_dir(path, private=True)
    if not why:
        return path
    warnings.warn(f"set_block kernel: not using {path} ({why}); building in a private temp folder")
    return _private_temp_dir()


@functools.lru_cache(maxsize=1)
def _private_temp_dir() -> Path:
    """A fresh folder only this process knows (mkdtemp: mode 0o700, unpredictable name), removed at exit."""
    fresh = Path(tempfile.mkdtemp(prefix="leader_jax-kernels-"))
    atexit.register(shutil.rmtree, fresh, ignore_errors=True)
    return fresh


def kernel_dir() -> Path:
    """The checked folder libraries are built into and loaded from (created 0o700 when missing).
    Raises UnsafeCacheError when the cache folder exists but is unsafe (it is never used then)."""
    path = cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError:                             # read-only home: a per-user temp folder instead
        return _temp_kernel_dir()
    why = _unsafe_dir(path, private=False)
    if why:
        raise UnsafeCacheError(f"refusing the kernel cache folder: {why} (fix it or set $LEADER_JAX_CACHE)")
    return path


def _sha256_file(path: Path) -> str:
    """Hex sha256 of a regular file owned by this user, opened without following symlinks."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise UnsafeCacheError(f"{path} is not a regular file owned by this user")
        h = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(lib: Path) -> str:
    """'' when `lib`'s sha256 equals the one recorded in `<lib>.sha256` when it was built, else why not."""
    side = lib.with_name(lib.name + SIDECAR)
    try:
        if stat.S_ISLNK(os.lstat(side).st_mode):
            return f"{side} is a symlink"
        recorded = side.read_text().split()[0] if side.stat().st_size < 1024 else ""
    except (OSError, IndexError):
        return f"{lib} has no recorded sha256 ({side.name} missing or unreadable)"
    try:
        actual = _sha256_file(lib)
    except (OSError, UnsafeCacheError) as e:
        return f"cannot hash {lib}: {e}"
    if actual != recorded:
        return f"{lib} has sha256 {actual[:16]}…, but {side.name} records {recorded[:16] or 'nothing'}…"
    return ""


def library_path(cxx: str | None = None) -> tuple[str, Path]:
    """(compiler executable, library path in `kernel_dir()`) of the build for this source, jaxlib,
    compiler, flags and CPU."""
    cxx = cxx or os.environ.get("CXX", "g++")
    exe = shutil.which(cxx)
    if exe is None:
        raise RuntimeError(f"no C++ compiler {cxx!r} on PATH (set $CXX)")
    import jaxlib
    key = hashlib.sha256("\0".join([SOURCE.read_text(), jaxlib.__version__, exe, " ".join(FLAGS),
                                    platform.machine(), _cpu_flags()]).encode()).hexdigest()[:16]
    return exe, kernel_dir() / f"set_block-{key}.so"


def _compile(exe: str, out: Path) -> None:
    """Compile into a temp file of `out`'s folder, record its sha256 (atomic sidecar), then rename."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    side_tmp = None
    try:
        cmd = [exe, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed ({' '.join(cmd)}):\n{res.stderr[-2000:]}")
        digest = _sha256_file(Path(tmp))
        fd, side_tmp = tempfile.mkstemp(suffix=SIDECAR, dir=out.parent)
        with os.fdopen(fd, "w") as f:
            f.write(f"{digest}  {out.name}\n")
        os.replace(side_tmp, out.with_name(out.name + SIDECAR))
        os.replace(tmp, out)
    finally:
        for t in (tmp, side_tmp):
            if t and os.path.exists(t):
                os.unlink(t)


def build(cxx: str | None = None) -> Path:
    """Compile set_block.cc unless this exact build is cached with a matching recorded sha256, and
    return the verified library path. A cached library whose sha256 does not match its record (or has
    none) is rebuilt with a warning; it is never returned."""
    exe, out = library_path(cxx)
    if os.path.lexists(out):
        why = verify(out)
        if not why:
            return out
        warnings.warn(f"set_block kernel: not loading the cached library: {why}; rebuilding it")
    _compile(exe, out)
    why = verify(out)                           # e.g. another process replaced it in between
    if why:
        raise UnsafeCacheError(f"refusing to load {out}: {why}")
    return out


def load_library(cxx: str | None = None) -> ctypes.CDLL:
    """dlopen the verified library (built if needed); raises with the reason when it cannot be."""
    path = build(cxx)
    why = verify(path)                          # checked right before the load, every time
    if why:
        raise UnsafeCacheError(f"refusing to load {path}: {why}")
    return ctypes.CDLL(str(path))


@functools.lru_cache(maxsize=1)
def _register() -> str:
    """'' once the FFI target is registered (for the CPU platform), else the reason it cannot be."""
    try:
        lib = load_library()
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
