"""`python -m leader_jax.train.extract_features --config.run_dir=RUN`: the teacher feature store for distillation.

Rebuilds the teacher of RUN from `RUN/config.json`, restores its best (or last) checkpoint, and runs
sharded inference over every split, writing per sample id the pooled final-norm hidden state (float16)
and the drug probabilities with `leader_jax.feature_store.FeatureStoreWriter` (atomic shards, manifest with
the teacher checkpoint and dataset fingerprints). Every sample is encoded with the evaluation settings
(`data.eval_max_len`, no sample dropped), so the store covers every id of every split. An interrupted
extraction resumes: ids already in a shard are skipped. Batches are padded to the teacher's length
buckets (`data.length_buckets`); `STORE/summary.json` reports the compile count, the padding fraction and
the time. A teacher trained with `retrieval.mode=fixed` is fed the same retrieval prompts as in training
(its `RUN/retrieval/memory.npz`; a split's pools from `RUN/retrieval/<split>.npz`, rebuilt there when
missing or stale); the manifest records the retrieval settings. A `retrieval.mode=joint` teacher ranks
each pool with its restored re-ranker before composing the prompts, as in its training run.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from ml_collections import ConfigDict

from leader_jax.cli import UserError, load_config
from leader_jax.feature_store import FeatureStoreWriter
from leader_jax.io import progress
from leader_jax.retrieval.run_prompts import RunRetrieval
from leader_jax.train import common, text_batches as tdata, distributed
from leader_jax.train.length_buckets import PadStats
from leader_jax.train.engine import Checkpointer, Engine, _abstract
from leader_jax.train.teacher import (build_teacher, encode_split, eval_max_len, predict_split, teacher_loss,
                                      teacher_predict, tokenizer_path, trainable_filter)

CHECKPOINTS = ("best", "last")
POOLING = {"last": "final-norm hidden state at the EOS (last real token)",          # model.pool -> manifest
           "mean": "mean of the final-norm hidden states over the prompt's real tokens",
           "query": "mean of the final-norm hidden states over the prompt's real tokens outside the retrieved "
                    "neighbours' block"}


def validate_config(cfg: ConfigDict) -> None:
    """UserError on a bad extraction config value (the run folder itself is checked when read)."""
    if cfg.checkpoint not in CHECKPOINTS:
        raise UserError(f"checkpoint={cfg.checkpoint!r}; expected {' | '.join(CHECKPOINTS)}")
    for k in ("batch_size", "shard_size"):
        if int(cfg[k]) <= 0:
            raise UserError(f"{k} must be positive, got {cfg[k]}")
    if int(cfg.stop_after_shards) < 0:
        raise UserError(f"stop_after_shards must be >= 0 (0 = off), got {cfg.stop_after_shards}")
    if not cfg.splits:
        raise UserError("splits is empty")


def params_fingerprint(tree) -> str:
    """sha256 over the trained (adapter + head) arrays, in tree order."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        arr = np.asarray(jax.device_get(leaf))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(arr.dtype).encode() + str(arr.shape).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _sub(cfg: ConfigDict, dotted: str) -> dict:
    """The dict holding the last field of `dotted` in cfg (empty when a parent is missing)."""
    node = cfg.to_dict()
    for part in dotted.split(".")[:-1]:
        node = node.get(part, {}) if isinstance(node, dict) else {}
    return node


def load_teacher_run(run: Path, which: str, mesh_shape) -> tuple[ConfigDict, Engine, dict[str, Any]]:
    """(teacher config, inference engine with restored weights, checkpoint info)."""
    cfg_path = run / "config.json"
    if not cfg_path.exists():
        raise UserError(f"{run}: config.json not found (not a teacher run folder?)")
    tcfg = ConfigDict(json.loads(cfg_path.read_text()))
    missing = [f for f in ("data.length_buckets", "lora.task.first_layer", "model.cache_prefix", "model.pool")
               if f.split(".")[-1] not in _sub(tcfg, f)]
    if missing:
        raise UserError(f"{cfg_path}: lacks {', '.join(missing)} (written by an older leader_jax); train the "
                        "teacher again")
    with tcfg.unlocked():
        tcfg.mesh = tuple(mesh_shape)
        if "retrieval" not in tcfg:      # a run saved before retrieval existed had none
            tcfg.retrieval = load_config("retrieval.py")
            tcfg.retrieval.mode = "none"
    if which not in CHECKPOINTS:
        raise UserError(f"checkpoint={which!r}; expected {' | '.join(CHECKPOINTS)}")
    ckpt_dir = run / ("best" if which == "best" else "checkpoints")
    ckpt = Checkpointer(ckpt_dir, max_to_keep=None)     # read only: nothing is pruned
    step = ckpt.latest_step()
    if step is None and which == "best":         # run without validation: the last step is its result
        ckpt, ckpt_dir = Checkpointer(run / "checkpoints", max_to_keep=None), run / "checkpoints"
        step = ckpt.latest_step()
    if step is None:
        raise UserError(f"{run}: no checkpoint in {ckpt_dir} (train the teacher first)")
    return tcfg, ckpt, {"dir": str(ckpt_dir.absolute()), "step": int(step)}


