"""The student's compiled steps and `StudentTrainer` (model state, optimizer, inference paths).

The train step and the predict steps are plain `jax.jit` functions of (params, opt_state, batch, key)
built from the split graphdef with pinned in/out shardings: parameters by their logical axes, every
batch array by the rules table's "batch" entry (`sharding.batch_sharding`). They live in a
`CompiledSteps` object owned by the trainer; a second trainer of the same structure (another seed, a
resumed run) may be handed the first one's `steps` and then recompiles nothing. Training runs through
`train_chunk`: up to `train.steps_per_call` optimizer steps over stacked batches in one compiled loop.
Checkpoints (the shared orbax `engine.Checkpointer`) hold the current and the best parameters, the optimizer state and a JSON
meta with the epoch, the early-stopping state and the run identity.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree
from ml_collections import ConfigDict

from leader_jax import sharding
from leader_jax.io import progress
from leader_jax.models.student import LossConfig, StudentConfig, init_student, student_loss
from leader_jax.train.engine import Checkpointer
from leader_jax.train.exported import ExportedJit
from leader_jax.train.packing import FlatLayout, PackLayout, flat_layout, pack_batches, pack_flat, pack_layout
from leader_jax.train.student_inputs import EncodedSplit, assign_buckets, batch_plan, make_batch, profile_fields

KERNEL_MODES = ("auto", "on", "off")
MODEL_KIND = "student"        # run.json "model" and checkpoint meta "model" of every student run
# the modules whose source defines the training loop (its exported program is keyed by them)
EXPORT_SOURCES = ("leader_jax.models.student", "leader_jax.train.student_trainer", "leader_jax.sharding")


def model_config(cfg: ConfigDict, vocab, teacher_dim: int | None) -> StudentConfig:
    """The model shape from the stage config (`cfg.model`) and the prepared vocabulary."""
    m = cfg.model
    return StudentConfig(
        n_diag=len(vocab.diag), n_proc=len(vocab.proc), n_med=len(vocab.med),
        profile_sizes=tuple(len(vocab.profile[f]) for f in profile_fields(vocab)) if m.use_profile else (),
        teacher_dim=teacher_dim, d=m.d, heads=m.heads, ffn=m.ffn, head_hidden=m.head_hidden,
        max_visits=m.max_visits, visit_position=m.visit_position, shared_embedding=bool(m.shared_embedding),
        neighbour_input=cfg.retrieval.mode != "none", dropout=m.dropout, attn_dropout=m.attn_dropout)


def loss_config(cfg: ConfigDict) -> LossConfig:
    lo = cfg.loss
    return LossConfig(alpha=lo.alpha, align_weight=lo.align_weight, tau=lo.tau, align_loss=lo.align_loss,
                      distill=bool(cfg.distill))


def resolve_kernel(mode: str, mcfg: StudentConfig, mesh) -> tuple[bool, str]:
    """(use the CPU inference kernel?, why not). mode "on" raises ValueError when it cannot be used."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"inference_kernel must be one of {KERNEL_MODES}, got {mode!r}")
    if mode == "off":
        return False, "inference_kernel=off"
    why = ""
    platform = mesh.devices.flat[0].platform
    if platform != "cpu":
        why = f"the mesh is on {platform} (the kernel is CPU-only)"
    elif mesh.devices.size > 1:
        why = f"the mesh has {mesh.devices.size} devices (the kernel runs on one CPU device)"
    elif mcfg.d % 16:
        why = f"d={mcfg.d} is not a multiple of 16"
    else:
        from leader_jax.kernels import set_block
        ok, why = set_block.available()
    if why and mode == "on":
        raise ValueError(f"inference_kernel=on, but the CPU kernel cannot be used: {why}")
    return not why, why


class LayoutKey(NamedTuple):
    """What fixes the shapes of packed inference batches (`CompiledSteps.layouts`)."""

    kernel: bool                        # flat batches for the CPU kernel (else rows for XLA)
    caps: tuple[tuple[int, ...], ...]   # bucket caps (only the XLA rows depend on them)
    batch_size: int
    visit_width: int
    parallelism: int                    # batch parallelism of the mesh (XLA rows are a multiple of it)


