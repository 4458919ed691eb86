"""Train LEADER(S) on a prepared dataset, distilling from a teacher feature store (offline KD).

    python -m leader_jax.train.student --config configs/student.py \
        --config.data_dir=PREPARED --config.features=STORE --out RUN
    python -m leader_jax.train.student ... --config.distill=False      # no-KD ablation

Inputs are index arrays built once per split with numpy (`encode_samples`). Each sample is assigned to
one of a few fixed shape buckets (visits, codes per set) and every batch is padded to (batch_size,
bucket caps), so the pure `jax.jit` train and predict steps compile once per bucket, never per batch.
Writes RUN/metrics.jsonl (per epoch: train loss parts, validation PRAUC/Jaccard/F1), the best
checkpoint (orbax, by validation PRAUC, early stopping), RUN/predictions/{val,test}.npz and RUN/run.json
(so `python -m leader_jax.eval --config.run_dir=RUN` scores it).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
import optax
from flax import nnx

from leader_jax import sharding
from leader_jax.io import JsonlLogger, atomic_write_json, progress
from leader_jax.models.student import LossConfig, StudentConfig, init_student, student_loss
from leader_jax.train.packing import flat_layout, pack_batches, pack_flat, pack_layout

SPLITS = ("train", "val", "test")
_NEED_NAMES = ("visits", "diag", "proc", "med")


# ------------------------------------------------------------------------------------------- inputs
@dataclasses.dataclass
class EncodedSplit:
    """Index arrays of one split (ids: 0 = pad, token i of a vocabulary → i + 1).

    diag/proc/med [n, V, C]: the last `max_visits` visits, oldest first, left-aligned; `med` is the
    shifted drug stream (slot 0 empty for the profile, slot j = drugs of kept visit j-1).
    needs [n, 4]: (kept visits, max diag / proc / drug set size) used for bucketing."""

    ids: np.ndarray
    diag: np.ndarray
    proc: np.ndarray
    med: np.ndarray
    n_visits: np.ndarray
    profile: np.ndarray
    target: np.ndarray
    labels: np.ndarray
    single_visit: np.ndarray
    needs: np.ndarray
    teacher: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)


def _fill(sets: list[list[int]], rows: list[int], slots: list[int], n: int, v: int) -> tuple[np.ndarray, np.ndarray]:
    """Scatter variable-length id lists into a zero-padded [n, v, C] array (vectorised)."""
    lens = np.fromiter((len(s) for s in sets), dtype=np.int64, count=len(sets))
    c = max(int(lens.max(initial=0)), 1)
    out = np.zeros((n, v, c), dtype=np.int32)
    total = int(lens.sum())
    if total:
        flat = np.fromiter(itertools.chain.from_iterable(sets), dtype=np.int32, count=total)
        starts = np.repeat(np.cumsum(lens) - lens, lens)
        out[np.repeat(rows, lens), np.repeat(slots, lens), np.arange(total) - starts] = flat
    per_set_max = np.zeros(n, dtype=np.int64)
    np.maximum.at(per_set_max, np.asarray(rows, dtype=np.int64), lens)
    return out, per_set_max


def profile_fields(vocab) -> tuple[str, ...]:
    return tuple(vocab.profile)


def encode_samples(samples: Sequence[Any], vocab, max_visits: int = 10) -> EncodedSplit:
    """Build the student's index arrays for `samples` (keeps the LAST `max_visits` visits, D3)."""
    if max_visits < 1:
        raise ValueError(f"max_visits must be >= 1, got {max_visits}")
    idx = {k: vocab.index(k) for k in ("diag", "proc", "med")}
    fields = profile_fields(vocab)
    n = len(samples)
    sets: dict[str, list] = {"diag": [], "proc": [], "med": []}
    rows: dict[str, list] = {"diag": [], "proc": [], "med": []}
    slots: dict[str, list] = {"diag": [], "proc": [], "med": []}
    targets, t_rows = [], []
    n_visits = np.zeros(n, dtype=np.int32)
    single = np.zeros(n, dtype=bool)
    profile = np.zeros((n, len(fields)), dtype=np.int32)
    attr = {"diag": "diagnoses", "proc": "procedures", "med": "medications"}

    def ids_of(kind, tokens, sid):
        table = idx[kind]
        try:
            return [table[t] + 1 for t in tokens]
        except KeyError as e:
            raise ValueError(f"sample {sid}: {attr[kind]} token {e.args[0]!r} is not in the {kind} "
                             f"vocabulary (prepared data and vocab.json disagree)") from None

    for i, s in enumerate(samples):
        if not s.visits:
            raise ValueError(f"sample {s.id}: has no visits")
        kept = s.visits[-max_visits:]
        n_visits[i] = len(kept)
        single[i] = len(s.visits) == 1
        for j, vis in enumerate(kept):
            for kind in ("diag", "proc"):
                sets[kind].append(ids_of(kind, getattr(vis, attr[kind]), s.id))
                rows[kind].append(i)
                slots[kind].append(j)
            if j + 1 < len(kept):          # drug stream shifted by one visit; target drugs never input
                sets["med"].append(ids_of("med", vis.medications, s.id))
                rows["med"].append(i)
                slots["med"].append(j + 1)
        targets.append(ids_of("med", s.visits[-1].medications, s.id))
        t_rows.append(i)
        for f, name in enumerate(fields):
            profile[i, f] = vocab.profile_index(name, s.profile.get(name, "unknown"))
    diag, need_d = _fill(sets["diag"], rows["diag"], slots["diag"], n, max_visits)
    proc, need_p = _fill(sets["proc"], rows["proc"], slots["proc"], n, max_visits)
    med, need_m = _fill(sets["med"], rows["med"], slots["med"], n, max_visits)
    target3, need_t = _fill(targets, t_rows, [0] * n, n, 1)
    target = target3[:, 0, :]
    labels = np.zeros((n, len(vocab.med)), dtype=np.uint8)
    r, c = np.nonzero(target)
    labels[r, target[r, c] - 1] = 1
    needs = np.stack([n_visits, need_d, need_p, np.maximum(need_m, need_t)], axis=1).astype(np.int32)
    return EncodedSplit(ids=np.asarray([s.id for s in samples], dtype=str), diag=diag, proc=proc, med=med,
                        n_visits=n_visits, profile=profile, target=target, labels=labels,
                        single_visit=single, needs=needs)


