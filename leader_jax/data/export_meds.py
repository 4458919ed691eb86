"""Writer: a bundled raw demo (MIMIC-III, MIMIC-IV, eICU) or any folder in the same layout → a MEDS 0.4
dataset, following the community conventions, so that the MEDS reader gives the native reader's cohort.

    python -m leader_jax.data.export_meds --dataset=mimic3|mimic4|eicu [--raw_dir=DIR] --out OUT \
        [--splits=native|none] [--shard_subjects=N]

MIMIC (MIMIC_IV_MEDS style, one subject per subject_id): `HOSPITAL_ADMISSION//<type>//<location>` at
admittime and `HOSPITAL_DISCHARGE//<location>` at dischtime, profile codes (`INSURANCE//…`, `LANGUAGE//…`,
…) at admittime, `DIAGNOSIS//ICD//<9|10>//<code>` and `PROCEDURE//ICD//<9|10>//<code>` at dischtime in
seq_num order, all with `hadm_id`; prescriptions as `MEDICATION//START//<ndc>` WITHOUT `hadm_id`, timed at
their start clamped into [admittime, dischtime] (a missing start at dischtime), so they attach by time;
`GENDER//<g>` static, `MEDS_BIRTH` at the date of birth (MIMIC-IV: 1 January of anchor_year − anchor_age).
eICU: one subject per `uniquepid` (eICU_MEDS has one per hospital stay, which would split the native
patients; the id travels as a static `UNIQUEPID//<id>` row), one `patientunitstayid` per unit stay,
synthetic times (1 January of hospitaldischargeyear + the stay's rank in days, + the row's offset in
minutes) because eICU has no dates, and the native stay-order key in a `visit_key` column;
`DIAGNOSIS//ICD//9//<code>` (each ICD-9 code of icd9code), `DIAGNOSIS//STRING//<diagnosisstring>`,
`TREATMENT//ENTERED//<treatmentstring>`, `MEDICATION//STARTED//HICL//<drughiclseqno>`.
Also `metadata/codes.parquet` (descriptions), `metadata/dataset.json` and, with `--splits=native`,
`metadata/subject_splits.parquet` holding the native reader's split under the default data config.
Read back with `--config.dataset=meds --config.meds.preset=auto` (leader_mimic3 / leader_mimic4 / leader_eicu).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, List

import numpy as np
import pandas as pd

from leader_jax.cli import REPO_ROOT, UserError
from leader_jax.data.cohort import clean_value, id_key
from leader_jax.data.meds_presets import EXPORT_ETL, UNK
from leader_jax.data.tables import find_table, integral_ids, parse_dates, read_table
from leader_jax.io import atomic_dir

DATASETS = ("mimic3", "mimic4", "eicu")
DEMO_NAME = {"mimic3": "mimic3_demo", "mimic4": "mimic4_demo", "eicu": "eicu_demo"}
MED_COLS = ["drugname", "drugordercancelled", "drugstartoffset", "drugorderoffset", "dosage", "routeadmin",
            "frequency", "drugstopoffset"]
SPLIT_OUT = {"train": "train", "val": "tuning", "test": "held_out"}


def _part(v) -> str:
    c = clean_value(v)
    return UNK if c == "unknown" else c.replace("//", "/")


class Events:
    """Rows collected per table, written sorted by (subject, time) with file order kept on ties."""

    def __init__(self, extra: Dict[str, str]):
        self.cols = {"subject_id": [], "time": [], "code": [], **{k: [] for k in extra}}
        self.extra = extra
        self.desc: Dict[str, str] = {}

    def add(self, sid, time, codes, **extra) -> None:
        n = len(codes)
        self.cols["subject_id"].append(np.broadcast_to(np.asarray(sid, dtype=np.int64), (n,)))
        self.cols["time"].append(np.broadcast_to(np.asarray(time, dtype="datetime64[us]"), (n,)))
        self.cols["code"].append(np.asarray(codes, dtype=object))
        for k, kind in self.extra.items():
            v = extra.get(k)
            fill = np.full(n, None, dtype=object) if v is None else np.broadcast_to(np.asarray(v, dtype=object), (n,))
            self.cols[k].append(fill)

    def frame(self) -> pd.DataFrame:
        df = pd.DataFrame({k: (np.concatenate(v) if v else np.array([], dtype=object)) for k, v in self.cols.items()})
        t = df["time"].to_numpy(dtype="datetime64[us]").astype(np.int64)
        order = np.lexsort((np.arange(len(df)), t, df["subject_id"].to_numpy(np.int64)))
        return df.iloc[order].reset_index(drop=True)


def _clamp(t: pd.Series, lo: pd.Series, hi: pd.Series) -> pd.Series:
    t = t.where(t.notna(), hi)
    return t.where(t >= lo, lo).where(t <= hi, hi)


def _mimic(raw_dir: Path, version: int) -> Events:
    iv = version == 4
    tn = (lambda n: "hosp/" + n.lower()) if iv else (lambda n: n)
    t = {n: find_table(raw_dir, tn(n)) for n in ("ADMISSIONS", "PATIENTS", "DIAGNOSES_ICD", "PROCEDURES_ICD",
                                                 "PRESCRIPTIONS", "D_ICD_DIAGNOSES", "D_ICD_PROCEDURES")}
    prof = ("insurance", "language", "marital_status", "race") if iv else \
        ("insurance", "language", "religion", "marital_status", "ethnicity")
    adm = read_table(t["ADMISSIONS"], ["subject_id", "hadm_id", "admittime"],
                     ["dischtime", "admission_type", "admission_location", "discharge_location", *prof])
    adm = integral_ids(adm, ["subject_id", "hadm_id"], t["ADMISSIONS"]).dropna(subset=["subject_id", "hadm_id"])
    adm = adm.drop_duplicates(subset=["hadm_id"], keep="first")
    a0 = parse_dates(adm["admittime"])
    adm = adm.assign(_a=a0).dropna(subset=["_a"])
    d0 = parse_dates(adm["dischtime"]) if "dischtime" in adm.columns else pd.Series(pd.NaT, index=adm.index)
    adm = adm.assign(_d=d0.where(d0 >= adm["_a"], adm["_a"]).fillna(adm["_a"]))
    ev = Events({"hadm_id": "int"})
    col = lambda c: adm[c] if c in adm.columns else pd.Series(None, index=adm.index)  # noqa: E731
    sid, hadm = adm["subject_id"].astype(np.int64).to_numpy(), adm["hadm_id"].astype(np.int64).to_numpy()
    a, d = adm["_a"].to_numpy("datetime64[us]"), adm["_d"].to_numpy("datetime64[us]")
    part = lambda c: col(c).map(_part).astype(object)  # noqa: E731
    hobj = hadm.astype(object)
    ev.add(sid, a, ("HOSPITAL_ADMISSION//" + part("admission_type") + "//" + part("admission_location")).to_numpy(),
           hadm_id=hobj)
    for f in prof:
        p = part(f)
        m = (p != UNK).to_numpy()
        ev.add(sid[m], a[m], (f.upper() + "//" + p[m]).to_numpy(), hadm_id=hobj[m])
    ev.add(sid, d, ("HOSPITAL_DISCHARGE//" + part("discharge_location")).to_numpy(), hadm_id=hobj)
    by_hadm = pd.DataFrame({"sid": sid, "a": adm["_a"].to_numpy(), "d": adm["_d"].to_numpy()}, index=hadm)

    for tab, kind in (("DIAGNOSES_ICD", "DIAGNOSIS"), ("PROCEDURES_ICD", "PROCEDURE")):
        cols = ["subject_id", "hadm_id", "icd_code", "icd_version"] if iv else ["subject_id", "hadm_id", "icd9_code"]
        df = read_table(t[tab], cols, ["seq_num"])
        df = integral_ids(df, ["subject_id", "hadm_id"], t[tab]).dropna(subset=cols)
        if not iv:
            df = df.assign(icd_code=df["icd9_code"], icd_version="9")
        df = df[df["hadm_id"].astype(np.int64).isin(by_hadm.index)]
        df = df.assign(_seq=pd.to_numeric(df["seq_num"], errors="coerce")).sort_values("_seq", kind="stable")
        h = df["hadm_id"].astype(np.int64).to_numpy()
        codes = (kind + "//ICD//" + df["icd_version"] + "//" + df["icd_code"]).to_numpy(dtype=object)
        ev.add(by_hadm["sid"].reindex(h).to_numpy(np.int64), by_hadm["d"].reindex(h).to_numpy("datetime64[us]"),
               codes, hadm_id=h.astype(object))
        dname = t["D_ICD_" + tab.split("_")[0]]
        dcols = ["icd_code", "icd_version", "long_title"] if iv else ["icd9_code", "short_title"]
        dd = read_table(dname, dcols).dropna()
        code = dd[dcols[0]]
        ver = dd["icd_version"] if iv else "9"
        ev.desc.update(zip((kind + "//ICD//" + ver + "//" + code).tolist(), dd[dcols[-1]].tolist()))

    start = "starttime" if iv else "startdate"
    rx = read_table(t["PRESCRIPTIONS"], ["subject_id", "hadm_id", "ndc"], [start, "drug"])
    rx = integral_ids(rx, ["subject_id", "hadm_id"], t["PRESCRIPTIONS"]).dropna(subset=["subject_id", "hadm_id", "ndc"])
    rx = rx[rx["hadm_id"].astype(np.int64).isin(by_hadm.index)]
    h = rx["hadm_id"].astype(np.int64)
    rx = rx[(by_hadm["sid"].reindex(h).to_numpy() == rx["subject_id"].astype(np.int64).to_numpy())]
    h = rx["hadm_id"].astype(np.int64)
    st = parse_dates(rx[start]) if start in rx.columns else pd.Series(pd.NaT, index=rx.index)
    rx = rx.iloc[np.argsort(_last_nat(st), kind="stable")]       # native order: start, missing last
    st, h = st.loc[rx.index], h.loc[rx.index]
    lo = pd.Series(by_hadm["a"].reindex(h).to_numpy(), index=rx.index)
    hi = pd.Series(by_hadm["d"].reindex(h).to_numpy(), index=rx.index)
    tt = _clamp(st, lo, hi).to_numpy("datetime64[us]")
    codes = ("MEDICATION//START//" + rx["ndc"]).to_numpy(dtype=object)
    ev.add(rx["subject_id"].astype(np.int64).to_numpy(), tt, codes)
    if "drug" in rx.columns:
        named = rx.dropna(subset=["drug"])
        ev.desc.update(_most_common(("MEDICATION//START//" + named["ndc"]).tolist(), named["drug"].tolist()))

    pat_cols = ["subject_id", "gender"] + (["anchor_age", "anchor_year"] if iv else ["dob"])
    pat = read_table(t["PATIENTS"], pat_cols)
    pat = integral_ids(pat, ["subject_id"], t["PATIENTS"]).dropna(subset=["subject_id"])
    pat = pat.drop_duplicates(subset=["subject_id"], keep="first")
    if iv:
        yob = (pd.to_numeric(pat["anchor_year"], errors="coerce") - pd.to_numeric(pat["anchor_age"], errors="coerce"))
        birth = pd.to_datetime(yob.map(lambda y: None if y != y else f"{int(y):04d}-01-01"), errors="coerce")
    else:
        birth = parse_dates(pat["dob"])
    psid = pat["subject_id"].astype(np.int64).to_numpy()
    g = pat["gender"].map(_part).astype(object)
    m = (g != UNK).to_numpy()
    ev.add(psid[m], np.full(int(m.sum()), np.datetime64("NaT"), "datetime64[us]"), ("GENDER//" + g[m]).to_numpy())
    m = birth.notna().to_numpy()
    ev.add(psid[m], birth[m].to_numpy("datetime64[us]"), np.full(int(m.sum()), "MEDS_BIRTH", dtype=object))
    return ev


def _last_nat(t: pd.Series) -> np.ndarray:
    v = t.to_numpy("datetime64[us]").astype(np.int64)
    v[t.isna().to_numpy()] = np.iinfo(np.int64).max
    return v


def _most_common(codes: List[str], names: List[str]) -> Dict[str, str]:
    """code -> its most frequent name (ties: the smaller name), as the eICU reader names HICL codes."""
    best: Dict[str, tuple] = {}
    for (code, name), n in Counter(zip(codes, names)).items():
        if isinstance(name, str) and (code not in best or (-n, name) < best[code]):
            best[code] = (-n, name)
    return {k: v[1] for k, v in best.items()}


def _eicu(raw_dir: Path) -> Events:
    from leader_jax.data.eicu import ICD9, ORDER_KEY, PROFILE, _leaf

    t = {n: find_table(raw_dir, n) for n in ("patient", "diagnosis", "treatment", "medication")}
    pat = read_table(t["patient"], ["patientunitstayid", "patienthealthsystemstayid", "uniquepid",
                                    "hospitaldischargeyear", "unitvisitnumber"], PROFILE)
    pat = integral_ids(pat, ["patientunitstayid", "patienthealthsystemstayid"], t["patient"])
    pat = pat.dropna(subset=["patientunitstayid", "uniquepid"]).drop_duplicates(subset=["patientunitstayid"])
    for c, _ in ORDER_KEY:
        pat = pat.assign(**{"_" + c: pd.to_numeric(pat[c], errors="coerce")})
    pat = pat.dropna(subset=["_" + c for c, _ in ORDER_KEY])
    pat = pat[np.all([(pat["_" + c] % 1 == 0).to_numpy() for c, _ in ORDER_KEY], axis=0)]
    keys = [tuple(int(v) for v in r) for r in pat[["_" + c for c, _ in ORDER_KEY]].to_numpy()]
    pat = pat.assign(_key=keys, _label=["-".join(f"{v:0{w}d}" for v, (_, w) in zip(k, ORDER_KEY)) for k in keys])
    upids = sorted(set(pat["uniquepid"]), key=id_key)
    subj = {u: i + 1 for i, u in enumerate(upids)}
    pat = pat.assign(_sid=pat["uniquepid"].map(subj)).sort_values(["_sid", "_key"], kind="stable")
    pat = pat.assign(_rank=pat.groupby("_sid").cumcount())
    base = {s: np.datetime64(f"{int(y):04d}-01-01", "us") + np.timedelta64(int(r), "D")
            for s, y, r in zip(pat["patientunitstayid"], pat["_hospitaldischargeyear"], pat["_rank"])}
    sid_of = dict(zip(pat["patientunitstayid"], pat["_sid"]))
    ev = Events({"patientunitstayid": "int", "visit_key": "str"})
    for u in upids:
        ev.add(subj[u], np.datetime64("NaT"), [f"UNIQUEPID//{u}"])
    for _, r in pat.iterrows():
        s = r["patientunitstayid"]
        codes = [f"ICU_ADMISSION//{_part(r.get('unittype'))}"]
        codes += [f"{f.upper()}//{_part(r.get(f))}" for f in PROFILE if _part(r.get(f)) != UNK]
        ev.add(sid_of[s], base[s], codes, patientunitstayid=int(s), visit_key=r["_label"])

    def timed(df, offset_col):
        """Rows of known stays in the native order (offset, missing last, file order), with their times."""
        df = integral_ids(df, ["patientunitstayid"], "eicu")
        df = df[df["patientunitstayid"].isin(base)]
        off = pd.to_numeric(df[offset_col], errors="coerce") if offset_col in df.columns else \
            pd.Series(np.nan, index=df.index)
        df = df.assign(_o=off)
        df = df.iloc[np.argsort(off.fillna(np.inf).to_numpy(), kind="stable")]
        top = df.groupby("patientunitstayid")["_o"].transform("max").fillna(0)
        o = df["_o"].fillna(top).astype(np.int64).to_numpy()
        bt = np.array([base[s] for s in df["patientunitstayid"]], dtype="datetime64[us]")
        return df, bt + o.astype("timedelta64[m]")

    dx = read_table(t["diagnosis"], ["patientunitstayid", "icd9code", "diagnosisstring"], ["diagnosisoffset"])
    dx = dx.dropna(subset=["icd9code", "diagnosisstring"], how="all").drop_duplicates()
    dx, tt = timed(dx, "diagnosisoffset")
    name_codes, name_vals, rows = [], [], ([], [], [], [])
    for (stay, icd, dstr), ti in zip(dx[["patientunitstayid", "icd9code", "diagnosisstring"]].itertuples(index=False),
                                     tt):
        codes = [c for c in (x.strip() for x in icd.split(",")) if ICD9.match(c)] if isinstance(icd, str) else []
        out = [f"DIAGNOSIS//ICD//9//{c}" for c in codes] if codes else \
            ([f"DIAGNOSIS//STRING//{dstr}"] if isinstance(dstr, str) else [])
        if codes and isinstance(dstr, str):
            name_codes += out
            name_vals += [_leaf(dstr)] * len(out)
        elif out:
            ev.desc[out[0]] = _leaf(dstr)
        for c in out:
            for lst, v in zip(rows, (sid_of[stay], ti, c, int(stay))):
                lst.append(v)
    ev.add(np.array(rows[0], np.int64), np.array(rows[1], "datetime64[us]"), rows[2],
           patientunitstayid=np.array(rows[3], dtype=object))
    ev.desc.update(_most_common(name_codes, name_vals))
    tx = read_table(t["treatment"], ["patientunitstayid", "treatmentstring"], ["treatmentoffset"])
    tx, tt = timed(tx.dropna(subset=["treatmentstring"]).drop_duplicates(), "treatmentoffset")
    codes = ("TREATMENT//ENTERED//" + tx["treatmentstring"]).to_numpy(dtype=object)
    stays = tx["patientunitstayid"]
    ev.add(stays.map(sid_of).to_numpy(np.int64), tt, codes, patientunitstayid=stays.astype(np.int64).to_numpy(object))
    ev.desc.update({c: _leaf(c[len("TREATMENT//ENTERED//"):]) for c in set(codes.tolist())})
    med = read_table(t["medication"], ["patientunitstayid", "drughiclseqno"], MED_COLS)   # the native columns,
    med = integral_ids(med, ["patientunitstayid", "drughiclseqno"], t["medication"])     # so that duplicate
    med = med.dropna(subset=["drughiclseqno"]).drop_duplicates()                          # rows count alike
    med, tt = timed(med, "drugstartoffset")
    codes = ("MEDICATION//STARTED//HICL//" + med["drughiclseqno"]).to_numpy(dtype=object)
    stays = med["patientunitstayid"]
    ev.add(stays.map(sid_of).to_numpy(np.int64), tt, codes, patientunitstayid=stays.astype(np.int64).to_numpy(object))
    if "drugname" in med.columns:
        ev.desc.update(_most_common(codes.tolist(), med["drugname"].tolist()))
    return ev


def native_splits(dataset: str, raw_dir: Path) -> Dict[str, str]:
    """Patient id -> train/val/test of the native reader under the default data config."""
    from leader_jax.data.prepare import default_config, prepare

    data = prepare(default_config(dataset=dataset, raw_dir=str(raw_dir)))
    return {s.patient_id: sp for sp in data.splits for s in data.splits[sp]}


def export(dataset: str, out, raw_dir: str = "", splits="none", shard_subjects: int = 0) -> Path:
    """Write the MEDS dataset atomically into `out`; returns it. `splits`: "native" (run the native reader
    for its split), "none", or a ready {patient id: train/val/test} mapping."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if dataset not in DATASETS:
        raise UserError(f"export_meds dataset={dataset!r}: expected one of {', '.join(DATASETS)}")
    if isinstance(splits, str) and splits not in ("native", "none"):
        raise UserError(f"export_meds splits={splits!r}: expected native or none")
    raw = Path(raw_dir) if raw_dir else REPO_ROOT / "data" / DEMO_NAME[dataset]
    try:
        ev = _eicu(raw) if dataset == "eicu" else _mimic(raw, 3 if dataset == "mimic3" else 4)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    df = ev.frame()
    schema = [pa.field("subject_id", pa.int64()), pa.field("time", pa.timestamp("us")),
              pa.field("code", pa.string()), pa.field("numeric_value", pa.float32())]
    schema += [pa.field(k, pa.int64() if kind == "int" else pa.string()) for k, kind in ev.extra.items()]
    split_of = {}
    if not isinstance(splits, str) or splits == "native":
        pid_split = native_splits(dataset, raw) if isinstance(splits, str) else dict(splits)
        if dataset == "eicu":
            upid = {int(s): c.split("//", 1)[1] for s, c in zip(df["subject_id"], df["code"]) if c.startswith("UNIQUEPID//")}
            split_of = {s: SPLIT_OUT[pid_split.get(p, "train")] for s, p in upid.items()}
        else:
            split_of = {int(s): SPLIT_OUT[pid_split.get(str(s), "train")] for s in pd.unique(df["subject_id"])}
    with atomic_dir(Path(out)) as tmp:
        subjects = pd.unique(df["subject_id"]).tolist()
        groups = {}
        for s in subjects:
            groups.setdefault(split_of.get(s, ""), []).append(s)
        for split, subj in groups.items():
            size = shard_subjects if shard_subjects > 0 else max(len(subj), 1)
            for i in range(0, len(subj), size):
                part = df[df["subject_id"].isin(set(subj[i:i + size]))]
                arrays = [pa.array(part["subject_id"].to_numpy(np.int64)),
                          pa.array(part["time"].to_numpy("datetime64[us]"), pa.timestamp("us")),
                          pa.array(part["code"].tolist(), pa.string()), pa.nulls(len(part), pa.float32())]
                arrays += [pa.array([None if x is None or x != x else x for x in part[k].tolist()], f.type)
                           for k, f in zip(ev.extra, schema[4:])]
                folder = tmp / "data" / split if split else tmp / "data"
                folder.mkdir(parents=True, exist_ok=True)
                pq.write_table(pa.Table.from_arrays(arrays, schema=pa.schema(schema)), folder / f"{i // size}.parquet")
        (tmp / "metadata").mkdir()
        used = sorted(set(df["code"]))
        pq.write_table(pa.table({"code": used, "description": [ev.desc.get(c) for c in used],
                                 "parent_codes": pa.nulls(len(used), pa.list_(pa.string()))}),
                       tmp / "metadata" / "codes.parquet")
        if split_of:
            ids = sorted(split_of)
            pq.write_table(pa.table({"subject_id": pa.array(ids, pa.int64()),
                                     "split": [split_of[i] for i in ids]}), tmp / "metadata" / "subject_splits.parquet")
        meta = {"dataset_name": DEMO_NAME[dataset], "dataset_version": "1", "etl_name": EXPORT_ETL, "etl_version": "1", "meds_version": "0.4",
                "created_at": "1970-01-01T00:00:00"}
        (tmp / "metadata" / "dataset.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return Path(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, choices=DATASETS)
    ap.add_argument("--raw_dir", default="", help="raw tables (default: the bundled demo)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--splits", default="native", choices=("native", "none"),
                    help="native: write the native reader's split as metadata/subject_splits.parquet")
    ap.add_argument("--shard_subjects", type=int, default=0, help="subjects per data shard (0: one per split)")
    a = ap.parse_args(argv)
    try:
        path = export(a.dataset, a.out, a.raw_dir, a.splits, a.shard_subjects)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(f"wrote {path}; read it with: python -m leader_jax.data.prepare --config configs/data.py "
          f"--config.dataset=meds --config.raw_dir={path} --out OUT", file=sys.stderr)


if __name__ == "__main__":
    main()
