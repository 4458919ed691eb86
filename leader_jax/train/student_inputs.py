"""The student's inputs: index arrays per split, fixed shape buckets and padded training batches.

Each split is encoded once with numpy (`encode_samples`). Each sample is assigned to one of a few fixed
shape buckets (visits, codes per set) and every training batch is padded to (batch_size, bucket caps),
so the jitted steps compile once per bucket, never per batch. Packed inference batches (real tokens
only) are laid out by `leader_jax.train.packing` from the same `EncodedSplit`.

With `retrieval.mode=fixed` every sample also gets `nbr` [n_med]: the mean multi-hot of the drugs of its
k retrieved neighbours (training-split visits ranked by code similarity, never its own patient;
`leader_jax.retrieval`): `attach_neighbours` builds it from the run's `RunRetrieval` (memory and pools under
RUN/retrieval/, as for the teacher), `neighbour_bags` for new patients.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, NamedTuple, Sequence

import numpy as np

SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class EncodedSplit:
    """Index arrays of one split (ids: 0 = pad, token i of a vocabulary → i + 1).

    diag/proc/med [n, V, C]: the last `max_visits` visits, oldest first, left-aligned; `med` is the
    shifted drug stream (slot 0 empty for the profile, slot j = drugs of kept visit j-1).
    needs [n, 4]: (kept visits, max diag / proc / drug set size) used for bucketing.
    nbr [n, n_med] float32 (retrieval mode fixed only): the neighbours' drug bag (`attach_neighbours`)."""

    ids: np.ndarray
    diag: np.ndarray
    proc: np.ndarray
    med: np.ndarray
    n_visits: np.ndarray
    profile: np.ndarray
    target: np.ndarray
    labels: np.ndarray
    single_visit: np.ndarray
    needs: np.ndarray
    teacher: np.ndarray | None = None
    nbr: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)


def _fill(sets: list[list[int]], rows: list[int], slots: list[int], n: int, v: int) -> tuple[np.ndarray, np.ndarray]:
    """Scatter variable-length id lists into a zero-padded [n, v, C] array (vectorised); also returns
    the largest set size per sample row."""
    lens = np.fromiter((len(s) for s in sets), dtype=np.int64, count=len(sets))
    width = max(int(lens.max(initial=0)), 1)
    out = np.zeros((n, v, width), dtype=np.int32)
    total = int(lens.sum())
    if total:
        flat = np.fromiter(itertools.chain.from_iterable(sets), dtype=np.int32, count=total)
        starts = np.repeat(np.cumsum(lens) - lens, lens)
        out[np.repeat(rows, lens), np.repeat(slots, lens), np.arange(total) - starts] = flat
    per_set_max = np.zeros(n, dtype=np.int64)
    np.maximum.at(per_set_max, np.asarray(rows, dtype=np.int64), lens)
    return out, per_set_max


def profile_fields(vocab) -> tuple[str, ...]:
    return tuple(vocab.profile)