# ------------------------------------------------------------------------------------------ buckets
def bucket_caps(needs: np.ndarray, levels: int) -> list[tuple[int, int, int, int]]:
    """Up to `levels` shape caps (visits, diag, proc, med) fitted to the data: samples are sorted by
    padded volume visits·(diag+proc+med) and cut into `levels` equal groups; a group's cap is the
    element-wise max of its needs (code caps rounded up to a multiple of 4). The last cap is the global
    max, so every sample fits; caps are ordered by volume (smallest first)."""
    if levels < 1:
        raise ValueError(f"bucket_levels must be >= 1, got {levels}")
    needs = np.maximum(np.asarray(needs, dtype=np.int64).reshape(-1, 4), 1)
    if len(needs) == 0:
        return [(1, 1, 1, 1)]
    top = needs.max(0)

    def rounded(c):
        return tuple([int(c[0])] + [int(min(4 * math.ceil(x / 4), m)) for x, m in zip(c[1:], top[1:])])

    volume = needs[:, 0] * needs[:, 1:].sum(1)
    order = np.argsort(volume, kind="stable")
    caps = [rounded(needs[g].max(0)) for g in np.array_split(order, levels) if len(g)]
    caps[-1] = rounded(top)
    caps = sorted(set(caps), key=lambda c: (c[0] * sum(c[1:]), c))
    return [c for i, c in enumerate(caps)            # drop caps dominated by a smaller-volume cap
            if not any(all(a >= b for a, b in zip(o, c)) for o in caps[:i])]


