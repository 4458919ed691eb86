"""LEADER(T): LLaMA (+ LoRA adapters) with a bias-free drug head on the last real token.

The prompt is `BOS + prompt + EOS`, right-padded; the pooled feature is the final-RMSNorm hidden state at
index `length - 1` (the EOS), taken from explicit lengths (never from padding); `pool="mean"` averages every
real token instead, `pool="query"` every real token outside a per-row skipped span (the retrieved neighbours'
block: attended to, not averaged in, so the pooled state stays the query's own). The head maps it to
`n_med` logits; the loss is mean sigmoid BCE over batch x drugs (optax). The pooled state (after every
adapter's delta) is also what the feature store keeps for distillation.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from leader_jax.models.llama import Llama, pool_last


POOLS = ("last", "mean", "query")


def pool_weights(attention_mask, skip=None):
    """float32 [B, T]: 1 on the real tokens averaged by the mean poolings, 0 elsewhere; `skip` [B, 2]
    (optional) removes each row's token span [start, end)."""
    m = attention_mask.astype(jnp.float32)
    if skip is None:
        return m
    pos = jnp.arange(m.shape[-1])
    inside = (pos >= skip[..., :1]) & (pos < skip[..., 1:])
    return jnp.where(inside, 0.0, m)


class HeadParam(nnx.Param):
    """Drug-head weights: always trained in stage 2, saved together with the task adapter."""


class HeadStats(HeadParam):
    """Fixed standardisation of the pooled state before the head (`model.head_norm`, CPU models): set
    once from the training split at the start of stage 2, never updated (stop_gradient), saved with the
    head. Typed as a head parameter so it is checkpointed and restored with it. With `head_norm` the head
    also has a bias (`head_bias`, a trained HeadParam) started at the logit of each drug's training prior."""


class Teacher(nnx.Module):
    """`teacher(ids, mask, skip=None)` -> (logits fp32 [B, n_med], pooled hidden fp32 [B, D]).

    `skip` int32 [B, 2]: per row the token span [start, end) that `pool="query"` leaves out of the mean
    (None or an empty span: the mean over every real token). The other poolings ignore it."""

    def __init__(self, llama: Llama, n_med: int, *, rngs: nnx.Rngs, std: float = 0.02, pool: str = "last",
                 head_norm: bool = False):
        if pool not in POOLS:
            raise ValueError(f"pool={pool!r}; expected last (the paper: EOS state) | mean (over real tokens) | "
                             f"query (over real tokens outside the neighbour block)")
        self.pool = pool
        self.llama = llama
        d = llama.config.hidden_size
        self.head = HeadParam(std * jax.random.normal(rngs.params(), (d, n_med), jnp.float32),
                              out_sharding=("embed", "labels"))
        self.n_med = int(n_med)
        self.head_norm = bool(head_norm)
        if self.head_norm:
            self.head_mean = HeadStats(jnp.zeros((d,), jnp.float32), out_sharding=(None,))
            self.head_scale = HeadStats(jnp.ones((d,), jnp.float32), out_sharding=(None,))
            # centring removes the mean direction a bias-free head uses as its bias: give it one back
            # (set to the logit of each drug's training prior with the statistics, then trained)
            self.head_bias = HeadParam(jnp.zeros((n_med,), jnp.float32), out_sharding=("labels",))

    def __call__(self, input_ids, attention_mask, skip=None):
        return self.from_hidden(self.llama.hidden_states(input_ids, attention_mask), attention_mask, skip)

    def from_hidden(self, hidden, attention_mask, skip=None):
        """(logits, pooled) from final-norm hidden states [B, T, D] (e.g. `frozen_prefix.upper_hidden`)."""
        if self.pool == "last":
            pooled = pool_last(hidden, attention_mask).astype(jnp.float32)
        else:
            m = pool_weights(attention_mask, skip if self.pool == "query" else None)[..., None]
            pooled = jnp.sum(hidden.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
        feats = pooled
        if self.head_norm:
            feats = (pooled - jax.lax.stop_gradient(self.head_mean[...])) * jax.lax.stop_gradient(
                self.head_scale[...])
        logits = feats @ self.head[...]
        if self.head_norm:
            logits = logits + self.head_bias[...]
        return logits, pooled


def forward(model: Teacher, batch: dict):
    """`model` on a batch's tokens; the batch's skipped spans (`pool_skip`, retrieval prompts only) go to the
    pooling."""
    return model(batch["input_ids"], batch["attention_mask"], batch.get("pool_skip"))


def bce_loss(logits, labels):
    """Mean sigmoid binary cross-entropy over batch x drugs (the original's BCEWithLogits)."""
    return jnp.mean(optax.losses.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype)))


def causal_lm_loss(logits, input_ids, attention_mask):
    """Next-token NLL averaged over real (non-pad) target tokens; returns (loss, n_tokens)."""
    targets = input_ids[:, 1:]
    weights = attention_mask[:, 1:].astype(jnp.float32)
    nll = optax.losses.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), targets)
    n = jnp.sum(weights)
    return jnp.sum(nll * weights) / jnp.maximum(n, 1.0), n
