"""Multi-process launch helpers: `jax.distributed.initialize` and per-process batch shards.

A run launched as several processes (one per host, or several on one host for tests) sets
`LEADER_JAX_COORDINATOR` / `LEADER_JAX_NUM_PROCESSES` / `LEADER_JAX_PROCESS_ID` (or the cluster's own
variables, which `jax.distributed.initialize()` auto-detects on TPU pods / SLURM). Each process builds
only the rows of a global batch that live on its own devices and assembles the global array with
`jax.make_array_from_process_local_data`. Only process 0 writes logs and reports.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

_INITIALISED = False


def maybe_initialize(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, local_devices: int | None = None,
                     auto: bool = False) -> bool:
    """Call `jax.distributed.initialize` if this is a multi-process launch. Must run before any JAX op.

    Explicit arguments win over the LEADER_JAX_* environment variables; `auto=True` calls
    `jax.distributed.initialize()` without arguments (TPU pods, SLURM). Returns True if initialised."""
    global _INITIALISED
    if _INITIALISED:
        return True
    import jax

    coordinator = coordinator or os.environ.get("LEADER_JAX_COORDINATOR")
    if num_processes is None and os.environ.get("LEADER_JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["LEADER_JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("LEADER_JAX_PROCESS_ID"):
        process_id = int(os.environ["LEADER_JAX_PROCESS_ID"])
    if local_devices is None and os.environ.get("LEADER_JAX_LOCAL_CPU_DEVICES"):
        local_devices = int(os.environ["LEADER_JAX_LOCAL_CPU_DEVICES"])
    if local_devices:
        jax.config.update("jax_num_cpu_devices", int(local_devices))
    if coordinator and num_processes and num_processes > 1:
        try:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except Exception:  # pragma: no cover - option renamed/removed in a later jax
            pass
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=int(num_processes),
                                   process_id=int(process_id or 0))
        _INITIALISED = True
    elif auto:
        jax.distributed.initialize()
        _INITIALISED = True
    return _INITIALISED


def is_main_process() -> bool:
    import jax
    return jax.process_index() == 0


def local_row_slices(sharding, global_shape: Sequence[int], axis: int) -> list[slice]:
    """Row ranges of `axis` that this process's devices hold (sorted, de-duplicated)."""
    idx_map = sharding.addressable_devices_indices_map(tuple(global_shape))
    seen = []
    for index in idx_map.values():
        s = index[axis]
        start, stop = s.start or 0, global_shape[axis] if s.stop is None else s.stop
        if (start, stop) not in seen:
            seen.append((start, stop))
    seen.sort()
    return [slice(a, b) for a, b in seen]


def local_rows(sharding, global_shape: Sequence[int], axis: int) -> np.ndarray:
    """Indices along `axis` this process must supply, in order (the process-local block)."""
    rows = [np.arange(s.start, s.stop) for s in local_row_slices(sharding, global_shape, axis)]
    return np.concatenate(rows) if rows else np.zeros((0,), np.int64)


def global_array(local: np.ndarray, sharding, global_shape: Sequence[int]):
    """Assemble a global jax.Array from this process's block (single process: a plain device_put)."""
    import jax

    if jax.process_count() == 1:
        return jax.device_put(np.asarray(local), sharding)
    return jax.make_array_from_process_local_data(sharding, np.asarray(local), tuple(global_shape))


def host_copy(tree):
    """Numpy copy of a (possibly multi-process sharded) pytree on every process; all processes must call."""
    import jax

    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
