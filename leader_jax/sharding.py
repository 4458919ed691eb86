"""Device mesh, logical-axis rules and sharding helpers (one place to edit the parallelism layout).

Every parameter and activation in leader_jax carries *logical* axis names ("embed", "heads", "batch",
...). `LOGICAL_AXIS_RULES` maps each logical name to a mesh axis of the 3-D mesh
`("data", "fsdp", "tensor")` (or to None = replicated). A research fork changes the layout by editing
that table only. All mesh axes use `AxisType.Auto` (the compiler propagates shardings), spelled out
explicitly because `jax.make_mesh` defaults to Explicit.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")

# logical axis name -> mesh axis (str), tuple of mesh axes, or None (replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),      # flattened q heads * head_dim (q_proj out, o_proj in)
    ("kv_heads", "tensor"),   # flattened kv heads * head_dim (k_proj / v_proj out)
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),         # stacked layer axis when scan_layers=True
    ("lora_rank", None),
    ("labels", None),         # classifier heads (drug vocabulary)
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape as (data, fsdp, tensor); one entry may be -1 = fill with the remaining devices."""

    shape: tuple[int, int, int] = (1, -1, 1)

    def resolve(self, n_devices: int) -> tuple[int, int, int]:
        return resolve_shape(self.shape, n_devices)


def resolve_shape(shape: Sequence[int], n_devices: int) -> tuple[int, int, int]:
    """Replace a single -1 by n_devices / prod(others); validate that the product equals n_devices."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"mesh shape must have 3 entries (data, fsdp, tensor), got {shape}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {shape}: entries must be positive, with at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n_devices % known:
            raise ValueError(f"mesh shape {shape}: {n_devices} devices not divisible by {known}")
        shape = tuple(n_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != n_devices:
        raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices, have {n_devices}")
    return shape  # type: ignore[return-value]


def make_mesh(shape: Sequence[int] | MeshConfig = (1, -1, 1), devices=None) -> jax.sharding.Mesh:
    """Mesh with axes ("data", "fsdp", "tensor"), Auto axis types, over `devices` (default: all)."""
    if isinstance(shape, MeshConfig):
        shape = shape.shape
    devices = list(jax.devices() if devices is None else devices)
    resolved = resolve_shape(shape, len(devices))
    return jax.make_mesh(resolved, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=devices)


def rules_dict(rules=None) -> dict[str, Any]:
    return dict(LOGICAL_AXIS_RULES if rules is None else rules)


def logical_to_mesh(spec: Sequence[str | None] | P | None, rules=None) -> P:
    """Translate a logical spec (e.g. ("embed", "mlp")) into a mesh PartitionSpec via the rules table.

    A mesh axis is used at most once per spec (later duplicates become None), as JAX requires."""
    if spec is None:
        return P()
    table = rules_dict(rules)
    used: set[str] = set()
    out = []
    for name in spec:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no entry in LOGICAL_AXIS_RULES")
        axes = table[name]
        if axes is None:
            out.append(None)
            continue
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
        axes_t = tuple(a for a in axes_t if a not in used)
        used.update(axes_t)
        out.append(None if not axes_t else (axes_t[0] if len(axes_t) == 1 else axes_t))
    return P(*out)


_WARNED: set[tuple] = set()


def _fit_spec(spec: P, shape: Sequence[int], mesh: jax.sharding.Mesh, what: str = "array") -> P:
    """Drop mesh axes from dims they do not divide (so tiny test models stay valid on big meshes).

    Never silent: each (what, dim, mesh axis, size) that falls back to replication is warned about once."""
    out = []
    for i, entry in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        if entry is None:
            out.append(None)
            continue
        axes = (entry,) if isinstance(entry, str) else tuple(entry)
        keep = []
        size = 1
        for a in axes:
            if shape[i] % (size * mesh.shape[a]) == 0:
                keep.append(a)
                size *= mesh.shape[a]
            else:
                key = (what, i, a, int(shape[i]), int(mesh.shape[a]))
                if key not in _WARNED:
                    _WARNED.add(key)
                    log.warning("%s: dim %d (size %d) is not divisible by mesh axis %r (size %d) "
                                "x the axes before it; that dim is replicated over %r instead",
                                what, i, shape[i], a, mesh.shape[a], a)
        out.append(None if not keep else (keep[0] if len(keep) == 1 else tuple(keep)))
    return P(*out)


def _logical_spec_of(variable: nnx.Variable) -> tuple | None:
    meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    for key in ("out_sharding", "sharding_names", "sharding"):
        if meta.get(key) is not None:
            return tuple(meta[key])
    return None


def variable_sharding(variable: nnx.Variable, mesh: jax.sharding.Mesh, rules=None) -> NamedSharding:
    """NamedSharding of one nnx Variable from its logical `out_sharding` metadata (replicated if none)."""
    logical = _logical_spec_of(variable)
    value = variable.get_value() if hasattr(variable, "get_value") else variable[...]
    shape = tuple(getattr(value, "shape", ()))
    spec = logical_to_mesh(logical, rules) if logical is not None else P()
    name = f"parameter {logical}" if logical is not None else "parameter"
    return NamedSharding(mesh, _fit_spec(spec, shape, mesh, f"{name} of shape {shape}"))


def state_shardings(state: Any, mesh: jax.sharding.Mesh, rules=None):
    """A pytree like `state` (an nnx.State or a module) with a NamedSharding per Variable leaf."""
    if isinstance(state, nnx.Module):
        state = nnx.state(state)
    return jax.tree.map(lambda v: variable_sharding(v, mesh, rules), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_axes(rules=None) -> tuple[str, ...]:
    """The mesh axes that the logical "batch" axis maps to (from the rules table)."""
    axes = rules_dict(rules).get("batch")
    return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))


def batch_parallelism(mesh: jax.sharding.Mesh, rules=None) -> int:
    """How many shards a batch is split into on `mesh`: the product of the sizes of `batch_axes()`.
    Batch sizes must be multiples of it (the stages check this before training)."""
    return math.prod(int(mesh.shape[a]) for a in batch_axes(rules))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 2, *, batch_dim: int = 0, rules=None) -> NamedSharding:
    """Sharding of an array whose dim `batch_dim` is the batch (e.g. 1 for stacked [accum, B, ...]
    micro-batches): that dim laid out by the rules table's "batch" entry, the rest replicated."""
    logical = [None] * ndim
    logical[batch_dim] = "batch"
    return NamedSharding(mesh, logical_to_mesh(tuple(logical), rules))


