"""Hugging Face checkpoint I/O: safetensors (single file or sharded index) <-> NNX state, tensor by tensor.

Reading: the abstract model gives every parameter's shape, dtype and target sharding; each HF tensor is
read on its own (fp32/fp16/bf16 via ml_dtypes), transposed/cast on the host and `device_put` straight
into its sharded device array, so the host never holds more than one tensor (one stacked parameter for
scan_layers) besides the device weights. Writing streams tensors to disk one by one (temp file + rename).
The model-specific key mapping (HF name -> state path, transpose) is passed in by the model module.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy before safetensors reads BF16)
import numpy as np
from flax import nnx

from leader_jax.io import atomic_write_json

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_ST_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
              "BF16": np.dtype(ml_dtypes.bfloat16), "F64": np.dtype(np.float64)}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}

KeyMap = Callable[[str], "tuple[tuple, int | None, bool] | None"]


class CheckpointKeyError(ValueError):
    """Missing or unexpected tensors in an HF checkpoint (the message lists them)."""


class SafetensorsReader:
    """Lazy, per-tensor access to `model.safetensors` or a sharded `model.safetensors.index.json`."""

    def __init__(self, path):
        from safetensors import safe_open

        self.path = Path(path)
        index, single = self.path / INDEX_FILE, self.path / SINGLE_FILE
        if index.is_file():
            with open(index, encoding="utf-8") as f:
                wmap = json.load(f).get("weight_map")
            if not isinstance(wmap, dict) or not wmap:
                raise ValueError(f"{index}: missing or empty 'weight_map'")
            self._file_of = {k: self.path / v for k, v in wmap.items()}
        elif single.is_file():
            self._file_of = None
        else:
            raise FileNotFoundError(f"{self.path}: neither {SINGLE_FILE} nor {INDEX_FILE} found "
                                    "(.bin checkpoints are not read: convert them to safetensors)")
        files = sorted(set(self._file_of.values())) if self._file_of else [single]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f}: shard named in {INDEX_FILE} does not exist")
        self._handles = {f: safe_open(str(f), framework="numpy") for f in files}
        if self._file_of is None:
            self._file_of = {k: single for k in self._handles[single].keys()}
        else:
            for k, f in self._file_of.items():
                if k not in set(self._handles[f].keys()):
                    raise ValueError(f"{f}: tensor {k!r} listed in {INDEX_FILE} is absent from the shard")

    def keys(self) -> list[str]:
        return sorted(self._file_of)

    def get(self, key: str) -> np.ndarray:
        try:
            return self._handles[self._file_of[key]].get_tensor(key)
        except TypeError as e:  # unknown dtype in the file
            raise ValueError(f"{self._file_of[key]}: tensor {key!r}: {e}") from e


def _flat(state) -> dict[tuple, Any]:
    return {tuple(p): v for p, v in nnx.to_flat_state(state)}


def _check_keys(present: Iterable[str], expected: Sequence[str], key_map: KeyMap, where) -> None:
    present = set(present)
    unexpected = []
    for k in sorted(present):
        try:
            key_map(k)
        except KeyError:
            unexpected.append(k)
    missing = sorted(set(expected) - present)
    if missing or unexpected:
        msg = [f"{where}: checkpoint does not match the model config"]
        if missing:
            msg.append(f"missing keys ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            msg.append(f"unexpected keys ({len(unexpected)}): {unexpected[:20]}"
                       f"{' ...' if len(unexpected) > 20 else ''}")
        raise CheckpointKeyError("; ".join(msg))


def load_state(path, abs_state, shardings, key_map: KeyMap, expected_keys: Sequence[str]):
    """Fill `abs_state` (abstract nnx.State) from the HF directory `path`; returns a concrete State."""
    reader = SafetensorsReader(path)
    _check_keys(reader.keys(), expected_keys, key_map, path)
    targets = _flat(abs_state)
    shard_of = _flat(shardings)
    groups: dict[tuple, list[tuple[str, int | None, bool]]] = {}
    for k in expected_keys:
        p, layer, transpose = key_map(k)
        if p not in targets:
            raise CheckpointKeyError(f"{path}: key {k!r} maps to {'/'.join(map(str, p))}, not a model parameter")
        groups.setdefault(p, []).append((k, layer, transpose))
    unfilled = sorted("/".join(map(str, p)) for p in targets if p not in groups)
    if unfilled:
        raise CheckpointKeyError(f"{path}: model parameters without a checkpoint tensor: {unfilled}")

    values: dict[tuple, jax.Array] = {}
    for p, items in groups.items():
        var = targets[p]
        sds = var.get_value() if hasattr(var, "get_value") else var
        shape, dtype = tuple(sds.shape), np.dtype(sds.dtype)
        if items[0][1] is None:  # one tensor -> one parameter
            (k, _, transpose), = items
            host = _prepare(reader.get(k), transpose, shape, dtype, path, k)
        else:  # stacked layers: fill one host buffer, then a single device_put
            host = np.empty(shape, dtype)
            for k, layer, transpose in items:
                host[layer] = _prepare(reader.get(k), transpose, shape[1:], dtype, path, k)
        # every process builds only its addressable shards (multi-process safe; same bytes everywhere)
        values[p] = jax.make_array_from_callback(host.shape, shard_of[p], lambda idx, h=host: h[idx])
        del host
    pure: dict = {}
    for p, v in values.items():
        d = pure
        for part in p[:-1]:
            d = d.setdefault(part, {})
        d[p[-1]] = v
    nnx.replace_by_pure_dict(abs_state, pure)
    return abs_state


def _prepare(arr: np.ndarray, transpose: bool, shape, dtype, path, key) -> np.ndarray:
    if arr.dtype not in _ST_NAMES:
        raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {arr.dtype} (need F32/F16/BF16)")
    if transpose:
        arr = arr.T
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{path}: tensor {key!r} has shape {tuple(arr.T.shape if transpose else arr.shape)}"
                         f", the model config expects {tuple(shape[::-1]) if transpose else tuple(shape)}")
    return np.ascontiguousarray(arr.astype(dtype, copy=False))


# ------------------------------------------------------------------------------------------ writing
def save_state(path, state, keys: Sequence[str], key_map: KeyMap, config_dict: dict, out_dtype,
               max_shard_bytes: int | None = None) -> Path:
    """Write config.json and safetensors (sharded with an index when the total exceeds max_shard_bytes)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat = _flat(state)
    out_dtype = np.dtype(out_dtype)
    entries = []  # (key, fetch-fn, shape)
    for k in keys:
        p, layer, transpose = key_map(k)
        var = flat[p]
        val = var.get_value() if hasattr(var, "get_value") else var[...]
        shape = tuple(val.shape[1:] if layer is not None else val.shape)
        if transpose:
            shape = shape[::-1]
        entries.append((k, val, layer, transpose, shape))
    nbytes = lambda shape: int(np.prod(shape, dtype=np.int64)) * out_dtype.itemsize  # noqa: E731
    shards: list[list] = [[]]
    size = 0
    for e in entries:
        if max_shard_bytes and shards[-1] and size + nbytes(e[4]) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes(e[4])
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name in (SINGLE_FILE, INDEX_FILE):  # stale files from an earlier save would shadow the new one
        if name not in names and (path / name).exists():
            (path / name).unlink()

    def fetch(val, layer, transpose):
        arr = np.asarray(jax.device_get(val[layer] if layer is not None else val))
        if transpose:
            arr = arr.T
        return np.ascontiguousarray(arr.astype(out_dtype, copy=False))

    for name, shard in zip(names, shards):
        _write_safetensors(path / name, [(k, shape, lambda v=v, l=l, t=t: fetch(v, l, t))
                                         for k, v, l, t, shape in shard], out_dtype)
    if len(shards) > 1:
        total = sum(nbytes(e[4]) for e in entries)
        wmap = {e[0]: name for name, shard in zip(names, shards) for e in shard}
        atomic_write_json(path / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": wmap})
    atomic_write_json(path / "config.json", config_dict)
    return path


def _write_safetensors(file: Path, tensors, dtype: np.dtype) -> None:
    """Streamed safetensors writer: header from shapes, then each tensor's bytes (fetched lazily)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for k, shape, _ in tensors:
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[k] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * (-len(hb) % 8)
    fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", suffix=".tmp", dir=file.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(hb)))
            f.write(hb)
            for k, shape, get in tensors:
                arr = get()
                assert arr.shape == tuple(shape) and arr.dtype == dtype, (k, arr.shape, shape)
                f.write(arr.tobytes())  # host is little-endian (x86/arm64)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
