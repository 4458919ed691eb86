"""Named LoRA adapters on the projections of the NNX LLaMA (two-step PEFT, Clinical LLaMA-LoRA style).

Each projection `Linear` of `leader_jax.models.llama` holds an `nnx.Dict` of adapters and returns
`x @ kernel + sum(adapter(x) for adapter in adapters.values())`, so every adapter attached here is really
in the forward pass (the released Clinical LLaMA-LoRA code never activates its second adapter). An
adapter computes `scale * dropout(x) @ A @ B` with `scale = alpha / rank`, A `[in, r]` Kaiming-uniform (PEFT's init), B `[r, out]` zeros, so a fresh adapter changes nothing.

Trainability is decided by the *parameter type*: `DomainLoRA` (stage 1) and `TaskLoRA` (stage 2) are
`nnx.LoRAParam` subclasses, so `nnx.Optimizer(wrt=...)` / `nnx.DiffState` / `nnx.split` filters pick exactly
the adapters to train. Dropout keys are `LoRADropoutKey` variables that the trainer folds with the step
number, so dropout masks are a pure function of (seed, step): resuming reproduces them exactly.

The on-disk format of a single adapter is the HF PEFT one (`adapter_config.json` +
`adapter_model.safetensors`), so `peft.PeftModel.from_pretrained` loads it onto the torch model, and
`load_adapter` imports PEFT adapters trained elsewhere.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from leader_jax.io import atomic_write_bytes, atomic_write_json


class DomainLoRA(nnx.LoRAParam):
    """Parameters of the stage-1 (domain-adaptation) adapter."""


class TaskLoRA(nnx.LoRAParam):
    """Parameters of the stage-2 (task) adapter."""


class LoRADropoutKey(nnx.Variable):
    """Raw uint32[2] PRNG key of one adapter's dropout; never trained, folded with the step by the trainer."""


PARAM_TYPES: dict[str, type] = {"domain": DomainLoRA, "task": TaskLoRA, "lora": nnx.LoRAParam}

# short name -> HF attribute name of the projection
TARGET_NAMES: dict[str, str] = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                                "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
ALL_TARGETS: tuple[str, ...] = tuple(TARGET_NAMES)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
NATIVE_META = "leader_jax_adapter.json"


def resolve_param_type(name_or_type: str | type) -> type:
    if isinstance(name_or_type, type):
        return name_or_type
    if name_or_type not in PARAM_TYPES:
        raise ValueError(f"unknown LoRA param type {name_or_type!r}; expected one of {sorted(PARAM_TYPES)}")
    return PARAM_TYPES[name_or_type]


def normalize_targets(targets: Iterable[str] | str) -> tuple[str, ...]:
    """("q", "v_proj", ...) or "q,v" -> HF projection names ("q_proj", "v_proj")."""
    if isinstance(targets, str):
        targets = [t for t in targets.replace(" ", "").split(",") if t]
    out = []
    for t in targets:
        full = TARGET_NAMES.get(t, t)
        if full not in TARGET_NAMES.values():
            raise ValueError(f"unknown LoRA target {t!r}; expected some of {list(TARGET_NAMES)} "
                             f"or {list(TARGET_NAMES.values())}")
        if full not in out:
            out.append(full)
    if not out:
        raise ValueError("LoRA targets are empty")
    return tuple(out)


