"""MEDS reader → `RawCohort`: any dataset in the Medical Event Data Standard (MEDS 0.4) becomes the same
prepared-data format as the native readers.

Input: `data/**/*.parquet` (subject_id int, time naive timestamp, code string, optional extra columns),
optionally `metadata/codes.parquet` (code → description, used as display names) and
`metadata/subject_splits.parquet` (train / tuning / held_out → train / val / test), else `data/<split>/`
folders, else the seeded patient split of the other readers. What codes mean comes from a preset plus the
`meds` config block (leader_jax/data/meds_presets.py).

Visits, by precedence per subject: the visit-id column (rows without an id attach by time to the stay
whose [start, end] holds them, end inclusive; the latest start wins), else admission → discharge code
pairs, else a time-gap rule. Codes inside a visit keep their (time, file order) order, unique.
Shards are read one at a time (pyarrow); a subject must sit in one shard, so memory is bounded by the
largest shard. Bad input is a ValueError naming the file (→ UserError) or a drop counted by reason.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pandas as pd

from leader_jax.data import mappings
from leader_jax.data.cohort import RawCohort, age_bucket, clean_value, id_key
from leader_jax.data.meds_presets import CHANNELS, Settings, check, classify, compile_settings, settings
from leader_jax.data.records import Patient, Visit
from leader_jax.data.tables import Drops, read_table
from leader_jax.io import progress

SPLIT_NAMES = {"train": "train", "tuning": "val", "held_out": "test"}
NAT = np.iinfo(np.int64).min


def find_shards(root: Path) -> List[Path]:
    data = root / "data"
    if not root.is_dir():
        raise FileNotFoundError(f"MEDS folder {root} does not exist")
    if not data.is_dir():
        raise FileNotFoundError(f"{root}: no data/ folder (a MEDS dataset holds data/**/*.parquet)")
    shards = sorted(p for p in data.rglob("*.parquet") if p.is_file())
    if not shards:
        raise FileNotFoundError(f"{data}: no .parquet file")
    return shards


class NdcAtc3(dict):
    """NDC → `atc:<ATC-3>` through the bundled NDC → RxCUI → ATC-3 maps, limited to the DDI label space
    (the MIMIC readers' rule)."""

    def __init__(self, cfg, ddi_codes):
        super().__init__()
        self.ndc2rx, self.rx2atc = mappings.ndc_to_atc3(cfg.ndc_map, cfg.rxcui_atc)
        self.ok = set(ddi_codes)

    def get(self, ndc, default=None):
        atc = self.rx2atc.get(self.ndc2rx.get(ndc))
        return "atc:" + atc if atc in self.ok else default


def load_med_map(s: Settings, cfg):
    """(map or None, names of the labels, DDI (codes, pairs) or None)."""
    if not s.med_map:
        return None, {}, None
    if s.med_map == "ndc_atc3":
        ddi = mappings.load_ddi_pairs(str(cfg.ddi_pairs))
        names = {"atc:" + k: v for k, v in mappings.load_atc3_names(str(cfg.atc_names)).items()}
        return NdcAtc3(cfg, ddi[0]), names, ddi
    path = Path(s.med_map)
    if not path.is_file():
        raise FileNotFoundError(f"config meds.med_map: {path} does not exist (expected ndc_atc3 or a CSV)")
    df = read_table(path, ["code", "label"], ["name"]).dropna(subset=["code", "label"])
    names = {}
    if "name" in df.columns:
        named = df.dropna(subset=["name"])
        names = dict(zip(named["label"], named["name"]))
    return dict(zip(df["code"], df["label"])), names, None


def read_split_file(root: Path, shards: List[Path]) -> Optional[Dict[int, str]]:
    """subject_id → train/val/test from metadata/subject_splits.parquet, else from data/<split>/ folders."""
    import pyarrow.parquet as pq

    path = root / "metadata" / "subject_splits.parquet"
    if path.is_file():
        tbl = _read_parquet(path, ["subject_id", "split"])
        sp = tbl.column("split").to_pylist()
        bad = sorted({x for x in sp if x not in SPLIT_NAMES}, key=str)
        if bad:
            raise ValueError(f"{path}: unknown split name(s) {bad[:3]} (expected train, tuning, held_out)")
        if tbl.column("subject_id").null_count:
            raise ValueError(f"{path}: null subject_id")
        return {int(k): SPLIT_NAMES[v] for k, v in zip(tbl.column("subject_id").to_pylist(), sp)}
    parts = {p.relative_to(root / "data").parts[0] for p in shards}
    if all(len(p.relative_to(root / "data").parts) > 1 for p in shards) and parts <= set(SPLIT_NAMES):
        out = {}
        for p in shards:
            split = SPLIT_NAMES[p.relative_to(root / "data").parts[0]]
            sid = pq.read_table(p, columns=["subject_id"]).column("subject_id")
            out.update((int(x), split) for x in pd.unique(sid.drop_null().to_numpy()))
        return out
    return None


def _read_parquet(path: Path, columns, extra=()):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: not a parquet file ({e})") from None
    names = pf.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(names)})")
    try:
        return pf.read(columns=list(columns) + [c for c in extra if c in names and c not in columns])
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: cannot read parquet ({e})") from None


