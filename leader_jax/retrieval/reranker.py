"""B1: the trainable re-ranker of the joint mode and its losses (JMLR-style joint retrieval training).

Scorer (`Reranker`): one embedding table over a joint code space (diagnoses, procedures, drugs: no two
kinds share a row; row 0 = padding); the query bag is the query visit's diagnoses + procedures, a
candidate bag its diagnoses + procedures + drugs (the memory's drugs are training data, never the query's
labels); masked means q, c → MLP([q ⊙ c, |q − c|]) → scalar, plus `prior_weight` × the candidate's B0
similarity standardised within its pool. The output layer is small at init, so the first ranking is the B0
ranking; it has no bias (a constant shift changes no ranking and would get no gradient). Every parameter
carries logical axis names (leader_jax.sharding).

Training step (wired by the teacher trainer): per example, sample m candidates from softmax(score / γ)
(`sample_candidates`, Gumbel top-m), compute the teacher's loss with each candidate alone under
stop_gradient (`candidate_losses`), and add λ × `retriever_loss` (RankNet on score differences with labels
1[loss_j > loss_i], dropping near-ties, or the REPLUG KL) to the teacher's loss with the top-k neighbours
(`select_top_k`: no gradient reaches the re-ranker through the teacher path). The re-ranker has its own
optimizer (`make_optimizer`) at a smaller learning rate; it holds every re-ranker parameter.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from leader_jax.data.dataset import Vocab
from leader_jax.retrieval.memory import Memory, Queries

_NEG = -1e9       # masked logits (finite, so masked rows stay NaN-free)


# ------------------------------------------------------------------------------------------ inputs
@dataclasses.dataclass(frozen=True)
class CodeSpace:
    """Joint id space: 0 = padding, then diagnoses, procedures, drugs (offsets from the prepared vocab)."""
    index: dict

    @classmethod
    def from_vocab(cls, vocab: Vocab) -> "CodeSpace":
        toks = list(vocab.diag) + list(vocab.proc) + list(vocab.med)
        return cls({t: i + 1 for i, t in enumerate(toks)})

    @property
    def size(self) -> int:
        return len(self.index) + 1

    def bags(self, token_lists: Sequence[Sequence[str]], width: int | None = None) -> np.ndarray:
        """int32 [n, width]: the ids of each token list (codes outside the vocabulary are left out),
        0-padded; width = the longest list when None."""
        ids = [[self.index[t] for t in toks if t in self.index] for toks in token_lists]
        width = max([len(r) for r in ids] + [1]) if width is None else width
        out = np.zeros((len(ids), width), np.int32)
        for r, row in enumerate(ids):
            row = row[:width]
            out[r, :len(row)] = row
        return out


def standardised_prior(scores: np.ndarray) -> np.ndarray:
    """float32 [n, P]: each pool's B0 scores as z-scores over its valid (finite) entries; 0 elsewhere."""
    s = np.asarray(scores, np.float64)
    valid = np.isfinite(s)
    cnt = np.maximum(valid.sum(1, keepdims=True), 1)
    mean = np.where(valid, s, 0.0).sum(1, keepdims=True) / cnt
    var = np.where(valid, (s - mean) ** 2, 0.0).sum(1, keepdims=True) / cnt
    z = (s - mean) / np.maximum(np.sqrt(var), 1e-6)
    return np.where(valid, z, 0.0).astype(np.float32)


def rerank_inputs(space: CodeSpace, memory: Memory, queries: Queries, indices: np.ndarray,
                  scores: np.ndarray) -> dict:
    """Host arrays of a whole split, from its candidate pools (`indices`/`scores` [n, P], -1 = empty):
    query [n, Lq], pool [n, P] (memory rows; an empty slot points at the all-padding last row of
    memory_bags), memory_bags [M + 1, Lc], prior [n, P], valid [n, P]. `batch_inputs` slices a batch."""
    mem_bags = space.bags([memory.diagnoses[i] + memory.procedures[i] + memory.medications[i]
                           for i in range(len(memory))])
    mem_bags = np.concatenate([mem_bags, np.zeros((1, mem_bags.shape[1]), np.int32)])
    indices = np.asarray(indices)
    return {"query": space.bags(queries.tokens), "pool": np.where(indices >= 0, indices, len(memory)),
            "memory_bags": mem_bags, "prior": standardised_prior(scores), "valid": indices >= 0}


def batch_inputs(inputs: dict, rows: np.ndarray) -> dict:
    """The re-ranker's arguments for `rows`: query [B, Lq], candidates [B, P, Lc], prior, valid [B, P]."""
    rows = np.asarray(rows)
    return {"query": inputs["query"][rows], "candidates": inputs["memory_bags"][inputs["pool"][rows]],
            "prior": inputs["prior"][rows], "valid": inputs["valid"][rows]}


