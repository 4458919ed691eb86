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
from typing import NamedTuple

import numpy as np

STREAMS = ("diag", "proc", "med")


class PackedBatch(NamedTuple):
    """One inference batch: the sample rows of the EncodedSplit it holds (in order) and its arrays."""

    rows: np.ndarray
    arrays: dict


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
    width_v = int(enc.diag.shape[1])
    n = max(len(enc), 1)
    widths = tuple(_round_up(max(c, 1), 8) for c in top[1:])
    rows = []
    for name, width in zip(STREAMS, widths):
        per_patient = float((getattr(enc, name) > 0).sum()) / n
        rows.append(max(_round_up(batch_size * per_patient * margin / width + 1, multiple),
                        _round_up(width_v, multiple)))
    visit_rows = max(_round_up(batch_size * float(enc.n_visits.sum()) / n * margin / width_v + 1, multiple), multiple)
    return PackLayout(batch=int(batch_size), visit_width=width_v, visit_rows=visit_rows, width=widths,
                      rows=tuple(rows))


class SetPlacement(NamedTuple):
    """Where one code set of a patient lands in a packed batch (one stream)."""

    row: int          # packed row
    col: int          # first column in that row
    length: int       # number of codes
    segment: int      # set number within the row (1-based; 0 = pad)
    sample: int       # sample row of the EncodedSplit
    visit: int        # kept-visit index of the sample
    slot: int         # visit slot in the batch (visit row * visit width + column)


class VisitPlacement(NamedTuple):
    """Where one patient's visit sequence lands in the batch's visit rows."""

    row: int
    col: int
    n_visits: int
    patient: int      # batch index of the patient


class _Batch:
    """The placement state of one batch being filled (`build` turns it into arrays)."""

    def __init__(self):
        self.patients: list[int] = []
        self.visit_row = self.visit_col = 0
        self.row, self.col, self.segment = [0, 0, 0], [0, 0, 0], [0, 0, 0]   # next free place per stream
        self.sets: tuple[list[SetPlacement], ...] = ([], [], [])
        self.visits: list[VisitPlacement] = []