def encode_samples(samples: Sequence[Any], vocab, max_visits: int = 10) -> EncodedSplit:
    """Build the student's index arrays for `samples` (keeps the LAST `max_visits` visits, so the target
    visit is always included)."""
    if max_visits < 1:
        raise ValueError(f"max_visits must be >= 1, got {max_visits}")
    index = {k: vocab.index(k) for k in ("diag", "proc", "med")}
    fields = profile_fields(vocab)
    n = len(samples)
    sets: dict[str, list] = {"diag": [], "proc": [], "med": []}
    rows: dict[str, list] = {"diag": [], "proc": [], "med": []}
    slots: dict[str, list] = {"diag": [], "proc": [], "med": []}
    targets, target_rows = [], []
    n_visits = np.zeros(n, dtype=np.int32)
    single = np.zeros(n, dtype=bool)
    profile = np.zeros((n, len(fields)), dtype=np.int32)
    attr = {"diag": "diagnoses", "proc": "procedures", "med": "medications"}

    def ids_of(kind, tokens, sample_id):
        table = index[kind]
        try:
            return [table[t] + 1 for t in tokens]
        except KeyError as e:
            raise ValueError(f"sample {sample_id}: {attr[kind]} token {e.args[0]!r} is not in the {kind} "
                             f"vocabulary (prepared data and vocab.json disagree)") from None

    for i, s in enumerate(samples):
        if not s.visits:
            raise ValueError(f"sample {s.id}: has no visits")
        kept = s.visits[-max_visits:]
        n_visits[i] = len(kept)
        single[i] = len(s.visits) == 1
        for j, vis in enumerate(kept):
            for kind in ("diag", "proc"):
                sets[kind].append(ids_of(kind, getattr(vis, attr[kind]), s.id))
                rows[kind].append(i)
                slots[kind].append(j)
            if j + 1 < len(kept):          # drug stream shifted by one visit; target drugs never input
                sets["med"].append(ids_of("med", vis.medications, s.id))
                rows["med"].append(i)
                slots["med"].append(j + 1)
        targets.append(ids_of("med", s.visits[-1].medications, s.id))
        target_rows.append(i)
        for f, name in enumerate(fields):
            profile[i, f] = vocab.profile_index(name, s.profile.get(name, "unknown"))
    diag, need_diag = _fill(sets["diag"], rows["diag"], slots["diag"], n, max_visits)
    proc, need_proc = _fill(sets["proc"], rows["proc"], slots["proc"], n, max_visits)
    med, need_med = _fill(sets["med"], rows["med"], slots["med"], n, max_visits)
    target3, need_target = _fill(targets, target_rows, [0] * n, n, 1)
    target = target3[:, 0, :]
    labels = np.zeros((n, len(vocab.med)), dtype=np.uint8)
    r, c = np.nonzero(target)
    labels[r, target[r, c] - 1] = 1
    needs = np.stack([n_visits, need_diag, need_proc, np.maximum(need_med, need_target)], axis=1).astype(np.int32)
    return EncodedSplit(ids=np.asarray([s.id for s in samples], dtype=str), diag=diag, proc=proc, med=med,
                        n_visits=n_visits, profile=profile, target=target, labels=labels,
                        single_visit=single, needs=needs)


def attach_teacher(enc: EncodedSplit, store, split: str) -> None:
    """enc.teacher ← store.hidden(split, enc.ids); the store raises MissingFeaturesError naming ids."""
    enc.teacher = np.asarray(store.hidden(split, enc.ids.tolist()), dtype=np.float16)


# ------------------------------------------------------------------------------------------ buckets
class BucketCap(NamedTuple):
    """The padded shape of one bucket: visits and the widest diagnosis / procedure / drug set."""

    visits: int
    diag: int
    proc: int
    med: int


def bucket_caps(needs: np.ndarray, levels: int) -> list[BucketCap]:
    """Up to `levels` shape caps (visits, diag, proc, med) fitted to the data: samples are sorted by
    padded volume visits·(diag+proc+med) and cut into `levels` equal groups; a group's cap is the
    element-wise max of its needs (code caps rounded up to a multiple of 4). The last cap is the global
    max, so every sample fits; caps are ordered by volume (smallest first)."""
    if levels < 1:
        raise ValueError(f"bucket_levels must be >= 1, got {levels}")
    needs = np.maximum(np.asarray(needs, dtype=np.int64).reshape(-1, 4), 1)
    if len(needs) == 0:
        return [BucketCap(1, 1, 1, 1)]
    top = needs.max(0)

    def rounded(cap) -> BucketCap:
        codes = [int(min(4 * math.ceil(x / 4), m)) for x, m in zip(cap[1:], top[1:])]
        return BucketCap(int(cap[0]), *codes)

    volume = needs[:, 0] * needs[:, 1:].sum(1)
    order = np.argsort(volume, kind="stable")
    caps = [rounded(needs[group].max(0)) for group in np.array_split(order, levels) if len(group)]
    caps[-1] = rounded(top)
    caps = sorted(set(caps), key=lambda c: (c.visits * (c.diag + c.proc + c.med), c))
    return [c for i, c in enumerate(caps)            # drop caps dominated by a smaller-volume cap
            if not any(all(a >= b for a, b in zip(other, c)) for other in caps[:i])]


