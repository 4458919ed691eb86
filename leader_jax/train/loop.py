"""The fit loop and the predict/gather loop shared by stage 1 (`pretrain`) and stage 2 (`teacher`).

`fit` runs optimizer steps from the engine's current step to `train.steps`: batch of the step, train step,
one metrics record (loss, grad norm, the loss function's own metrics, lr, step time, tokens/s, data
position + whatever `after_step` adds, e.g. validation), progress bar, checkpoint every `train.ckpt_every` steps and at the end, and an
early stop at `train.stop_after` (kill simulation). `resume` restores the newest readable checkpoint of
a run after checking that it was written by the same config and prepared data. `gather` runs the
engine's predict function over a whole encoded split and returns the host arrays of every row.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from ml_collections import ConfigDict

from leader_jax.cli import UserError
from leader_jax.io import progress
from leader_jax.train import common, distributed, text_batches as tdata
from leader_jax.train.engine import Checkpointer, Engine, StepTimer, restore_latest_valid
from leader_jax.train.optim import make_optimizer

FRESH_HINT = "--config.train.resume=False"


# ----------------------------------------------------------------------------------------- config
def validate_train(tr: ConfigDict) -> None:
    """The `train` block shared by both stages (steps, batch, checkpoints, optimizer)."""
    for k in ("steps", "micro_batch", "accum"):
        if int(tr[k]) <= 0:
            raise UserError(f"train.{k} must be positive, got {tr[k]}")
    for k in ("ckpt_every", "stop_after"):
        if int(tr[k]) < 0:
            raise UserError(f"train.{k} must be >= 0 (0 = off), got {tr[k]}")
    o = tr.optim
    checks = {"lr": float(o.lr) > 0, "eps": float(o.eps) > 0, "weight_decay": float(o.weight_decay) >= 0,
              "b1": 0 <= float(o.b1) < 1, "b2": 0 <= float(o.b2) < 1, "head_lr_mult": float(o.head_lr_mult) > 0,
              "warmup_steps": 0 <= int(o.warmup_steps) < int(tr.steps)}
    for k, ok in checks.items():
        if not ok:
            raise UserError(f"train.optim.{k}={o[k]} is out of range"
                            + (f" (0 <= warmup_steps < train.steps={tr.steps})" if k == "warmup_steps" else ""))


def make_tx(tr: ConfigDict):
    """(optax optimizer, learning-rate schedule) of a `train` block."""
    try:
        return make_optimizer({**tr.optim.to_dict(), "total_steps": tr.steps})
    except ValueError as e:
        raise UserError(f"train.optim / train.steps: {e}") from None


# ----------------------------------------------------------------------------------------- resume
def resume(engine: Engine, ckpt: Checkpointer, tr: ConfigDict, identity: dict[str, str], run: Path
           ) -> dict | None:
    """With `train.resume`, restore the newest readable checkpoint onto `engine` and return its meta
    (None: start at step 0). A run whose config or prepared data changed is refused (UserError)."""
    if not tr.resume:
        return None
    return restore_latest_valid(engine, ckpt,
                                lambda meta: common.check_identity(meta, identity, run, FRESH_HINT))


# ----------------------------------------------------------------------------------------- fit
@dataclasses.dataclass
class FitResult:
    steps_done: int
    finished: bool
    seconds: float


def fit(engine: Engine, ckpt: Checkpointer, tr: ConfigDict, *, next_batch: Callable[[int], tuple[dict, int]],
        schedule: Callable[[int], Any], log, desc: str, meta: Callable[[], dict],
        after_step: Callable[[int], dict | None] | None = None,
        after_checkpoint: Callable[[], None] | None = None) -> FitResult:
    """Train from `engine.step` to `tr.steps` (or `tr.stop_after` when > 0).

    `next_batch(step)` -> (sharded batch [accum, micro, ...], real tokens); `after_step(done_steps)` may
    return extra fields for that step's record (its time is not billed to the next step); `meta()` is
    stored with every checkpoint, next to the step and the data position; `after_checkpoint()` runs once
    a checkpoint is on disk."""
    per_step = int(tr.accum) * int(tr.micro_batch)
    stop = int(tr.stop_after) or None
    timer, t0 = StepTimer(), time.perf_counter()
    bar = progress(total=tr.steps, initial=engine.step, desc=desc, unit="step",
                   disable=None if distributed.is_main_process() else True)
    while engine.step < tr.steps:
        if stop is not None and engine.step >= stop:
            break
        step = engine.step
        batch, n_tok = next_batch(step)
        m = engine.train_step(batch)
        rec = {"step": engine.step, **m, "lr": float(schedule(step)), **timer.lap(n_tok),
               "data_position": engine.step * per_step}
        extra = after_step(engine.step) if after_step is not None else None
        if extra:
            rec.update(extra)
            timer.lap(0)
        log.log(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.4f}")
        if (tr.ckpt_every and engine.step % tr.ckpt_every == 0) or engine.step == tr.steps:
            engine.save(ckpt, {"data_position": engine.step * per_step, **meta()})
            if after_checkpoint is not None:
                after_checkpoint()
    bar.close()
    return FitResult(engine.step, engine.step >= tr.steps, time.perf_counter() - t0)


def write_unfinished(run: Path, summary: dict) -> dict:
    """summary.json of a run stopped before `train.steps` (resumable); returns `summary`."""
    common.write_json(run / "summary.json", {**summary, "finished": False})
    return summary


# ----------------------------------------------------------------------------------------- predict
def gather(engine: Engine, enc: tdata.Encoded, batch_size: int, desc: str = "predict", *,
           buckets=None, stats=None, prefix=None, fn=None) -> tuple[np.ndarray, ...]:
    """The engine's predict outputs (a tuple of [B, ...] arrays; `fn` replaces the engine's predict
    function) over every row of `enc`, gathered from every process, in the rows' order (padding rows
    removed). `buckets`, `stats`, `prefix`: see `text_batches.eval_batches`."""
    from jax.experimental import multihost_utils

    outs: list[np.ndarray] = []
    for rows, batch in progress(tdata.eval_batches(enc, batch_size, engine.mesh, buckets=buckets, stats=stats,
                                                   prefix=prefix),
                                desc=desc, total=-(-len(enc) // batch_size), unit="batch"):
        out = engine.predict(batch, fn=fn)
        out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        if jax.process_count() > 1:
            out = tuple(multihost_utils.process_allgather(out, tiled=True))
        if not outs:
            outs = [np.empty((len(enc),) + tuple(x.shape[1:]), np.asarray(x).dtype) for x in out]
        for acc, x in zip(outs, out):
            acc[rows] = np.asarray(x)[:len(rows)]
    return tuple(outs)