class LoRAAdapter(nnx.Module):
    """One low-rank delta: `scale * dropout(x) @ A @ B`, computed in the adapter dtype (fp32)."""

    def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float,
                 dropout: float = 0.0, param_type: type = TaskLoRA, rngs: nnx.Rngs,
                 in_axis: str | None = "embed", out_axis: str | None = None,
                 dtype: Any = jnp.float32):
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        key = rngs.params()
        bound = 1.0 / math.sqrt(in_features)   # kaiming_uniform(a=sqrt(5)) as in PEFT
        self.lora_a = param_type(jax.random.uniform(key, (in_features, rank), dtype, -bound, bound),
                                 out_sharding=(in_axis, "lora_rank"))
        self.lora_b = param_type(jnp.zeros((rank, out_features), dtype), out_sharding=("lora_rank", out_axis))
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scale = float(alpha) / float(rank)
        self.dropout_rate = float(dropout)
        self.deterministic = False
        if self.dropout_rate > 0:
            self.dropout_key = LoRADropoutKey(jax.random.key_data(jax.random.fold_in(key, 1))
                                              if jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                                              else jax.random.fold_in(key, 1))

    def __call__(self, x: jax.Array) -> jax.Array:
        a = self.lora_a[...]
        h = x.astype(a.dtype)
        if self.dropout_rate > 0 and not self.deterministic:
            keep = jax.random.bernoulli(self.dropout_key[...], 1.0 - self.dropout_rate, h.shape)
            h = jnp.where(keep, h / (1.0 - self.dropout_rate), 0.0)
        y = (h @ a) @ self.lora_b[...]
        return (y * self.scale).astype(x.dtype)

    def delta(self) -> jax.Array:
        """`scale * A @ B` in fp32, the [in, out] update a merge adds to the kernel."""
        return self.scale * (self.lora_a[...].astype(jnp.float32) @ self.lora_b[...].astype(jnp.float32))


# ----------------------------------------------------------------------------------------- traversal
def _path_str(path: Sequence[Any]) -> str:
    return ".".join(str(p) for p in path)


def layer_of(path: Sequence[Any]) -> int | None:
    """The decoder-layer index in a module path (`(..., "layers", 3, "self_attn", "q_proj")` -> 3)."""
    parts = [str(p) for p in path]
    for i, p in enumerate(parts[:-1]):
        if p == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def iter_projections(model: nnx.Module, targets: Iterable[str] | str | None = None,
                     layers: Iterable[int] | None = None) -> Iterator[tuple[tuple, nnx.Module]]:
    """(path, Linear) for every adapter-capable projection whose attribute name is in `targets` (and, when
    `layers` is given, whose decoder-layer index is in `layers`)."""
    names = set(normalize_targets(targets)) if targets is not None else set(TARGET_NAMES.values())
    keep = None if layers is None else {int(i) for i in layers}
    for path, module in nnx.iter_modules(model):
        if path and str(path[-1]) in names and hasattr(module, "adapters") and hasattr(module, "kernel"):
            if keep is not None and layer_of(path) not in keep:
                continue
            yield tuple(path), module


def _kernel_axes(linear: nnx.Module) -> tuple[Any, Any]:
    meta = linear.kernel.get_metadata()
    spec = meta.get("out_sharding") or meta.get("sharding_names") or (None, None)
    spec = tuple(spec)
    return (spec[0] if len(spec) > 0 else None, spec[-1] if len(spec) > 1 else None)


def _mesh_of(value) -> Any:
    sharding = getattr(value, "sharding", None)
    return getattr(sharding, "mesh", None) if isinstance(sharding, jax.sharding.NamedSharding) else None


