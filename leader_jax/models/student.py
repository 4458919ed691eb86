"""LEADER(S): the small code-id student distilled from the teacher's pooled hidden state.

Architecture (the paper's, with the fixes listed in docs/decisions.md):

- separate embedding tables for diagnoses, procedures and drugs (id 0 = padding in each), or with
  `shared_embedding=True` one table whose rows are offset per code type (padding | diagnoses |
  procedures | drugs): either way no two codes share an embedding row (the original's merged table let
  codes of different types collide);
- three code-set encoders (one pre-LN transformer block each, masked mean over the codes of a set);
- one visit encoder shared by the three streams (one block, masked mean over visits), with an
  optional learned recency embedding (`visit_position="recency"`; "none" reproduces the original);
- the drug stream is shifted by one visit: slot 0 holds the profile vector, slot j the drugs of kept
  visit j-1, so the target visit's drugs (the labels) are never an input;
- profile encoder: one embedding per categorical field → concat → linear (a learned vector if the
  dataset has no profile fields);
- head ReLU → Linear(3d, 128) → ReLU → Linear(128, n_med); the 128-d "mediator" (output of the first
  Linear) is projected to the teacher dimension for feature distillation.
- optional neighbour-drug input (`neighbour_input=True`, retrieval mode fixed): the mean multi-hot of
  the drugs of the k retrieved training visits, `nbr` [B, n_med], is projected linearly (no bias) to 3d
  and added to the patient vector before the head's ReLU. Adding keeps the head's shape, lets the bag
  act through the same non-linearity as the three streams, and a sample without neighbours (an all-zero
  bag) is exactly the plain student; with `neighbour_input=False` the model has no such parameter.

Losses (`student_loss`): BCE + α·MSE(proj(mediator), teacher) + w·profile alignment (symmetric InfoNCE
with temperature τ; `align_loss="paper"` leaves the positive out of the denominators as the original).

Everything here is functional: dropout takes an explicit PRNG key (None = deterministic), so a training
step is a pure function of (params, batch, key) that `jax.jit` compiles once per shape bucket. The
trainer uses "rbg" keys: the same determinism as threefry, at a fraction of the compile time.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

ALIGN_LOSSES = ("infonce", "paper")
VISIT_POSITIONS = ("none", "recency")
_NEG = -1e9  # masked attention / contrastive logits (finite, so masked rows stay NaN-free)


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    """Static model shape. `profile_sizes` = number of values per profile field (empty = no profile)."""

    n_diag: int
    n_proc: int
    n_med: int
    profile_sizes: tuple[int, ...] = ()
    teacher_dim: int | None = None     # None: no KD projector (the no-KD ablation)
    d: int = 64
    heads: int = 4
    ffn: int = 300
    head_hidden: int = 128
    max_visits: int = 10
    visit_position: str = "none"
    shared_embedding: bool = False     # one table, per-type row offsets (see Student.stream_offsets)
    neighbour_input: bool = False      # batch["nbr"] [B, n_med]: neighbours' drug bag (retrieval fixed)
    dropout: float = 0.4
    attn_dropout: float = 0.1
    ln_eps: float = 1e-12

    def __post_init__(self):
        if self.d % self.heads:
            raise ValueError(f"student d={self.d} is not divisible by heads={self.heads}")
        if self.visit_position not in VISIT_POSITIONS:
            raise ValueError(f"visit_position must be one of {VISIT_POSITIONS}, got {self.visit_position!r}")
        for name in ("n_diag", "n_proc", "n_med"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")


# ----------------------------------------------------------------------------------------------- layers
class Dense(nnx.Module):
    """x @ kernel + bias with PyTorch's default init U(±1/√fan_in) (as the original student)."""

    def __init__(self, din: int, dout: int, axes: tuple, *, use_bias: bool = True, rng: np.random.Generator):
        b = 1.0 / math.sqrt(din)
        self.kernel = nnx.Param(rng.uniform(-b, b, (din, dout)).astype(np.float32), out_sharding=axes)
        self.bias = (nnx.Param(rng.uniform(-b, b, (dout,)).astype(np.float32), out_sharding=(axes[1],))
                     if use_bias else None)

    def __call__(self, x):
        y = x @ self.kernel[...]
        return y + self.bias[...] if self.bias is not None else y


