"""A MEDS folder as the input of `python -m leader_jax.predict`: its subjects as patient objects in the
input schema (`leader_jax.patient_input`), so that they go through the same checks as JSONL lines.

The subjects are read by the MEDS reader of data preparation (`leader_jax.data.meds`) with the predict
config's `meds` block (the same fields as configs/data.py's) and the prepared data's visit order.
Codes become the prepared tokens (`dx9:4019`, `atc:N02B`, ...); those outside the run's vocabulary are
then listed in `unknown_codes` as for JSONL. The last visit of each subject is the one predicted.

A visit is kept when it has a code of any channel. The MEDS reader keeps only visits holding every
channel of `meds.required`, which for prediction would drop the newest visit when its drugs are not
recorded yet; so the folder is read once per channel (required = that channel) and the visits are
united per subject, in the reader's order (its per-channel orders merged; visits no order relates
are placed by their time, then their id).
"""
from __future__ import annotations

import heapq
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from leader_jax.cli import UserError

CHANNELS = ("diagnoses", "procedures", "medications")
SPLITS = ("train", "val", "test")


def is_meds_folder(path: str) -> bool:
    return bool(path) and path != "-" and Path(path).is_dir()


def read_patients(root: str | Path, meds: ConfigDict, visit_order: str, split: str = "") -> list[dict[str, Any]]:
    """The subjects of the MEDS folder `root` as patient objects (ids: the reader's patient ids), in id
    order; `split` ("" = all): only the subjects of that split of the folder's split file."""
    from leader_jax.cli import load_config
    from leader_jax.data.cohort import id_key
    from leader_jax.data.meds import read_meds
    from leader_jax.data.prepare import validate_meds

    validate_meds(meds)
    cohorts = []
    for ch in CHANNELS:
        cfg = load_config("data.py", {"dataset": "meds", "raw_dir": str(root), "visit_order": visit_order,
                                      "meds": {**meds.to_dict(), "required": (ch,)}})
        try:
            cohorts.append(read_meds(root, cfg))
        except FileNotFoundError as e:
            raise UserError(f"MEDS input {root}: {e}") from None
        except ValueError as e:
            if "lacks a required channel" in str(e):       # no visit with this channel: nothing to add
                continue
            raise UserError(f"MEDS input {root}: {e}") from None
    if not cohorts:
        raise UserError(f"MEDS input {root}: no visit with a diagnosis, procedure or medication code")
    if split:
        if cohorts[0].splits is None:
            raise UserError(f"config meds_split={split!r}: the MEDS folder {root} has no split file "
                            "(metadata/subject_splits.parquet or data/<split>/ folders); use meds_split=''")
    chains: dict[str, list] = {}
    profiles: dict[str, dict] = {}
    for c in cohorts:
        profiles.update(c.visit_profiles)
        for p in c.patients:
            chains.setdefault(p.id, []).append(list(p.visits))
    split_of = next((c.splits for c in cohorts if c.splits is not None), None)
    out = []
    for pid in sorted(chains, key=id_key):
        if split and split_of.get(pid) != split:
            continue
        visits = _merge_orders(chains[pid], by_id=visit_order == "hadm_id")
        out.append({"id": pid, "profile": dict(profiles[visits[-1].id]),
                    "visits": [{"id": v.id, "time": v.time, "diagnoses": list(v.diagnoses),
                                "procedures": list(v.procedures), "medications": list(v.medications)}
                               for v in visits]})
    return out


def _merge_orders(chains: list[list], by_id: bool) -> list:
    """The union of several orderings of (subsets of) one visit list, keeping every given order; ties
    (visits no chain orders) by (time, id), or id alone for the hadm_id visit order."""
    from leader_jax.data.cohort import id_key

    visit, after, indeg = {}, {}, {}
    for chain in chains:
        for a, b in zip(chain, chain[1:]):
            if b.id not in after.setdefault(a.id, set()):
                after[a.id].add(b.id)
                indeg[b.id] = indeg.get(b.id, 0) + 1
        for v in chain:
            visit[v.id] = v
    key = (lambda v: id_key(v.id)) if by_id else (lambda v: (v.time, id_key(v.id)))
    by_index = list(visit.values())
    pos = {v.id: i for i, v in enumerate(by_index)}
    heap = [(key(v), i) for i, v in enumerate(by_index) if indeg.get(v.id, 0) == 0]
    heapq.heapify(heap)
    out = []
    while heap:
        _, i = heapq.heappop(heap)
        v = by_index[i]
        out.append(v)
        for nxt in after.get(v.id, ()):
            indeg[nxt] -= 1
            if indeg[nxt] == 0:
                heapq.heappush(heap, (key(visit[nxt]), pos[nxt]))
    return out
