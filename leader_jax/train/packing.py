"""Packed inference batches for LEADER(S): real code tokens only, one fixed shape for every batch.

A bucketed, padded [B, V, C] batch is mostly padding (≈ 1.7 visits per patient, Poisson-sized code
sets, a whole empty drug stream for every single-visit patient). `pack_batches` instead lays each
stream's non-empty code sets back to back into rows of width W and the patients' visit slots back to
back into rows of `max_visits`. Patients are added to a batch until `batch` patients or any row budget
is full, so one compile serves every batch. `Student.predict_packed` reads it (XLA path).

Arrays of one packed batch (int32 unless said; R, W per stream, Rv visit rows, V = max visits,
n = Rv·V visit slots, slot = row·V + column):
  profile [B, F]
  {s}_tok [R, W] code ids (0 = pad), {s}_seg [R, W] set number within the row (0 = pad),
  {s}_set [R, W] visit slot of the token's set (n = pad), v_{s} [Rv, V] the slot itself if its set
  is non-empty else n, for s ∈ diag/proc/med;
  v_seg [Rv, V] patient number 1..B (0 = pad), v_pat [Rv, V] batch index of the slot's patient
  (B = pad), v_age [Rv, V] visits before the target, v_first [Rv, V] bool (first kept visit: the drug
  stream's profile slot).

The CPU kernel needs no rows at all: `pack_flat` lays every set out as a contiguous run of tokens
(`FlatLayout`, fully vectorised with numpy).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

STREAMS = ("diag", "proc", "med")


@dataclasses.dataclass(frozen=True)
class PackLayout:
    """Fixed shapes of a packed batch: up to `batch` patients; per stream `rows[s]` rows of `width[s]`
    code slots; `visit_rows` rows of `visit_width`
    (= max visits) slots holding the patients' visit sequences."""

    batch: int
    visit_width: int
    visit_rows: int
    width: tuple[int, int, int]
    rows: tuple[int, int, int]


def _round_up(x: float, m: int) -> int:
    return int(m * math.ceil(x / m))


def pack_layout(enc, caps, batch_size: int, margin: float = 1.2, multiple: int = 8) -> PackLayout:
    """Layout sized from `enc`'s mean real tokens/visits per patient (× margin), widths from the
    global caps (caps[-1]); a batch whose patients need more simply holds fewer patients."""
    top = [int(c) for c in caps[-1]]
    v = int(enc.diag.shape[1])
    n = max(len(enc), 1)
    widths = tuple(_round_up(max(c, 1), 8) for c in top[1:])
    rows = []
    for name, w in zip(STREAMS, widths):
        per_patient = float((getattr(enc, name) > 0).sum()) / n
        rows.append(max(_round_up(batch_size * per_patient * margin / w + 1, multiple), _round_up(v, multiple)))
    vrows = max(_round_up(batch_size * float(enc.n_visits.sum()) / n * margin / v + 1, multiple), multiple)
    return PackLayout(batch=int(batch_size), visit_width=v, visit_rows=vrows, width=widths, rows=tuple(rows))


class _Batch:
    """The placement state of one batch being filled (plain lists; `build` turns it into arrays)."""

    def __init__(self):
        self.pats: list[int] = []
        self.vrow = self.vcol = 0
        self.row, self.col, self.seg = [0, 0, 0], [0, 0, 0], [0, 0, 0]
        self.sets: tuple[list, list, list] = ([], [], [])  # (row, col, len, seg, sample, visit, slot)
        self.visits: list[tuple[int, int, int, int]] = []  # (vrow, vcol, n visits, batch idx)