def assign_buckets(needs: np.ndarray, caps: Sequence[Sequence[int]]) -> np.ndarray:
    """First (smallest-volume) bucket whose caps hold every need of the sample."""
    caps_a = np.asarray(caps, dtype=np.int64)
    fits = (needs[:, None, :] <= caps_a[None, :, :]).all(-1)
    if not fits[:, -1].all():
        bad = int(np.nonzero(~fits[:, -1])[0][0])
        raise ValueError(f"sample row {bad} needs {needs[bad].tolist()} > largest bucket {caps_a[-1].tolist()}")
    return fits.argmax(axis=1)


def batch_plan(buckets: np.ndarray, batch_size: int, rng: np.random.Generator | None = None
               ) -> list[tuple[int, np.ndarray]]:
    """(bucket, row indices) per batch; rows shuffled within buckets and batches shuffled if rng."""
    plan = []
    for b in np.unique(buckets):
        rows = np.nonzero(buckets == b)[0]
        if rng is not None:
            rows = rng.permutation(rows)
        plan += [(int(b), rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    if rng is not None:
        plan = [plan[i] for i in rng.permutation(len(plan))]
    return plan


def make_batch(enc: EncodedSplit, rows: np.ndarray, cap: Sequence[int], batch_size: int,
               with_teacher: bool = False) -> dict[str, np.ndarray]:
    """Host batch padded to exactly (batch_size, cap): padded rows have weight 0 and no visits."""
    cv, cd, cp, cm = (int(c) for c in cap)
    n = len(rows)

    def pad(a, shape):
        out = np.zeros((batch_size,) + shape, dtype=a.dtype)
        src = a[rows][(slice(None),) + tuple(slice(0, s) for s in shape)]
        out[(slice(0, n),) + tuple(slice(0, s) for s in src.shape[1:])] = src
        return out

    batch = {"diag": pad(enc.diag, (cv, cd)), "proc": pad(enc.proc, (cv, cp)), "med": pad(enc.med, (cv, cm)),
             "n_visits": pad(enc.n_visits, ()), "profile": pad(enc.profile, enc.profile.shape[1:]),
             "target": pad(enc.target, (cm,)), "labels": pad(enc.labels, enc.labels.shape[1:]),
             "weight": np.zeros(batch_size, np.float32)}
    batch["weight"][:n] = 1.0
    if with_teacher:
        batch["teacher"] = pad(enc.teacher, enc.teacher.shape[1:])
    return batch


_LAYOUTS: dict = {}   # (caps, dp | 'flat', batch_size, visits) → PackLayout / FlatLayout, shared by all trainers


# ------------------------------------------------------------------------------------------ trainer
def model_config(cfg, vocab, teacher_dim: int | None) -> StudentConfig:
    return StudentConfig(
        n_diag=len(vocab.diag), n_proc=len(vocab.proc), n_med=len(vocab.med),
        profile_sizes=tuple(len(vocab.profile[f]) for f in profile_fields(vocab)) if cfg.use_profile else (),
        teacher_dim=teacher_dim, d=cfg.d, heads=cfg.heads, ffn=cfg.ffn, head_hidden=cfg.head_hidden,
        max_visits=cfg.max_visits, visit_position=cfg.visit_position, dropout=cfg.dropout,
        attn_dropout=cfg.attn_dropout)


def loss_config(cfg) -> LossConfig:
    return LossConfig(alpha=cfg.alpha, align_weight=cfg.align_weight, tau=cfg.tau,
                      align_loss=cfg.align_loss, distill=bool(cfg.distill))


def make_mesh(shape: Sequence[int]):
    shape = tuple(int(s) for s in shape)
    n = len(jax.devices()) if -1 in shape else math.prod(shape)
    if n > len(jax.devices()):
        raise ValueError(f"mesh_shape {shape} needs {n} devices, only {len(jax.devices())} available")
    return sharding.make_mesh(shape, devices=jax.devices()[:n])


KERNEL_MODES = ("auto", "on", "off")


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


@functools.lru_cache(maxsize=8)
def _compiled_steps(graphdef, lc: LossConfig, lr: float, mesh, p_sh_flat, p_tree, o_sh_flat, o_tree):
    """The jitted train/predict steps for one (model graph, loss, lr, mesh): cached, so a second trainer
    with the same shapes (e.g. a second seed) reuses the compiled executables."""
    tx = optax.adam(lr)

    def train_step(params, opt_state, batch, key):
        def loss_of(p):
            return student_loss(nnx.merge(graphdef, p), batch, lc, key)
        (_, parts), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, parts

    def tables_step(params):
        return nnx.merge(graphdef, params).inference_tables()

    def predict_step(params, packed):
        return jax.nn.sigmoid(nnx.merge(graphdef, params).predict_packed(packed))

    def predict_kernel_step(params, tables, flat):
        return jax.nn.sigmoid(nnx.merge(graphdef, params).predict_flat(flat, tables))

    def predict_padded_step(params, batch):
        return jax.nn.sigmoid(nnx.merge(graphdef, params)(batch)["logits"])

    # Pin every sharding so the first call and later calls (donated outputs) share one compile.
    p_sh = jax.tree.unflatten(p_tree, p_sh_flat)
    o_sh = jax.tree.unflatten(o_tree, o_sh_flat)
    rep = sharding.replicated(mesh)
    data_sh = sharding.batch_sharding(mesh, 1)
    return (tx,
            jax.jit(train_step, donate_argnums=(0, 1), in_shardings=(p_sh, o_sh, data_sh, rep),
                    out_shardings=(p_sh, o_sh, rep)),
            jax.jit(predict_step, in_shardings=(p_sh, data_sh), out_shardings=data_sh),
            jax.jit(tables_step, in_shardings=(p_sh,), out_shardings=rep),
            jax.jit(predict_kernel_step, in_shardings=(p_sh, rep, data_sh), out_shardings=data_sh),
            jax.jit(predict_padded_step, in_shardings=(p_sh, data_sh), out_shardings=data_sh))


class StudentTrainer:
    """Owns the model state, the optimizer and the two compiled steps (plain functional jit)."""

    def __init__(self, mcfg: StudentConfig, lc: LossConfig, *, lr: float, seed: int, mesh=None,
                 inference_kernel: str = "auto"):
        mesh = make_mesh((1, 1, 1)) if mesh is None else mesh
        self.mcfg, self.lc, self.mesh = mcfg, lc, mesh
        with sharding.use_mesh(mesh):
            self.graphdef, self.params = init_student(mcfg, seed)
            self.opt_state = jax.jit(optax.adam(lr).init)(self.params)
        p_flat, p_tree = jax.tree.flatten(jax.tree.map(lambda a: a.sharding, self.params))
        o_flat, o_tree = jax.tree.flatten(jax.tree.map(lambda a: a.sharding, self.opt_state))
        (self.tx, self.train_step, self.predict_xla_step, self.tables_step, self.predict_kernel_step,
         self.predict_padded_step) = _compiled_steps(self.graphdef, lc, float(lr), mesh, tuple(p_flat), p_tree,
                                                     tuple(o_flat), o_tree)
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

    def _put(self, batch: dict) -> dict:
        return {k: sharding.shard_batch(v, self.mesh) for k, v in batch.items()}

    def train_batch(self, batch: dict) -> dict:
        key = jax.random.fold_in(self.base_key, self.step)
        self.params, self.opt_state, parts = self.train_step(self.params, self.opt_state, self._put(batch), key)
        self.step += 1
        return parts

    def predict(self, enc: EncodedSplit, caps, batch_size: int, desc: str | None = None,
                packed: bool = True, kernel: bool | None = None) -> np.ndarray:
        """float32 [n, n_med] probabilities in the row order of `enc`. packed=True (default): real
        tokens only (`pack_batches`), one compile for all batches; the packed layout is sized on the
        first split predicted in this process with these (caps, batch_size) and then reused by every
        trainer (so the compiled step is shared; a different split only changes how many patients fit
        a batch, never a result); `kernel` (default: this trainer's `inference_kernel` resolution)
        runs the packed batches through the CPU FFI kernel instead of XLA ops. packed=False: the
        bucketed, padded reference path."""
        kernel = self.kernel if kernel is None else kernel
        if packed:
            dp = sharding.batch_parallelism(self.mesh)
            key = (("flat",) if kernel else (tuple(tuple(int(x) for x in c) for c in caps), dp)) + (
                int(batch_size), int(enc.diag.shape[1]))
            if key not in _LAYOUTS:
                _LAYOUTS[key] = (flat_layout(enc, batch_size) if kernel
                                 else pack_layout(enc, caps, batch_size, multiple=8 * dp))
            out = np.zeros((len(enc), self.mcfg.n_med), dtype=np.float32)
            pending = []
            if kernel:
                tables = self.tables_step(self.params)      # per-token work that depends on the id alone
                step = functools.partial(self.predict_kernel_step, self.params, tables)
                batches = pack_flat(enc, _LAYOUTS[key])
            else:
                step = functools.partial(self.predict_xla_step, self.params)
                batches = pack_batches(enc, _LAYOUTS[key])
            for rows, pb in progress(batches, desc=desc or "predict", unit="batch", disable=desc is None or None):
                pending.append((rows, step(self._put(pb))))
            for rows, p in pending:
                out[rows] = np.asarray(p)[: len(rows)]
            return out
        buckets = assign_buckets(enc.needs, caps)
        out = np.zeros((len(enc), self.mcfg.n_med), dtype=np.float32)
        plan = batch_plan(buckets, batch_size)
        pending = []
        for b, rows in progress(plan, desc=desc or "predict", unit="batch", disable=desc is None or None):
            pending.append((rows, self.predict_padded_step(self.params, self._put(make_batch(enc, rows, caps[b], batch_size)))))
        for rows, p in pending:
            out[rows] = np.asarray(p)[: len(rows)]
        return out

    def compile_counts(self) -> dict[str, int]:
        """Executables compiled so far per step (jit's private `_cache_size`; -1 if a jax lacks it)."""
        size = lambda f: int(f._cache_size()) if hasattr(f, "_cache_size") else -1  # noqa: E731
        return {"train_step": size(self.train_step),
                "predict_step": size(self.predict_kernel_step if self.kernel else self.predict_xla_step)}

    def host_params(self):
        return jax.device_get(self.params)

    def set_params(self, host_params) -> None:
        shardings = jax.tree.map(lambda a: a.sharding, self.params)
        self.params = jax.tree.map(lambda h, s: jax.device_put(np.asarray(h), s), host_params, shardings)


def split_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    from leader_jax.metrics import per_sample_metrics
    ps = per_sample_metrics(labels, probs, threshold)
    return {k: float(np.mean(ps[k])) if len(labels) else 0.0 for k in ("prauc", "jaccard", "f1")}


def attach_teacher(enc: EncodedSplit, store, split: str) -> None:
    """enc.teacher ← store.hidden(split, enc.ids); the store raises MissingFeaturesError naming ids."""
    enc.teacher = np.asarray(store.hidden(split, enc.ids.tolist()), dtype=np.float16)


def _save_checkpoint(mngr, epoch: int, params, meta: dict) -> None:
    import orbax.checkpoint as ocp
    mngr.save(epoch, args=ocp.args.Composite(model=ocp.args.StandardSave(params),
                                             meta=ocp.args.JsonSave(meta)))
    mngr.wait_until_finished()


def restore_params(run_dir: str | Path, trainer: StudentTrainer, step: int | None = None):
    """Load the best checkpoint of RUN into `trainer` (abstract target = the current params)."""
    import orbax.checkpoint as ocp
    mngr = ocp.CheckpointManager(Path(run_dir).resolve() / "checkpoints")
    step = mngr.latest_step() if step is None else step
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), trainer.params)
    restored = mngr.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(abstract),
                                                          meta=ocp.args.JsonRestore()))
    mngr.close()
    trainer.params = restored["model"]
    return restored["meta"]