def check_batch_size(name: str, value: int, mesh: jax.sharding.Mesh, rules=None) -> None:
    """ValueError naming the config field when `value` is not a multiple of the batch parallelism."""
    n = batch_parallelism(mesh, rules)
    if int(value) % n:
        axes = "*".join(batch_axes(rules)) or "(none)"
        raise ValueError(f"{name}={value} must be a multiple of the batch parallelism {n} "
                         f"(mesh axes {axes} of the 'batch' rule in LOGICAL_AXIS_RULES)")


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(x, mesh: jax.sharding.Mesh):
    """device_put a host array with the batch sharding (its leading dim must divide the batch parallelism)."""
    x = np.asarray(x)
    return jax.device_put(x, batch_sharding(mesh, x.ndim))


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh | None, rules=None) -> Iterator[jax.sharding.Mesh | None]:
    """Enter `jax.set_mesh(mesh)` and `nnx.logical_axis_rules(rules)`; with mesh=None, disable eager
    sharding instead so annotated parameters can be created on a single device (unit tests, CPU)."""
    rules = tuple(LOGICAL_AXIS_RULES if rules is None else rules)
    if mesh is None:
        with nnx.use_eager_sharding(False):
            yield None
        return
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        yield mesh


def with_logical_constraint(x, logical: Sequence[str | None]):
    """`with_sharding_constraint` by logical names; a no-op when no mesh is set."""
    mesh = _current_mesh()
    if mesh is None:
        return x
    spec = _fit_spec(logical_to_mesh(logical), x.shape, mesh, f"activation {tuple(logical)}")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _current_mesh():
    try:
        from jax.sharding import get_abstract_mesh
        m = get_abstract_mesh()
    except Exception:  # pragma: no cover - API moved
        return None
    if m is None or getattr(m, "empty", True):
        return None
    return m
