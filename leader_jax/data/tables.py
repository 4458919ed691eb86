"""Raw-table access shared by the readers: case-insensitive file and column lookup, `.csv` or
`.csv.gz`, every column read as a string, and clear errors naming the file and column.

Also `Drops`, the per-reason counter of rows/visits removed on the way (reported in stats.json), and
the cleaning steps every reader applies before a value becomes a token or an ordering key:
missing-value markers (`NaN`, `NULL`, `NA`, `None`, ...) read as missing, integral float ids
(`123.0`) read as integers, codes checked for length and separator characters, dates parsed as
ISO 8601 and numeric keys parsed as numbers (never compared as strings)."""
from __future__ import annotations

import gzip
import re
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
    case-insensitively (`hosp/admissions`, `ADMISSIONS`, `admissionDrug`). Two candidates for one
    part (`X.csv` beside `X.csv.gz`, or two spellings of one name) are refused as ambiguous."""
    base = Path(raw_dir)
    if not base.is_dir():
        raise FileNotFoundError(f"raw data folder {base} does not exist")
    parts = name.split("/")
    cur = base
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        wanted = ({f"{part}.csv".lower(), f"{part}.csv.gz".lower()} if last else {part.lower()})
        matches = sorted(p for p in cur.iterdir() if p.name.lower() in wanted) if cur.is_dir() else []
        if not matches:
            raise FileNotFoundError(f"{base}: missing table {name}.csv or {name}.csv.gz "
                                    f"(looked in {cur}, names matched case-insensitively)")
        if len(matches) > 1:
            raise ValueError(f"ambiguous table {name}: both {matches[0]} and {matches[1]} exist; "
                             "remove or rename one of them")
        cur = matches[0]
    return cur


_READ_ERRORS = (EOFError, OSError, zlib.error, gzip.BadGzipFile, UnicodeDecodeError,
                pd.errors.ParserError, pd.errors.EmptyDataError, ValueError)


def read_table(path: Path, required: Sequence[str], optional: Iterable[str] = (),
               require_rows: bool = False) -> pd.DataFrame:
    """Read the named columns (lower-cased names) as strings; empty cells are NaN, surrounding
    whitespace is stripped. Missing required column, a column named twice in the header, or (with
    `require_rows`) a table without data rows -> ValueError naming the file and column."""
    path = Path(path)
    try:
        header = pd.read_csv(path, header=None, nrows=1, dtype=str, keep_default_na=False)
    except _READ_ERRORS as e:
        raise ValueError(f"{path}: cannot read CSV header ({type(e).__name__}: {e})") from None
    names = [str(c).strip().lower() for c in header.iloc[0].tolist()] if len(header) else []
    pos: Dict[str, list] = {}
    for i, c in enumerate(names):
        pos.setdefault(c, []).append(i)
    missing = [c for c in required if c.lower() not in pos]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)} "
                         f"(found: {', '.join(sorted(pos))})")
    want = list(dict.fromkeys([c.lower() for c in required] + [c.lower() for c in optional if c.lower() in pos]))
    for c in want:
        if len(pos[c]) > 1:
            raise ValueError(f"{path}: column {c!r} appears {len(pos[c])} times in the header "
                             f"(positions {', '.join(str(i + 1) for i in pos[c])}); keep one")
    cols = sorted(pos[c][0] for c in want)
    try:
        df = pd.read_csv(path, header=0, usecols=cols, dtype=object, keep_default_na=False, na_values=[""],
                         engine="c", low_memory=False)
    except _READ_ERRORS as e:
        raise ValueError(f"{path}: cannot read CSV ({type(e).__name__}: {e})") from None
    df.columns = [names[i] for i in cols]            # usecols by position: file order
    df = df[want]
    for c in want:
        s = df[c].astype(object).str.strip()
        df[c] = s.mask(s == "")
    if require_rows and len(df) == 0:
        raise ValueError(f"{path}: the table has no data rows (header only), so the cohort would be empty")
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


# ---------------------------------------------------------------- cleaning: markers, ids, codes, keys
NA_MARKERS = ("nan", "null", "none", "na", "n/a", "<na>", "nat")
MAX_CODE_LEN = 64          # ICD / HICL codes (real ones have <= 8 characters)
MAX_TEXT_LEN = 256         # eICU diagnosis / treatment path strings (demo maximum: 147)
_CODE_BAD = re.compile(r"[\x00-\x1f\x7f;,]")   # control characters (newline, tab, ...), `;` and `,`
_TEXT_BAD = re.compile(r"[\x00-\x1f\x7f]")
_NAIVE_ISO = re.compile(r"\d{4}-\d{1,2}-\d{1,2}([ T]\d{1,2}:\d{2}(:\d{2}(\.\d{1,9})?)?)?")


def _all_cases(word: str) -> set:
    out = {""}
    for ch in word:
        out = {p + v for p in out for v in {ch.lower(), ch.upper()}}
    return out


_MARKER_SPELLINGS = sorted({v for w in NA_MARKERS for v in _all_cases(w)})


def example(value, width: int = 40) -> str:
    """A value for a drop reason: repr, cut to `width` characters."""
    r = repr(str(value))
    return r if len(r) <= width else r[:width - 1] + "…"


def marker_mask(s: pd.Series) -> np.ndarray:
    """True where the cell holds a missing-value marker (NaN, NULL, NA, None, N/A, <NA>, NaT; any case)."""
    return s.isin(_MARKER_SPELLINGS).to_numpy()


def drop_missing(df: pd.DataFrame, cols: Sequence[str], drops: Drops, label: str, empty_reason: str,
                 need: str = "all") -> pd.DataFrame:
    """Read missing-value markers in `cols` as missing and drop the rows that then lack a value:
    need="all" drops a row missing any of cols, need="any" one missing all of them. Rows holding a
    marker are counted per column (`<label>: <col> is NaN/NULL/NA/None`), the others under
    `empty_reason`."""
    marks = {c: marker_mask(df[c]) for c in cols}
    if any(m.any() for m in marks.values()):
        df = df.assign(**{c: df[c].mask(marks[c]) for c in cols})
    miss = [df[c].isna().to_numpy() for c in cols]
    gone = np.logical_or.reduce(miss) if need == "all" else np.logical_and.reduce(miss)
    left = gone.copy()
    for c in cols:
        m = left & marks[c]
        drops.add(f"{label}: {c} is a missing-value marker (NaN/NULL/NA/None)", np.count_nonzero(m))
        left &= ~m
    drops.add(empty_reason, np.count_nonzero(left))
    return df.loc[~gone] if gone.any() else df


def unmark(df: pd.DataFrame, cols: Sequence[str]) -> pd.DataFrame:
    """Missing-value markers in `cols` become missing (no drop; for optional fields)."""
    marks = {c: marker_mask(df[c]) for c in cols if c in df.columns}
    marks = {c: m for c, m in marks.items() if m.any()}
    return df.assign(**{c: df[c].mask(m) for c, m in marks.items()}) if marks else df


_FLOAT_ID = re.compile(r"[+-]?\d+\.\d*")


def integral_ids(df: pd.DataFrame, cols: Sequence[str], path) -> pd.DataFrame:
    """Ids written as integral floats (`123.0`, as pandas writes an int column holding gaps) become
    `123`; a non-integral one (`123.5`) is an error naming the file, column and value."""
    out = {}
    for c in cols:
        s = df[c]
        dot = s.str.contains(".", regex=False, na=False).to_numpy()
        if not dot.any():
            continue
        sub = s[dot]
        num = sub.str.fullmatch(_FLOAT_ID.pattern, na=False)
        frac = sub[num].str.split(".", n=1).str[1].fillna("")
        bad = frac.str.strip("0") != ""
        if bad.any():
            raise ValueError(f"{path}: column {c!r} holds a non-integral id {sub[num][bad].iloc[0]!r}")
        fixed = s.copy()
        fixed.loc[sub[num].index] = sub[num].map(lambda x: str(int(x.split(".", 1)[0])))
        out[c] = fixed
    return df.assign(**out) if out else df


def drop_bad_codes(df: pd.DataFrame, col: str, drops: Drops, label: str, text: bool = False) -> pd.DataFrame:
    """Drop rows whose code would break a token or a prompt: longer than MAX_CODE_LEN (MAX_TEXT_LEN for
    eICU path strings, text=True) or holding a control character (newline, tab, ...) or, for codes,
    `;` or `,`. Counted per column with an example value."""
    s = df[col]
    cap, bad_re = (MAX_TEXT_LEN, _TEXT_BAD) if text else (MAX_CODE_LEN, _CODE_BAD)
    long = (s.str.len() > cap).fillna(False).to_numpy(dtype=bool)
    if long.any():
        drops.add(f"{label}: {col} longer than {cap} characters (e.g. {example(s[long].iloc[0])})",
                  np.count_nonzero(long))
    bad = s.str.contains(bad_re.pattern, regex=True, na=False).to_numpy(dtype=bool) & ~long
    if bad.any():
        what = "a control character" if text else "a control character, ';' or ','"
        drops.add(f"{label}: {col} holds {what} (e.g. {example(s[bad].iloc[0])})", np.count_nonzero(bad))
    gone = long | bad
    return df.loc[~gone] if gone.any() else df


def parse_dates(s: pd.Series) -> pd.Series:
    """Naive ISO 8601 dates / date-times (`2150-01-01`, `2150-01-01 10:00:00`, `...T10:00:00.5`) ->
    datetime64; missing or anything else (other layouts, time zones, impossible dates) -> NaT."""
    try:
        t = pd.to_datetime(s, format="ISO8601", errors="coerce")
        if getattr(t.dt, "tz", None) is None:
            return t
    except (ValueError, TypeError, OverflowError):
        pass
    ok = s.str.fullmatch(_NAIVE_ISO.pattern, na=False)
    return pd.to_datetime(s.where(ok), format="ISO8601", errors="coerce")


def time_key(t: pd.Series, missing_last: bool = True) -> np.ndarray:
    """int64 microseconds since 1970 (sortable); NaT -> the largest int64 (sorted last)."""
    v = t.to_numpy(dtype="datetime64[us]").astype(np.int64)
    nat = t.isna().to_numpy()
    if nat.any():
        v = v.copy()
        v[nat] = np.iinfo(np.int64).max if missing_last else np.iinfo(np.int64).min
    return v


def drop_bad_dates(df: pd.DataFrame, col: str, drops: Drops, label: str) -> tuple:
    """Parse `col` (parse_dates); drop and count rows whose present value is not a date (the reason
    names the column and an example). Returns (df, parsed dates aligned with df; NaT where missing)."""
    t = parse_dates(df[col])
    bad = (t.isna() & df[col].notna()).to_numpy()
    if bad.any():
        drops.add(f"{label}: {col} is not an ISO date (e.g. {example(df[col][bad].iloc[0])})",
                  np.count_nonzero(bad))
        df, t = df.loc[~bad], t.loc[~bad]
    return df, t


def drop_bad_numbers(df: pd.DataFrame, col: str, drops: Drops, label: str, need: bool) -> tuple:
    """Parse `col` as an integer-valued number (eICU order keys and offsets); drop and count rows whose
    value is present but not an integer, and with `need` also rows where it is missing. Returns
    (df, float values aligned with df; NaN where missing)."""
    v = pd.to_numeric(df[col], errors="coerce")
    present = df[col].notna().to_numpy()
    bad = present & ~(v.notna() & (v == v.round())).to_numpy()
    if bad.any():
        drops.add(f"{label}: {col} is not an integer (e.g. {example(df[col][bad].iloc[0])})", np.count_nonzero(bad))
    gone = bad.copy()
    if need:
        drops.add(f"{label}: {col} missing", np.count_nonzero(~present))
        gone |= ~present
    if gone.any():
        df, v = df.loc[~gone], v.loc[~gone]
    return df, v


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
