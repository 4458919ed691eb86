"""Upper-layer LoRA with the frozen lower layers run once per sample (a training-time cache).

When every trained weight (task adapter, drug head) sits in layers >= K and the layers below K are frozen
and deterministic (a frozen domain adapter there is fine, with dropout 0), the activations after layer
K-1 depend only on the tokens. `PrefixCache` computes them once per sample and keeps them on the host
(ragged: [length, D] per sample); training steps and validation then run only layers K.. on them. The
loss and gradients equal the full model's (tests compare them to 1e-5); only the cost changes: a sample's
lower layers run once (the first time it is drawn), and validation skips them after its first pass.

Built from the model's public pieces (`embed_tokens`, `layers`, `norm`, `llama.rope_cos_sin`, the remat
policies); the layers must be a list (`scan_layers=False`, which LoRA needs anyway). The step functions
are frozen dataclasses keyed by K, so equal settings share one compiled step.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from leader_jax import sharding as shd
from leader_jax.models.llama import REMAT_POLICIES, Llama, rope_cos_sin, to_dtype


def run_layers(llama: Llama, h, attention_mask, start: int, stop: int):
    """Decoder layers [start, stop) of `llama` on hidden states `h` [B, T, D] (right padding), with the
    model's remat policy."""
    c = llama.config
    if c.scan_layers:
        raise ValueError("the frozen-prefix cache needs scan_layers=False (a list of layers)")
    t = h.shape[1]
    lengths = jnp.maximum(jnp.sum(attention_mask.astype(jnp.int32), axis=-1), 1)
    cos, sin = rope_cos_sin(c, jnp.arange(t), to_dtype(c.dtype))
    policy_fn = REMAT_POLICIES[c.remat]
    for i in range(start, stop):
        layer = llama.layers[i]
        if policy_fn is None:
            h = layer(h, cos, sin, lengths)
        else:
            graphdef, state = nnx.split(layer)
            h = jax.checkpoint(lambda st, x, g=graphdef: nnx.merge(g, st)(x, cos, sin, lengths),
                               policy=policy_fn())(state, h)
    return h


def prefix_hidden(llama: Llama, input_ids, attention_mask, k: int):
    """Activations after layer k-1 (the embeddings for k = 0), [B, T, D] in the compute dtype."""
    h = shd.with_logical_constraint(llama.embed_tokens(input_ids), ("batch", "length", "act_embed"))
    return run_layers(llama, h, attention_mask, 0, k)


def upper_hidden(llama: Llama, hidden, attention_mask, k: int):
    """Final-norm hidden states from the activations after layer k-1: layers k.. then the final norm."""
    h = shd.with_logical_constraint(hidden.astype(to_dtype(llama.config.dtype)), ("batch", "length", "act_embed"))
    return llama.norm(run_layers(llama, h, attention_mask, k, llama.config.num_hidden_layers))


def _llama(model) -> Llama:
    """The LLaMA of a teacher (`model.llama`) or the LLaMA itself (stage 1)."""
    return model.llama if hasattr(model, "llama") else model


@dataclasses.dataclass(frozen=True)
class PrefixFn:
    """Predict function: teacher or LLaMA -> activations after layer k-1 (float32) of a token batch."""
    k: int

    def __call__(self, model, batch):
        return prefix_hidden(_llama(model), batch["input_ids"], batch["attention_mask"],
                             self.k).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class UpperLMLoss:
    """Stage-1 causal-LM loss of a LLaMA on cached activations (targets from `batch["input_ids"]`)."""
    k: int

    def __call__(self, model, batch):
        from leader_jax.models.teacher import causal_lm_loss
        mask = batch["attention_mask"]
        loss, _ = causal_lm_loss(model.logits(upper_hidden(model, batch["hidden"], mask, self.k)),
                                 batch["input_ids"], mask)
        return loss, {}


@dataclasses.dataclass(frozen=True)
class UpperLMNll:
    """Per-row (sum of next-token NLL, number of targets) of a LLaMA on cached activations."""
    k: int

    def __call__(self, model, batch):
        import optax
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = model.logits(upper_hidden(model, batch["hidden"], mask, self.k))
        nll = optax.losses.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
        w = mask[:, 1:].astype(jnp.float32)
        return jnp.sum(nll * w, axis=1), jnp.sum(w, axis=1)