class Embedding(nnx.Module):
    """Lookup table, N(0, 1) init (PyTorch default), row 0 (padding) zeroed."""

    def __init__(self, n: int, d: int, *, rng: np.random.Generator, pad_row: bool = True):
        table = rng.standard_normal((n, d)).astype(np.float32)
        if pad_row:
            table[0] = 0.0
        self.table = nnx.Param(table, out_sharding=("vocab", "embed"))

    def __call__(self, ids):
        return jnp.take(self.table[...], ids, axis=0)


class LayerNorm(nnx.Module):
    def __init__(self, d: int, eps: float):
        self.scale = nnx.Param(jnp.ones((d,), jnp.float32), out_sharding=("norm",))
        self.bias = nnx.Param(jnp.zeros((d,), jnp.float32), out_sharding=("norm",))
        self.eps = eps

    def __call__(self, x):
        mu = x.mean(-1, keepdims=True)
        var = jnp.square(x - mu).mean(-1, keepdims=True)
        return (x - mu) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]


def _mix32(x):
    """murmur3's 32-bit finaliser: a bijective avalanche hash of uint32 counters."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


class Dropout:
    """Counter-based dropout: one 32-bit seed drawn from `key`, and the keep mask of the i-th call is
    hash(seed, i, element index) < (1 − rate)·2³² — a few integer ops per element instead of a PRNG
    call per mask (on CPU the PRNG masks cost more than the whole forward pass, to run and to compile).
    key None = identity (eval)."""

    def __init__(self, key):
        self.key, self.i = key, 0
        self.seed = None if key is None else jax.random.bits(key, (), jnp.uint32)

    def __call__(self, x, rate: float):
        if self.key is None or rate <= 0.0:
            return x
        self.i += 1
        idx = jax.lax.broadcasted_iota(jnp.uint32, x.shape, 0)
        for axis in range(1, x.ndim):         # row-major element index (wraps mod 2^32: still a bijection)
            idx = idx * jnp.uint32(x.shape[axis]) + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis)
        h = _mix32(idx ^ _mix32(self.seed + jnp.uint32(0x9E3779B9) * jnp.uint32(self.i)))
        keep = h < jnp.uint32(min(int((1.0 - rate) * 2.0 ** 32), 2 ** 32 - 1))
        return jnp.where(keep, x / (1.0 - rate), 0.0)


class TransformerBlock(nnx.Module):
    """G-BERT-style pre-LN block: x + Drop(Attn(LN x)); x + Drop(FFN(LN x)); Drop(x)."""

    def __init__(self, cfg: StudentConfig, *, rng: np.random.Generator):
        d = cfg.d
        self.heads = cfg.heads
        self.ln1 = LayerNorm(d, cfg.ln_eps)
        self.q = Dense(d, d, ("embed", "heads"), use_bias=False, rng=rng)
        self.k = Dense(d, d, ("embed", "heads"), use_bias=False, rng=rng)
        self.v = Dense(d, d, ("embed", "heads"), use_bias=False, rng=rng)
        self.o = Dense(d, d, ("heads", "embed"), rng=rng)
        self.ln2 = LayerNorm(d, cfg.ln_eps)
        self.w1 = Dense(d, cfg.ffn, ("embed", "mlp"), rng=rng)
        self.w2 = Dense(cfg.ffn, d, ("mlp", "embed"), rng=rng)
        self.rate, self.attn_rate = cfg.dropout, cfg.attn_dropout

    def __call__(self, x, mask, drop: Dropout):
        """x [N, L, d], mask [N, L] bool (keys that exist) or [N, L, L] (per query: packed segments)."""
        a = self.attention(self.ln1(x) @ self.qkv_kernel(), mask, drop)
        x = x + drop(a, self.rate)
        f = self.w2(drop(self.ffn_hidden(x), self.rate))
        x = x + drop(f, self.rate)
        return drop(x, self.rate)

    def qkv_kernel(self):
        """[d, 3d] = Wq | Wk | Wv: one fused matmul instead of three."""
        return jnp.concatenate([self.q.kernel[...], self.k.kernel[...], self.v.kernel[...]], axis=1)

    def attention(self, qkv, mask, drop: Dropout):
        """O(softmax(QK^T/√hd) V) for qkv = LN1(x) @ qkv_kernel() [N, L, 3d]; mask as in __call__."""
        n, length, d3 = qkv.shape
        d = d3 // 3
        hd = d // self.heads
        # heads-first [3, N, H, L, hd]: XLA CPU's batched dots run far faster with the contracted/free
        # dims last than with "nqhd" operands (measured ≈ 1.6×)
        qkv = qkv.reshape(n, length, 3, self.heads, hd).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        s = jnp.einsum("nhqd,nhkd->nhqk", q, k) / math.sqrt(hd)
        s = jnp.where(mask[:, None, None, :] if mask.ndim == 2 else mask[:, None, :, :], s, _NEG)
        p = drop(jax.nn.softmax(s, axis=-1), self.attn_rate)
        return self.o(jnp.einsum("nhqk,nhkd->nhqd", p, v).transpose(0, 2, 1, 3).reshape(n, length, d))

    def ffn_hidden(self, x):
        """GELU(W1 · LN2(x) + b1) [N, L, ffn] (before dropout and W2)."""
        return jax.nn.gelu(self.w1(self.ln2(x)), approximate=True)


def segment_mask(seg):
    """[N, L] segment numbers (0 = pad) → [N, L, L]: query i may attend key j iff same non-zero segment."""
    return (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)


def masked_mean(x, mask, axis: int):
    """Mean of x over `axis` where mask is True (count clamped to >= 1, so empty sets give 0)."""
    m = mask.astype(x.dtype)[..., None]
    return (x * m).sum(axis) / jnp.maximum(m.sum(axis), 1.0)


# ------------------------------------------------------------------------------------------------ model
class Student(nnx.Module):
    """LEADER(S). Inputs (one batch, all int32 unless said):

    diag/proc/med [B, V, C*]: token ids per visit slot (0 = pad), visits oldest → newest, left-aligned;
        `med` is already shifted (slot 0 empty: it receives the profile vector).
    n_visits [B]: kept visits (0 = padded batch row); profile [B, F]; target [B, Cm] target drug ids
    (1 + label index, 0 = pad) for the alignment loss; nbr [B, n_med] float (neighbour_input only): the
    neighbours' drug bag.
    """

    def __init__(self, cfg: StudentConfig, *, rng: np.random.Generator):
        self.cfg = cfg
        d = cfg.d
        if cfg.shared_embedding:      # rows: 0 = padding | diagnoses | procedures | drugs
            self.code_emb = Embedding(1 + cfg.n_diag + cfg.n_proc + cfg.n_med, d, rng=rng)
            self.diag_emb = self.proc_emb = self.med_emb = None
        else:
            self.code_emb = None
            self.diag_emb = Embedding(cfg.n_diag + 1, d, rng=rng)
            self.proc_emb = Embedding(cfg.n_proc + 1, d, rng=rng)
            self.med_emb = Embedding(cfg.n_med + 1, d, rng=rng)
        self.diag_enc = TransformerBlock(cfg, rng=rng)
        self.proc_enc = TransformerBlock(cfg, rng=rng)
        self.med_enc = TransformerBlock(cfg, rng=rng)
        self.visit_enc = TransformerBlock(cfg, rng=rng)
        self.recency = (Embedding(cfg.max_visits, d, rng=rng, pad_row=False)
                        if cfg.visit_position == "recency" else None)
        if cfg.profile_sizes:
            self.profile_emb = nnx.List([Embedding(n, d, rng=rng, pad_row=False) for n in cfg.profile_sizes])
            self.profile_proj = Dense(len(cfg.profile_sizes) * d, d, ("mlp", "embed"), rng=rng)
            self.profile_vec = None
        else:
            self.profile_emb = None
            self.profile_proj = None
            self.profile_vec = nnx.Param(rng.standard_normal((d,)).astype(np.float32), out_sharding=("embed",))
        self.head1 = Dense(3 * d, cfg.head_hidden, ("embed", "mlp"), rng=rng)
        self.head2 = Dense(cfg.head_hidden, cfg.n_med, ("mlp", "labels"), rng=rng)
        self.kd_proj = (Dense(cfg.head_hidden, cfg.teacher_dim, ("mlp", "embed"), rng=rng)
                        if cfg.teacher_dim else None)
        self.align_x = Dense(d, d, ("embed", "mlp"), rng=rng)
        self.align_y = Dense(d, d, ("embed", "mlp"), rng=rng)
        # drawn last, so the other parameters' initial values do not depend on the switch
        self.nbr_proj = (Dense(cfg.n_med, 3 * d, ("labels", "embed"), use_bias=False, rng=rng)
                         if cfg.neighbour_input else None)

    # -- pieces
    def stream_offsets(self) -> dict[str, int]:
        """Row offset of each code type in the shared table (a type's id i ≥ 1 is row offset + i)."""
        c = self.cfg
        return {"diag": 0, "proc": c.n_diag, "med": c.n_diag + c.n_proc}

    def embed(self, name: str, ids):
        """Embeddings of `name` ("diag" | "proc" | "med") code ids (0 = padding → the zero row)."""
        if self.code_emb is None:
            return getattr(self, f"{name}_emb")(ids)
        off = self.stream_offsets()[name]
        return self.code_emb(jnp.where(ids > 0, ids + off, 0) if off else ids)

    def stream_table(self, name: str):
        """[n_type + 1, d]: the rows `embed(name, ·)` reads (row 0 = padding), a view of the shared table."""
        if self.code_emb is None:
            return getattr(self, f"{name}_emb").table[...]
        table, off = self.code_emb.table[...], self.stream_offsets()[name]
        n = {"diag": self.cfg.n_diag, "proc": self.cfg.n_proc, "med": self.cfg.n_med}[name]
        return table[:1 + n] if off == 0 else jnp.concatenate([table[:1], table[off + 1:off + 1 + n]], axis=0)

    def encode_sets(self, name: str, enc: TransformerBlock, ids, drop: Dropout):
        """[B, V, C] ids of code type `name` → [B, V, d] (one block over each set, masked mean over its
        codes)."""
        b, v, c = ids.shape
        mask = (ids > 0).reshape(b * v, c)
        x = enc(self.embed(name, ids).reshape(b * v, c, -1), mask, drop)
        return masked_mean(x, mask, axis=1).reshape(b, v, -1)

    def profile_vector(self, profile):
        """[B, F] value indices → [B, d]."""
        if self.profile_emb is None:
            return jnp.broadcast_to(self.profile_vec[...], (profile.shape[0], self.cfg.d))
        parts = [emb(profile[:, i]) for i, emb in enumerate(self.profile_emb)]
        return self.profile_proj(jnp.concatenate(parts, axis=-1))

    def __call__(self, batch: dict, key=None) -> dict:
        """Returns logits [B, n_med], mediator [B, head_hidden], profile [B, d]."""
        drop = Dropout(key)
        nv = batch["n_visits"]
        v = batch["diag"].shape[1]
        slots = jnp.arange(v)
        vmask = slots[None, :] < nv[:, None]
        prof = self.profile_vector(batch["profile"])
        dx = self.encode_sets("diag", self.diag_enc, batch["diag"], drop)
        px = self.encode_sets("proc", self.proc_enc, batch["proc"], drop)
        md = self.encode_sets("med", self.med_enc, batch["med"], drop)
        md = jnp.where((slots == 0)[None, :, None], prof[:, None, :], md)
        streams = jnp.concatenate([dx, px, md], axis=0)                 # [3B, V, d]
        mask3 = jnp.concatenate([vmask] * 3, axis=0)
        if self.recency is not None:
            age = jnp.clip(nv[:, None] - 1 - slots[None, :], 0, self.cfg.max_visits - 1)
            streams = streams + jnp.concatenate([self.recency(age)] * 3, axis=0)
        pooled = masked_mean(self.visit_enc(streams, mask3, drop), mask3, axis=1)
        c = jnp.concatenate(jnp.split(pooled, 3, axis=0), axis=-1)     # [B, 3d]
        h, logits = self.head(c, batch)
        return {"logits": logits, "mediator": h, "profile": prof}

    def head(self, c, batch: dict):
        """[B, 3d] patient vector (+ the projected neighbour-drug bag `batch["nbr"]` when the model has
        the neighbour input) → (mediator [B, head_hidden], logits [B, n_med])."""
        if self.nbr_proj is not None:
            c = c + self.nbr_proj(batch["nbr"].astype(c.dtype))
        h = self.head1(jax.nn.relu(c))
        return h, self.head2(jax.nn.relu(h))

    def _streams(self):
        return (("diag", self.diag_enc), ("proc", self.proc_enc), ("med", self.med_enc))

    def inference_tables(self) -> dict:
        """Per code stream, [vocab + 1, 4d] = embedding | LN1(embedding) @ [Wq|Wk|Wv]: before attention
        a code-set block's work depends on the token id alone, so the kernel path gathers these rows
        (computed once per `predict` call, not per batch)."""
        tables = {name: self.stream_table(name) for name, _ in self._streams()}
        return {name: jnp.concatenate([tables[name], enc.ln1(tables[name]) @ enc.qkv_kernel()], axis=-1)
                for name, enc in self._streams()}

    def _visit_streams(self, pb: dict, vecs: list, prof):
        """The three visit-slot streams stacked on axis 0 (vecs: each stream's set vector per visit slot,
        [Rv, V, d] rows or [n, d] flat): profile in the drug stream's first slot, optional recency."""
        d = prof.shape[1]
        prof_pad = jnp.concatenate([prof, jnp.zeros((1, d), prof.dtype)], axis=0)
        vecs = list(vecs)
        vecs[2] = jnp.where(pb["v_first"][..., None], jnp.take(prof_pad, pb["v_pat"], axis=0), vecs[2])
        streams = jnp.concatenate(vecs, axis=0)
        if self.recency is not None:
            streams = streams + jnp.concatenate([self.recency(pb["v_age"])] * 3, axis=0)
        return streams

    def predict_packed(self, pb: dict):
        """Inference logits [B, n_med] from a packed-rows batch (`leader_jax.train.packing.pack_batches`),
        in XLA ops: the same function as `__call__(batch)["logits"]` without dropout, computing real
        tokens only. Each stream's non-empty code sets lie back to back in rows of width W (`{s}_tok`
        ids, `{s}_seg` set number within the row, `{s}_set` visit slot of the token's set); attention is
        restricted to the own set by a segment mask and the set means are scattered back by
        `segment_sum`; the visit encoder runs the same way on packed visit slots (`v_seg`, `v_pat`
        patient index, `v_age`, `v_first`)."""
        drop = Dropout(None)
        prof = self.profile_vector(pb["profile"])                       # [B, d]
        b, d = prof.shape
        n_sets = pb["v_seg"].size                                       # S: set-index space (pad = S)

        def seg_mean(x, seg, idx, n):
            real = (seg > 0).reshape(-1, 1).astype(x.dtype)
            idx = idx.reshape(-1)
            tot = jax.ops.segment_sum(x.reshape(-1, d) * real, idx, num_segments=n + 1)
            cnt = jax.ops.segment_sum(real, idx, num_segments=n + 1)
            return tot / jnp.maximum(cnt, 1.0)                          # [n + 1, d]; row n = 0

        vecs = []
        for name, enc in self._streams():
            seg = pb[f"{name}_seg"]
            y = enc(self.embed(name, pb[f"{name}_tok"]), segment_mask(seg), drop)
            vecs.append(jnp.take(seg_mean(y, seg, pb[f"{name}_set"], n_sets), pb[f"v_{name}"], axis=0))
        streams = self._visit_streams(pb, vecs, prof)                    # [3Rv, V, d]
        vseg = jnp.concatenate([pb["v_seg"]] * 3, axis=0)
        y = self.visit_enc(streams, segment_mask(vseg), drop)
        rv = pb["v_seg"].shape[0]
        pooled = [seg_mean(y[i * rv:(i + 1) * rv], pb["v_seg"], pb["v_pat"], b)[:b] for i in range(3)]
        return self.head(jnp.concatenate(pooled, axis=-1), pb)[1]

    def predict_flat(self, pb: dict, tables: dict | None = None):
        """The same logits from a *flat* batch (`leader_jax.train.packing.pack_flat`: every set a run
        `{s}_start`/`{s}_len` of `{s}_tok`, every patient a run `p_start`/`p_len` of visit slots) through
        the CPU FFI kernel (`leader_jax.kernels.set_block`, which applies W2 after the set mean: exact,
        it is linear); `tables` = `inference_tables()`, computed here if not given."""
        from leader_jax.kernels.set_block import set_block_means
        tables = self.inference_tables() if tables is None else tables
        prof = self.profile_vector(pb["profile"])
        b, d = prof.shape
        n = pb["v_pat"].shape[0]                                        # visit slots
        vecs = []
        for name, enc in self._streams():
            vecs.append(set_block_means(enc, tables[name], pb[f"{name}_tok"], pb[f"{name}_start"],
                                        pb[f"{name}_len"]))            # [n, d]
        x = self._visit_streams(pb, vecs, prof)                          # [3n, d]
        enc = self.visit_enc
        rows = jnp.concatenate([x, enc.ln1(x) @ enc.qkv_kernel()], axis=-1)
        starts = jnp.concatenate([pb["p_start"] + i * n for i in range(3)])
        counts = jnp.concatenate([pb["p_len"]] * 3)
        pooled = set_block_means(enc, rows, jnp.arange(3 * n, dtype=jnp.int32), starts, counts).reshape(3, b, d)
        return self.head(jnp.concatenate(list(pooled), axis=-1), pb)[1]

    def align_pair(self, target, profile_vec, key=None):
        """Projected target-drug-set embedding x [B, d] and profile embedding y [B, d] (the target
        set is encoded with the drug stream's own table and encoder)."""
        e = self.encode_sets("med", self.med_enc, target[:, None, :], Dropout(key))[:, 0]
        return self.align_x(e), self.align_y(profile_vec)


def build_student(cfg: StudentConfig, seed: int = 0) -> Student:
    """Build under the caller's mesh/rules context (see leader_jax.sharding.use_mesh). Initial values
    are drawn on the host with numpy (PyTorch's default init): deterministic per seed and free of the
    dozens of tiny initializer compilations an eager jax.random init costs on CPU."""
    return Student(cfg, rng=np.random.default_rng(seed))


def init_student(cfg: StudentConfig, seed: int = 0):
    """(graphdef, params State). The parameters are created inside one jitted function: one compiled
    program (one persistent-cache entry) instead of an eager op and a layout program per parameter."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_student(cfg, seed)), nnx.Param)
    layout = jax.tree.map(lambda a: a.sharding, abstract)          # from the rules table, as when eager
    return graphdef, jax.jit(lambda: nnx.split(build_student(cfg, seed), nnx.Param)[1], out_shardings=layout)()


# ----------------------------------------------------------------------------------------------- losses
def info_nce(x, y, valid, tau: float = 1.0, paper: bool = False):
    """Per-sample symmetric contrastive loss between rows of x and y (positive pairs = same row).

    S_ij = cos(x_i, y_j)/τ; ℓ_j = [lse_i S_ij − S_jj] + [lse_i S_ji − S_jj] over valid i. Standard
    InfoNCE includes the positive in each log-sum-exp; `paper=True` excludes it (the original).
    Rows with valid=False get 0, and everything is 0 when fewer than 2 rows are valid."""
    xn = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-8)
    yn = y / jnp.maximum(jnp.linalg.norm(y, axis=-1, keepdims=True), 1e-8)
    s = (xn @ yn.T) / tau
    pair = valid[:, None] & valid[None, :]
    if paper:
        pair = pair & ~jnp.eye(s.shape[0], dtype=bool)
    sm = jnp.where(pair, s, _NEG)
    pos = jnp.diagonal(s)
    loss = (jax.nn.logsumexp(sm, axis=0) - pos) + (jax.nn.logsumexp(sm, axis=1) - pos)
    ok = valid & (valid.sum() >= 2)
    return jnp.where(ok, loss, 0.0)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    alpha: float = 0.4          # KD weight (MIMIC-III; 0.8 for MIMIC-IV)
    align_weight: float = 0.005  # w (MIMIC-III; 0.01 for MIMIC-IV)
    tau: float = 1.0
    align_loss: str = "infonce"
    distill: bool = True

    def __post_init__(self):
        if self.align_loss not in ALIGN_LOSSES:
            raise ValueError(f"align_loss must be one of {ALIGN_LOSSES}, got {self.align_loss!r}")


def kd_loss(model: Student, mediator, teacher):
    """Per-sample MSE between the projected mediator and the teacher hidden state (mean over dims)."""
    return jnp.square(model.kd_proj(mediator) - teacher.astype(jnp.float32)).mean(-1)


def student_loss(model: Student, batch: dict, lc: LossConfig, key=None) -> tuple[Any, dict]:
    """Mean over real rows (batch["weight"] = 1) of BCE + α·KD + w·align; returns (loss, parts)."""
    k_main = k_align = None
    if key is not None:
        k_main, k_align = jax.random.split(key)
    out = model(batch, k_main)
    w = batch["weight"].astype(jnp.float32)
    denom = jnp.maximum(w.sum(), 1.0)
    bce = optax.losses.sigmoid_binary_cross_entropy(out["logits"], batch["labels"].astype(jnp.float32)).mean(-1)
    per = bce
    parts = {"bce": (bce * w).sum() / denom}
    if lc.distill:
        kd = kd_loss(model, out["mediator"], batch["teacher"])
        per = per + lc.alpha * kd
        parts["kd"] = (kd * w).sum() / denom
    if lc.align_weight:
        x, y = model.align_pair(batch["target"], out["profile"], k_align)
        al = info_nce(x, y, w > 0, lc.tau, paper=lc.align_loss == "paper")
        per = per + lc.align_weight * al
        parts["align"] = (al * w).sum() / denom
    loss = (per * w).sum() / denom
    parts["loss"] = loss
    return loss, parts