def add_adapter(model: nnx.Module, name: str, targets: Iterable[str] | str = ALL_TARGETS, *, rank: int,
                alpha: float, dropout: float = 0.0, param_type: type | str = TaskLoRA,
                rngs: nnx.Rngs | None = None, seed: int = 0, dtype: Any = jnp.float32,
                layers: Iterable[int] | None = None) -> int:
    """Attach adapter `name` to every targeted projection of `model` (only in decoder layers `layers` when
    given, e.g. the upper ones); returns how many were added.

    Adapters are created on the host and then placed like the kernel's mesh (if it has one), with the
    sharding given by their logical axes (A: kernel-in axis x "lora_rank", B: "lora_rank" x kernel-out)."""
    ptype = resolve_param_type(param_type)
    rngs = rngs if rngs is not None else nnx.Rngs(params=seed)
    count = 0
    for path, linear in iter_projections(model, targets, layers):
        if name in linear.adapters:
            raise ValueError(f"adapter {name!r} already exists on {_path_str(path)}")
        kernel = linear.kernel[...]
        if kernel.ndim != 2:
            raise ValueError(f"{_path_str(path)}: LoRA expects a 2-D kernel [in, out], got {kernel.shape}")
        in_axis, out_axis = _kernel_axes(linear)
        with nnx.use_eager_sharding(False):
            adapter = LoRAAdapter(kernel.shape[0], kernel.shape[1], rank=rank, alpha=alpha, dropout=dropout,
                                  param_type=ptype, rngs=rngs, in_axis=in_axis, out_axis=out_axis, dtype=dtype)
        mesh = _mesh_of(kernel)
        if mesh is not None:
            from leader_jax.sharding import state_shardings
            state = nnx.state(adapter)
            nnx.update(adapter, jax.device_put(state, state_shardings(state, mesh)))
        linear.adapters[name] = adapter
        count += 1
    if count == 0:
        raise ValueError(f"no projection named {normalize_targets(targets)} found in the model"
                         + (f" in layers {sorted(layers)}" if layers is not None else ""))
    return count


def adapter_names(model: nnx.Module) -> list[str]:
    names: list[str] = []
    for _, linear in iter_projections(model):
        for n in linear.adapters:
            if n not in names:
                names.append(n)
    return names


def _adapters(model: nnx.Module, name: str) -> list[tuple[tuple, nnx.Module, LoRAAdapter]]:
    found = [(p, lin, lin.adapters[name]) for p, lin in iter_projections(model) if name in lin.adapters]
    if not found:
        raise KeyError(f"adapter {name!r} not found; the model has {adapter_names(model)}")
    return found


def remove_adapter(model: nnx.Module, name: str) -> None:
    for _, linear, _ in _adapters(model, name):
        del linear.adapters[name]


def set_deterministic(model: nnx.Module, deterministic: bool = True) -> None:
    """Switch adapter dropout off (evaluation, feature extraction) or on (training)."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, LoRAAdapter):
            module.deterministic = bool(deterministic)


def merge_adapter(model: nnx.Module, name: str) -> None:
    """Fold `scale * A @ B` into each kernel (in fp32, cast back to the kernel dtype); drop the adapter."""
    for _, linear, adapter in _adapters(model, name):
        kernel = linear.kernel[...]
        merged = (kernel.astype(jnp.float32) + adapter.delta()).astype(kernel.dtype)
        if isinstance(getattr(kernel, "sharding", None), jax.sharding.NamedSharding):
            merged = jax.device_put(merged, kernel.sharding)
        linear.kernel[...] = merged
        del linear.adapters[name]


# ----------------------------------------------------------------------------------- save / load (PEFT)
def _peft_key(path: tuple, which: str) -> str:
    """HF PEFT tensor name; our Llama paths start at `layers`, HF's at `model.layers`."""
    hf_path = ("model",) + tuple(path) if path and str(path[0]) == "layers" else tuple(path)
    return f"base_model.model.{_path_str(hf_path)}.lora_{which}.weight"


def adapter_config(model: nnx.Module, name: str) -> dict[str, Any]:
    found = _adapters(model, name)
    a0 = found[0][2]
    targets = sorted({str(p[-1]) for p, _, _ in found})
    ptype = type(a0.lora_a)
    layers = sorted({i for i in (layer_of(p) for p, _, _ in found) if i is not None})
    return {"rank": a0.rank, "alpha": a0.alpha, "dropout": a0.dropout_rate, "targets": targets,
            "param_type": next((k for k, v in PARAM_TYPES.items() if v is ptype), "lora"),
            "n_modules": len(found), "layers": layers}


def _partial_layers(model: nnx.Module, info: dict[str, Any]) -> bool:
    """True when the adapter covers only some of the model's decoder layers."""
    every = {layer_of(p) for p, _ in iter_projections(model, info["targets"])} - {None}
    return set(info["layers"]) != every


