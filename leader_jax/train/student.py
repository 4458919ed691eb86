"""Train LEADER(S) on a prepared dataset, distilling from a teacher feature store (offline KD).

    python -m leader_jax.train.student --config configs/student.py \
        --config.data_dir=PREPARED --config.features=STORE --out RUN
    python -m leader_jax.train.student ... --config.distill=False      # no-KD ablation

The epoch loop and the run folder; inputs live in `student_inputs` (+ `packing`), the compiled steps
and the trainer in `student_trainer`. RUN gets `config.json` (at start), `run.json` (`"model": "student"`
marks the folder as a student run from the start; the summary is added when the run finishes),
`metrics.jsonl` (per epoch: train loss parts, validation PRAUC/Jaccard/F1), `checkpoints/` (orbax, one
per epoch: current + best parameters, optimizer state, early-stopping state, run identity) and
`predictions/{val,test}.npz`; with `retrieval.mode=fixed` also `retrieval/` (the training-visit
memory, the neighbour pools per split and their settings, which prediction reuses). A run resumes from
its last checkpoint (`train.resume`, default) with results identical to an uninterrupted run; a folder
that holds another kind of run is refused.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from ml_collections import ConfigDict

from leader_jax import retrieval
from leader_jax.cli import UserError
from leader_jax.compile_cache import CompileStats, active_dir
from leader_jax.io import JsonlLogger, atomic_write_json, atomic_write_text, progress
from leader_jax.models.student import ALIGN_LOSSES, VISIT_POSITIONS
from leader_jax.train import common, distributed
from leader_jax.train.engine import Checkpointer
from leader_jax.retrieval.run_prompts import RETRIEVAL_DIR, RunRetrieval
from leader_jax.train.student_inputs import (SPLITS, EncodedSplit, after_first_step, assign_buckets, attach_neighbours,
                                             attach_teacher, bucket_caps, chunk_plan, encode_samples, make_chunk)
from leader_jax.train.student_trainer import (KERNEL_MODES, MODEL_KIND, CompiledSteps, StudentTrainer, loss_config,
                                              model_config, restore_state, save_state, split_metrics)

_IMPORTED = time.time()     # launch-clock fallback where /proc is missing


def seconds_since_launch(proc: Path = Path("/proc")) -> tuple[float, str]:
    """(seconds since this process started, the clock used). "proc": Linux, the process's start time
    (/proc/self/stat field 22, clock ticks since boot) against /proc/uptime (seconds since boot, 10 ms
    resolution; /proc/stat's btime has whole seconds only). "import" where /proc cannot be read: from
    the import of this module, so the interpreter's start-up and the imports before it are not counted."""
    try:
        stat = (proc / "self" / "stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()      # the command name may hold spaces
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        up = float((proc / "uptime").read_text().split()[0])
        return max(up - started, 0.0), "proc"
    except (OSError, ValueError, IndexError):
        return time.time() - _IMPORTED, "import"


# Files and folders that other stages write: a --out folder holding one is never written into.
OTHER_RUN_FILES = {"vocab.json": "prepared data", "samples.jsonl": "prepared data",
                   "splits.json": "prepared data", "manifest.json": "a feature store",
                   "head.npy": "a teacher run", "adapters": "a teacher run", "best": "a teacher run",
                   "summary.json": "a teacher or stage-1 run", "base": "a stage-1 run",
                   "domain_adapter": "a stage-1 run"}
# What a student run writes (and, with train.resume=False, replaces).
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoints", "predictions", RETRIEVAL_DIR)
# retrieval.mode values the student supports: none, or fixed = the neighbours' drug sets as an input
STUDENT_RETRIEVAL_MODES = ("none", "fixed")
ORACLE_NOTE = ("similarity=oracle ranks neighbours by the query's own true drugs: an upper bound for "
               "evaluation, not a model (prediction refuses this run)")


# --------------------------------------------------------------------------------------------- config
def validate_config(cfg: ConfigDict) -> None:
    """UserError naming the field for a value the student stage cannot use (paths are checked later)."""
    def need(ok: bool, field: str, value: Any, what: str) -> None:
        if not ok:
            raise UserError(f"student config {field}={value!r}: {what}")

    mesh = tuple(cfg.mesh)
    need(len(mesh) == 3 and all(isinstance(s, int) and (s >= 1 or s == -1) for s in mesh), "mesh", mesh,
         "expected a (data, fsdp, tensor) tuple of positive sizes (or -1 = the remaining devices)")
    need(isinstance(cfg.distill, bool), "distill", cfg.distill, "expected True or False")
    m = cfg.model
    for name in ("d", "heads", "ffn", "head_hidden", "max_visits", "bucket_levels"):
        need(int(m[name]) >= 1, f"model.{name}", m[name], "must be >= 1")
    need(m.d % m.heads == 0, "model.d", m.d, f"must be a multiple of model.heads={m.heads}")
    need(m.visit_position in VISIT_POSITIONS, "model.visit_position", m.visit_position,
         f"expected one of {VISIT_POSITIONS}")
    need(isinstance(m.shared_embedding, bool), "model.shared_embedding", m.shared_embedding, "expected True or False")
    need(isinstance(m.use_profile, bool), "model.use_profile", m.use_profile, "expected True or False")
    need(m.inference_kernel in KERNEL_MODES, "model.inference_kernel", m.inference_kernel,
         f"expected one of {KERNEL_MODES}")
    for name in ("dropout", "attn_dropout"):
        need(0.0 <= m[name] < 1.0, f"model.{name}", m[name], "must be in [0, 1)")
    lo = cfg.loss
    for name in ("alpha", "align_weight"):
        need(lo[name] >= 0, f"loss.{name}", lo[name], "must be >= 0")
    need(lo.tau > 0, "loss.tau", lo.tau, "must be > 0")
    need(lo.align_loss in ALIGN_LOSSES, "loss.align_loss", lo.align_loss, f"expected one of {ALIGN_LOSSES}")
    tr = cfg.train
    need(tr.lr > 0, "train.lr", tr.lr, "must be > 0")
    for name in ("batch_size", "epochs", "patience", "steps_per_call"):
        need(int(tr[name]) >= 1, f"train.{name}", tr[name], "must be >= 1")
    need(int(tr.stop_after) >= 0, "train.stop_after", tr.stop_after, "must be >= 0 (0 = off)")
    need(int(cfg.eval.batch_size) >= 1, "eval.batch_size", cfg.eval.batch_size, "must be >= 1")
    need(0.0 <= cfg.eval.threshold <= 1.0, "eval.threshold", cfg.eval.threshold, "must be in [0, 1]")
    retrieval.validate_config(cfg.retrieval, prefix="retrieval.")
    need(cfg.retrieval.mode in STUDENT_RETRIEVAL_MODES, "retrieval.mode", cfg.retrieval.mode,
         f"expected one of {STUDENT_RETRIEVAL_MODES} for the student (the joint re-ranker is not wired "
         "into the student)")


# ----------------------------------------------------------------------------------------- run folder
def checkpoint_meta(ckpt_dir: Path) -> dict | None:
    """JSON meta of the latest checkpoint in `ckpt_dir` (None: no checkpoint; no array is read)."""
    if not ckpt_dir.is_dir():
        return None
    ckpt = Checkpointer(ckpt_dir, max_to_keep=None)
    try:
        step = ckpt.latest_step()
        return None if step is None else ckpt.read_meta(step)
    finally:
        ckpt.close()


def check_out_folder(out: Path) -> None:
    """Refuse (UserError, nothing touched) a --out folder that holds anything but a student run: files
    of another stage, a run.json of another model, checkpoints of another kind, or student outputs
    without the run.json marker."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out} is a file, not a run folder")
    refuse = "refusing to write into it (a student run replaces its checkpoints and metrics); choose another --out"
    for name, what in OTHER_RUN_FILES.items():
        if (out / name).exists():
            raise UserError(f"--out {out} holds {name} ({what}), not a student run; {refuse}")
    marker = out / "run.json"
    if marker.exists():
        try:
            model = json.loads(marker.read_text()).get("model")
        except (json.JSONDecodeError, AttributeError):
            raise UserError(f"{marker} is not a JSON object, so {out} is not a student run; {refuse}") from None
        if model != MODEL_KIND:
            raise UserError(f"--out {out} holds a run of model {model!r} ({marker}), not a student run; {refuse}")
    else:
        present = [name for name in RUN_FILES if (out / name).exists()]
        if present:
            raise UserError(f"--out {out} holds {', '.join(present)} but no run.json with \"model\": \"student\" "
                            f"(another stage's run?); {refuse}")
    meta = checkpoint_meta(out / "checkpoints")
    if meta is not None and meta.get("model") != MODEL_KIND:
        raise UserError(f"--out {out}: {out / 'checkpoints'} holds checkpoints of another kind "
                        f"(meta model {meta.get('model')!r}); {refuse}")


def open_metrics(out: Path, epochs_done: int) -> JsonlLogger:
    """metrics.jsonl for this run: epoch records before `epochs_done` are kept (they belong to the
    restored checkpoint), later ones and final lines are dropped (they will be replayed); a torn last
    line (a kill while appending) is dropped too."""
    path = out / "metrics.jsonl"
    main = distributed.is_main_process()
    if main and path.exists():
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        keep = []
        for i, line in enumerate(lines):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    break                                  # torn last line: the epoch is replayed
                raise UserError(f"{path}: line {i + 1} is not JSON (only a torn last line is expected); "
                                f"start afresh with --config.train.resume=False") from None
            if not rec.get("final") and int(rec.get("epoch", -1)) < epochs_done:
                keep.append(line + "\n")
        atomic_write_text(path, "".join(keep))
    return JsonlLogger(path, enabled=main)


def write_marker(out: Path, summary: dict) -> None:
    if distributed.is_main_process():
        atomic_write_json(out / "run.json", summary)


# --------------------------------------------------------------------------------------------- train
class EarlyStopping(NamedTuple):
    """The early-stopping state carried across epochs (and checkpoints)."""

    best_val_prauc: float = -1.0
    best_val_jaccard: float = 0.0
    best_epoch: int = -1
    bad_epochs: int = 0

    def done(self, patience: int) -> bool:
        return self.bad_epochs >= patience


class StudentRun(NamedTuple):
    """What `train` returns: the summary (also RUN/run.json) and the trainer (holding the best
    parameters and the compiled steps, which another run of the same structure can reuse)."""

    summary: dict
    trainer: StudentTrainer


def load_inputs(cfg: ConfigDict, data, store, out: Path | None = None
                ) -> tuple[dict[str, EncodedSplit], int | None]:
    """Encoded splits (+ the neighbours' drug bags with retrieval mode fixed, saved under
    `out`/retrieval/; + teacher features on train when distilling) and the teacher dimension."""
    encs = {s: encode_samples(data.splits[s], data.vocab, cfg.model.max_visits) for s in SPLITS}
    if len(encs["train"]) == 0 or len(encs["val"]) == 0:
        raise ValueError(f"{cfg.data_dir}: the student needs non-empty train and val splits "
                         f"(train {len(encs['train'])}, val {len(encs['val'])})")
    if cfg.retrieval.mode == "fixed":
        retrieval = RunRetrieval.for_training(cfg.retrieval, data, out,
                                              write=out is not None and distributed.is_main_process())
        attach_neighbours(encs, data, retrieval)
    if not cfg.distill:
        return encs, None
    if store.n_med != len(data.vocab.med):
        raise ValueError(f"feature store {store.path}: n_med {store.n_med} != prepared data's "
                         f"{len(data.vocab.med)} drugs ({cfg.data_dir})")
    stored_fp = store.manifest["meta"].get("dataset_fingerprint")
    if stored_fp and stored_fp != data.fingerprint():
        raise ValueError(f"feature store {store.path} was extracted from a different prepared dataset "
                         f"(dataset_fingerprint {stored_fp[:12]}… != {cfg.data_dir}'s {data.fingerprint()[:12]}…)")
    attach_teacher(encs["train"], store, "train")
    return encs, store.hidden_dim


def retrieval_summary(cfg: ConfigDict, encs: dict[str, EncodedSplit]) -> dict:
    """run.json's record of the neighbour input: the mode, and with mode fixed the pool settings, k and
    the samples per split whose bag is empty (no neighbour); oracle runs are labelled as an upper bound."""
    r = cfg.retrieval
    if r.mode == "none":
        return {"mode": "none"}
    out = {"mode": r.mode, "similarity": r.similarity, "k": int(r.k), "pool": int(r.pool),
           "time_order": r.time_order, "folder": RETRIEVAL_DIR,
           "empty_bags": {s: int((e.nbr.sum(axis=1) == 0).sum()) for s, e in encs.items() if e.nbr is not None}}
    if r.similarity == "oracle":
        out.update(upper_bound=True, note=ORACLE_NOTE)
    return out


def train(cfg: ConfigDict, *, steps: CompiledSteps | None = None) -> StudentRun:
    """A full (or resumed, or `train.stop_after`-interrupted) student run in `cfg.out`. `steps`: the
    compiled steps of an earlier trainer of the same structure, to reuse its executables."""
    from leader_jax.feature_store import FeatureStore, MissingFeaturesError

    t_start = time.perf_counter()
    validate_config(cfg)
    if not cfg.out:
        raise UserError("--out RUN (the run directory) is required")
    if not cfg.data_dir:
        raise UserError("--config.data_dir=PREPARED is required")
    if cfg.distill and not cfg.features:
        raise UserError("--config.features=STORE is required with distill=True "
                        "(or pass --config.distill=False for the no-KD ablation)")
    common.setup_distributed(cfg)                      # before any other JAX call (multi-process runs)
    out = Path(cfg.out).absolute()
    check_out_folder(out)
    stored = checkpoint_meta(out / "checkpoints") if cfg.train.resume else None
    if stored is not None:              # a changed config is refused before config.json is rewritten
        common.check_identity(stored, {"config_hash": common.config_hash(cfg),
                                       "data_fingerprint": stored.get("data_fingerprint", "")},
                              out, "--config.train.resume=False")
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, {"model": MODEL_KIND, "data_dir": str(Path(cfg.data_dir).resolve()), "finished": False})
    _, data = common.start_run(cfg)
    identity = common.run_identity(cfg, data.fingerprint())
    if stored is not None:
        common.check_identity(stored, identity, out, "--config.train.resume=False")
    try:
        store = FeatureStore(cfg.features) if cfg.distill else None
        return _train(cfg, out, data, store, identity, resume=stored is not None, steps=steps, t_start=t_start)
    except (FileNotFoundError, ValueError, MissingFeaturesError) as e:
        raise UserError(str(e)) from None


def _train(cfg: ConfigDict, out: Path, data, store, identity: dict, *, resume: bool,
           steps: CompiledSteps | None, t_start: float) -> StudentRun:
    from leader_jax.eval import write_predictions

    t0 = time.perf_counter()
    compiled_before = CompileStats.snapshot()
    first_step_s = None
    tr = cfg.train
    encs, teacher_dim = load_inputs(cfg, data, store, out)
    caps = bucket_caps(np.concatenate([e.needs for e in encs.values()]), cfg.model.bucket_levels)
    mesh = common.make_mesh(cfg)
    common.check_batch_sizes(mesh, {"train.batch_size": tr.batch_size, "eval.batch_size": cfg.eval.batch_size})
    mcfg = model_config(cfg, data.vocab, teacher_dim)
    trainer = StudentTrainer(mcfg, loss_config(cfg), lr=tr.lr, seed=cfg.seed, mesh=mesh,
                             inference_kernel=cfg.model.inference_kernel, steps=steps)
    n_params = int(sum(np.prod(a.shape) for a in jax.tree.leaves(trainer.params)))

    ckpt_dir = out / "checkpoints"
    if not resume and distributed.is_main_process():
        for old in (ckpt_dir, out / "metrics.jsonl"):  # start afresh: never mix an earlier run's epochs in
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()
    ckpt = Checkpointer(ckpt_dir, max_to_keep=1)
    stopping, epochs_done, best_params = EarlyStopping(), 0, None
    if resume:
        best_params, meta = restore_state(ckpt, trainer)
        epochs_done = int(meta["epochs_done"])
        stopping = EarlyStopping(float(meta["best_val_prauc"]), float(meta["best_val_jaccard"]),
                                 int(meta["best_epoch"]), int(meta["bad_epochs"]))
    logger = open_metrics(out, epochs_done)

    train_buckets = assign_buckets(encs["train"].needs, caps)
    epoch = epochs_done
    while epoch < tr.epochs and not stopping.done(tr.patience):
        if tr.stop_after and epoch >= tr.stop_after:
            break                                              # simulated kill (tests)
        started = time.perf_counter()
        rng = np.random.default_rng([cfg.seed, epoch])         # the data order is a function of the epoch
        sums = []
        for chunk in progress(chunk_plan(train_buckets, tr.batch_size, tr.steps_per_call, rng),
                              desc=f"epoch {epoch}", unit="chunk"):
            arrays = make_chunk(encs["train"], chunk.rows, caps[chunk.bucket], with_teacher=bool(cfg.distill))
            # a fresh run dispatches its very first optimizer step alone, so that step's end is observed
            parts = ([(arrays, chunk.steps)] if trainer.step else
                     [(arrays, 1), (after_first_step(arrays), chunk.steps - 1)])
            for part, steps in parts:
                if steps:
                    sums.append(trainer.train_chunk(part, steps))
                if first_step_s is None:
                    jax.block_until_ready(sums[-1])
                    first_step_s = time.perf_counter() - t_start
                    launch_s, launch_clock = seconds_since_launch()
        host = jax.device_get(sums)                            # the epoch's only read-back of train metrics
        total = {k: float(np.sum([h[k] for h in host], dtype=np.float64)) for k in host[0]}
        train_parts = {f"train_{k}": v / total["n"] for k, v in total.items() if k != "n"}
        val = split_metrics(encs["val"].labels, trainer.predict(encs["val"], caps, cfg.eval.batch_size),
                            cfg.eval.threshold)
        improved = val["prauc"] > stopping.best_val_prauc
        logger.log({"epoch": epoch, "step": trainer.step, **train_parts, **{f"val_{k}": v for k, v in val.items()},
                    "best": bool(improved), "epoch_seconds": round(time.perf_counter() - started, 3)})
        if not all(math.isfinite(v) for v in train_parts.values()):
            raise FloatingPointError(f"non-finite training loss at epoch {epoch}: {train_parts}")
        if improved:
            stopping = EarlyStopping(val["prauc"], val["jaccard"], epoch, 0)
            best_params = trainer.host_params()
        else:
            stopping = stopping._replace(bad_epochs=stopping.bad_epochs + 1)
        epoch += 1
        save_state(ckpt, trainer, best_params, {"epoch": epoch - 1, "epochs_done": epoch, "step": trainer.step,
                                                **stopping._asdict(), **identity})
    ckpt.close()
    finished = epoch >= tr.epochs or stopping.done(tr.patience)
    summary: dict[str, Any] = {"data_dir": str(Path(cfg.data_dir).resolve()), "model": MODEL_KIND,
                               "finished": finished, "distill": bool(cfg.distill),
                               "features": str(cfg.features or ""), "seed": int(cfg.seed),
                               "best_epoch": stopping.best_epoch, "epochs_run": epoch, "n_params": n_params,
                               "n_params_inference": n_params - (
                                   (mcfg.head_hidden + 1) * teacher_dim if teacher_dim else 0),
                               "buckets": [list(c) for c in caps], "threshold": float(cfg.eval.threshold),
                               "checkpoint": str(ckpt_dir), "retrieval": retrieval_summary(cfg, encs)}
    if not finished:                                           # stopped by train.stop_after: resume later
        return StudentRun(summary, trainer)
    trainer.set_params(best_params)
    summary.update({"inference": "kernel" if trainer.kernel else "xla",
                    **({} if trainer.kernel else {"inference_note": trainer.kernel_note})})
    for split in ("val", "test"):
        enc = encs[split]
        if not len(enc):
            continue
        probs = trainer.predict(enc, caps, cfg.eval.batch_size)
        if distributed.is_main_process():
            write_predictions(out, split, ids=enc.ids, y_true=enc.labels, y_prob=probs,
                              single_visit=enc.single_visit, data_fingerprint=data.fingerprint())
        summary[split] = split_metrics(enc.labels, probs, cfg.eval.threshold)
    summary["compile_counts"] = trainer.compile_counts()
    chunk_fn = trainer.steps.train_chunk                       # traced training loops kept across runs
    summary["compile"] = {**CompileStats.since(compiled_before), "persistent_cache": str(active_dir() or ""),
                          "exported_programs": {"loaded": chunk_fn.loaded, "traced": chunk_fn.traced}}
    summary["seconds_to_first_step"] = None if first_step_s is None else round(first_step_s, 2)
    if first_step_s is not None:     # from process launch (interpreter start, imports, data loading included)
        summary["seconds_from_launch_to_first_step"] = round(launch_s, 2)
        summary["launch_clock"] = launch_clock
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    logger.log({"final": True, **{f"{s}_{k}": v for s in ("val", "test") if s in summary
                                  for k, v in summary[s].items()}, "best_epoch": stopping.best_epoch})
    write_marker(out, summary)
    if distributed.is_main_process():
        from leader_jax.model_card import write_after_training
        write_after_training(out)
    return StudentRun(summary, trainer)


# ---------------------------------------------------------------------------------------------- CLI
def main(cfg: ConfigDict, args: list[str]) -> None:
    if args:
        raise UserError(f"unexpected positional arguments: {args}")
    summary = train(cfg).summary
    if not distributed.is_main_process():
        return
    if not summary["finished"]:
        print(f"student stopped after {summary['epochs_run']} epochs (train.stop_after); "
              f"re-run to resume → {cfg.out}")
        return
    shown = {s: {k: round(v, 4) for k, v in summary[s].items()} for s in ("val", "test") if s in summary}
    if summary["retrieval"].get("upper_bound"):
        print(f"note: {ORACLE_NOTE}")
    print(f"student ({'KD' if cfg.distill else 'no KD'}) best epoch {summary['best_epoch']}: {shown} → {cfg.out}")


if __name__ == "__main__":
    from leader_jax.cli import run
    run(main, "student.py")