@dataclasses.dataclass(frozen=True)
class UpperLoss:
    """Stage-2 loss (mean sigmoid BCE) of a teacher on cached activations (`batch["hidden"]`)."""
    k: int

    def __call__(self, model, batch):
        from leader_jax.models.teacher import bce_loss
        logits, _ = model.from_hidden(upper_hidden(model.llama, batch["hidden"], batch["attention_mask"], self.k),
                                      batch["attention_mask"], batch.get("pool_skip"))
        return bce_loss(logits, batch["labels"]), {}


@dataclasses.dataclass(frozen=True)
class UpperPredict:
    """(probabilities, pooled state) of a teacher on cached activations."""
    k: int

    def __call__(self, model, batch):
        logits, pooled = model.from_hidden(
            upper_hidden(model.llama, batch["hidden"], batch["attention_mask"], self.k), batch["attention_mask"],
            batch.get("pool_skip"))
        return jax.nn.sigmoid(logits), pooled


class PrefixCache:
    """Activations after layer K-1 of the rows of an encoded split, computed the first time a row is
    needed (so a run shorter than an epoch pays no more than the plain path) and kept on the host as one
    float32 array of all real tokens ([sum(lengths), D]) with per-row offsets.

    `ensure(rows)` computes the missing rows in evaluation batches (`text_batches.eval_batches`: bucketed,
    fixed batch size, every process runs the same batches); `rows(rows, t)` returns them zero-padded to t.
    Every process must call `ensure` with the same (global) rows."""

    def __init__(self, engine, enc, k: int, batch_size: int, *, buckets=None, stats=None,
                 desc: str = "frozen prefix"):
        self.engine, self.enc, self.k, self.batch_size = engine, enc, int(k), int(batch_size)
        self.buckets, self.stats, self.desc = buckets, stats, desc
        self.lengths = np.asarray(enc.lengths, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.dim = int(_llama(engine.model()).config.hidden_size)
        self.flat = np.zeros((int(self.lengths.sum()), self.dim), np.float32)
        self.have = np.zeros((len(self.lengths),), bool)
        self.seconds = 0.0

    @property
    def nbytes(self) -> int:
        return int(self.flat.nbytes)

    def info(self) -> dict:
        return {"rows": int(self.have.sum()), "of": len(self.have), "seconds": round(self.seconds, 2),
                "mb": round(self.nbytes / 2**20, 1)}

    def ensure(self, rows) -> None:
        """Compute the rows not cached yet (dropout off)."""
        import time

        from jax.experimental import multihost_utils

        from leader_jax.io import progress
        from leader_jax.train.text_batches import eval_batches

        missing = np.unique(np.asarray(rows).ravel())
        missing = missing[~self.have[missing]]
        if not len(missing):
            return
        t0 = time.perf_counter()
        sub = self.enc.subset(missing)
        fn = PrefixFn(self.k)
        batches = eval_batches(sub, self.batch_size, self.engine.mesh, buckets=self.buckets, stats=self.stats)
        if len(missing) > self.batch_size:
            batches = progress(batches, desc=self.desc, total=-(-len(missing) // self.batch_size), unit="batch")
        for sel, batch in batches:
            out = self.engine.predict(batch, fn=fn)
            if jax.process_count() > 1:
                out = multihost_utils.process_allgather(out, tiled=True)
            out = np.asarray(out)
            for j, r in enumerate(missing[sel]):
                self.flat[self.offsets[r]:self.offsets[r + 1]] = out[j, :self.lengths[r]]
            self.have[missing[sel]] = True
        self.seconds += time.perf_counter() - t0

    def rows(self, rows, t: int) -> np.ndarray:
        """float32 [len(rows), t, D]: each row's cached activations, zero-padded to t (computed if needed)."""
        rows = np.asarray(rows).ravel()
        self.ensure(rows)
        out = np.zeros((len(rows), t, self.dim), np.float32)
        for j, r in enumerate(rows):
            n = min(int(self.lengths[r]), t)
            out[j, :n] = self.flat[self.offsets[r]:self.offsets[r] + n]
        return out