def pack_batches(enc, layout: PackLayout):
    """Yield a `PackedBatch` per batch, covering every sample of `enc` (an `EncodedSplit`) in order."""
    lay = layout
    width_v = lay.visit_width
    if enc.diag.shape[1] != width_v:
        raise ValueError(f"encoded visits {enc.diag.shape[1]} != layout visit width {width_v}")
    set_sizes = np.stack([(getattr(enc, s) > 0).sum(-1) for s in STREAMS], axis=1)   # [n, 3, V]
    for k, s in enumerate(STREAMS):
        if set_sizes[:, k].max(initial=0) > lay.width[k]:
            raise ValueError(f"a {s} code set has {int(set_sizes[:, k].max())} codes > packed width {lay.width[k]} "
                             f"(buckets were built from other data)")
    visits_of = enc.n_visits.astype(np.int64)
    set_sizes_l = set_sizes.tolist()

    def place(st: _Batch, i: int) -> bool:
        """Place patient i into st in place; False (st untouched) if it does not fit."""
        n_vis = int(visits_of[i])
        if len(st.patients) >= lay.batch:
            return False
        vrow, vcol = st.visit_row, st.visit_col
        if vcol + n_vis > width_v:
            vrow, vcol = vrow + 1, 0
        if vrow >= lay.visit_rows:
            return False
        row, col, segment = list(st.row), list(st.col), list(st.segment)
        sets: tuple[list[SetPlacement], ...] = ([], [], [])
        for k in range(3):
            for j, size in enumerate(set_sizes_l[i][k][:n_vis]):
                if not size:
                    continue
                if col[k] + size > lay.width[k]:
                    row[k], col[k], segment[k] = row[k] + 1, 0, 0
                if row[k] >= lay.rows[k]:
                    return False
                segment[k] += 1
                sets[k].append(SetPlacement(row[k], col[k], size, segment[k], i, j, vrow * width_v + vcol + j))
                col[k] += size
        st.visits.append(VisitPlacement(vrow, vcol, n_vis, len(st.patients)))
        st.patients.append(i)
        st.visit_row, st.visit_col = vrow, vcol + n_vis
        st.row, st.col, st.segment = row, col, segment
        for k in range(3):
            st.sets[k].extend(sets[k])
        return True

    def build(st: _Batch):
        b, n_slots = lay.batch, lay.visit_rows * width_v
        rows = np.asarray(st.patients, dtype=np.int64)
        pb = {"profile": np.zeros((b,) + enc.profile.shape[1:], enc.profile.dtype)}
        pb["profile"][: len(rows)] = enc.profile[rows]
        vis = VisitPlacement(*np.asarray(st.visits, dtype=np.int64).T)          # one array per field
        n_vis = vis.n_visits
        slot_row = np.repeat(vis.row, n_vis)
        visit_no = np.arange(n_vis.sum()) - np.repeat(np.cumsum(n_vis) - n_vis, n_vis)  # visit within patient
        slot_col = np.repeat(vis.col, n_vis) + visit_no
        shape = (lay.visit_rows, width_v)
        pb["v_seg"] = np.zeros(shape, np.int32)
        pb["v_seg"][slot_row, slot_col] = np.repeat(vis.patient + 1, n_vis)
        pb["v_pat"] = np.full(shape, b, np.int32)
        pb["v_pat"][slot_row, slot_col] = np.repeat(vis.patient, n_vis)
        pb["v_age"] = np.zeros(shape, np.int32)
        pb["v_age"][slot_row, slot_col] = np.clip(np.repeat(n_vis, n_vis) - 1 - visit_no, 0, width_v - 1)
        pb["v_first"] = np.zeros(shape, bool)
        pb["v_first"][slot_row, slot_col] = visit_no == 0
        for k, name in enumerate(STREAMS):
            shape_k = (lay.rows[k], lay.width[k])
            tok, seg = np.zeros(shape_k, np.int32), np.zeros(shape_k, np.int32)
            set_slot = np.full(shape_k, n_slots, np.int32)
            visit_set = np.full(n_slots, n_slots, np.int32)
            if st.sets[k]:
                sets = SetPlacement(*np.asarray(st.sets[k], dtype=np.int64).T)  # one array per field
                size = sets.length
                offset = np.arange(size.sum()) - np.repeat(np.cumsum(size) - size, size)
                tok_row, tok_col = np.repeat(sets.row, size), np.repeat(sets.col, size) + offset
                codes = getattr(enc, name)
                tok[tok_row, tok_col] = codes[np.repeat(sets.sample, size), np.repeat(sets.visit, size), offset]
                seg[tok_row, tok_col] = np.repeat(sets.segment, size)
                set_slot[tok_row, tok_col] = np.repeat(sets.slot, size)
                visit_set[sets.slot] = sets.slot
            pb[f"{name}_tok"], pb[f"{name}_seg"], pb[f"{name}_set"] = tok, seg, set_slot
            pb[f"v_{name}"] = visit_set.reshape(shape)
        return PackedBatch(rows, pb)

    st = _Batch()
    for i in range(len(enc)):
        if not place(st, i):
            yield build(st)
            st = _Batch()
            if not place(st, i):
                raise ValueError(f"sample row {i} does not fit an empty packed batch {lay}")
    if st.patients:
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
    n_vis = enc.n_visits.astype(np.int64)
    per_patient = [(getattr(enc, s) > 0).sum(axis=(1, 2)) for s in STREAMS]      # real codes per patient
    tokens = tuple(max(_round_up(batch_size * float(t.sum()) / n * margin, multiple),
                       _round_up(t.max(initial=1), multiple)) for t in per_patient)
    slots = max(_round_up(batch_size * float(n_vis.sum()) / n * margin, multiple),
                _round_up(n_vis.max(initial=1), multiple))
    return FlatLayout(batch=int(batch_size), visit_width=int(enc.diag.shape[1]), slots=slots, tokens=tokens)


