"""The set_block kernel cache is untrusted until checked: only a folder owned by this user and not
writable by others is used, a per-user temp folder is never adopted from someone else, and a library
is loaded only when its sha256 equals the one recorded right after it was built. A fake compiler (a
shell script writing fixed bytes) keeps these tests free of real builds; the real library is checked
once at the end (it is the one the numerics tests already build)."""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile

import pytest

from leader_jax.kernels import set_block


@pytest.fixture
def fake_cxx(tmp_path):
    """A 'compiler' that writes b'fake library' to its -o argument and counts its calls."""
    calls = tmp_path / "calls"
    script = tmp_path / "fake-cxx"
    script.write_text("#!/bin/sh\n"
                      f"echo x >> {calls}\n"
                      'while [ $# -gt 0 ]; do if [ "$1" = -o ]; then printf "fake library" > "$2"; fi; shift; done\n')
    script.chmod(0o755)
    return str(script), lambda: len(calls.read_text().splitlines()) if calls.exists() else 0


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LEADER_JAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "kernels"


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_build_records_sha256_and_reuses_the_verified_library(cache, fake_cxx):
    cxx, n_calls = fake_cxx
    lib = set_block.build(cxx)
    assert lib.parent == cache and _mode(cache) == 0o700 and n_calls() == 1
    side = lib.with_name(lib.name + ".sha256")
    assert side.read_text().split()[0] == hashlib.sha256(b"fake library").hexdigest()
    assert set_block.verify(lib) == ""
    assert set_block.build(cxx) == lib and n_calls() == 1          # cached: not compiled again
    assert sorted(p.name for p in cache.iterdir()) == [lib.name, side.name]   # no temp files left


@pytest.mark.parametrize("sidecar", [None, "0" * 64])
def test_planted_library_is_never_loaded(cache, fake_cxx, monkeypatch, sidecar):
    cxx, n_calls = fake_cxx
    _, lib = set_block.library_path(cxx)
    lib.write_bytes(b"planted code")
    if sidecar is not None:
        lib.with_name(lib.name + ".sha256").write_text(sidecar)
    why = set_block.verify(lib)
    assert lib.name in why and ("no recorded sha256" in why if sidecar is None else "records 0000" in why)
    loaded = []
    monkeypatch.setattr(ctypes, "CDLL", lambda path: loaded.append(open(path, "rb").read()) or "handle")
    with pytest.warns(UserWarning, match=f"not loading the cached library: {lib}.*rebuilding"):
        assert set_block.load_library(cxx) == "handle"
    assert loaded == [b"fake library"] and n_calls() == 1            # the rebuilt one, not the planted one


def test_load_refuses_a_library_changed_after_the_build(cache, fake_cxx, monkeypatch):
    cxx, _ = fake_cxx
    lib = set_block.build(cxx)
    monkeypatch.setattr(set_block, "build", lambda cxx=None: lib)      # swap it between build and load
    lib.write_bytes(b"swapped")
    monkeypatch.setattr(ctypes, "CDLL", lambda path: pytest.fail("an unverified library was loaded"))
    with pytest.raises(set_block.UnsafeCacheError, match="refusing to load .*sha256"):
        set_block.load_library(cxx)


def test_unsafe_cache_folders_are_refused(cache, fake_cxx, monkeypatch):
    cxx, n_calls = fake_cxx
    cache.mkdir(parents=True)
    cache.chmod(0o777)
    with pytest.raises(set_block.UnsafeCacheError, match=f"{cache} has mode 0o777"):
        set_block.build(cxx)
    cache.chmod(0o700)
    assert set_block.kernel_dir() == cache
    monkeypatch.setattr(os, "getuid", lambda: os.lstat(cache).st_uid + 1)    # someone else's folder
    with pytest.raises(set_block.UnsafeCacheError, match="is owned by uid .*not by this user"):
        set_block.build(cxx)
    monkeypatch.undo()
    monkeypatch.setenv("LEADER_JAX_CACHE", str(cache.parent.parent / "link"))
    (cache.parent.parent / "link").mkdir()
    (cache.parent.parent / "link" / "kernels").symlink_to(cache)
    with pytest.raises(set_block.UnsafeCacheError, match="is a symlink"):
        set_block.build(cxx)
    assert n_calls() == 0
    # available() gives the reason (the real compiler is never reached: the folder check comes first)
    set_block._register.cache_clear()
    try:
        ok, why = set_block.available()
        assert not ok and "UnsafeCacheError" in why and "is a symlink" in why
    finally:
        set_block._register.cache_clear()       # later callers register the real kernel again


def test_temp_fallback_is_private_and_never_adopted(tmp_path, fake_cxx, monkeypatch):
    cxx, _ = fake_cxx
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LEADER_JAX_CACHE", str(tmp_path / "file" / "cache"))   # cannot be created
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    mine = tmp_path / "tmp" / f"leader_jax-kernels-{os.getuid()}"
    assert set_block.build(cxx).parent == mine and _mode(mine) == 0o700
    set_block._private_temp_dir.cache_clear()
    try:
        mine.chmod(0o777)                       # e.g. created first by another user, open to all
        with pytest.warns(UserWarning, match=f"not using {mine} .*mode 0o777"):
            lib = set_block.build(cxx)
        assert lib.parent != mine and lib.parent.name.startswith("leader_jax-kernels-")
        assert _mode(lib.parent) == 0o700 and set_block.verify(lib) == ""
        mine.chmod(0o700)
        monkeypatch.setattr(os, "getuid", lambda: os.lstat(mine).st_uid + 1)
        with pytest.warns(UserWarning, match="is owned by uid"):
            assert set_block.kernel_dir() == lib.parent
    finally:
        set_block._private_temp_dir.cache_clear()


def test_real_library_is_verified_and_built_once(monkeypatch):
    """The happy path: the real build (the numerics tests use the same one) has a matching record
    and is reused without compiling."""
    # the kernel is optional for users, but the test machines (CI included) have g++: never skip
    assert shutil.which(os.environ.get("CXX", "g++")), "no C++ compiler on the test machine"
    ok, why = set_block.available()
    assert ok, why
    lib = set_block.build()
    assert set_block.verify(lib) == "" and _mode(lib.parent) & 0o022 == 0
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("compiled again"))
    assert set_block.build() == lib and hasattr(set_block.load_library(), "SetBlockMeans")