@dataclasses.dataclass
class CompiledSteps:
    """The jitted steps of one (model graph, loss, learning rate, mesh, state shardings) and the packed
    inference layouts that fix their input shapes. A layout is sized on the first split predicted with
    its key and then reused (a different split only changes how many patients fit a batch, never a
    result), so predicting val and then test compiles once."""

    graphdef: Any
    loss: LossConfig
    lr: float
    mesh: Any
    param_shardings: Any
    opt_shardings: Any
    batch_sharding: Any
    tx: Any
    train: Any
    train_chunk: Any
    chunk_sharding: Any
    predict_packed: Any
    tables: Any
    predict_flat: Any
    predict_padded: Any
    layouts: dict = dataclasses.field(default_factory=dict)

    def fits(self, graphdef, loss: LossConfig, lr: float, mesh, param_shardings, opt_shardings) -> bool:
        """Whether these steps compute what a trainer of this structure needs."""
        same = lambda a, b: jax.tree.flatten(a) == jax.tree.flatten(b)  # noqa: E731
        return (self.graphdef == graphdef and self.loss == loss and self.lr == float(lr) and self.mesh == mesh
                and same(self.param_shardings, param_shardings) and same(self.opt_shardings, opt_shardings)
                and self.batch_sharding == sharding.batch_sharding(mesh, 1))


def compile_steps(graphdef, loss: LossConfig, lr: float, mesh, param_shardings, opt_shardings) -> CompiledSteps:
    """Build (not yet compile) the jitted steps; every sharding is pinned so the first call and later
    calls (donated outputs) share one executable."""
    tx = optax.adam(lr)

    def train_step(params, opt_state, batch, key):
        def loss_of(p):
            return student_loss(nnx.merge(graphdef, p), batch, loss, key)
        (_, parts), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, parts

    def train_chunk(params, opt_state, chunk, n_steps, first_step, base_key):
        """`n_steps` optimizer steps over the stacked batches chunk[k] (k < n_steps; the rest of the
        stack is never touched) in one dispatch; step k uses dropout key fold_in(base_key, first_step + k),
        like `train_step`. Returns the new state and the loss parts summed over real samples ("n")
        on the device, so an epoch needs no host round trip until its end."""
        # Inside the loop the parameters and Adam's moments are single flat vectors: Adam is then one
        # fused elementwise loop instead of ~200 small ones (measured ≈ 3× cheaper on XLA:CPU); the
        # math is elementwise, so the result equals the per-leaf update.
        flat, unravel = ravel_pytree(params)
        adam, rest = opt_state[0], opt_state[1:]
        flat_opt = (adam._replace(mu=ravel_pytree(adam.mu)[0], nu=ravel_pytree(adam.nu)[0]), *rest)

        def body(k, carry):
            flat, flat_opt, acc = carry
            batch = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, k, keepdims=False), chunk)
            key = jax.random.fold_in(base_key, first_step + k)

            def loss_of(f):
                return student_loss(nnx.merge(graphdef, unravel(f)), batch, loss, key)
            (_, parts), grads = jax.value_and_grad(loss_of, has_aux=True)(flat)
            updates, flat_opt = tx.update(grads, flat_opt, flat)
            n = batch["weight"].sum()
            acc = {name: acc[name] + (n if name == "n" else parts[name] * n) for name in acc}
            return optax.apply_updates(flat, updates), flat_opt, acc

        acc = {name: jnp.zeros((), jnp.float32) for name in ("n", *loss_part_names(loss))}
        flat, flat_opt, acc = jax.lax.fori_loop(0, n_steps, body, (flat, flat_opt, acc))
        adam_flat = flat_opt[0]
        opt_state = (adam_flat._replace(mu=unravel(adam_flat.mu), nu=unravel(adam_flat.nu)), *flat_opt[1:])
        return unravel(flat), opt_state, acc

    def tables_step(params):
        return nnx.merge(graphdef, params).inference_tables()

    def predict_packed_step(params, packed):
        return jax.nn.sigmoid(nnx.merge(graphdef, params).predict_packed(packed))

    def predict_flat_step(params, tables, flat):
        return jax.nn.sigmoid(nnx.merge(graphdef, params).predict_flat(flat, tables))

    def predict_padded_step(params, batch):
        return jax.nn.sigmoid(nnx.merge(graphdef, params)(batch)["logits"])

    rep = sharding.replicated(mesh)
    data = sharding.batch_sharding(mesh, 1)       # a prefix: dim 0 of every batch array, the rest replicated
    stacked = sharding.batch_sharding(mesh, 2, batch_dim=1)     # [steps, B, ...] chunks: dim 1 is the batch
    p_sh, o_sh = param_shardings, opt_shardings
    return CompiledSteps(
        graphdef=graphdef, loss=loss, lr=float(lr), mesh=mesh, param_shardings=p_sh, opt_shardings=o_sh,
        batch_sharding=data, tx=tx, chunk_sharding=stacked,
        train=jax.jit(train_step, donate_argnums=(0, 1), in_shardings=(p_sh, o_sh, data, rep),
                      out_shardings=(p_sh, o_sh, rep)),
        train_chunk=ExportedJit(
            jax.jit(train_chunk, donate_argnums=(0, 1), in_shardings=(p_sh, o_sh, stacked, rep, rep, rep),
                    out_shardings=(p_sh, o_sh, rep)),
            train_chunk, name="train_chunk", donate_argnums=(0, 1), modules=EXPORT_SOURCES,
            key=f"{graphdef}|{loss}|lr={float(lr)}|{mesh}",
            shardings=lambda params, opt_state, chunk, *scalars: (
                (p_sh, o_sh, {k: stacked for k in chunk}, *(rep for _ in scalars)),
                (p_sh, o_sh, {name: rep for name in ("n", *loss_part_names(loss))}))),
        predict_packed=jax.jit(predict_packed_step, in_shardings=(p_sh, data), out_shardings=data),
        tables=jax.jit(tables_step, in_shardings=(p_sh,), out_shardings=rep),
        predict_flat=jax.jit(predict_flat_step, in_shardings=(p_sh, rep, data), out_shardings=data),
        predict_padded=jax.jit(predict_padded_step, in_shardings=(p_sh, data), out_shardings=data))


