"""Retrieval quality measured directly: how well the neighbours' drugs match the query's true drugs.

Uses the labels, so it is an evaluation only (never a retrieval signal). For each query with at least one
neighbour: `mean_jaccard` averages Jaccard(neighbour's drugs, query's true drugs) over its k neighbours;
`union_jaccard` takes Jaccard(union of the k neighbours' drugs, true drugs). Both are then averaged over
those queries; queries without any neighbour are counted in `n_without_neighbours` and left out.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from leader_jax.retrieval.memory import Memory


def _jaccard(a: set, b: set) -> float:
    u = len(a | b)
    return len(a & b) / u if u else 0.0


def neighbour_quality(memory: Memory, indices: np.ndarray, true_drugs: Sequence[Sequence[str]]) -> dict:
    """{mean_jaccard, union_jaccard, n_queries, n_without_neighbours} for neighbours `indices` [n, k]
    (memory rows best first, -1 = none) and each query's true drugs."""
    indices = np.asarray(indices)
    if indices.shape[0] != len(true_drugs):
        raise ValueError(f"{indices.shape[0]} neighbour rows for {len(true_drugs)} queries")
    per, union, empty = [], [], 0
    for row, truth in zip(indices, true_drugs):
        truth = set(truth)
        nbrs = [set(memory.medications[int(j)]) for j in row if j >= 0]
        if not nbrs:
            empty += 1
            continue
        per.append(float(np.mean([_jaccard(n, truth) for n in nbrs])))
        union.append(_jaccard(set().union(*nbrs), truth))
    return {"mean_jaccard": float(np.mean(per)) if per else float("nan"),
            "union_jaccard": float(np.mean(union)) if union else float("nan"),
            "n_queries": len(per), "n_without_neighbours": empty}