def pack_batches(enc, layout: PackLayout):
    """Yield (row indices, packed batch) covering every sample of `enc` (an `EncodedSplit`) in order."""
    lay = layout
    v = lay.visit_width
    if enc.diag.shape[1] != v:
        raise ValueError(f"encoded visits {enc.diag.shape[1]} != layout visit width {v}")
    lens = np.stack([(getattr(enc, s) > 0).sum(-1) for s in STREAMS], axis=1)   # [n, 3, V]
    for k, s in enumerate(STREAMS):
        if lens[:, k].max(initial=0) > lay.width[k]:
            raise ValueError(f"a {s} code set has {int(lens[:, k].max())} codes > packed width {lay.width[k]} "
                             f"(buckets were built from other data)")
    nv_all = enc.n_visits.astype(np.int64)
    lens_l = lens.tolist()

    def place(st: _Batch, i: int) -> bool:
        """Place patient i into st in place; False (st untouched) if it does not fit."""
        nv = int(nv_all[i])
        if len(st.pats) >= lay.batch:
            return False
        vrow, vcol = st.vrow, st.vcol
        if vcol + nv > v:
            vrow, vcol = vrow + 1, 0
        if vrow >= lay.visit_rows:
            return False
        row, col, seg = list(st.row), list(st.col), list(st.seg)
        sets = ([], [], [])
        for k in range(3):
            for j, ln in enumerate(lens_l[i][k][:nv]):
                if not ln:
                    continue
                if col[k] + ln > lay.width[k]:
                    row[k], col[k], seg[k] = row[k] + 1, 0, 0
                if row[k] >= lay.rows[k]:
                    return False
                seg[k] += 1
                sets[k].append((row[k], col[k], ln, seg[k], i, j, vrow * v + vcol + j))
                col[k] += ln
        st.visits.append((vrow, vcol, nv, len(st.pats)))
        st.pats.append(i)
        st.vrow, st.vcol = vrow, vcol + nv
        st.row, st.col, st.seg = row, col, seg
        for k in range(3):
            st.sets[k].extend(sets[k])
        return True

    def build(st: _Batch):
        b, n_slots = lay.batch, lay.visit_rows * v
        rows = np.asarray(st.pats, dtype=np.int64)
        pb = {"profile": np.zeros((b,) + enc.profile.shape[1:], enc.profile.dtype)}
        pb["profile"][: len(rows)] = enc.profile[rows]
        vr, vc, vn, vp = (np.asarray(a, dtype=np.int64) for a in zip(*st.visits))
        tr = np.repeat(vr, vn)
        slot = np.arange(vn.sum()) - np.repeat(np.cumsum(vn) - vn, vn)      # visit number within patient
        tc = np.repeat(vc, vn) + slot
        shape = (lay.visit_rows, v)
        pb["v_seg"] = np.zeros(shape, np.int32)
        pb["v_seg"][tr, tc] = np.repeat(vp + 1, vn)
        pb["v_pat"] = np.full(shape, b, np.int32)
        pb["v_pat"][tr, tc] = np.repeat(vp, vn)
        pb["v_age"] = np.zeros(shape, np.int32)
        pb["v_age"][tr, tc] = np.clip(np.repeat(vn, vn) - 1 - slot, 0, v - 1)
        pb["v_first"] = np.zeros(shape, bool)
        pb["v_first"][tr, tc] = slot == 0
        for k, name in enumerate(STREAMS):
            w, r = lay.width[k], lay.rows[k]
            tok, seg, sid = np.zeros((r, w), np.int32), np.zeros((r, w), np.int32), np.full((r, w), n_slots, np.int32)
            vset = np.full(n_slots, n_slots, np.int32)
            if st.sets[k]:
                sr, sc, sl, sn, si, sj, sx = (np.asarray(a, dtype=np.int64) for a in zip(*st.sets[k]))
                off = np.arange(sl.sum()) - np.repeat(np.cumsum(sl) - sl, sl)
                rr, cc = np.repeat(sr, sl), np.repeat(sc, sl) + off
                tok[rr, cc] = getattr(enc, name)[np.repeat(si, sl), np.repeat(sj, sl), off]
                seg[rr, cc] = np.repeat(sn, sl)
                sid[rr, cc] = np.repeat(sx, sl)
                vset[sx] = sx
            pb[f"{name}_tok"], pb[f"{name}_seg"], pb[f"{name}_set"] = tok, seg, sid
            pb[f"v_{name}"] = vset.reshape(shape)
        return rows, pb

    st = _Batch()
    for i in range(len(enc)):
        if not place(st, i):
            yield build(st)
            st = _Batch()
            if not place(st, i):
                raise ValueError(f"sample row {i} does not fit an empty packed batch {lay}")
    if st.pats:
        yield build(st)


# --------------------------------------------------------------------------- flat (CSR) batches
@dataclasses.dataclass(frozen=True)
class FlatLayout:
    """Fixed shapes of a flat batch for the CPU kernel (`Student.predict_flat`): up to
    `batch` patients, `slots` visit slots and `tokens[s]` code tokens per stream; sets are contiguous
    runs of tokens (no rows, no width), so nothing but the budgets' tail is padding."""

    batch: int
    visit_width: int
    slots: int
    tokens: tuple[int, int, int]


