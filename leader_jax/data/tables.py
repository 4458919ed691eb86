"""Raw-table access shared by the readers: case-insensitive file and column lookup, `.csv` or
`.csv.gz`, every column read as a string, and clear errors naming the file and column.

Also `Drops`, the per-reason counter of rows/visits removed on the way (reported in stats.json)."""
from __future__ import annotations

import gzip
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence

import numpy as np
import pandas as pd


class Drops:
    """Ordered counter: reason -> number of rows (or visits/patients, as the reason says)."""

    def __init__(self):
        self.counts: Dict[str, int] = OrderedDict()

    def add(self, reason: str, n: int) -> None:
        n = int(n)
        if n > 0:
            self.counts[reason] = self.counts.get(reason, 0) + n

    def as_dict(self) -> Dict[str, int]:
        return dict(self.counts)


def find_table(raw_dir: str | Path, name: str) -> Path:
    """Locate `<name>.csv` or `<name>.csv.gz` under raw_dir, matching every path part
    case-insensitively (`hosp/admissions`, `ADMISSIONS`, `admissionDrug`)."""
    base = Path(raw_dir)
    if not base.is_dir():
        raise FileNotFoundError(f"raw data folder {base} does not exist")
    parts = name.split("/")
    cur = base
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        wanted = ({f"{part}.csv".lower(), f"{part}.csv.gz".lower()} if last else {part.lower()})
        matches = sorted(p for p in cur.iterdir() if p.name.lower() in wanted) if cur.is_dir() else []
        if last:  # prefer the plain .csv when both exist
            matches.sort(key=lambda p: (p.name.lower().endswith(".gz"), p.name))
        if not matches:
            raise FileNotFoundError(f"{base}: missing table {name}.csv or {name}.csv.gz "
                                    f"(looked in {cur}, names matched case-insensitively)")
        cur = matches[0]
    return cur


_READ_ERRORS = (EOFError, OSError, zlib.error, gzip.BadGzipFile, UnicodeDecodeError,
                pd.errors.ParserError, pd.errors.EmptyDataError, ValueError)


def read_table(path: Path, required: Sequence[str], optional: Iterable[str] = ()) -> pd.DataFrame:
    """Read the named columns (lower-cased names) as strings; empty cells are NaN, surrounding
    whitespace is stripped. Missing required column -> ValueError naming file and column."""
    path = Path(path)
    try:
        header = pd.read_csv(path, nrows=0, dtype=str)
    except _READ_ERRORS as e:
        raise ValueError(f"{path}: cannot read CSV header ({type(e).__name__}: {e})") from None
    lower = {}
    for c in header.columns:
        lower.setdefault(str(c).strip().lower(), c)
    missing = [c for c in required if c.lower() not in lower]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)} "
                         f"(found: {', '.join(sorted(lower))})")
    want = list(dict.fromkeys([c.lower() for c in required] + [c.lower() for c in optional if c.lower() in lower]))
    orig = [lower[c] for c in want]
    try:
        df = pd.read_csv(path, usecols=orig, dtype=object, keep_default_na=False, na_values=[""],
                         engine="c", low_memory=False)
    except _READ_ERRORS as e:
        raise ValueError(f"{path}: cannot read CSV ({type(e).__name__}: {e})") from None
    df = df.rename(columns={lower[c]: c for c in want})[want]
    for c in want:
        s = df[c].astype(object).str.strip()
        df[c] = s.mask(s == "")
    return df


def missing_mask(s: pd.Series) -> np.ndarray:
    return s.isna().to_numpy()


def drop_rows(df: pd.DataFrame, mask: np.ndarray, drops: Drops, reason: str) -> pd.DataFrame:
    """Remove rows where mask is True and count them under `reason`."""
    n = int(np.count_nonzero(mask))
    if n:
        drops.add(reason, n)
        df = df.loc[~mask]
    return df


def drop_duplicates(df: pd.DataFrame, drops: Drops, reason: str,
                    subset: Optional[Sequence[str]] = None) -> pd.DataFrame:
    mask = df.duplicated(subset=subset, keep="first").to_numpy()
    return drop_rows(df, mask, drops, reason)


def group_unique(keys: np.ndarray, values: np.ndarray) -> Dict[str, tuple]:
    """key -> tuple of unique values in first-appearance order (row order preserved)."""
    if len(keys) == 0:
        return {}
    df = pd.DataFrame({"k": keys, "v": values}).drop_duplicates(keep="first")
    k = df["k"].to_numpy()
    v = df["v"].to_numpy()
    order = np.argsort(k, kind="stable")
    k, v = k[order], v[order]
    bounds = np.flatnonzero(k[1:] != k[:-1]) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(k)]])
    vl = v.tolist()
    return {k[s]: tuple(vl[s:e]) for s, e in zip(starts.tolist(), ends.tolist())}