def with_neighbours(arrays: dict, enc: EncodedSplit, rows: np.ndarray, mcfg: StudentConfig) -> dict:
    """A packed inference batch (`packing`: per-patient arrays have the layout's batch rows, patient i
    of the batch in row i) plus "nbr", the neighbours' drug bags of its `rows`, when the model takes
    them (padding rows get an all-zero bag)."""
    if not mcfg.neighbour_input:
        return arrays
    if enc.nbr is None:
        raise ValueError("the student was trained with neighbour input (retrieval.mode=fixed), but these "
                         "inputs carry no neighbours' drug bags")
    nbr = np.zeros((arrays["profile"].shape[0], enc.nbr.shape[1]), np.float32)
    nbr[: len(rows)] = enc.nbr[rows]
    return {**arrays, "nbr": nbr}


def loss_part_names(lc: LossConfig) -> tuple[str, ...]:
    """The loss parts `student_loss` returns for this loss config."""
    return ("bce", *(("kd",) if lc.distill else ()), *(("align",) if lc.align_weight else ()), "loss")


def _shardings(tree):
    return jax.tree.map(lambda a: a.sharding, tree)


def _abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def default_mesh():
    """One device (1, 1, 1), built by the shared mesh builder."""
    from leader_jax.train import common
    return common.make_mesh(ConfigDict(dict(mesh=(1, 1, 1))))