def flat_layout(enc, batch_size: int, margin: float = 1.1, multiple: int = 64) -> FlatLayout:
    """Budgets = mean real tokens/visits per patient × batch × margin, at least one largest patient."""
    n = max(len(enc), 1)
    nv = enc.n_visits.astype(np.int64)
    toks = [(getattr(enc, s) > 0).sum(axis=(1, 2)) for s in STREAMS]
    tokens = tuple(max(_round_up(batch_size * float(t.sum()) / n * margin, multiple), _round_up(t.max(initial=1), multiple))
                   for t in toks)
    slots = max(_round_up(batch_size * float(nv.sum()) / n * margin, multiple), _round_up(nv.max(initial=1), multiple))
    return FlatLayout(batch=int(batch_size), visit_width=int(enc.diag.shape[1]), slots=slots, tokens=tokens)


def pack_flat(enc, layout: FlatLayout):
    """Yield (row indices, flat batch) covering every sample of `enc` in order. A flat batch holds
    profile [B, F]; per stream s `{s}_tok` [T_s] (the codes of each kept visit back to back, row-major
    over (patient, visit)), `{s}_start` / `{s}_len` [slots] (the run of each visit slot's set); per
    visit slot `v_pat` (batch index, B = pad), `v_age`, `v_first`; per patient `p_start` / `p_len`.
    Fully vectorised: a batch is the longest run of patients that fits every budget."""
    lay = layout
    if enc.diag.shape[1] != lay.visit_width:
        raise ValueError(f"encoded visits {enc.diag.shape[1]} != layout visit width {lay.visit_width}")
    nv_all = enc.n_visits.astype(np.int64)
    need = np.stack([nv_all] + [(getattr(enc, s) > 0).sum(axis=(1, 2)) for s in STREAMS], axis=1)
    budget = np.asarray([lay.slots, *lay.tokens])
    if len(enc) and (need > budget).any():
        i = int(np.nonzero((need > budget).any(axis=1))[0][0])
        raise ValueError(f"sample row {i} needs {need[i].tolist()} (visits, diag/proc/med codes) > flat batch "
                         f"budgets {budget.tolist()}")
    cum = np.vstack([np.zeros((1, 4), np.int64), np.cumsum(need, axis=0)])
    i, n, b = 0, len(enc), lay.batch
    while i < n:
        j = min(i + b, n)
        # longest run i..k that fits every budget: searchsorted per budget column
        k = min(int(np.searchsorted(cum[i + 1: j + 1, c] - cum[i, c], budget[c], side="right")) for c in range(4))
        rows = np.arange(i, i + k)
        yield rows, _flat_batch(enc, rows, lay)
        i += k


def _flat_batch(enc, rows: np.ndarray, lay: FlatLayout) -> dict:
    b, slots, v = lay.batch, lay.slots, lay.visit_width
    nv = enc.n_visits[rows].astype(np.int64)
    used = int(nv.sum())
    pb = {"profile": np.zeros((b,) + enc.profile.shape[1:], enc.profile.dtype)}
    pb["profile"][: len(rows)] = enc.profile[rows]
    off = np.cumsum(nv) - nv
    p = np.repeat(np.arange(len(rows)), nv)                      # patient of each used slot
    j = np.arange(used) - np.repeat(off, nv)                     # visit number within the patient
    pb["p_start"], pb["p_len"] = np.zeros(b, np.int32), np.zeros(b, np.int32)
    pb["p_start"][: len(rows)], pb["p_len"][: len(rows)] = off, nv
    pb["v_pat"] = np.full(slots, b, np.int32)
    pb["v_pat"][:used] = p
    pb["v_age"] = np.zeros(slots, np.int32)
    pb["v_age"][:used] = np.clip(np.repeat(nv, nv) - 1 - j, 0, v - 1)
    pb["v_first"] = np.zeros(slots, bool)
    pb["v_first"][:used] = j == 0
    kept = np.arange(v)[None, :] < nv[:, None]                   # [b, V] kept visit slots, row-major
    for k, name in enumerate(STREAMS):
        ids = getattr(enc, name)[rows]                           # [b, V, C]
        real = ids > 0
        lens = real.sum(-1)[kept]                                # per used slot, in slot order
        tok = np.zeros(lay.tokens[k], np.int32)
        flat = ids[real & kept[..., None]]
        tok[: flat.size] = flat
        start, length = np.zeros(slots, np.int32), np.zeros(slots, np.int32)
        start[:used], length[:used] = np.cumsum(lens) - lens, lens
        pb[f"{name}_tok"], pb[f"{name}_start"], pb[f"{name}_len"] = tok, start, length
    return pb