def pack_flat(enc, layout: FlatLayout):
    """Yield a `PackedBatch` per batch, covering every sample of `enc` in order. A flat batch holds
    profile [B, F]; per stream s `{s}_tok` [T_s] (the codes of each kept visit back to back, row-major
    over (patient, visit)), `{s}_start` / `{s}_len` [slots] (the run of each visit slot's set); per
    visit slot `v_pat` (batch index, B = pad), `v_age`, `v_first`; per patient `p_start` / `p_len`.
    Fully vectorised: a batch is the longest run of patients that fits every budget."""
    lay = layout
    if enc.diag.shape[1] != lay.visit_width:
        raise ValueError(f"encoded visits {enc.diag.shape[1]} != layout visit width {lay.visit_width}")
    need = np.stack([enc.n_visits.astype(np.int64)] + [(getattr(enc, s) > 0).sum(axis=(1, 2)) for s in STREAMS], axis=1)
    budget = np.asarray([lay.slots, *lay.tokens])
    if len(enc) and (need > budget).any():
        i = int(np.nonzero((need > budget).any(axis=1))[0][0])
        raise ValueError(f"sample row {i} needs {need[i].tolist()} (visits, diag/proc/med codes) > flat batch "
                         f"budgets {budget.tolist()}")
    cum = np.vstack([np.zeros((1, 4), np.int64), np.cumsum(need, axis=0)])
    first, n = 0, len(enc)
    while first < n:
        last = min(first + lay.batch, n)
        # the longest run of patients from `first` that fits every budget: searchsorted per budget column
        count = min(int(np.searchsorted(cum[first + 1: last + 1, c] - cum[first, c], budget[c], side="right"))
                    for c in range(4))
        rows = np.arange(first, first + count)
        yield PackedBatch(rows, _flat_batch(enc, rows, lay))
        first += count


def _flat_batch(enc, rows: np.ndarray, lay: FlatLayout) -> dict:
    b, n_slots, width_v = lay.batch, lay.slots, lay.visit_width
    n_vis = enc.n_visits[rows].astype(np.int64)
    used = int(n_vis.sum())
    pb = {"profile": np.zeros((b,) + enc.profile.shape[1:], enc.profile.dtype)}
    pb["profile"][: len(rows)] = enc.profile[rows]
    first_slot = np.cumsum(n_vis) - n_vis                        # each patient's first visit slot
    patient = np.repeat(np.arange(len(rows)), n_vis)             # patient of each used slot
    visit_no = np.arange(used) - np.repeat(first_slot, n_vis)    # visit number within the patient
    pb["p_start"], pb["p_len"] = np.zeros(b, np.int32), np.zeros(b, np.int32)
    pb["p_start"][: len(rows)], pb["p_len"][: len(rows)] = first_slot, n_vis
    pb["v_pat"] = np.full(n_slots, b, np.int32)
    pb["v_pat"][:used] = patient
    pb["v_age"] = np.zeros(n_slots, np.int32)
    pb["v_age"][:used] = np.clip(np.repeat(n_vis, n_vis) - 1 - visit_no, 0, width_v - 1)
    pb["v_first"] = np.zeros(n_slots, bool)
    pb["v_first"][:used] = visit_no == 0
    kept = np.arange(width_v)[None, :] < n_vis[:, None]          # [b, V] kept visit slots, row-major
    for k, name in enumerate(STREAMS):
        ids = getattr(enc, name)[rows]                           # [b, V, C]
        real = ids > 0
        set_size = real.sum(-1)[kept]                            # per used slot, in slot order
        tok = np.zeros(lay.tokens[k], np.int32)
        flat = ids[real & kept[..., None]]
        tok[: flat.size] = flat
        start, length = np.zeros(n_slots, np.int32), np.zeros(n_slots, np.int32)
        start[:used], length[:used] = np.cumsum(set_size) - set_size, set_size
        pb[f"{name}_tok"], pb[f"{name}_start"], pb[f"{name}_len"] = tok, start, length
    return pb
