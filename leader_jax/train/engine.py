"""Sharded functional training engine shared by stage 1 (causal LM) and stage 2 (teacher).

The model is split once into (trainable, dropout RNG keys, frozen) by an nnx filter; only `trainable` is
differentiated and has optimizer state. One `jax.jit` step with explicit in/out shardings (donating params
and optimizer state) does gradient accumulation over micro-batches with `lax.scan`, global-norm clipping
and AdamW. The frozen base weights may be cast to bf16 (`frozen_dtype`); every LoRA adapter (a frozen
stage-1 domain adapter included), the head, the optimizer state and the loss stay fp32. Dropout keys are
folded with (step, micro-batch), so a resumed run replays the same masks, and the data position is a pure
function of the step: resuming is exact. The loss function returns (loss, aux): aux holds scalar metrics
(e.g. the joint retrieval mode's teacher and retriever losses), averaged over the micro-batches and
returned next to the loss.
"""
from __future__ import annotations

import collections
import logging
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from leader_jax import sharding as shd
from leader_jax.models import lora


def place(module: nnx.Module, mesh) -> nnx.Module:
    """Put every variable of `module` on `mesh` with the sharding of its logical axes."""
    state = nnx.state(module)
    nnx.update(module, jax.device_put(state, shd.state_shardings(state, mesh)))
    return module