def save_adapter(model: nnx.Module, name: str, out_dir: str | Path, *, base_model_name_or_path: str = "",
                 extra_meta: dict[str, Any] | None = None) -> Path:
    """Write adapter `name` alone in HF PEFT format (+ a small native metadata file).

    `model` must be the LLaMA module itself (paths are then HF module paths, e.g.
    `model.layers.0.self_attn.q_proj`), not a wrapper such as the teacher."""
    from safetensors.numpy import save as st_save

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = adapter_config(model, name)
    tensors: dict[str, np.ndarray] = {}
    for path, _, adapter in _adapters(model, name):
        a = np.asarray(jax.device_get(adapter.lora_a[...]), dtype=np.float32)
        b = np.asarray(jax.device_get(adapter.lora_b[...]), dtype=np.float32)
        tensors[_peft_key(path, "A")] = np.ascontiguousarray(a.T)   # PEFT lora_A.weight [r, in]
        tensors[_peft_key(path, "B")] = np.ascontiguousarray(b.T)   # PEFT lora_B.weight [out, r]
    peft_cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path or None,
        "r": info["rank"], "lora_alpha": info["alpha"], "lora_dropout": info["dropout"],
        "target_modules": info["targets"], "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "modules_to_save": None, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "layers_pattern": None,
        # the decoder layers that carry the adapter (None = every layer of the model)
        "layers_to_transform": info["layers"] if info["layers"] and _partial_layers(model, info) else None,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }
    atomic_write_bytes(out / ADAPTER_WEIGHTS, st_save(tensors, metadata={"format": "pt"}))
    atomic_write_json(out / ADAPTER_CONFIG, peft_cfg)
    atomic_write_json(out / NATIVE_META, {"name": name, **info, **(extra_meta or {})})
    return out


def load_adapter(model: nnx.Module, in_dir: str | Path, *, name: str | None = None,
                 param_type: type | str | None = None, dropout: float | None = None) -> str:
    """Attach an adapter saved by `save_adapter` (or any PEFT LoRA adapter for the same architecture).

    `param_type` decides whether it will be trained (e.g. load the domain adapter as `DomainLoRA`)."""
    from safetensors.numpy import load_file

    src = Path(in_dir)
    cfg_path, w_path = src / ADAPTER_CONFIG, src / ADAPTER_WEIGHTS
    for p in (cfg_path, w_path):
        if not p.exists():
            raise FileNotFoundError(f"adapter folder {src}: {p.name} not found")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    native = json.loads((src / NATIVE_META).read_text()) if (src / NATIVE_META).exists() else {}
    name = name or native.get("name") or "default"
    ptype = param_type if param_type is not None else native.get("param_type", "lora")
    tensors = load_file(str(w_path))
    targets = cfg["target_modules"]
    if isinstance(targets, str):
        raise ValueError(f"{cfg_path}: regex target_modules are not supported ({targets!r})")
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    add_adapter(model, name, targets, rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                dropout=float(cfg.get("lora_dropout", 0.0) if dropout is None else dropout), param_type=ptype,
                layers=layers)
    used = set()
    for path, _, adapter in _adapters(model, name):
        for which, var in (("A", adapter.lora_a), ("B", adapter.lora_b)):
            key = _peft_key(path, which)
            if key not in tensors:
                # PEFT also writes keys with the adapter name (".lora_A.<name>.weight") in some versions
                raise ValueError(f"{w_path}: tensor {key!r} missing")
            arr = np.asarray(tensors[key], dtype=np.float32).T
            if arr.shape != var[...].shape:
                raise ValueError(f"{w_path}: {key} has shape {arr.T.shape}, expected {var[...].T.shape}")
            old = var[...]
            new = jnp.asarray(arr, dtype=old.dtype)
            if isinstance(getattr(old, "sharding", None), jax.sharding.NamedSharding):
                new = jax.device_put(new, old.sharding)
            var[...] = new
            used.add(key)
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"{w_path}: {len(unused)} tensors match no projection, e.g. {unused[:3]}")
    return name