def restored_engine(tcfg: ConfigDict, ckpt: Checkpointer, info: dict[str, Any], mesh, vocab) -> Engine:
    """The run's teacher as an inference engine holding its checkpointed trainable state (`load_teacher_run`)."""
    engine = Engine(build_teacher(tcfg, vocab.n_med, mesh, vocab=vocab), trainable_filter(tcfg), optax.identity(),
                    mesh, teacher_loss, frozen_dtype=tcfg.model.frozen_dtype, predict_fn=teacher_predict)
    engine.trainable, _, _ = ckpt.restore(info["step"], _abstract(engine.trainable))
    return engine


def extract(cfg: ConfigDict) -> dict[str, Any]:
    from leader_jax.data.dataset import PreparedData

    validate_config(cfg)
    if not cfg.run_dir:
        raise UserError("set --config.run_dir=RUN (a teacher run folder)")
    common.setup_distributed(cfg)
    run = Path(cfg.run_dir)
    out = Path(cfg.out) if cfg.out else run / "features"
    mesh = common.make_mesh(cfg)
    tcfg, ckpt, info = load_teacher_run(run, cfg.checkpoint, cfg.mesh)
    try:
        prepared = PreparedData.load(tcfg.data_dir)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise UserError(f"cannot load prepared data {tcfg.data_dir} (from {run}/config.json): {e}") from None
    common.check_batch_sizes(mesh, {"batch_size": cfg.batch_size})
    engine = restored_engine(tcfg, ckpt, info, mesh, prepared.vocab)
    info["params_sha256"] = params_fingerprint(distributed.host_copy(engine.trainable))
    meta = {"teacher_run": str(run.absolute()), "teacher_checkpoint": info,
            "teacher_base": str(tcfg.model.path), "teacher_config": tcfg.config_name,
            "dataset_fingerprint": prepared.fingerprint(), "dataset_dir": str(Path(tcfg.data_dir).absolute()),
            "pooling": POOLING[tcfg.model.pool],
            "eval_max_len": eval_max_len(tcfg)}
    tok = common.load_run_tokenizer(tokenizer_path(tcfg), run)     # RUN/tokenizer for a GGUF base
    special = tdata.SpecialIds.from_tokenizer(tok)
    main = distributed.is_main_process()
    retr = RunRetrieval.for_run(tcfg.retrieval, run, prepared.vocab, fingerprint=prepared.fingerprint(),
                                write=main)
    if retr is not None:                 # (mode none adds nothing: stores written before retrieval still resume)
        meta["retrieval"] = retr.info()
        retr.follow(engine)              # joint: the restored re-ranker ranks the pools
    writer = FeatureStoreWriter(out, hidden_dim=engine.model().llama.config.hidden_size,
                                n_med=prepared.vocab.n_med, meta=meta) if main else None
    shards_written, counts = 0, {}
    buckets = tuple(int(b) for b in tcfg.data.length_buckets) or None
    stats, t0 = PadStats(), time.perf_counter()

    for split in cfg.splits:
        if split not in prepared.splits:
            raise UserError(f"split {split!r} not in the prepared data (has {sorted(prepared.splits)})")
        enc = encode_split(tcfg, prepared, split, tok, special, training=False, retrieval=retr)
        done = writer.done_ids(split) if main else set()
        if jax.process_count() > 1:               # every process must run the same batches
            from jax.experimental import multihost_utils
            flags = np.array([sid in done for sid in enc.sample_ids], dtype=np.int32)
            flags = np.asarray(multihost_utils.broadcast_one_to_all(flags))
            todo = np.flatnonzero(flags == 0)
        else:
            todo = np.array([i for i, sid in enumerate(enc.sample_ids) if sid not in done], dtype=np.int64)
        counts[split] = {"n": len(enc), "skipped_done": len(enc) - len(todo)}
        for start in progress(range(0, len(todo), cfg.shard_size), desc=f"features {split}",
                              total=-(-len(todo) // cfg.shard_size), unit="shard"):
            if cfg.stop_after_shards and shards_written >= cfg.stop_after_shards:
                return {"interrupted": True, "counts": counts, "out": str(out)}
            sub = enc.subset(todo[start:start + cfg.shard_size])
            probs, pooled = predict_split(engine, sub, cfg.batch_size, desc=split, buckets=buckets, stats=stats)
            if main:
                writer.write_shard(split, sub.sample_ids, pooled.astype(np.float16), probs)
            shards_written += 1
    summary = {"interrupted": False, "counts": counts, "out": str(out), "compiles": engine.compiles()["predict"],
               "padding": stats.summary(), "seconds": round(time.perf_counter() - t0, 2)}
    if main:
        writer.finalize()
        common.write_json(out / "summary.json", summary)
    return summary


def main(cfg: ConfigDict, argv: list[str]) -> None:
    res = extract(cfg)
    if distributed.is_main_process():
        print(json.dumps(res))


if __name__ == "__main__":
    from leader_jax import cli
    cli.run(main, "extract_features.py", out_flag=False)