# ------------------------------------------------------------------------------------------ model
class Reranker(nnx.Module):
    """`reranker(query [B, Lq], candidates [B, P, Lc], prior [B, P])` -> scores fp32 [B, P]."""

    def __init__(self, n_codes: int, d: int, hidden: int, *, rng: np.random.Generator):
        table = (0.1 * rng.standard_normal((n_codes, d))).astype(np.float32)
        table[0] = 0.0
        self.table = nnx.Param(table, out_sharding=("vocab", "embed"))
        b = 1.0 / np.sqrt(2 * d)
        self.w1 = nnx.Param(rng.uniform(-b, b, (2 * d, hidden)).astype(np.float32), out_sharding=("embed", "mlp"))
        self.b1 = nnx.Param(np.zeros((hidden,), np.float32), out_sharding=("mlp",))
        self.w2 = nnx.Param((0.01 * rng.standard_normal((hidden, 1))).astype(np.float32),
                            out_sharding=("mlp", None))
        self.prior_weight = nnx.Param(np.ones((1,), np.float32), out_sharding=(None,))

    def bag(self, ids):
        mask = (ids > 0).astype(jnp.float32)[..., None]
        e = jnp.take(self.table[...], ids, axis=0)
        return jnp.sum(e * mask, axis=-2) / jnp.maximum(jnp.sum(mask, axis=-2), 1.0)

    def __call__(self, query, candidates, prior):
        q = self.bag(query)[:, None, :]                      # [B, 1, d]
        c = self.bag(candidates)                             # [B, P, d]
        h = jax.nn.relu(jnp.concatenate([q * c, jnp.abs(q - c)], axis=-1) @ self.w1[...] + self.b1[...])
        return (h @ self.w2[...])[..., 0] + self.prior_weight[...] * prior


def build_reranker(n_codes: int, d: int, hidden: int, seed: int = 0) -> Reranker:
    """Build under the caller's mesh/rules context (leader_jax.sharding.use_mesh); numpy init, per seed."""
    return Reranker(n_codes, d, hidden, rng=np.random.default_rng(seed))


def make_optimizer(model: Reranker, lr: float) -> nnx.Optimizer:
    """The re-ranker's own Adam at `lr`, over every nnx.Param of the re-ranker."""
    return nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)


# ------------------------------------------------------------------------------------------ selection
def sample_candidates(key, scores, valid, m: int, gamma: float):
    """(positions int32 [B, m], picked_valid bool [B, m]): m pool positions per row drawn without
    replacement from softmax(score / γ) over the valid entries (Gumbel top-m); no gradient."""
    s = jax.lax.stop_gradient(scores)
    g = jax.random.gumbel(key, s.shape, jnp.float32)
    _, pos = jax.lax.top_k(jnp.where(valid, s / gamma + g, _NEG), m)
    return pos, jnp.take_along_axis(valid, pos, axis=1)


def select_top_k(scores, valid, k: int):
    """(positions [B, k], picked_valid [B, k]): the k best valid pool positions (ties: lower position).
    The choice is discrete and under stop_gradient: the teacher's loss never trains the re-ranker."""
    _, pos = jax.lax.top_k(jnp.where(valid, jax.lax.stop_gradient(scores), _NEG), k)
    return pos, jnp.take_along_axis(valid, pos, axis=1)


# ------------------------------------------------------------------------------------------ losses
def candidate_losses(logits, labels):
    """Teacher loss per (example, candidate): drug BCE summed over drugs (the label set's negative
    log-likelihood) from logits [B, m, n_med] and labels [B, n_med]; under stop_gradient."""
    y = jnp.broadcast_to(labels[:, None, :].astype(logits.dtype), logits.shape)
    return jax.lax.stop_gradient(jnp.sum(optax.losses.sigmoid_binary_cross_entropy(logits, y), axis=-1))


def ranknet_loss(scores, losses, valid, margin: float):
    """JMLR's pairwise logistic (RankNet) loss: over pairs i < j of valid candidates whose losses differ
    by more than margin × their mean, −[y log σ(s_i − s_j) + (1 − y) log σ(s_j − s_i)] with
    y = 1[loss_j > loss_i] (candidate i helped the teacher more); mean over kept pairs (0 when none)."""
    L = jax.lax.stop_gradient(losses)
    ds = scores[:, :, None] - scores[:, None, :]              # s_i - s_j
    dl = L[:, None, :] - L[:, :, None]                        # loss_j - loss_i
    m = scores.shape[1]
    upper = jnp.triu(jnp.ones((m, m), bool), k=1)
    mean = 0.5 * (jnp.abs(L[:, :, None]) + jnp.abs(L[:, None, :]))
    keep = upper[None] & valid[:, :, None] & valid[:, None, :] & (jnp.abs(dl) > margin * mean)
    pair = jax.nn.softplus(jnp.where(dl > 0, -ds, ds))
    n = jnp.sum(keep)
    return jnp.sum(jnp.where(keep, pair, 0.0)) / jnp.maximum(n, 1)


def replug_loss(scores, losses, valid, gamma: float, tau: float):
    """REPLUG's KL(P_R ‖ Q): P_R = softmax(score / γ), Q = softmax(−loss / τ), over the valid sampled
    candidates; mean over rows with at least two valid candidates (0 when none)."""
    L = jax.lax.stop_gradient(losses)
    logp = jax.nn.log_softmax(jnp.where(valid, scores / gamma, _NEG), axis=-1)
    logq = jax.nn.log_softmax(jnp.where(valid, -L / tau, _NEG), axis=-1)
    kl = jnp.sum(jnp.where(valid, jnp.exp(logp) * (logp - logq), 0.0), axis=-1)
    rows = jnp.sum(valid, axis=-1) >= 2
    return jnp.sum(jnp.where(rows, kl, 0.0)) / jnp.maximum(jnp.sum(rows), 1)


def retriever_loss(kind: str, scores, losses, valid, *, margin: float, gamma: float, tau: float):
    """`joint.loss` = ranknet | replug."""
    if kind == "ranknet":
        return ranknet_loss(scores, losses, valid, margin)
    if kind == "replug":
        return replug_loss(scores, losses, valid, gamma, tau)
    raise ValueError(f"retriever loss {kind!r}; expected ranknet | replug")