def train(cfg, data, store, out: str | Path) -> dict:
    """Full training run; returns the summary written into RUN/run.json."""
    import orbax.checkpoint as ocp

    from leader_jax.eval import write_predictions
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    encs = {s: encode_samples(data.splits[s], data.vocab, cfg.max_visits) for s in SPLITS}
    if len(encs["train"]) == 0 or len(encs["val"]) == 0:
        raise ValueError(f"{cfg.data_dir}: the student needs non-empty train and val splits "
                         f"(train {len(encs['train'])}, val {len(encs['val'])})")
    teacher_dim = None
    if cfg.distill:
        if store.n_med != len(data.vocab.med):
            raise ValueError(f"feature store {store.path}: n_med {store.n_med} != prepared data's "
                             f"{len(data.vocab.med)} drugs ({cfg.data_dir})")
        stored_fp = store.manifest.get("meta", {}).get("dataset_fingerprint")
        if stored_fp and stored_fp != data.fingerprint():
            raise ValueError(f"feature store {store.path} was extracted from a different prepared dataset "
                             f"(dataset_fingerprint {stored_fp[:12]}… != {cfg.data_dir}'s "
                             f"{data.fingerprint()[:12]}…)")
        attach_teacher(encs["train"], store, "train")
        teacher_dim = store.hidden_dim
    caps = bucket_caps(np.concatenate([e.needs for e in encs.values()]), cfg.bucket_levels)
    mesh = make_mesh(cfg.mesh_shape)
    for name in ("batch_size", "eval_batch_size"):
        sharding.check_batch_size(f"config.{name}", getattr(cfg, name), mesh)
    mcfg = model_config(cfg, data.vocab, teacher_dim)
    trainer = StudentTrainer(mcfg, loss_config(cfg), lr=cfg.lr, seed=cfg.seed, mesh=mesh,
                             inference_kernel=cfg.get("inference_kernel", "auto"))
    n_params = int(sum(np.prod(a.shape) for a in jax.tree.leaves(trainer.params)))
    ckpt_dir = out / "checkpoints"
    for old in (ckpt_dir, out / "metrics.jsonl"):   # a student run starts afresh (no resume): never mix
        if old.is_dir():                            # an earlier run's epochs or checkpoints into this one
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
    logger = JsonlLogger(out / "metrics.jsonl")
    mngr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=1))
    train_buckets = assign_buckets(encs["train"].needs, caps)
    best = {"val_prauc": -1.0, "epoch": -1}
    best_params = None
    bad_epochs = 0
    for epoch in range(cfg.epochs):
        te = time.perf_counter()
        rng = np.random.default_rng([cfg.seed, epoch])
        plan = batch_plan(train_buckets, cfg.batch_size, rng)
        parts_all = []
        for b, rows in progress(plan, desc=f"epoch {epoch}", unit="batch"):
            batch = make_batch(encs["train"], rows, caps[b], cfg.batch_size, with_teacher=bool(cfg.distill))
            parts_all.append((len(rows), trainer.train_batch(batch)))
        host = jax.device_get([p for _, p in parts_all])
        counts = np.asarray([n for n, _ in parts_all], dtype=np.float64)
        train_parts = {f"train_{k}": float(np.sum(counts * np.asarray([h[k] for h in host])) / counts.sum())
                       for k in host[0]}
        val_probs = trainer.predict(encs["val"], caps, cfg.eval_batch_size)
        val = split_metrics(encs["val"].labels, val_probs, cfg.threshold)
        record = {"epoch": epoch, "step": trainer.step, **train_parts,
                  **{f"val_{k}": v for k, v in val.items()}, "epoch_seconds": round(time.perf_counter() - te, 3)}
        improved = val["prauc"] > best["val_prauc"]
        record["best"] = bool(improved)
        logger.log(record)
        if not all(math.isfinite(v) for k, v in train_parts.items()):
            raise FloatingPointError(f"non-finite training loss at epoch {epoch}: {train_parts}")
        if improved:
            best = {"val_prauc": val["prauc"], "val_jaccard": val["jaccard"], "epoch": epoch}
            best_params = trainer.host_params()
            _save_checkpoint(mngr, epoch, trainer.params, {"epoch": epoch, "val_prauc": val["prauc"]})
            bad_epochs = 0
        else:
            bad_epochs += 1
            if bad_epochs >= cfg.patience:
                break
    mngr.close()
    trainer.set_params(best_params)
    summary: dict[str, Any] = {"data_dir": str(Path(cfg.data_dir).resolve()), "model": "student",
                               "distill": bool(cfg.distill), "features": str(cfg.features or ""),
                               "seed": int(cfg.seed), "best_epoch": best["epoch"],
                               "epochs_run": epoch + 1, "n_params": n_params,
                               "n_params_inference": n_params - (
                                   (mcfg.head_hidden + 1) * teacher_dim if teacher_dim else 0),
                               "buckets": [list(c) for c in caps], "threshold": float(cfg.threshold),
                               "inference": "kernel" if trainer.kernel else "xla",
                               **({} if trainer.kernel else {"inference_note": trainer.kernel_note})}
    for split in ("val", "test"):
        enc = encs[split]
        if not len(enc):
            continue
        probs = trainer.predict(enc, caps, cfg.eval_batch_size)
        write_predictions(out, split, ids=enc.ids, y_true=enc.labels, y_prob=probs, single_visit=enc.single_visit)
        summary[split] = split_metrics(enc.labels, probs, cfg.threshold)
    summary["compile_counts"] = trainer.compile_counts()
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    logger.log({"final": True, **{f"{s}_{k}": v for s in ("val", "test") if s in summary
                                  for k, v in summary[s].items()}, "best_epoch": best["epoch"]})
    atomic_write_json(out / "run.json", summary)
    return summary


