"""`RawCohort`: what a reader hands to the builder (patients with unfiltered codes, per-visit
profiles, display names, drop counts), plus small helpers shared by the readers."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from leader_jax.data.records import Patient
from leader_jax.data.tables import NA_MARKERS, Drops

UNKNOWN = "unknown"
AGE_BUCKETS = ((18, "<18"), (30, "18-29"), (40, "30-39"), (50, "40-49"), (60, "50-59"),
               (70, "60-69"), (80, "70-79"), (90, "80-89"))


@dataclass
class RawCohort:
    dataset: str
    patients: List[Patient]                      # natural id order; visits oldest -> newest
    visit_profiles: Dict[str, Dict[str, str]]    # visit id -> profile at that visit
    names: Dict[str, str]                        # token -> display name (may hold extra tokens)
    drops: Drops
    required: Tuple[str, ...]                    # channels a visit must have non-empty
    profile_fields: Tuple[str, ...]
    ddi_pairs: Optional[tuple] = None            # ((atc_a, atc_b), ...) or None (no DDI graph)
    ddi_codes: Optional[tuple] = None
    notes: List[str] = field(default_factory=list)
    splits: Optional[Dict[str, str]] = None      # patient id -> train/val/test from the source (MEDS split
                                                 #     file); None: the seeded patient split


def age_bucket(age) -> str:
    """Decade buckets; >89 for MIMIC's shifted ages (≈300 y) and eICU's "> 89"."""
    if age is None:
        return UNKNOWN
    try:
        a = float(age)
    except (TypeError, ValueError):
        return UNKNOWN
    if a != a or a < 0:
        return UNKNOWN
    for hi, label in AGE_BUCKETS:
        if a < hi:
            return label
    return ">89"


def id_key(s: str):
    """Natural order for ids: numeric ids by value, then other strings lexicographically."""
    return (0, len(s), s) if s.isdigit() else (1, 0, s)


def clean_value(v) -> str:
    """A profile value as written; missing, blank or a missing-value marker (NaN, NULL, ...) -> "unknown"."""
    if v is None or (isinstance(v, float) and v != v):
        return UNKNOWN
    s = str(v).strip()
    return s if s and s.lower() not in NA_MARKERS else UNKNOWN
