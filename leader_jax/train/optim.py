"""Optimizer for adapter/head training: AdamW + linear warmup then linear decay to 0, global-norm clipping.

Only the trainable subset of the model is ever passed to `tx.init`/`tx.update`, so frozen weights get
neither gradients nor optimizer state (no `optax.masked`).

`make_optimizer` returns the same optimizer object for the same hyper-parameters (a small LRU cache), so
engines built again with an identical optimizer share their compiled train step (see engine.Engine)."""
from __future__ import annotations

import functools

import optax


def make_schedule(lr: float, total_steps: int, warmup_steps: int = 0, end_lr: float = 0.0) -> optax.Schedule:
    """0 -> lr linearly over `warmup_steps`, then lr -> end_lr linearly until `total_steps`."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps), got {warmup_steps} of {total_steps}")
    decay = optax.linear_schedule(lr, end_lr, total_steps - warmup_steps)
    if warmup_steps == 0:
        return decay
    warm = optax.linear_schedule(0.0, lr, warmup_steps)
    return optax.join_schedules([warm, decay], [warmup_steps])


def scale_matching(substring: str, factor: float) -> optax.GradientTransformation:
    """Multiply the updates of leaves whose tree path contains `substring` (e.g. the drug head) by `factor`:
    a per-group learning-rate multiplier that works on nnx.State trees."""
    import jax

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(
            lambda path, u: u * factor if substring in jax.tree_util.keystr(path) else u, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


OPTIM_FIELDS = ("lr", "total_steps", "warmup_steps", "weight_decay", "b1", "b2", "eps", "clip_norm",
                "head_lr_mult")


def make_optimizer(cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`cfg` (a mapping) fields: lr, total_steps, warmup_steps, weight_decay, b1, b2, eps, clip_norm
    (<=0: none), head_lr_mult (learning-rate multiplier of the drug head; 1 = none)."""
    missing = [k for k in OPTIM_FIELDS if k not in cfg]
    if missing:
        raise ValueError(f"optimizer config lacks {missing}")
    return _make_optimizer(float(cfg["lr"]), int(cfg["total_steps"]), int(cfg["warmup_steps"]),
                           float(cfg["weight_decay"]), float(cfg["b1"]), float(cfg["b2"]), float(cfg["eps"]),
                           float(cfg["clip_norm"]), float(cfg["head_lr_mult"]))


@functools.lru_cache(maxsize=16)
def _make_optimizer(lr, total_steps, warmup_steps, weight_decay, b1, b2, eps, clip_norm, head_lr_mult):
    schedule = make_schedule(lr, total_steps, warmup_steps)
    parts = []
    if clip_norm > 0:
        parts.append(optax.clip_by_global_norm(clip_norm))
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    if head_lr_mult != 1.0:
        parts.append(scale_matching("'head'", head_lr_mult))
    return optax.chain(*parts), schedule