def assign_buckets(needs: np.ndarray, caps: Sequence[Sequence[int]]) -> np.ndarray:
    """First (smallest-volume) bucket whose caps hold every need of the sample."""
    caps_a = np.asarray(caps, dtype=np.int64)
    fits = (needs[:, None, :] <= caps_a[None, :, :]).all(-1)
    if not fits[:, -1].all():
        bad = int(np.nonzero(~fits[:, -1])[0][0])
        raise ValueError(f"sample row {bad} needs {needs[bad].tolist()} > largest bucket {caps_a[-1].tolist()}")
    return fits.argmax(axis=1)


class PlannedBatch(NamedTuple):
    """One batch of an epoch: its bucket and the sample rows it holds."""

    bucket: int
    rows: np.ndarray


def batch_plan(buckets: np.ndarray, batch_size: int, rng: np.random.Generator | None = None
               ) -> list[PlannedBatch]:
    """The batches of one pass; rows shuffled within buckets and batches shuffled if rng."""
    plan = []
    for b in np.unique(buckets):
        rows = np.nonzero(buckets == b)[0]
        if rng is not None:
            rows = rng.permutation(rows)
        plan += [PlannedBatch(int(b), rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    if rng is not None:
        plan = [plan[i] for i in rng.permutation(len(plan))]
    return plan


def make_batch(enc: EncodedSplit, rows: np.ndarray, cap: Sequence[int], batch_size: int,
               with_teacher: bool = False) -> dict[str, np.ndarray]:
    """Host batch padded to exactly (batch_size, cap): padded rows have weight 0 and no visits."""
    cap = BucketCap(*(int(c) for c in cap))
    n = len(rows)

    def pad(a, shape):
        out = np.zeros((batch_size,) + shape, dtype=a.dtype)
        src = a[rows][(slice(None),) + tuple(slice(0, s) for s in shape)]
        out[(slice(0, n),) + tuple(slice(0, s) for s in src.shape[1:])] = src
        return out

    batch = {"diag": pad(enc.diag, (cap.visits, cap.diag)), "proc": pad(enc.proc, (cap.visits, cap.proc)),
             "med": pad(enc.med, (cap.visits, cap.med)), "n_visits": pad(enc.n_visits, ()),
             "profile": pad(enc.profile, enc.profile.shape[1:]), "target": pad(enc.target, (cap.med,)),
             "labels": pad(enc.labels, enc.labels.shape[1:]), "weight": np.zeros(batch_size, np.float32)}
    batch["weight"][:n] = 1.0
    if with_teacher:
        batch["teacher"] = pad(enc.teacher, enc.teacher.shape[1:])
    if enc.nbr is not None:
        batch["nbr"] = pad(enc.nbr, enc.nbr.shape[1:])
    return batch


# ------------------------------------------------------------------------------- multi-step chunks
class PlannedChunk(NamedTuple):
    """Up to `steps_per_call` optimizer steps of one bucket, run by one dispatch of the train step:
    rows [K, B] sample rows per step (-1 = padding), `steps` the real steps (the rest are skipped)."""

    bucket: int
    steps: int
    rows: np.ndarray


def chunk_plan(buckets: np.ndarray, batch_size: int, steps_per_call: int, rng: np.random.Generator
               ) -> list[PlannedChunk]:
    """The chunks of one epoch: rows shuffled within each bucket and cut into batches (the last one
    of a bucket partial), consecutive batches of a bucket grouped into chunks of `steps_per_call`,
    the chunks of all buckets shuffled. Vectorised; a function of `rng` alone."""
    plan = []
    k = int(steps_per_call)
    for b in np.unique(buckets):
        rows = rng.permutation(np.nonzero(buckets == b)[0])
        n_batches = -(-len(rows) // batch_size)
        grid = np.full(n_batches * batch_size, -1, dtype=np.int64)
        grid[: len(rows)] = rows
        grid = grid.reshape(n_batches, batch_size)
        for first in range(0, n_batches, k):
            part = grid[first:first + k]
            padded = np.full((k, batch_size), -1, dtype=np.int64)
            padded[: len(part)] = part
            plan.append(PlannedChunk(int(b), len(part), padded))
    return [plan[i] for i in rng.permutation(len(plan))]


def make_chunk(enc: EncodedSplit, rows: np.ndarray, cap: Sequence[int], with_teacher: bool = False
               ) -> dict[str, np.ndarray]:
    """Stacked host batches [K, B, ...] for `rows` [K, B] (-1 = padded row: weight 0, no visits, no
    codes), each padded to the bucket `cap`: the same arrays as `make_batch` per step, built with one
    gather per field."""
    cap = BucketCap(*(int(c) for c in cap))
    valid = rows >= 0
    r = np.where(valid, rows, 0)

    def take(a, *trailing):
        src = a[(slice(None),) + tuple(slice(0, s) for s in trailing)][r]     # [K, B, ≤ trailing...]
        src = np.where(valid.reshape(valid.shape + (1,) * (src.ndim - 2)), src, np.zeros((), src.dtype))
        if src.shape[2:] == tuple(trailing) or not trailing:
            return src
        out = np.zeros(valid.shape + tuple(trailing), dtype=a.dtype)       # this split is narrower than cap
        out[(slice(None), slice(None)) + tuple(slice(0, s) for s in src.shape[2:])] = src
        return out

    chunk = {"diag": take(enc.diag, cap.visits, cap.diag), "proc": take(enc.proc, cap.visits, cap.proc),
             "med": take(enc.med, cap.visits, cap.med), "n_visits": take(enc.n_visits),
             "profile": take(enc.profile), "target": take(enc.target, cap.med), "labels": take(enc.labels),
             "weight": valid.astype(np.float32)}
    if with_teacher:
        chunk["teacher"] = take(enc.teacher)
    if enc.nbr is not None:
        chunk["nbr"] = take(enc.nbr)
    return chunk


def after_first_step(chunk: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A `make_chunk` stack whose first step has been run on its own: batch k+1 becomes batch k (the old
    first batch moves to the last slot, which the remaining `steps - 1` steps never reach)."""
    return {k: np.roll(v, -1, axis=0) for k, v in chunk.items()}


# ------------------------------------------------------------------------ neighbours' drug sets (B2 ii)
def attach_neighbours(encs: dict[str, EncodedSplit], data, retrieval) -> dict[str, int]:
    """Retrieval mode fixed: `enc.nbr` <- `Memory.drug_bag(pools.top(k))` for every split of `encs`, with the
    pools of the run's `RunRetrieval` (the training-split memory; a sample never sees its own patient's
    visits; RUN/retrieval/<split>.npz reused when data and settings match). Returns, per split, the number
    of samples without any neighbour."""
    empty = {}
    for split, enc in encs.items():
        pools = retrieval.split_pools(data.splits[split], split)
        if pools.query_ids != enc.ids.tolist():
            raise ValueError(f"the {split} pools' rows do not follow the {split} samples")
        top = pools.top(retrieval.k)
        enc.nbr = retrieval.memory.drug_bag(top, data.vocab)
        empty[split] = int((top < 0).all(axis=1).sum())
    return empty


def query_samples(enc: EncodedSplit, vocab) -> list:
    """One query `Sample` per row of `enc` for new patients: id = patient id = the row's id, the target
    visit's diagnosis + procedure codes read back from the last kept visit slot, no drugs (so no oracle),
    time "" (later than every memory visit)."""
    from leader_jax.data.dataset import Sample, Visit

    out = []
    last = np.maximum(enc.n_visits.astype(np.int64) - 1, 0)
    rows = np.arange(len(enc))
    dx, px = enc.diag[rows, last], enc.proc[rows, last]              # [n, C] ids of the target visit
    for i, pid in enumerate(enc.ids.tolist()):
        visit = Visit(id="", time="", diagnoses=tuple(vocab.diag[j - 1] for j in dx[i] if j > 0),
                      procedures=tuple(vocab.proc[j - 1] for j in px[i] if j > 0), medications=())
        out.append(Sample(id=pid, patient_id=pid, visits=(visit,)))
    return out


def neighbour_bags(retrieval, enc: EncodedSplit, vocab) -> np.ndarray:
    """float32 [n, n_med]: the neighbours' drug bags of new patients (the rows of `enc`, see `query_samples`),
    their pools built afresh from the run's saved memory and settings (`RunRetrieval.input_pools`)."""
    if not len(enc):
        return np.zeros((0, vocab.n_med), np.float32)
    return retrieval.memory.drug_bag(retrieval.input_pools(query_samples(enc, vocab)).top(retrieval.k), vocab)