def _shardings(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def cast_frozen_base(frozen, dtype):
    """Cast the floating base weights of a frozen nnx.State to `dtype`; LoRA adapters (nnx.LoRAParam,
    e.g. a frozen domain adapter) and integer variables keep their dtype."""
    def cast(v):
        if isinstance(v, nnx.LoRAParam):
            return v
        x = v.get_value()
        return v.replace(x.astype(dtype)) if jnp.issubdtype(x.dtype, jnp.floating) else v

    return jax.tree.map(cast, frozen, is_leaf=lambda x: isinstance(x, nnx.Variable))


def stacked_batch_sharding(mesh, ndim: int) -> NamedSharding:
    """[accum, B, ...] arrays: the micro-batch axis (1) laid out by the rules table's "batch" entry."""
    return shd.batch_sharding(mesh, ndim, batch_dim=1)


log = logging.getLogger(__name__)


class _CompiledSteps:
    """Bounded LRU of jitted step functions keyed by the objects that define them (graphdef, loss or
    predict function, optimizer object, mesh, batch ranks, frozen structure and dtypes): engines built
    again on an identical model (resumed runs, tests) reuse the compiled step instead of recompiling."""

    def __init__(self, maxsize: int = 16):
        self.maxsize, self._d = maxsize, collections.OrderedDict()

    def get(self, key, build: Callable[[], Any]):
        if key in self._d:
            self._d.move_to_end(key)
            return self._d[key]
        fn = self._d[key] = build()
        while len(self._d) > self.maxsize:
            self._d.popitem(last=False)
        return fn

    def clear(self) -> None:
        self._d.clear()


COMPILED_STEPS = _CompiledSteps()
LossFn = Callable[[nnx.Module, dict], tuple[jax.Array, dict]]
OutFn = Callable[[nnx.Module, dict], Any]


class Engine:
    """Holds (graphdef, trainable, rng_keys, frozen, opt_state) on a mesh and runs jitted train/predict
    steps. Compiled steps are shared between engines with the same graphdef, loss/predict function,
    optimizer *object* (`optim.make_optimizer` returns one object per hyper-parameter set) and mesh."""

    def __init__(self, model: nnx.Module, trainable: Any, tx: optax.GradientTransformation, mesh,
                 loss_fn: LossFn, *, frozen_dtype: str | None = None, predict_fn: OutFn | None = None):
        self.mesh, self.tx, self.loss_fn, self.predict_fn = mesh, tx, loss_fn, predict_fn
        self.filters = (trainable, lora.LoRADropoutKey, ...)
        lora.set_deterministic(model, True)
        self.graphdef_eval = nnx.split(model, *self.filters)[0]
        lora.set_deterministic(model, False)
        self.graphdef, self.trainable, self.rng_keys, self.frozen = nnx.split(model, *self.filters)
        if not jax.tree.leaves(self.trainable):
            raise ValueError("the trainable filter selects no parameter")
        if frozen_dtype and frozen_dtype not in ("float32", "fp32"):
            from leader_jax.models.llama import to_dtype
            self.frozen = cast_frozen_base(self.frozen, to_dtype(frozen_dtype))
        with jax.set_mesh(mesh):
            self.opt_state = jax.jit(tx.init)(self.trainable)
        self.step = 0
        self._train = None
        self._predict: dict[Any, Any] = {}
        # distinct batch shapes each compiled step has run (each is compiled once per process)
        self.shapes: dict[str, set] = {"train": set(), "predict": set()}

    def compiles(self) -> dict[str, int]:
        """Number of distinct (function, batch shapes) this engine ran: its compilations."""
        return {k: len(v) for k, v in self.shapes.items()}

    # ------------------------------------------------------------------ counts
    def n_trainable(self) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.trainable)))

    def n_frozen(self) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.frozen)))

    # ------------------------------------------------------------------ train step
    def _build_train(self, batch):
        graphdef, loss_fn, tx = self.graphdef, self.loss_fn, self.tx

        def step_fn(trainable, opt_state, rng_keys, frozen, batch, step):
            accum = jax.tree.leaves(batch)[0].shape[0]

            def micro(carry, xs):
                g_acc, l_acc = carry
                mb, i = xs
                k = jax.tree.map(lambda key: jax.random.fold_in(jax.random.fold_in(key, step), i), rng_keys)

                def lf(tr):
                    return loss_fn(nnx.merge(graphdef, tr, k, frozen), mb)

                (loss, aux), g = jax.value_and_grad(lf, has_aux=True)(trainable)
                return (jax.tree.map(jnp.add, g_acc, g), l_acc + loss), aux

            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
            (g, loss), aux = jax.lax.scan(micro, (zeros, jnp.zeros((), jnp.float32)),
                                          (batch, jnp.arange(accum)))
            g = jax.tree.map(lambda x, p: (x / accum).astype(p.dtype), g, trainable)
            loss = loss / accum
            gnorm = optax.tree.norm(g) if hasattr(optax, "tree") else optax.global_norm(g)
            updates, opt_state = tx.update(g, opt_state, trainable)
            trainable = optax.apply_updates(trainable, updates)
            aux = {name: jnp.mean(v.astype(jnp.float32)) for name, v in aux.items()}
            return trainable, opt_state, {**aux, "loss": loss, "grad_norm": gnorm}

        rep = NamedSharding(self.mesh, P())
        tr_sh, opt_sh = _shardings(self.trainable), _shardings(self.opt_state)
        in_sh = (tr_sh, opt_sh, _shardings(self.rng_keys), _shardings(self.frozen),
                 jax.tree.map(lambda x: stacked_batch_sharding(self.mesh, x.ndim), batch), rep)
        out_sh = (tr_sh, opt_sh, rep)                      # every metric replicated
        return jax.jit(step_fn, in_shardings=in_sh, out_shardings=out_sh, donate_argnums=(0, 1))

    def _cache_key(self, kind: str, batch, fn=None) -> tuple:
        fn_key = (self.graphdef, self.loss_fn, self.tx) if kind == "train" else (self.graphdef_eval, fn)
        ranks = tuple(sorted((k, v.ndim) for k, v in batch.items()))
        return (kind, fn_key, self.mesh, ranks, jax.tree.structure(self.frozen),
                tuple(str(x.dtype) for x in jax.tree.leaves(self.frozen)))

    def train_step(self, batch: dict) -> dict[str, float]:
        """One optimizer step on a global batch `{name: jax.Array [accum, B, ...]}` (already sharded)."""
        if self._train is None:
            self._train = COMPILED_STEPS.get(self._cache_key("train", batch), lambda: self._build_train(batch))
        self.shapes["train"].add(tuple(sorted((k, tuple(v.shape)) for k, v in batch.items())))
        with jax.set_mesh(self.mesh):
            self.trainable, self.opt_state, metrics = self._train(
                self.trainable, self.opt_state, self.rng_keys, self.frozen, batch,
                jnp.asarray(self.step, jnp.int32))
        self.step += 1
        return {k: float(v) for k, v in metrics.items()}

    # ------------------------------------------------------------------ inference
    def _build_predict(self, fn):
        graphdef = self.graphdef_eval

        def pred(trainable, rng_keys, frozen, batch):
            return fn(nnx.merge(graphdef, trainable, rng_keys, frozen), batch)

        return jax.jit(pred)

    def predict(self, batch: dict, fn: OutFn | None = None):
        """`fn(model, batch)` (default: the engine's `predict_fn`) with dropout off; `batch` arrays [B, ...]
        sharded over the batch."""
        fn = fn or self.predict_fn
        if fn is None:
            raise ValueError("Engine was built without predict_fn")
        if fn not in self._predict:
            self._predict[fn] = COMPILED_STEPS.get(self._cache_key("predict", batch, fn),
                                                   lambda: self._build_predict(fn))
        self.shapes["predict"].add((getattr(fn, "__qualname__", str(fn)),)
                                   + tuple(sorted((k, tuple(v.shape)) for k, v in batch.items())))
        with jax.set_mesh(self.mesh):
            return self._predict[fn](self.trainable, self.rng_keys, self.frozen, batch)

    def model(self, eval_mode: bool = True) -> nnx.Module:
        """A live module view of the current parameters (shares arrays; do not train it)."""
        return nnx.merge(self.graphdef_eval if eval_mode else self.graphdef, self.trainable, self.rng_keys,
                         self.frozen)

    # ------------------------------------------------------------------ checkpoints
    def save(self, ckpt: "Checkpointer", meta: dict | None = None) -> None:
        ckpt.save(self.step, self.trainable, self.opt_state, {"step": self.step, **(meta or {})})

    def restore(self, ckpt: "Checkpointer", step: int | None = None, with_opt: bool = True) -> dict:
        """Restore onto *this* engine's mesh/shardings (any saved mesh shape works)."""
        tr, opt, meta = ckpt.restore(step, _abstract(self.trainable),
                                     _abstract(self.opt_state) if with_opt else None)
        self.trainable = tr
        if with_opt:
            self.opt_state = opt
            self.step = int(meta["step"])
        return meta