class StudentTrainer:
    """Owns the model state, the optimizer and the compiled steps (plain functional jit)."""

    def __init__(self, mcfg: StudentConfig, lc: LossConfig, *, lr: float, seed: int, mesh=None,
                 inference_kernel: str = "auto", steps: CompiledSteps | None = None):
        mesh = default_mesh() if mesh is None else mesh
        self.mcfg, self.lc, self.mesh = mcfg, lc, mesh
        with sharding.use_mesh(mesh):
            self.graphdef, self.params = init_student(mcfg, seed)
            self.opt_state = jax.jit(optax.adam(lr).init)(self.params)
        p_sh, o_sh = _shardings(self.params), _shardings(self.opt_state)
        if steps is None:
            steps = compile_steps(self.graphdef, lc, lr, mesh, p_sh, o_sh)
        elif not steps.fits(self.graphdef, lc, lr, mesh, p_sh, o_sh):
            raise ValueError("the compiled steps passed to StudentTrainer were built for another model, loss, "
                             "learning rate, mesh or sharding rules")
        self.steps = steps
        self.train_step, self.tables_step = steps.train, steps.tables
        self.train_chunk_step = steps.train_chunk
        self.predict_xla_step, self.predict_kernel_step = steps.predict_packed, steps.predict_flat
        self.predict_padded_step = steps.predict_padded
        self.inference_kernel = inference_kernel
        if inference_kernel != "auto":     # "on" must be usable and a bad mode fails now; "auto" builds the
            self.kernel                    # kernel only when this trainer first predicts
        self.base_key = jax.random.key(seed, impl="rbg")
        self.step = 0

    @functools.cached_property
    def _kernel_choice(self) -> tuple[bool, str]:
        return resolve_kernel(self.inference_kernel, self.mcfg, self.mesh)

    @property
    def kernel(self) -> bool:
        """Whether packed inference runs through the CPU kernel (`resolve_kernel`, decided once)."""
        return self._kernel_choice[0]

    @property
    def kernel_note(self) -> str:
        """Why the kernel is not used ('' when it is)."""
        return self._kernel_choice[1]

    def put_batch(self, batch: dict) -> dict:
        """Host batch → device arrays laid out by the steps' batch sharding (the rules table's "batch")."""
        return {k: jax.device_put(np.asarray(v), self.steps.batch_sharding) for k, v in batch.items()}

    def train_chunk(self, chunk: dict, n_steps: int) -> dict:
        """`n_steps` optimizer steps over a `make_chunk` stack in one dispatch; returns the loss parts
        summed over real samples (device arrays, "n" = samples; nothing is read back here)."""
        arrays = {k: jax.device_put(np.asarray(v), self.steps.chunk_sharding) for k, v in chunk.items()}
        self.params, self.opt_state, sums = self.train_chunk_step(
            self.params, self.opt_state, arrays, np.int32(n_steps), np.int32(self.step), self.base_key)
        self.step += int(n_steps)
        return sums

    def train_batch(self, batch: dict) -> dict:
        key = jax.random.fold_in(self.base_key, self.step)
        self.params, self.opt_state, parts = self.train_step(self.params, self.opt_state, self.put_batch(batch), key)
        self.step += 1
        return parts

    def _layout(self, enc: EncodedSplit, caps, batch_size: int, kernel: bool) -> PackLayout | FlatLayout:
        dp = sharding.batch_parallelism(self.mesh)
        key = LayoutKey(kernel=kernel, caps=() if kernel else tuple(tuple(int(x) for x in c) for c in caps),
                        batch_size=int(batch_size), visit_width=int(enc.diag.shape[1]),
                        parallelism=1 if kernel else dp)
        layouts = self.steps.layouts
        if key not in layouts:
            layouts[key] = (flat_layout(enc, batch_size) if kernel
                            else pack_layout(enc, caps, batch_size, multiple=8 * dp))
        return layouts[key]

    def predict(self, enc: EncodedSplit, caps, batch_size: int, desc: str | None = None,
                packed: bool = True, kernel: bool | None = None) -> np.ndarray:
        """float32 [n, n_med] probabilities in the row order of `enc`. packed=True (default): real
        tokens only, one compile for all batches (the layout is kept in `self.steps`); `kernel`
        (default: this trainer's `inference_kernel` resolution) runs the packed batches through the CPU
        FFI kernel instead of XLA ops. packed=False: the bucketed, padded reference path."""
        kernel = self.kernel if kernel is None else kernel
        out = np.zeros((len(enc), self.mcfg.n_med), dtype=np.float32)
        pending = []
        show = dict(desc=desc or "predict", unit="batch", disable=desc is None or None)
        if packed:
            layout = self._layout(enc, caps, batch_size, kernel)
            if kernel:
                tables = self.tables_step(self.params)      # per-token work that depends on the id alone
                step = functools.partial(self.predict_kernel_step, self.params, tables)
                batches = pack_flat(enc, layout)
            else:
                step = functools.partial(self.predict_xla_step, self.params)
                batches = pack_batches(enc, layout)
            for packed_batch in progress(batches, **show):
                arrays = with_neighbours(packed_batch.arrays, enc, packed_batch.rows, self.mcfg)
                pending.append((packed_batch.rows, step(self.put_batch(arrays))))
        else:
            buckets = assign_buckets(enc.needs, caps)
            for planned in progress(batch_plan(buckets, batch_size), **show):
                batch = make_batch(enc, planned.rows, caps[planned.bucket], batch_size)
                pending.append((planned.rows, self.predict_padded_step(self.params, self.put_batch(batch))))
        for rows, p in pending:
            out[rows] = np.asarray(p)[: len(rows)]
        return out

    def compile_counts(self) -> dict[str, int]:
        """Executables compiled so far per step (jit's private `_cache_size`; -1 if a jax lacks it)."""
        size = lambda f: int(f._cache_size()) if hasattr(f, "_cache_size") else -1  # noqa: E731
        return {"train_step": size(self.train_step) + self.train_chunk_step.cache_size(),
                "predict_step": size(self.predict_kernel_step if self.kernel else self.predict_xla_step)}

    def host_params(self):
        return jax.device_get(self.params)

    def set_params(self, host_params) -> None:
        shardings = _shardings(self.params)
        self.params = jax.tree.map(lambda h, s: jax.device_put(np.asarray(h), s), host_params, shardings)


