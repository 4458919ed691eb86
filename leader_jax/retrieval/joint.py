"""B1 wired into the teacher: prompts composed from a re-ranked candidate pool, per step and at inference.

A joint run's teacher carries its `Reranker` as the attribute `reranker` (so the engine trains, checkpoints
and restores it with the adapters and head). Prompts are assembled from separately tokenised parts:
`head` (profile + history) + neighbour sentences + `tail` (current visit + question), with
`render.compose_ids` (neighbours dropped whole, lowest rank first, to fit the budget and max_len). Each
memory visit's sentence is tokenised once. Training, validation, feature extraction and prediction all
compose this way, so a patient gets the same prompt everywhere for the same re-ranker.

Per training step (`JointBatches`, on the host): the step's rows (the same seeded stream as the plain
teacher), their pools scored by the current re-ranker (`Ranker`, one jitted call), the top-k
(`select_top_k`) composed into the teacher's prompts, and m candidates sampled (`sample_candidates`, key
from (retrieval.seed, step): exact resume) composed one neighbour each. `JointLoss` then adds λ × the
retriever loss on the candidates (teacher logits under stop_gradient) to the teacher's BCE on the top-k.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import numpy as np
import optax
from flax import nnx

from leader_jax.models.teacher import bce_loss, forward
from leader_jax.retrieval import render
from leader_jax.retrieval.reranker import (CodeSpace, batch_inputs, build_reranker, candidate_losses,
                                           rerank_inputs, retriever_loss, sample_candidates, select_top_k)

RERANKER = "reranker"          # the teacher's attribute (and state key) holding the re-ranker
RANK_BLOCK = 256               # rows per scoring call at evaluation (fixed shape: one compilation per split)


# ------------------------------------------------------------------------------------------ model
def attach_reranker(teacher: nnx.Module, rcfg, vocab, seed: int) -> None:
    """Give `teacher` its re-ranker (numpy init from `seed`; the caller places the module on the mesh)."""
    j = rcfg.joint
    setattr(teacher, RERANKER, build_reranker(CodeSpace.from_vocab(vocab).size, int(j.d), int(j.hidden), seed))


def is_reranker_path(path) -> bool:
    return bool(path) and getattr(path[0], "key", getattr(path[0], "name", None)) == RERANKER


@functools.lru_cache(maxsize=8)
def joint_tx(teacher_tx: optax.GradientTransformation, lr: float) -> optax.GradientTransformation:
    """Two optimizer groups: the re-ranker's parameters (Adam at `retrieval.joint.lr`, constant) and the
    rest (the teacher's optimizer as configured). Cached: the same object for the same inputs, so
    engines built again share their compiled step."""
    def labels(params):
        return jax.tree_util.tree_map_with_path(lambda p, _: RERANKER if is_reranker_path(p) else "teacher",
                                                params)
    return optax.multi_transform({"teacher": teacher_tx, RERANKER: optax.adam(lr)}, labels)


@dataclasses.dataclass(frozen=True)
class JointLoss:
    """Engine loss of a joint step: teacher BCE on the top-k prompts + λ × retriever loss, where the
    retriever loss compares the re-ranker's scores of the m sampled candidates with the teacher's loss on
    each single-candidate prompt (under stop_gradient: the teacher gets the teacher loss's gradient only)."""
    kind: str
    lam: float
    margin: float
    gamma: float
    tau: float

    @classmethod
    def from_config(cls, rcfg) -> "JointLoss":
        j = rcfg.joint
        return cls(j.loss, float(j.lam), float(j.margin), float(j.gamma), float(j.replug_tau))

    def __call__(self, model, mb: dict):
        logits, _ = forward(model, mb)
        teacher = bce_loss(logits, mb["labels"])
        b, m, t = mb["cand_ids"].shape
        c_logits, _ = model(mb["cand_ids"].reshape(b * m, t), mb["cand_mask"].reshape(b * m, t),
                            mb["cand_skip"].reshape(b * m, 2))
        losses = candidate_losses(c_logits.reshape(b, m, -1), mb["labels"])
        scores = getattr(model, RERANKER)(mb["query"], mb["cand_bags"], mb["cand_prior"])
        retr = retriever_loss(self.kind, scores, losses, mb["cand_valid"], margin=self.margin, gamma=self.gamma,
                              tau=self.tau)
        return teacher + self.lam * retr, {"teacher_loss": teacher, "retriever_loss": retr}


# ------------------------------------------------------------------------------------------ ranking
@functools.lru_cache(maxsize=8)
def _select_fn(graphdef, k: int, m: int, gamma: float):
    def select(state, query, cands, prior, valid, key):
        scores = nnx.merge(graphdef, state)(query, cands, prior)
        top, top_valid = select_top_k(scores, valid, k)
        if not m:
            return top, top_valid
        pos, pos_valid = sample_candidates(key, scores, valid, m, gamma)
        return top, top_valid, pos, pos_valid
    return jax.jit(select)


class Ranker:
    """Ranks pools with the current re-ranker: `state()` returns its parameters (e.g. the engine's
    trainable state under `reranker`), `graphdef` its structure."""

    def __init__(self, graphdef, state):
        self.graphdef, self.state = graphdef, state

    @classmethod
    def of_engine(cls, engine) -> "Ranker":
        return cls(nnx.split(getattr(engine.model(), RERANKER))[0], lambda: engine.trainable[RERANKER])

    def select(self, inputs: dict, rows: np.ndarray, k: int, m: int = 0, gamma: float = 1.0, key=None):
        """Numpy (top [n, k], top_valid [, sampled [n, m], sampled_valid]) for `rows` of a split's
        `rerank_inputs`; `m` > 0 also samples m candidates with `key`."""
        b = batch_inputs(inputs, rows)
        key = jax.random.key(0) if key is None else key
        out = _select_fn(self.graphdef, int(k), int(m), float(gamma))(
            self.state(), b["query"], b["candidates"], b["prior"], b["valid"], key)
        return tuple(np.asarray(x) for x in out)

    def top_k(self, inputs: dict, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions [n, k], valid [n, k]) of every row, scored in fixed-size blocks."""
        n = len(inputs["query"])
        pos, ok = np.zeros((n, k), np.int32), np.zeros((n, k), bool)
        for s in range(0, n, RANK_BLOCK):
            rows = np.arange(s, min(s + RANK_BLOCK, n))
            full = np.concatenate([rows, np.full(RANK_BLOCK - len(rows), rows[0])])
            p, v = self.select(inputs, full, k)
            pos[rows], ok[rows] = p[:len(rows)], v[:len(rows)]
        return pos, ok


# ------------------------------------------------------------------------------------------ prompt parts
@dataclasses.dataclass
class Parts:
    """One split's prompts as separately tokenised parts, and its re-ranker inputs (rows = kept samples)."""
    sample_ids: list[str]
    heads: list[list[int]]            # tokens before the neighbour block (no BOS)
    tails: list[list[int]]            # current visit + question (no EOS)
    pool: np.ndarray                  # int32 [n, P]: memory rows, -1 = empty
    inputs: dict                      # reranker.rerank_inputs of the kept rows
    labels: np.ndarray | None
    single_visit: np.ndarray
    true_drugs: list[frozenset]       # the query's drugs (label overlap of the neighbours, measured only)
    n_truncated: int
    n_history_dropped: int
    dropped_ids: list[str]


def build_parts(samples: Sequence, pools, memory, vocab, tokenizer, special, max_len: int, *, max_history: int,
                profile: bool, labels: np.ndarray | None, overlong: str, split: str) -> Parts:
    """Per sample: the oldest shown history visits dropped until BOS + head + tail + EOS fits `max_len`
    (as `text_batches.encode_samples` does for the plain prompt); a sample whose current visit alone does
    not fit raises (overlong="error") or is left out (overlong="drop")."""
    from leader_jax.data.prompts import build_prompt
    from leader_jax.retrieval.memory import Queries
    from leader_jax.train.text_batches import encode_text

    heads, tails, keep = [], [], []
    n_trunc = n_dropped = 0
    for i, s in enumerate(samples):
        shown = min(max_history, len(s.history))
        for h in range(shown, -1, -1):
            head, tail = render.split_at_current_visit(build_prompt(s, vocab, max_history=h, profile=profile))
            hi, ti = encode_text(tokenizer, head), encode_text(tokenizer, tail)
            if len(hi) + len(ti) + 2 <= max_len:
                break
        else:
            if overlong == "drop":
                continue
            raise ValueError(f"{split or 'data'} sample {s.id!r}: the current visit alone needs "
                             f"{len(hi) + len(ti) + 2} tokens > max_len={max_len}; raise data.eval_max_len / "
                             f"data.max_len (the current visit is never cut)")
        if h < shown:
            n_trunc, n_dropped = n_trunc + 1, n_dropped + shown - h
        heads.append(hi)
        tails.append(ti)
        keep.append(i)
    kept_set = set(keep)
    keep = np.asarray(keep, np.int64)
    kept = [samples[i] for i in keep]
    queries = Queries.from_samples(kept)
    return Parts(sample_ids=[s.id for s in kept], heads=heads, tails=tails, pool=pools.indices[keep],
                 inputs=rerank_inputs(CodeSpace.from_vocab(vocab), memory, queries, pools.indices[keep],
                                      pools.scores[keep]),
                 labels=None if labels is None else labels[keep],
                 single_visit=np.array([s.single_visit for s in kept], dtype=bool),
                 true_drugs=[frozenset(s.target.medications) for s in kept],
                 n_truncated=n_trunc, n_history_dropped=n_dropped,
                 dropped_ids=[s.id for i, s in enumerate(samples) if i not in kept_set])


class Composer:
    """Token ids of composed prompts: BOS + head + neighbours + tail + EOS (`render.compose_ids`)."""

    def __init__(self, neighbour_ids: Sequence[Sequence[int]], special, budget: int):
        self.nb, self.special, self.budget = neighbour_ids, special, int(budget)

    def ids(self, parts: Parts, row: int, memory_rows: Sequence[int], max_len: int) -> list[int]:
        return render.compose_ids(parts.heads[row], [self.nb[int(j)] for j in memory_rows if j >= 0],
                                  parts.tails[row], max_len=max_len, budget=self.budget, bos=self.special.bos,
                                  eos=self.special.eos)

    @staticmethod
    def span(parts: Parts, row: int, toks: Sequence[int]) -> tuple[int, int]:
        """Token span [start, end) of the neighbour block of a composed prompt `toks` ((0, 0): none kept)."""
        start, end = 1 + len(parts.heads[row]), len(toks) - 1 - len(parts.tails[row])     # 1: BOS, EOS
        return (start, end) if end > start else (0, 0)

    def encode(self, parts: Parts, positions: np.ndarray, valid: np.ndarray, max_len: int):
        """`text_batches.Encoded` of every row with the neighbours at pool `positions` [n, k] (best first)."""
        from leader_jax.train.text_batches import Encoded

        n = len(parts.sample_ids)
        ids = np.full((n, max_len), self.special.pad, np.int32)
        lengths = np.zeros((n,), np.int32)
        skip = np.zeros((n, 2), np.int32)
        for r in range(n):
            toks = self.ids(parts, r, np.where(valid[r], parts.pool[r, positions[r]], -1), max_len)
            ids[r, :len(toks)] = toks
            lengths[r] = len(toks)
            skip[r] = self.span(parts, r, toks)
        return Encoded(ids=ids, lengths=lengths, sample_ids=list(parts.sample_ids), labels=parts.labels,
                       single_visit=parts.single_visit, n_truncated=parts.n_truncated,
                       n_history_dropped=parts.n_history_dropped, dropped_ids=list(parts.dropped_ids), skip=skip)


def neighbour_jaccard(parts: Parts, memory_drugs: Sequence[frozenset], rows, memory_rows: np.ndarray) -> float:
    """Mean over `rows` (with at least one neighbour) of the mean Jaccard(neighbour's drugs, query's true
    drugs) over its neighbours (`memory_rows` [len(rows), k], -1 = none); NaN when no row has one."""
    per = []
    for r, mrow in zip(rows, memory_rows):
        q = parts.true_drugs[int(r)]
        js = [len(q & memory_drugs[j]) / max(len(q | memory_drugs[j]), 1) for j in mrow if j >= 0]
        if js:
            per.append(np.mean(js))
    return float(np.mean(per)) if per else float("nan")


# ------------------------------------------------------------------------------------------ training batches
class JointBatches:
    """`batches(step)` -> (sharded batch [accum, micro, ...], real tokens of the top-k prompts); `info`
    holds the step's label overlap of the top-k neighbours (`retriever_jaccard`, measured, not trained)."""

    def __init__(self, parts: Parts, composer: Composer, ranker: Ranker, memory_drugs, rcfg, *, accum: int,
                 micro: int, seed: int, mesh, max_len: int, lengths: Sequence[int], stats=None):
        self.parts, self.composer, self.ranker, self.memory_drugs = parts, composer, ranker, memory_drugs
        self.k, self.m, self.gamma = int(rcfg.k), int(rcfg.joint.m), float(rcfg.joint.gamma)
        self.key = jax.random.key(int(rcfg.seed))
        self.accum, self.micro, self.seed, self.mesh, self.max_len = accum, micro, seed, mesh, int(max_len)
        self.lengths, self.stats, self.info = tuple(sorted(int(x) for x in lengths)), stats, {}

    def _width(self, longest: int) -> int:
        return next(b for b in self.lengths if b >= longest)

    def _pack(self, seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray, int]:
        t = self._width(max(len(s) for s in seqs))
        ids = np.full((len(seqs), t), self.composer.special.pad, np.int32)
        mask = np.zeros((len(seqs), t), np.int32)
        for r, s in enumerate(seqs):
            ids[r, :len(s)], mask[r, :len(s)] = s, 1
        return ids, mask, t

    def __call__(self, step: int) -> tuple[dict, int]:
        from leader_jax.train import distributed
        from leader_jax.train.engine import stacked_batch_sharding
        from leader_jax.train.text_batches import stream_indices

        p, a, mi, m = self.parts, self.accum, self.micro, self.m
        g = a * mi
        rows = stream_indices(len(p.sample_ids), step * g, g, self.seed)
        top, top_ok, pos, pos_ok = self.ranker.select(p.inputs, rows, self.k, m, self.gamma,
                                                      jax.random.fold_in(self.key, step))
        top_mem = np.where(top_ok, np.take_along_axis(p.pool[rows], top, 1), -1)
        cand_mem = np.where(pos_ok, np.take_along_axis(p.pool[rows], pos, 1), -1)
        seqs = [self.composer.ids(p, r, mrow, self.max_len) for r, mrow in zip(rows, top_mem)]
        c_rows = [(r, j) for r, mrow in zip(rows, cand_mem) for j in mrow]
        c_seqs = [self.composer.ids(p, r, [j], self.max_len) for r, j in c_rows]
        ids, mask, t = self._pack(seqs)
        c_ids, c_mask, tc = self._pack(c_seqs)
        skip = np.array([Composer.span(p, r, x) for r, x in zip(rows, seqs)], np.int32).reshape(a, mi, 2)
        c_skip = np.array([Composer.span(p, r, x) for (r, _), x in zip(c_rows, c_seqs)], np.int32)
        b = batch_inputs(p.inputs, rows)
        host = {"input_ids": ids.reshape(a, mi, t), "attention_mask": mask.reshape(a, mi, t), "pool_skip": skip,
                "labels": p.labels[rows].reshape(a, mi, -1),
                "cand_ids": c_ids.reshape(a, mi, m, tc), "cand_mask": c_mask.reshape(a, mi, m, tc),
                "cand_skip": c_skip.reshape(a, mi, m, 2),
                "query": b["query"].reshape(a, mi, -1),
                "cand_bags": np.take_along_axis(b["candidates"], pos[..., None], 1).reshape(a, mi, m, -1),
                "cand_prior": np.take_along_axis(b["prior"], pos, 1).reshape(a, mi, m),
                "cand_valid": pos_ok.reshape(a, mi, m)}
        batch = {}
        for name, x in host.items():
            sh = stacked_batch_sharding(self.mesh, x.ndim)
            local = distributed.local_rows(sh, x.shape, axis=1)
            batch[name] = distributed.global_array(x[:, local], sh, x.shape)
        n_tok = int(mask.sum())
        if self.stats is not None:
            self.stats.add(n_tok, g, t, (a, mi, t))
        self.info = {"retriever_jaccard": neighbour_jaccard(p, self.memory_drugs, rows, top_mem),
                     "cand_tokens": int(c_mask.sum())}
        return batch, n_tok


def memory_drug_sets(memory) -> list[frozenset]:
    return [frozenset(x) for x in memory.medications]


def parts_for(retr: Any, samples, pools, tokenizer, special, max_len: int, **kw) -> Parts:
    """`build_parts` with the memory and vocabulary of a `run_prompts.RunRetrieval`."""
    return build_parts(samples, pools, retr.memory, retr.vocab, tokenizer, special, max_len, **kw)