class Checkpointer:
    """orbax CheckpointManager over {trainable, opt, meta(json)}; every process calls save/restore.

    `max_to_keep=None` keeps every step (the caller prunes with `delete`). Saving a step that already
    exists replaces it: a resumed run that replays a step written before a crash (or a corrupt one it
    skipped) overwrites it instead of failing."""

    def __init__(self, directory: str | Path, max_to_keep: int | None = 2):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.directory = Path(directory).absolute()
        self.mngr = ocp.CheckpointManager(self.directory,
                                          options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep))

    def latest_step(self) -> int | None:
        return self.mngr.latest_step()

    def steps(self) -> list[int]:
        """Every saved step, oldest first."""
        return sorted(int(s) for s in self.mngr.all_steps())

    def delete(self, step: int) -> None:
        self.mngr.delete(step)

    def save(self, step: int, trainable, opt_state, meta: dict) -> None:
        ocp = self.ocp
        if step in self.steps():
            self.delete(step)
        items = {"trainable": ocp.args.StandardSave(trainable), "meta": ocp.args.JsonSave(meta)}
        if opt_state is not None:
            items["opt"] = ocp.args.StandardSave(opt_state)
        self.mngr.save(step, args=ocp.args.Composite(**items), force=True)
        self.mngr.wait_until_finished()

    def read_meta(self, step: int) -> dict:
        """The json metadata of `step` alone (no array is read)."""
        out = self.mngr.restore(step, args=self.ocp.args.Composite(meta=self.ocp.args.JsonRestore()))
        return dict(out["meta"])

    def restore(self, step, abstract_trainable, abstract_opt=None):
        ocp = self.ocp
        step = self.mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        items = {"trainable": ocp.args.StandardRestore(abstract_trainable), "meta": ocp.args.JsonRestore()}
        if abstract_opt is not None:
            items["opt"] = ocp.args.StandardRestore(abstract_opt)
        out = self.mngr.restore(step, args=ocp.args.Composite(**items))
        return out["trainable"], (out["opt"] if abstract_opt is not None else None), dict(out["meta"])

    def close(self) -> None:
        self.mngr.close()


def restore_latest_valid(engine: Engine, ckpt: Checkpointer,
                         check_meta: Callable[[dict], None] | None = None) -> dict | None:
    """Restore the newest checkpoint of `ckpt` that reads back completely onto `engine` and return its
    meta (None when there is none). A checkpoint that fails to read (truncated or corrupt files) is
    skipped with a warning naming it, and the previous one is tried. `check_meta(meta)` runs before any
    array is read and may raise (e.g. a run-identity mismatch, which is not a corruption)."""
    steps = ckpt.steps()
    for step in reversed(steps):
        where = ckpt.directory / str(step)
        try:
            meta = ckpt.read_meta(step)
        except Exception as e:                      # noqa: BLE001 (orbax raises many kinds on bad files)
            log.warning("checkpoint %s is unreadable (%s: %s); falling back to the previous one",
                        where, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            continue
        if check_meta is not None:
            check_meta(meta)
        try:
            return engine.restore(ckpt, step)
        except Exception as e:                      # noqa: BLE001
            log.warning("checkpoint %s is unreadable (%s: %s); falling back to the previous one",
                        where, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
    if steps:
        log.warning("no readable checkpoint in %s (tried steps %s); starting from step 0", ckpt.directory, steps)
    return None


class StepTimer:
    """Wall time of a step and tokens/s for the metrics log."""

    def __init__(self):
        self.t0 = time.perf_counter()

    def lap(self, tokens: int) -> dict[str, float]:
        t = time.perf_counter()
        dt, self.t0 = t - self.t0, t
        return {"step_time": dt, "tokens_per_s": tokens / dt if dt > 0 else 0.0}