# ---------------------------------------------------------------------------------------- checkpoints
def save_state(ckpt: Checkpointer, trainer: StudentTrainer, best_params, meta: dict) -> None:
    """One checkpoint per finished epoch (step = epochs done): the current and the best parameters, the
    optimizer state and `meta` (epoch, early-stopping state, run identity), written atomically by orbax."""
    ckpt.save(int(meta["epochs_done"]), {"params": trainer.params, "best": best_params}, trainer.opt_state,
              {"model": MODEL_KIND, **meta})


def restore_state(ckpt: Checkpointer, trainer: StudentTrainer, step: int | None = None) -> tuple[Any, dict]:
    """Load the current parameters, optimizer state and step into `trainer`; returns (best params on
    the host, meta)."""
    abstract = _abstract(trainer.params)
    state, opt, meta = ckpt.restore(step, {"params": abstract, "best": abstract}, _abstract(trainer.opt_state))
    trainer.params, trainer.opt_state, trainer.step = state["params"], opt, int(meta["step"])
    return jax.device_get(state["best"]), meta


def restore_params(run_dir: str | Path, trainer: StudentTrainer, step: int | None = None) -> dict:
    """Load the best parameters of RUN's latest (or `step`) checkpoint into `trainer`; returns its meta."""
    ckpt = Checkpointer(Path(run_dir) / "checkpoints")
    try:
        abstract = _abstract(trainer.params)
        state, _, meta = ckpt.restore(step, {"params": abstract, "best": abstract})
    finally:
        ckpt.close()
    trainer.params = state["best"]
    return meta


def split_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    from leader_jax.metrics import per_sample_metrics
    ps = per_sample_metrics(labels, probs, threshold)
    return {k: float(np.mean(ps[k])) if len(labels) else 0.0 for k in ("prauc", "jaccard", "f1")}
