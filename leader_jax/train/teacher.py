"""Stage 2: `python -m leader_jax.train.teacher --config configs/teacher_tiny.py --out RUN`.

Loads the base LLaMA (+ the stage-1 domain adapter, frozen or trainable), adds a task adapter and the
drug head, and trains them with sigmoid BCE on the teacher prompts (sharded, gradient accumulation,
warmup + linear decay, clipping, optional bf16 frozen base and remat). Every `train.eval_every` steps the
validation PRAUC is computed and the best step's trainable weights are kept (leader.md D13). Writes
`RUN/metrics.jsonl`, `RUN/checkpoints/` (resume), `RUN/best/`, `RUN/adapters/task/` (HF PEFT format),
`RUN/head.npy`, `RUN/predictions/{val,test}.npz`, `RUN/run.json`, `RUN/config.json`, `RUN/summary.json`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from leader_jax import sharding as shd
from leader_jax.cli import UserError
from leader_jax.io import progress
from leader_jax.models import lora
from leader_jax.models.teacher import HeadParam, Teacher, bce_loss
from leader_jax.train import common, text_batches as tdata, distributed
from leader_jax.train.engine import Checkpointer, Engine, StepTimer, place
from leader_jax.train.optim import make_optimizer


# ----------------------------------------------------------------------------------------- building
def trainable_filter(cfg: ConfigDict):
    if cfg.model.get("trainable_base", False):       # full fine-tuning (tiny from-scratch models)
        return nnx.Param
    parts = [HeadParam]
    if cfg.lora.task.rank > 0:
        parts.append(lora.TaskLoRA)
    if cfg.lora.domain_path and cfg.lora.domain_trainable:
        parts.append(lora.DomainLoRA)
    return nnx.Any(*parts)


def build_teacher(cfg: ConfigDict, n_med: int, mesh) -> Teacher:
    """Base (+ domain adapter) + task adapter + head, every variable on `mesh`."""
    _, base = common.load_base(cfg.model, mesh, cfg.seed)
    if cfg.lora.domain_path:
        if not Path(cfg.lora.domain_path).exists():
            raise UserError(f"lora.domain_path={cfg.lora.domain_path}: folder not found")
        lora.load_adapter(base, cfg.lora.domain_path, name="domain", param_type=lora.DomainLoRA)
    t = cfg.lora.task
    if t.rank > 0:
        lora.add_adapter(base, "task", t.targets, rank=t.rank, alpha=t.alpha, dropout=t.dropout,
                         param_type=lora.TaskLoRA, seed=cfg.seed + 1)
    with nnx.use_eager_sharding(False):
        teacher = Teacher(base, n_med, rngs=nnx.Rngs(cfg.seed + 2), pool=cfg.model.get("pool", "last"),
                          head_norm=bool(cfg.model.get("head_norm", False)))
    return place(teacher, mesh)


def teacher_loss(model: Teacher, mb: dict):
    logits, _ = model(mb["input_ids"], mb["attention_mask"])
    return bce_loss(logits, mb["labels"]), {}


def teacher_predict(model: Teacher, b: dict):
    logits, pooled = model(b["input_ids"], b["attention_mask"])
    return jax.nn.sigmoid(logits), pooled


def tokenizer_path(cfg: ConfigDict) -> str:
    return cfg.tokenizer or cfg.model.path


def encode_split(cfg: ConfigDict, prepared, split: str, tokenizer, special,
                 training: bool | None = None) -> tdata.Encoded:
    """Training encoding (max_len, overlong samples dropped) for the train split during training;
    evaluation encoding (eval_max_len, nothing dropped) otherwise (predictions, feature store)."""
    samples = prepared.splits[split]
    if not samples:
        raise UserError(f"prepared data {cfg.data_dir}: split {split!r} is empty")
    is_train = (split == "train") if training is None else training
    max_len = cfg.data.max_len if is_train else (cfg.data.get("eval_max_len") or cfg.data.max_len)
    try:
        return tdata.encode_samples(samples, prepared.vocab, tokenizer, special, max_len,
                                    max_history=cfg.data.max_history, profile=cfg.data.profile,
                                    labels=prepared.labels(samples), split=split,
                                    overlong="drop" if is_train else "error")
    except ValueError as e:
        raise UserError(str(e)) from None


def predict_split(engine: Engine, enc: tdata.Encoded, batch_size: int, desc: str = "predict"):
    """(probs float32 [N, n_med], pooled float32 [N, D]) over a whole split (process-gathered)."""
    from jax.experimental import multihost_utils

    probs, pooled = [], []
    for rows, batch in progress(tdata.eval_batches(enc, batch_size, engine.mesh), desc=desc,
                                total=-(-len(enc) // batch_size), unit="batch"):
        p, h = engine.predict(batch)
        if jax.process_count() > 1:
            p, h = multihost_utils.process_allgather((p, h), tiled=True)
        probs.append(np.asarray(p)[:len(rows)])
        pooled.append(np.asarray(h)[:len(rows)])
    return np.concatenate(probs).astype(np.float32), np.concatenate(pooled).astype(np.float32)


def set_head_stats(engine: Engine, enc: tdata.Encoded, batch_size: int) -> None:
    """head_norm: mean and 1/std of the initial pooled state over the training split."""
    _, pooled = predict_split(engine, enc, batch_size, desc="head stats")
    mean = pooled.mean(0)
    inv = 1.0 / (pooled.std(0) + 1e-6)

    def put(path, x):
        k = jax.tree_util.keystr(path)
        if "head_mean" in k:
            return jax.device_put(mean.astype(x.dtype), x.sharding)
        if "head_scale" in k:
            return jax.device_put(inv.astype(x.dtype), x.sharding)
        return x

    engine.trainable = jax.tree_util.tree_map_with_path(put, engine.trainable)


def val_prauc(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    from leader_jax.metrics import ranking_metrics
    ap, _ = ranking_metrics(y_true, y_prob)
    return float(np.mean(ap))


# ----------------------------------------------------------------------------------------- training
def check_config(cfg: ConfigDict) -> None:
    if not cfg.data_dir:
        raise UserError("set --config.data_dir=PREPARED (a folder written by python -m leader_jax.data.prepare)")
    if not cfg.get("out"):
        raise UserError("set --out RUN (the run folder)")
    tr = cfg.train
    for k in ("steps", "micro_batch", "accum"):
        if int(tr[k]) <= 0:
            raise UserError(f"train.{k} must be positive, got {tr[k]}")


def train(cfg: ConfigDict) -> dict[str, Any]:
    """Run stage 2 in `cfg.out`; returns the summary dict."""
    check_config(cfg)
    run, prepared = common.start_run(cfg)
    mesh = common.make_mesh(cfg)
    tok = common.load_tokenizer(tokenizer_path(cfg))
    special = tdata.SpecialIds.from_tokenizer(tok)
    train_enc = encode_split(cfg, prepared, "train", tok, special)
    val_enc = encode_split(cfg, prepared, "val", tok, special)

    tr = cfg.train
    try:
        shd.check_batch_size("train.micro_batch", tr.micro_batch, mesh)
        shd.check_batch_size("eval.batch_size", cfg.eval.batch_size, mesh)
    except ValueError as e:
        raise UserError(str(e)) from None
    teacher = build_teacher(cfg, prepared.vocab.n_med, mesh)
    try:
        tx, schedule = make_optimizer(ConfigDict({**tr.optim.to_dict(), "total_steps": tr.steps}))
    except ValueError as e:
        raise UserError(f"train.optim / train.steps: {e}") from None
    engine = Engine(teacher, trainable_filter(cfg), tx, mesh, teacher_loss,
                    frozen_dtype=cfg.model.frozen_dtype, predict_fn=teacher_predict,
                    tx_key=json.dumps({**tr.optim.to_dict(), "steps": tr.steps}, sort_keys=True))
    ckpt = Checkpointer(run / "checkpoints", max_to_keep=2)
    best = Checkpointer(run / "best", max_to_keep=1)
    best_val, best_step = -1.0, -1
    if tr.resume and ckpt.latest_step() is not None:
        meta = engine.restore(ckpt)
        best_val, best_step = float(meta.get("best_val", -1.0)), int(meta.get("best_step", -1))
    if cfg.model.get("head_norm", False) and engine.step == 0:
        set_head_stats(engine, train_enc, int(cfg.eval.batch_size))
    log = common.open_log(run, engine.step)
    info = {"n_trainable": engine.n_trainable(), "n_frozen": engine.n_frozen(), **common.mesh_info(mesh),
            "n_train": len(train_enc), "n_val": len(val_enc),
            "train_truncated": train_enc.n_truncated, "val_truncated": val_enc.n_truncated,
            "train_history_dropped": train_enc.n_history_dropped,
            "train_dropped_overlong": len(train_enc.dropped_ids)}
    eval_bs = int(cfg.eval.batch_size)

    timer, t_start = StepTimer(), time.perf_counter()
    stop = int(tr.stop_after) if tr.get("stop_after") else None
    bar = progress(total=tr.steps, initial=engine.step, desc="teacher", unit="step",
                   disable=None if distributed.is_main_process() else True)
    while engine.step < tr.steps:
        if stop is not None and engine.step >= stop:
            break                                              # simulated kill (tests)
        step = engine.step
        batch, n_tok = tdata.train_batch(train_enc, step, tr.accum, tr.micro_batch, cfg.seed, mesh)
        m = engine.train_step(batch)
        rec = {"step": engine.step, "loss": m["loss"], "grad_norm": m["grad_norm"],
               "lr": float(schedule(step)), **timer.lap(n_tok),
               "data_position": engine.step * tr.accum * tr.micro_batch}
        if tr.eval_every and (engine.step % tr.eval_every == 0 or engine.step == tr.steps):
            probs, _ = predict_split(engine, val_enc, eval_bs, desc="val")
            rec["val_prauc"] = val_prauc(val_enc.labels, probs)
            if rec["val_prauc"] > best_val:
                best_val, best_step = rec["val_prauc"], engine.step
                best.save(engine.step, engine.trainable, None, {"step": engine.step, "val_prauc": best_val})
            timer.lap(0)                                       # do not bill validation to the next step
        log.log(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.4f}")
        if (tr.ckpt_every and engine.step % tr.ckpt_every == 0) or engine.step == tr.steps:
            engine.save(ckpt, {"best_val": best_val, "best_step": best_step,
                               "data_position": engine.step * tr.accum * tr.micro_batch})
    bar.close()
    train_time = time.perf_counter() - t_start
    summary = {**info, "steps_done": engine.step, "train_seconds_this_run": train_time,
               "best_step": best_step, "best_val_prauc": best_val}
    if engine.step < tr.steps:                                 # stopped early (stop_after)
        common.write_json(run / "summary.json", {**summary, "finished": False})
        return summary

    # ---- final: best weights (D13) -> adapters, head, predictions
    if best_step > 0:
        tr_best, _, _ = best.restore(best_step, jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), engine.trainable))
        engine.trainable = tr_best
    finish(cfg, engine, prepared, tok, special, run, summary)
    return summary


def finish(cfg, engine: Engine, prepared, tok, special, run: Path, summary: dict) -> None:
    host = distributed.host_copy(engine.trainable)           # collective: every process calls it
    model = nnx.merge(engine.graphdef_eval, host, engine.keys, engine.frozen)
    if distributed.is_main_process():
        if cfg.lora.task.rank > 0:
            lora.save_adapter(model.llama, "task", run / "adapters" / "task",
                              base_model_name_or_path=str(cfg.model.path))
        if cfg.lora.domain_path and cfg.lora.domain_trainable:
            lora.save_adapter(model.llama, "domain", run / "adapters" / "domain",
                              base_model_name_or_path=str(cfg.model.path))
        from leader_jax.io import atomic_save_npy
        atomic_save_npy(run / "head.npy", np.asarray(jax.device_get(model.head[...])))
    from leader_jax.eval import write_predictions

    for split in cfg.eval.splits:
        enc = encode_split(cfg, prepared, split, tok, special)
        probs, _ = predict_split(engine, enc, int(cfg.eval.batch_size), desc=split)
        if distributed.is_main_process():
            write_predictions(run, split, ids=enc.sample_ids, y_true=enc.labels, y_prob=probs,
                              single_visit=enc.single_visit)
        summary[f"{split}_prauc"] = val_prauc(enc.labels, probs)
        summary[f"{split}_truncated"] = enc.n_truncated
    common.write_json(run / "run.json", {"data_dir": str(Path(cfg.data_dir).absolute()), "model": "teacher",
                                         "config": cfg.get("config_name", ""), "best_step": summary["best_step"],
                                         "checkpoint": str((run / "best").absolute())})
    common.write_json(run / "summary.json", {**summary, "finished": True})


def main(cfg: ConfigDict, argv: list[str]) -> None:
    s = train(cfg)
    if distributed.is_main_process():
        print(json.dumps({k: s[k] for k in s if k.endswith("prauc") or k in ("steps_done", "best_step")}))


if __name__ == "__main__":
    from leader_jax import cli
    cli.run(main, "teacher_tiny.py")