# ---------------------------------------------------------------------------------------------- CLI
def main(cfg, args: list[str]) -> None:
    from leader_jax.cli import UserError
    from leader_jax.data.dataset import PreparedData
    from leader_jax.feature_store import FeatureStore, MissingFeaturesError

    if args:
        raise UserError(f"unexpected positional arguments: {args}")
    if not cfg.get("out"):
        raise UserError("--out RUN (the run directory) is required")
    if not cfg.data_dir:
        raise UserError("--config.data_dir=PREPARED is required")
    try:
        data = PreparedData.load(cfg.data_dir)
        store = None
        if cfg.distill:
            if not cfg.features:
                raise UserError("--config.features=STORE is required with distill=True "
                                "(or pass --config.distill=False for the no-KD ablation)")
            store = FeatureStore(cfg.features)
        summary = train(cfg, data, store, cfg.out)
    except (FileNotFoundError, ValueError, MissingFeaturesError) as e:
        raise UserError(str(e)) from None
    shown = {s: {k: round(v, 4) for k, v in summary[s].items()} for s in ("val", "test") if s in summary}
    print(f"student ({'KD' if cfg.distill else 'no KD'}) best epoch {summary['best_epoch']}: {shown} → {cfg.out}")


if __name__ == "__main__":
    from leader_jax.cli import run
    run(main, "student.py")
