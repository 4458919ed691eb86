"""Retrieval quality of a trained teacher run, on a prepared split: the drug overlap of the neighbours its
prompts show (`quality.neighbour_quality`; the labels are used only to measure, never to retrieve).

Mode fixed: the top-k of the run's pools. Mode joint: the pools' own order (the B0 ranking the re-ranker
starts from) and the top-k of the run's trained re-ranker (its best checkpoint by default), so one call gives
the before/after of joint training.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def teacher_run_quality(run: str | Path, split: str = "val", checkpoint: str = "best") -> list[dict]:
    """One record per ranking: {ranking, mode, similarity, k, mean_jaccard, union_jaccard, n_queries,
    n_without_neighbours[, step, rows_reordered]}."""
    from leader_jax.cli import UserError
    from leader_jax.data.dataset import PreparedData
    from leader_jax.retrieval.quality import neighbour_quality
    from leader_jax.retrieval.run_prompts import RunRetrieval
    from leader_jax.train import common, text_batches as tdata
    from leader_jax.train.extract_features import load_teacher_run, restored_engine
    from leader_jax.train.teacher import eval_max_len, tokenizer_path

    run = Path(run)
    tcfg, ckpt, info = load_teacher_run(run, checkpoint, (1, 1, 1))
    rcfg = tcfg.retrieval
    if rcfg.mode == "none":
        raise UserError(f"{run}: retrieval.mode is none; there are no neighbours to measure")
    data = PreparedData.load(tcfg.data_dir)
    if split not in data.splits:
        raise UserError(f"split {split!r} not in {tcfg.data_dir} (has {sorted(data.splits)})")
    samples = data.splits[split]
    retr = RunRetrieval.for_run(rcfg, run, data.vocab, fingerprint=data.fingerprint(), write=False)
    pools = retr.split_pools(samples, split)
    truth = [s.target.medications for s in samples]
    k = int(rcfg.k)
    head = {"mode": rcfg.mode, "similarity": rcfg.similarity, "k": k}
    out = [{"ranking": "pool order", **head, **neighbour_quality(retr.memory, pools.top(k), truth)}]
    if rcfg.mode != "joint":
        return out
    retr.follow(restored_engine(tcfg, ckpt, info, common.make_mesh(tcfg), data.vocab))
    tok = common.load_run_tokenizer(tokenizer_path(tcfg), run)
    parts = retr.parts(samples, split, tok, tdata.SpecialIds.from_tokenizer(tok), eval_max_len(tcfg),
                       max_history=int(tcfg.data.max_history), profile=bool(tcfg.data.profile), labels=None,
                       overlong="error")
    pos, ok = retr.ranker.top_k(parts.inputs, k)
    rows = np.where(ok, np.take_along_axis(parts.pool, pos, axis=1), -1)
    out.append({"ranking": "joint re-ranker", **head, "step": int(info["step"]),
                "rows_reordered": int((pos != np.arange(k)).any(axis=1).sum()),
                **neighbour_quality(retr.memory, rows, truth)})
    return out