def _check_types(path: Path, tbl) -> None:
    """The MEDS core columns (meds.DataSchema): subject_id integer, time naive timestamp, code string."""
    import meds
    import pyarrow as pa

    sch = meds.DataSchema
    t = tbl.schema.field(sch.subject_id_name).type
    if not pa.types.is_integer(t):
        raise ValueError(f"{path}: column subject_id has type {t}, expected an integer ({sch.subject_id_dtype})")
    t = tbl.schema.field(sch.time_name).type
    if not pa.types.is_timestamp(t):
        raise ValueError(f"{path}: column time has type {t}, expected a timestamp ({sch.time_dtype})")
    if t.tz is not None:
        raise ValueError(f"{path}: column time is time-zone aware ({t}); MEDS times are naive ({sch.time_dtype})")
    t = tbl.schema.field(sch.code_name).type
    if pa.types.is_dictionary(t):
        t = t.value_type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise ValueError(f"{path}: column code has type {t}, expected a string ({sch.code_dtype})")


def _encode(col):
    """(int indices with -1 for null, list of distinct values) of an arrow column."""
    import pyarrow.compute as pc

    enc = pc.dictionary_encode(col).combine_chunks()
    idx = pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    return idx, enc.dictionary.to_pylist()


def _fmt(ti: np.ndarray) -> List[str]:
    return pd.to_datetime(ti.astype("datetime64[us]")).strftime("%Y-%m-%d %H:%M:%S").tolist()


def _years(start: np.ndarray, birth: np.ndarray) -> np.ndarray:
    a, b = pd.DatetimeIndex(start.astype("datetime64[us]")), pd.DatetimeIndex(birth.astype("datetime64[us]"))
    md = lambda t: t.month * 100 + t.day  # noqa: E731
    y = np.array(a.year - b.year - (md(a) < md(b)).astype(float), dtype=float)
    y[birth == NAT] = np.nan
    return y


def _age(v: str) -> str:
    return ">89" if ">" in v else age_bucket(v)


