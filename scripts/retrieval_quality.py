"""Retrieval quality of a teacher run's neighbours, measured directly on a split (labels used only here).

For a `fixed` run: the top-k of its saved pools. For a `joint` run: the top-k of the same pools ranked by
its trained re-ranker (best checkpoint), next to the pools' own order (= the B0 ranking before joint
training). Prints one JSON line per ranking with `retrieval.quality.neighbour_quality`'s fields.

    PYTHONPATH=. .venv/bin/python scripts/retrieval_quality.py --run RUN [--split val] [--checkpoint best]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import optax


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="teacher run folder (retrieval.mode fixed or joint)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--checkpoint", default="best", choices=("best", "last"))
    a = ap.parse_args()

    from leader_jax.cli import UserError
    from leader_jax.data.dataset import PreparedData
    from leader_jax.retrieval.quality import neighbour_quality
    from leader_jax.retrieval.run_prompts import RunRetrieval
    from leader_jax.train import common, text_batches as tdata
    from leader_jax.train.engine import Engine, _abstract
    from leader_jax.train.extract_features import load_teacher_run
    from leader_jax.train.teacher import (build_teacher, eval_max_len, teacher_loss, tokenizer_path,
                                          trainable_filter)

    run = Path(a.run)
    tcfg, ckpt, info = load_teacher_run(run, a.checkpoint, (1, 1, 1))
    if tcfg.retrieval.mode == "none":
        raise UserError(f"{run}: retrieval.mode is none; nothing to measure")
    data = PreparedData.load(tcfg.data_dir)
    samples = data.splits[a.split]
    retr = RunRetrieval.for_run(tcfg.retrieval, run, data.vocab, fingerprint=data.fingerprint(), write=False)
    pools = retr.split_pools(samples, a.split)
    truth = [s.target.medications for s in samples]
    k = int(tcfg.retrieval.k)
    out = {"run": str(run), "split": a.split, "mode": tcfg.retrieval.mode,
           "similarity": tcfg.retrieval.similarity, "k": k}
    print(json.dumps({**out, "ranking": "pool order (B0)", **neighbour_quality(retr.memory, pools.top(k), truth)}))
    if tcfg.retrieval.mode != "joint":
        return
    mesh = common.make_mesh(tcfg)
    engine = Engine(build_teacher(tcfg, data.vocab.n_med, mesh, vocab=data.vocab), trainable_filter(tcfg),
                    optax.identity(), mesh, teacher_loss)
    engine.trainable, _, _ = ckpt.restore(info["step"], _abstract(engine.trainable))
    retr.follow(engine)
    tok = common.load_run_tokenizer(tokenizer_path(tcfg), run)
    parts = retr.parts(samples, a.split, tok, tdata.SpecialIds.from_tokenizer(tok), eval_max_len(tcfg),
                       max_history=int(tcfg.data.max_history), profile=bool(tcfg.data.profile), labels=None,
                       overlong="error")
    if len(parts.sample_ids) != len(samples):
        raise UserError(f"{len(samples) - len(parts.sample_ids)} {a.split} samples did not fit eval_max_len")
    pos, ok = retr.ranker.top_k(parts.inputs, k)
    rows = np.where(ok, np.take_along_axis(parts.pool, pos, axis=1), -1)
    moved = int((pos != np.arange(k)).any(axis=1).sum())
    print(json.dumps({**out, "ranking": f"joint re-ranker (step {info['step']})", "rows_reordered": moved,
                      **neighbour_quality(retr.memory, rows, truth)}))


if __name__ == "__main__":
    main()
