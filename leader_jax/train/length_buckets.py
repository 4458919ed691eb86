"""Length buckets: sequences are padded to one of a few lengths instead of one fixed length, so each shape
compiles once and a 65-token prompt does not pay for 512.

- `bucket_set(buckets, max_len)`: the configured lengths below `max_len`, plus `max_len` itself; an empty
  configuration gives the single bucket `max_len` (the fixed-length padded path).
- `BucketedStream`: the training groups (one optimizer step each, G = accum x micro-batch sequences). For
  epoch e the samples are permuted with (seed, e); walking the buckets from short to long, each bucket's
  samples (in permutation order) are cut into groups of G, and a remainder is carried into the next longer
  bucket (padded to its length); the last remainder is completed with the first samples of the epoch's
  permutation. The epoch's groups are then shuffled with (seed, e, 1). How many groups an epoch has depends
  only on the bucket counts, so step s's group, (epoch, index) = divmod(s, groups per epoch), is a pure
  function of s: a resumed run replays exactly the same batches.
- `eval_plan`: evaluation batches over the rows sorted by length, each padded to the bucket of its longest row.
- `PadStats`: real vs computed tokens (the padding fraction) and the distinct shapes run.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


def bucket_set(buckets: Sequence[int], max_len: int) -> tuple[int, ...]:
    """Sorted unique bucket lengths <= max_len, always ending with max_len."""
    return tuple(sorted({int(b) for b in buckets if 0 < int(b) < int(max_len)} | {int(max_len)}))


def bucket_index(lengths: np.ndarray, buckets: Sequence[int]) -> np.ndarray:
    """Index of the smallest bucket holding each length (lengths must be <= buckets[-1])."""
    lengths = np.asarray(lengths)
    if lengths.size and lengths.max() > buckets[-1]:
        raise ValueError(f"a sequence of {int(lengths.max())} tokens exceeds the largest bucket {buckets[-1]}")
    return np.searchsorted(np.asarray(buckets), lengths, side="left")


def validate_buckets(name: str, buckets: Sequence[int]) -> None:
    """ValueError naming the config field when a bucket length is not positive."""
    bad = [b for b in buckets if int(b) <= 0]
    if bad:
        raise ValueError(f"{name}={tuple(buckets)}: bucket lengths must be positive (got {bad})")


class BucketedStream:
    """Training groups of `group` rows that share a bucket; `step_rows(step)` -> (rows [group], padded length)."""

    def __init__(self, lengths: np.ndarray, buckets: Sequence[int], group: int, seed: int):
        self.lengths = np.asarray(lengths)
        self.buckets = tuple(int(b) for b in buckets)
        self.group, self.seed = int(group), int(seed)
        self.n = len(self.lengths)
        if self.n == 0:
            raise ValueError("no training sequences")
        self.bucket_of = bucket_index(self.lengths, self.buckets)
        self._cache: dict[int, list[tuple[np.ndarray, int]]] = {}
        self.groups_per_epoch = len(self._epoch(0))

    def _epoch(self, epoch: int) -> list[tuple[np.ndarray, int]]:
        if epoch in self._cache:
            return self._cache[epoch]
        g = self.group
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        groups: list[tuple[np.ndarray, int]] = []
        carry = np.empty((0,), np.int64)
        for b, length in enumerate(self.buckets):
            members = np.concatenate([carry, perm[self.bucket_of[perm] == b]])
            full = len(members) // g
            groups += [(members[i * g:(i + 1) * g], length) for i in range(full)]
            carry = members[full * g:]
        if len(carry):
            fill = np.resize(perm, g - len(carry))          # the first samples of the epoch (wrapping)
            groups.append((np.concatenate([carry, fill]), self.buckets[-1]))
        order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(groups))
        out = [groups[i] for i in order]
        if len(self._cache) > 4:
            self._cache.pop(next(iter(self._cache)))
        self._cache[epoch] = out
        return out

    def step_rows(self, step: int) -> tuple[np.ndarray, int]:
        epoch, i = divmod(int(step), self.groups_per_epoch)
        rows, length = self._epoch(epoch)[i]
        return rows, length


def eval_plan(lengths: np.ndarray, batch_size: int, buckets: Sequence[int]) -> list[tuple[np.ndarray, int]]:
    """[(rows, padded length)] covering every row once: rows sorted by length (stable), cut into batches of
    `batch_size`, each padded to the bucket of its longest row (the caller fills a short last batch)."""
    lengths = np.asarray(lengths)
    order = np.argsort(lengths, kind="stable")
    plan = []
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        plan.append((rows, int(buckets[int(bucket_index(lengths[rows].max(keepdims=True), buckets)[0])])))
    return plan


@dataclasses.dataclass
class PadStats:
    """Tokens of real sequences vs positions computed (rows x padded length), and the shapes seen."""
    real_tokens: int = 0
    computed_tokens: int = 0
    shapes: set = dataclasses.field(default_factory=set)

    def add(self, real_tokens: int, rows: int, length: int, shape: tuple = ()) -> None:
        self.real_tokens += int(real_tokens)
        self.computed_tokens += int(rows) * int(length)
        self.shapes.add(tuple(shape) or (int(rows), int(length)))

    @property
    def pad_fraction(self) -> float:
        return 1.0 - self.real_tokens / self.computed_tokens if self.computed_tokens else 0.0

    def summary(self) -> dict:
        return {"pad_fraction": round(self.pad_fraction, 4), "real_tokens": self.real_tokens,
                "computed_tokens": self.computed_tokens, "shapes": len(self.shapes)}