class _Reader:
    """Shard-by-shard state: roles of the codes seen so far, subjects and visit ids seen, the cohort."""

    def __init__(self, root: Path, cfg, s: Settings):
        self.root, self.cfg, self.s = root, cfg, s
        self.compiled = compile_settings(s)
        self.med_map, self.map_names, self.ddi = load_med_map(s, cfg)
        self.roles: Dict[str, object] = {}
        self.drops = Drops()
        self.seen: Dict[int, Path] = {}
        self.visit_owner: Dict[str, int] = {}
        self.patients: List[Patient] = []
        self.pid_of: Dict[int, str] = {}
        self.visit_profiles: Dict[str, Dict[str, str]] = {}
        self.fields = tuple(f for f, _ in s.profile)
        self.n_visits_found = 0

    def role(self, code):
        r = self.roles.get(code)
        if r is None:
            r = self.roles[code] = classify(code, self.s, self.med_map, self.compiled)
        return r

    def shard(self, path: Path) -> None:
        s = self.s
        extra = [c for c in (s.visit_column, s.visit_time_column) if c]
        tbl = _read_parquet(path, ["subject_id", "time", "code"], extra)
        _check_types(path, tbl)
        n = tbl.num_rows
        sid_col = tbl.column("subject_id")
        keep = ~sid_col.is_null().to_numpy(zero_copy_only=False)
        self.drops.add("meds: rows with a null subject_id", n - int(keep.sum()))
        import pyarrow.compute as pc
        sid = pc.fill_null(sid_col, 0).to_numpy().astype(np.int64)
        ti = tbl.column("time").cast("timestamp[us]").to_numpy(zero_copy_only=False).astype("datetime64[us]")
        ti = ti.astype(np.int64)                                  # NaT -> int64 min (static rows first)
        cidx, codes = _encode(tbl.column("code"))
        self.drops.add("meds: rows with a null code", int(np.count_nonzero(keep & (cidx < 0))))
        keep &= cidx >= 0
        vidx, vvals = _encode(tbl.column(s.visit_column)) if s.visit_column in tbl.column_names else \
            (np.full(n, -1), [])
        tidx, tvals = _encode(tbl.column(s.visit_time_column)) if s.visit_time_column in tbl.column_names else \
            (np.full(n, -1), [])
        del tbl
        rows = np.flatnonzero(keep)
        rows = rows[np.lexsort((rows, ti[rows], sid[rows]))]       # subject, time, file order
        sid, ti, cidx, vidx, tidx = sid[rows], ti[rows], cidx[rows], vidx[rows], tidx[rows]

        for x in np.unique(sid).tolist():
            if x in self.seen:
                raise ValueError(f"subject_id {x} has rows in {self.seen[x]} and {path}; a MEDS shard must "
                                 "hold all rows of its subjects")
            self.seen[x] = path
        roles = [self.role(c) for c in codes]
        r_chan = np.array([r.chan for r in roles], np.int64)[cidx]
        r_field = np.array([r.field for r in roles], np.int64)[cidx]
        r_adm = np.array([r.admission for r in roles], bool)[cidx]
        r_dis = np.array([r.discharge for r in roles], bool)[cidx]
        r_birth = np.array([r.birth for r in roles], bool)[cidx]
        r_unk = np.array([r.unk for r in roles], bool)[cidx]
        r_unm = np.array([r.unmapped for r in roles], bool)[cidx]
        self.drops.add("meds: codes with an UNK part", int(r_unk.sum()))
        self.drops.add(f"meds: medication codes without a label in the map ({s.med_map})", int(r_unm.sum()))
        other = ~(r_unk | r_unm) & (r_chan < 0) & (r_field < 0) & ~r_adm & ~r_dis & ~r_birth
        other &= ~np.array([bool(r.patient_id) for r in roles], bool)[cidx]
        self.drops.add("meds: rows whose code matches no channel (ignored)", int(other.sum()))
        static = ti == NAT

        # ---- visits: id column, else admission/discharge pairs, else time gaps
        visit = np.full(len(sid), -1, np.int64)
        vt_sid, vt_id, vt_start, vt_end = [], [], [], []
        has_id = (vidx >= 0) & ~static
        if has_id.any():
            df = pd.DataFrame({"sid": sid[has_id], "v": vidx[has_id], "t": ti[has_id],
                               "a": np.where(r_adm[has_id], ti[has_id], np.nan),
                               "d": np.where(r_dis[has_id], ti[has_id], np.nan)})
            g = df.groupby(["sid", "v"], sort=False)
            visit[has_id] = g.ngroup().to_numpy()
            agg = g.agg(t0=("t", "min"), t1=("t", "max"), a=("a", "min"), d=("d", "max"))
            ids = [_vid(vvals[v]) for v in agg.index.get_level_values(1)]
            vt_sid += agg.index.get_level_values(0).tolist()
            vt_id += ids
            vt_start += agg["a"].fillna(agg["t0"]).astype(np.int64).tolist()
            vt_end += agg["d"].fillna(agg["t1"]).astype(np.int64).tolist()
        with_visits = set(vt_sid)
        adm_rows = np.flatnonzero(r_adm & ~static & ~np.isin(sid, list(with_visits)))
        if len(adm_rows):
            dis_rows = np.flatnonzero(r_dis & ~static)
            counter: Dict[int, int] = {}
            for i in adm_rows.tolist():
                x = int(sid[i])
                later = dis_rows[(sid[dis_rows] == x) & (ti[dis_rows] >= ti[i])]
                counter[x] = counter.get(x, 0) + 1
                vt_sid.append(x)
                vt_id.append(f"{x}_{counter[x]}")
                vt_start.append(int(ti[i]))
                vt_end.append(int(ti[later[0]]) if len(later) else int(ti[i]))
        n_iv = len(vt_sid)
        orphan = ~static & (visit < 0)
        if n_iv and orphan.any():
            left = pd.DataFrame({"t": ti[orphan], "sid": sid[orphan], "row": np.flatnonzero(orphan)}).sort_values(
                "t", kind="stable")
            right = pd.DataFrame({"start": vt_start, "sid": vt_sid, "end": vt_end,
                                  "vi": np.arange(n_iv)}).sort_values("start", kind="stable")
            m = pd.merge_asof(left, right, left_on="t", right_on="start", by="sid", direction="backward")
            ok = m["vi"].notna().to_numpy() & (m["t"].to_numpy() <= m["end"].fillna(NAT).to_numpy())
            visit[m["row"].to_numpy()[ok]] = m["vi"].to_numpy()[ok].astype(np.int64)
        gap_subj = ~np.isin(sid, vt_sid) & ~static
        if s.gap_hours > 0 and gap_subj.any():
            r = np.flatnonzero(gap_subj)
            new = np.ones(len(r), bool)
            new[1:] = (sid[r][1:] != sid[r][:-1]) | (np.diff(ti[r]) > int(s.gap_hours * 3600e6))
            gi = np.cumsum(new) - 1
            visit[r] = n_iv + gi
            firsts = r[new]
            k = pd.Series(sid[firsts]).groupby(sid[firsts]).cumcount().to_numpy() + 1
            lasts = np.append(r[np.flatnonzero(new)[1:] - 1], r[-1])
            vt_sid += sid[firsts].tolist()
            vt_id += [f"{x}_{j}" for x, j in zip(sid[firsts].tolist(), k.tolist())]
            vt_start += ti[firsts].tolist()
            vt_end += ti[lasts].tolist()
        useful = (r_chan >= 0) | (r_field >= 0)
        self.drops.add("meds: rows outside every visit", int(np.count_nonzero(useful & ~static & (visit < 0))))
        self.n_visits_found += len(vt_sid)
        self._assemble(path, sid, ti, cidx, codes, roles, visit, r_chan, r_field, r_birth, static, tidx, tvals,
                       vt_sid, vt_id, vt_start)

    def _assemble(self, path, sid, ti, cidx, codes, roles, visit, r_chan, r_field, r_birth, static, tidx, tvals,
                  vt_sid, vt_id, vt_start):
        s = self.s
        for x, v in zip(vt_sid, vt_id):
            owner = self.visit_owner.setdefault(v, x)
            if owner != x:
                raise ValueError(f"{path}: visit id {v} ({s.visit_column}) appears under subjects {owner} and {x}; "
                                 f"it is not a visit id (set --config.meds.visit_column)")
        tok_of = np.array([r.token for r in roles], dtype=object)
        chans = {}
        for ci, ch in enumerate(CHANNELS):
            m = (r_chan == ci) & (visit >= 0)
            chans[ch] = _group(visit[m], tok_of[cidx[m]])
        # profile: last value inside the visit, else the subject's last static value
        val_of = np.array([r.value for r in roles], dtype=object)
        pm = (r_field >= 0) & (visit >= 0)
        vprof = pd.DataFrame({"v": visit[pm], "f": r_field[pm], "x": val_of[cidx[pm]]}).drop_duplicates(
            ["v", "f"], keep="last")
        vprof = {(v, f): x for v, f, x in zip(vprof["v"].tolist(), vprof["f"].tolist(), vprof["x"].tolist())}
        sm = (r_field >= 0) & static
        sprof = pd.DataFrame({"s": sid[sm], "f": r_field[sm], "x": val_of[cidx[sm]]}).drop_duplicates(
            ["s", "f"], keep="last")
        sprof = {(a, f): x for a, f, x in zip(sprof["s"].tolist(), sprof["f"].tolist(), sprof["x"].tolist())}
        pid_of = {}
        for i in np.flatnonzero(static).tolist():
            p = roles[cidx[i]].patient_id
            if p:
                pid_of.setdefault(int(sid[i]), p)
        bm = r_birth & ~static
        birth = dict(zip(sid[bm][::-1].tolist(), ti[bm][::-1].tolist()))        # first birth row wins
        vlabel = {}
        if tvals:
            tm = (tidx >= 0) & (visit >= 0)
            for v, j in zip(visit[tm][::-1].tolist(), tidx[tm][::-1].tolist()):
                vlabel[v] = str(tvals[j])
        starts = np.array(vt_start, np.int64)
        labels = _fmt(starts) if len(starts) else []
        ages = _years(starts, np.array([birth.get(x, NAT) for x in vt_sid], np.int64)) if len(starts) else []
        age_rx = dict(s.profile).get("age", "")
        by_subject: Dict[int, list] = {}
        n_miss = {ch: 0 for ch in CHANNELS}
        for vi, (x, v) in enumerate(zip(vt_sid, vt_id)):
            codes_v = {ch: chans[ch].get(vi, ()) for ch in CHANNELS}
            missing = [ch for ch in s.required if not codes_v[ch]]
            for ch in missing:
                n_miss[ch] += 1
            if missing:
                self.drops.add("visits dropped (any reason above)", 1)
                continue
            prof = {}
            for fi, f in enumerate(self.fields):
                raw = vprof.get((vi, fi), sprof.get((x, fi)))
                if f == "age" and not age_rx:
                    a = ages[vi]
                    prof[f] = age_bucket(None if a != a else a)
                elif f == "age":
                    c = clean_value(raw)
                    prof[f] = _age(c) if c != "unknown" else c
                else:
                    prof[f] = clean_value(raw)
            self.visit_profiles[v] = prof
            time = vlabel.get(vi, labels[vi])
            by_subject.setdefault(x, []).append((starts[vi], v, Visit(v, time, *(codes_v[ch] for ch in CHANNELS))))
        for ch in CHANNELS:
            self.drops.add(f"visits without {ch}" if ch != "medications" else "visits without a mapped drug",
                           n_miss[ch])
        by_id = self.cfg.visit_order == "hadm_id"
        for x, vs in by_subject.items():
            vs.sort(key=(lambda r: id_key(r[1])) if by_id else (lambda r: (r[0], id_key(r[1]))))
            pid = pid_of.get(x, str(x))
            self.pid_of[x] = pid
            self.patients.append(Patient(pid, self.visit_profiles[vs[-1][1]], tuple(r[2] for r in vs)))

    def names(self) -> Dict[str, str]:
        """Display names: the map's label names, then metadata/codes.parquet descriptions (first wins)."""
        names = dict(self.map_names)
        path = self.root / "metadata" / "codes.parquet"
        if not path.is_file():
            return names
        tbl = _read_parquet(path, ["code", "description"])
        for code, desc in zip(tbl.column("code").to_pylist(), tbl.column("description").to_pylist()):
            if code is None or not desc:
                continue
            r = self.role(code)
            if r.chan >= 0 and not (r.chan == 2 and self.med_map is not None):
                names.setdefault(r.token, desc)
        return names


def _vid(v) -> str:
    if isinstance(v, float) and v == int(v):
        v = int(v)
    return str(v)


def _group(keys: np.ndarray, vals: np.ndarray) -> Dict[int, tuple]:
    """key -> unique values in row order (rows already in time / file order)."""
    if not len(keys):
        return {}
    df = pd.DataFrame({"k": keys, "v": vals}).drop_duplicates(keep="first")
    out: Dict[int, list] = {}
    for k, v in zip(df["k"].tolist(), df["v"].tolist()):
        out.setdefault(k, []).append(v)
    return {k: tuple(v) for k, v in out.items()}


def read_meds(root, cfg) -> RawCohort:
    root = Path(root)
    shards = find_shards(root)
    s = settings(cfg.meds, root)
    check(s)
    splits = read_split_file(root, shards) if s.use_split_file else None
    rd = _Reader(root, cfg, s)
    for path in progress(shards, desc="meds shards", unit="shard"):
        rd.shard(path)
    if rd.n_visits_found == 0:
        raise ValueError(f"{root}: no visit found (no {s.visit_column or 'visit-id'} column value, no admission "
                         f"code matching {s.admission!r}, time-gap rule {s.gap_hours} h); check config meds.preset")
    if not rd.patients:
        dropped = {k: v for k, v in rd.drops.as_dict().items() if k.startswith("visits without")}
        raise ValueError(f"{root}: every one of {rd.n_visits_found} visits lacks a required channel "
                         f"(meds.required={s.required}; {dropped})")
    cohort_splits = None
    if splits is not None:
        unknown = sorted(set(splits) - set(rd.seen))
        if unknown:
            raise ValueError(f"{root}: the split file names {len(unknown)} subject_id(s) not in data/ "
                             f"(e.g. {unknown[:3]})")
        cohort_splits = {rd.pid_of[x]: sp for x, sp in splits.items() if x in rd.pid_of}
    rd.patients.sort(key=lambda p: id_key(p.id))
    notes = [f"MEDS dataset read with preset {s.preset} ({len(shards)} shard(s)); splits "
             + ("from the split file" if cohort_splits is not None else "seeded by patient") + "."]
    codes, pairs = rd.ddi if rd.ddi is not None else (None, None)
    return RawCohort("meds", rd.patients, rd.visit_profiles, rd.names(), rd.drops, tuple(s.required),
                     rd.fields, pairs, codes, notes, splits=cohort_splits)
