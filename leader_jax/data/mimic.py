"""MIMIC-III and MIMIC-IV readers → `RawCohort`.

A visit is a hospital admission (hadm_id) with ≥1 diagnosis, ≥1 procedure and ≥1 drug whose NDC maps
through NDC → RxCUI → ATC-3 into the label space (the ATC-3 codes of the DDI graph). Visits are ordered
by admittime, parsed as a date (ties: hadm_id), or, with `visit_order=hadm_id`, by hadm_id as the
original did. Tokens: `dx9:`/`dx10:`/`px9:`/`px10:` (+ ICD code as written), `atc:` + ATC-3.
Profile at each visit: the admission fields + gender + age bucket.
Cleaning (see tables.py): missing-value markers are missing, `123.0` ids are `123`, ICD codes that are
too long or hold separators are dropped, and rows whose date does not parse are dropped; each counted.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import pandas as pd

from leader_jax.data import mappings
from leader_jax.data.cohort import RawCohort, age_bucket, clean_value, id_key
from leader_jax.data.records import Patient, Visit
from leader_jax.data.tables import (Drops, drop_bad_codes, drop_bad_dates, drop_duplicates, drop_missing,
                                    drop_rows, example, find_table, group_unique, integral_ids, parse_dates,
                                    read_table, time_key, unmark)
from leader_jax.io import progress

PROFILE_III = ("insurance", "language", "religion", "marital_status", "ethnicity")
PROFILE_IV = ("insurance", "language", "admission_type", "marital_status", "race")


def _admissions(adm: pd.DataFrame, label: str, drops: Drops, path) -> pd.DataFrame:
    """Clean admissions; `admittime` is re-spelled `YYYY-MM-DD HH:MM:SS` and `_t` holds its sort key."""
    adm = integral_ids(adm, ["subject_id", "hadm_id"], path)
    adm = drop_missing(adm, ["subject_id", "hadm_id"], drops, label, f"{label}: missing subject_id or hadm_id")
    adm = drop_missing(adm, ["admittime"], drops, label, f"{label}: missing admittime")
    adm, t = drop_bad_dates(adm, "admittime", drops, label)
    adm = adm.assign(admittime=t.dt.strftime("%Y-%m-%d %H:%M:%S"), _t=time_key(t))
    adm = drop_duplicates(adm, drops, f"{label}: duplicate row")
    adm = drop_duplicates(adm, drops, f"{label}: repeated hadm_id (first row kept)", subset=["hadm_id"])
    return adm


def _link(df: pd.DataFrame, label: str, adm_subject: pd.Series, drops: Drops) -> pd.DataFrame:
    """Drop rows whose hadm_id matches no admission, or whose subject_id disagrees with it."""
    known = df["hadm_id"].isin(adm_subject.index).to_numpy()
    df = drop_rows(df, ~known, drops, f"{label}: hadm_id matches no admission")
    wrong = (df["hadm_id"].map(adm_subject) != df["subject_id"]).to_numpy()
    return drop_rows(df, wrong, drops, f"{label}: subject_id differs from the admission's")


def _icd_tokens(df: pd.DataFrame, label: str, kind: str, adm_subject: pd.Series, drops: Drops,
                fixed_version: Optional[str], code_col: str, path) -> Dict[str, tuple]:
    """hadm_id -> unique `<kind><version>:<code>` tokens ordered by seq_num (file order on ties).
    The code column arrives renamed to `code`; `code_col` is its name in the file (for drop reasons)."""
    df = integral_ids(df, ["subject_id", "hadm_id"], path)
    df = drop_missing(df.rename(columns={"code": code_col}), [code_col], drops, label, f"{label}: empty code")
    df = drop_bad_codes(df, code_col, drops, label).rename(columns={code_col: "code"})
    df = drop_duplicates(df, drops, f"{label}: duplicate row")
    df = _link(df, label, adm_subject, drops)
    if fixed_version is None:
        ver = df["icd_version"]
        bad = ~ver.isin(["9", "10"]).to_numpy()
        df = drop_rows(df, bad, drops, f"{label}: icd_version not 9 or 10")
        ver = df["icd_version"]
    else:
        ver = pd.Series(fixed_version, index=df.index)
    if "seq_num" in df.columns:
        df = df.assign(_seq=pd.to_numeric(df["seq_num"], errors="coerce")).sort_values("_seq", kind="stable")
        ver = ver.loc[df.index]
    tokens = (kind + ver + ":" + df["code"]).to_numpy()
    return group_unique(df["hadm_id"].to_numpy(), tokens)


def _drug_tokens(rx: pd.DataFrame, label: str, adm_subject: pd.Series, drops: Drops, cfg,
                 ddi_codes: Sequence[str], path, date_col: str) -> Dict[str, tuple]:
    """hadm_id -> unique `atc:<ATC3>` tokens in order of first prescription (start date parsed as a date,
    missing last; file order on ties). The start column arrives renamed to `startdate`; `date_col` is its
    name in the file (for drop reasons)."""
    rx = integral_ids(rx, ["subject_id", "hadm_id"], path)
    rx = drop_missing(rx, ["ndc"], drops, label, f"{label}: NDC missing or 0")
    rx = drop_rows(rx, (rx["ndc"] == "0").to_numpy(), drops, f"{label}: NDC missing or 0")
    rx = drop_duplicates(rx, drops, f"{label}: duplicate row")
    rx = _link(rx, label, adm_subject, drops)
    if int(cfg.min_admissions) > 1:
        n_adm = rx.groupby("subject_id")["hadm_id"].nunique()
        few = rx["subject_id"].map(n_adm).to_numpy() < int(cfg.min_admissions)
        rx = drop_rows(rx, few, drops, f"{label}: patient with < {int(cfg.min_admissions)} admissions")
    ndc2rx, rx2atc = mappings.ndc_to_atc3(cfg.ndc_map, cfg.rxcui_atc)
    rxcui, atc3 = mappings.map_ndc_series(rx["ndc"], ndc2rx, rx2atc)
    rx = drop_rows(rx, rxcui.isna().to_numpy(), drops, f"{label}: NDC not in the NDC→RxCUI map")
    atc3 = atc3.loc[rx.index]
    rx = drop_rows(rx, atc3.isna().to_numpy(), drops, f"{label}: RxCUI without ATC code")
    atc3 = atc3.loc[rx.index]
    outside = ~atc3.isin(set(ddi_codes)).to_numpy()
    rx = drop_rows(rx, outside, drops, f"{label}: ATC-3 outside the label space (DDI vocabulary)")
    atc3 = atc3.loc[rx.index]
    if "startdate" in rx.columns:
        rx = unmark(rx, ["startdate"]).rename(columns={"startdate": date_col})
        rx, t = drop_bad_dates(rx, date_col, drops, label)
        atc3 = atc3.loc[rx.index]
        order = np.argsort(time_key(t), kind="stable")
        rx, atc3 = rx.iloc[order], atc3.iloc[order]
    return group_unique(rx["hadm_id"].to_numpy(), ("atc:" + atc3).to_numpy())


def _assemble(dataset: str, adm: pd.DataFrame, ages: pd.Series, gender: pd.Series,
              dx: Dict[str, tuple], px: Dict[str, tuple], meds: Dict[str, tuple],
              profile_fields: Sequence[str], cfg, drops: Drops, names: Dict[str, str],
              ddi) -> RawCohort:
    hadm = adm["hadm_id"].to_numpy()
    has_dx = np.fromiter((h in dx for h in hadm), bool, len(hadm))
    has_px = np.fromiter((h in px for h in hadm), bool, len(hadm))
    has_rx = np.fromiter((h in meds for h in hadm), bool, len(hadm))
    drops.add("visits without diagnoses", np.count_nonzero(~has_dx))
    drops.add("visits without procedures", np.count_nonzero(~has_px))
    drops.add("visits without a mapped drug", np.count_nonzero(~has_rx))
    keep = has_dx & has_px & has_rx
    drops.add("visits dropped (any reason above)", np.count_nonzero(~keep))
    adm = adm.loc[keep]
    ages, gender = ages.loc[adm.index], gender.loc[adm.index]

    frac = float(cfg.sample_fraction)
    if frac < 1.0:  # the original's MIMIC-IV 15 % patient sample (RandomState(42) over ascending ids)
        ids = sorted(set(adm["subject_id"]), key=id_key)
        chosen = set(np.random.RandomState(int(cfg.sample_seed)).choice(ids, int(frac * len(ids)), replace=False))
        mask = ~adm["subject_id"].isin(chosen).to_numpy()
        drops.add("patients left out by sample_fraction", len(ids) - len(chosen))
        adm, ages, gender = adm.loc[~mask], ages.loc[~mask], gender.loc[~mask]

    prof_cols = {f: (adm[f].tolist() if f in adm.columns else [None] * len(adm)) for f in profile_fields}
    rows = list(zip(adm["subject_id"].tolist(), adm["hadm_id"].tolist(), adm["admittime"].tolist(),
                    gender.tolist(), ages.tolist(), *[prof_cols[f] for f in profile_fields]))
    tkey = dict(zip(adm["hadm_id"].tolist(), adm["_t"].tolist()))
    if cfg.visit_order == "admittime":    # by the parsed time (an int), never by the string
        rows.sort(key=lambda r: (id_key(r[0]), tkey[r[1]], id_key(r[1])))
    elif cfg.visit_order == "hadm_id":
        rows.sort(key=lambda r: (id_key(r[0]), id_key(r[1])))
    else:
        raise ValueError(f"config visit_order={cfg.visit_order!r}: expected 'admittime' or 'hadm_id'")

    patients, visit_profiles = [], {}
    cur, visits = None, []
    for r in progress(rows, desc=f"{dataset} visits", unit="visit"):
        sid, h, t, g, age = r[:5]
        if sid != cur:
            if visits:
                patients.append(Patient(cur, visit_profiles[visits[-1].id], tuple(visits)))
            cur, visits = sid, []
        prof = {f: clean_value(v) for f, v in zip(profile_fields, r[5:])}
        prof["gender"] = clean_value(g)
        prof["age"] = age
        visit_profiles[h] = prof
        visits.append(Visit(h, t, dx[h], px[h], meds[h]))
    if visits:
        patients.append(Patient(cur, visit_profiles[visits[-1].id], tuple(visits)))
    codes, pairs = ddi
    return RawCohort(dataset, patients, visit_profiles, names, drops,
                     ("diagnoses", "procedures", "medications"),
                     tuple(profile_fields) + ("gender", "age"), pairs, codes)


def _atc_names(cfg) -> Dict[str, str]:
    return {"atc:" + k: v for k, v in mappings.load_atc3_names(str(cfg.atc_names)).items()}


def _dob(pat: pd.DataFrame, label: str, drops: Drops) -> pd.Series:
    """Parsed dob per subject_id; a value that is not a date is left missing (age unknown), counted."""
    pat = unmark(pat, ["dob"])
    t = parse_dates(pat["dob"])
    bad = (t.isna() & pat["dob"].notna()).to_numpy()
    if bad.any():
        drops.add(f"{label}: dob is not an ISO date, age left unknown (e.g. {example(pat['dob'][bad].iloc[0])})",
                  np.count_nonzero(bad))
    return t


def _age_years(admit: pd.Series, dob: pd.Series) -> pd.Series:
    """Whole years between two parsed dates (NaN where either is missing)."""
    md = lambda t: t.dt.month * 100 + t.dt.day  # noqa: E731
    return (admit.dt.year - dob.dt.year - (md(admit) < md(dob)).astype(float)).astype(float)


def _patients(path, cols) -> pd.DataFrame:
    """PATIENTS / patients indexed by subject_id (first row per subject kept)."""
    pat = read_table(path, cols, require_rows=True)
    pat = integral_ids(pat, ["subject_id"], path)
    pat = unmark(pat, ["subject_id", "gender"]).dropna(subset=["subject_id"])
    return pat.drop_duplicates(subset=["subject_id"], keep="first").set_index("subject_id")


def read_mimic3(raw_dir, cfg) -> RawCohort:
    """MIMIC-III (v1.4 layout; demo lower-case or credentialed upper-case columns)."""
    drops = Drops()
    t = {n: find_table(raw_dir, n) for n in ("ADMISSIONS", "PATIENTS", "DIAGNOSES_ICD", "PROCEDURES_ICD",
                                             "PRESCRIPTIONS", "D_ICD_DIAGNOSES", "D_ICD_PROCEDURES")}
    adm = _admissions(read_table(t["ADMISSIONS"], ["subject_id", "hadm_id", "admittime"], PROFILE_III,
                                 require_rows=True), "ADMISSIONS", drops, t["ADMISSIONS"])
    adm_subject = pd.Series(adm["subject_id"].to_numpy(), index=adm["hadm_id"].to_numpy())
    pat = _patients(t["PATIENTS"], ["subject_id", "gender", "dob"])
    dob = adm["subject_id"].map(_dob(pat, "PATIENTS", drops))
    age = _age_years(parse_dates(adm["admittime"]), dob)
    ages = age.map(lambda a: age_bucket(None if a != a else a))
    gender = adm["subject_id"].map(pat["gender"])

    icd = {}
    for tab, kind in (("DIAGNOSES_ICD", "dx"), ("PROCEDURES_ICD", "px")):
        df = read_table(t[tab], ["subject_id", "hadm_id", "icd9_code"], ["seq_num"], require_rows=True)
        icd[kind] = _icd_tokens(df.rename(columns={"icd9_code": "code"}), tab, kind, adm_subject, drops, "9",
                                "icd9_code", t[tab])
    ddi = mappings.load_ddi_pairs(str(cfg.ddi_pairs))
    rx = read_table(t["PRESCRIPTIONS"], ["subject_id", "hadm_id", "ndc"],
                    ["icustay_id", "startdate", "enddate", "drug", "dose_val_rx", "dose_unit_rx", "route"],
                    require_rows=True)
    meds = _drug_tokens(rx, "PRESCRIPTIONS", adm_subject, drops, cfg, ddi[0], t["PRESCRIPTIONS"], "startdate")
    dx, px = icd["dx"], icd["px"]

    names = _atc_names(cfg)
    for tab, kind in (("D_ICD_DIAGNOSES", "dx9:"), ("D_ICD_PROCEDURES", "px9:")):
        d = read_table(t[tab], ["icd9_code", "short_title"]).dropna()
        names.update(zip((kind + d["icd9_code"]).tolist(), d["short_title"].tolist()))
    return _assemble("mimic3", adm, ages, gender, dx, px, meds, PROFILE_III, cfg, drops, names, ddi)


def read_mimic4(raw_dir, cfg) -> RawCohort:
    """MIMIC-IV `hosp/` module (v2.x); ICD-9 and ICD-10 told apart by icd_version."""
    drops = Drops()
    t = {n: find_table(raw_dir, "hosp/" + n) for n in ("admissions", "patients", "diagnoses_icd",
                                                        "procedures_icd", "prescriptions", "d_icd_diagnoses",
                                                        "d_icd_procedures")}
    adm = _admissions(read_table(t["admissions"], ["subject_id", "hadm_id", "admittime"], PROFILE_IV,
                                 require_rows=True), "admissions", drops, t["admissions"])
    adm_subject = pd.Series(adm["subject_id"].to_numpy(), index=adm["hadm_id"].to_numpy())
    pat = _patients(t["patients"], ["subject_id", "gender", "anchor_age", "anchor_year"])
    ay = parse_dates(adm["admittime"]).dt.year.astype(float)
    age = (pd.to_numeric(adm["subject_id"].map(pat["anchor_age"]), errors="coerce") + ay
           - pd.to_numeric(adm["subject_id"].map(pat["anchor_year"]), errors="coerce"))
    ages = age.map(lambda a: age_bucket(None if a != a else a))
    gender = adm["subject_id"].map(pat["gender"])

    icd = {}
    for tab, kind in (("diagnoses_icd", "dx"), ("procedures_icd", "px")):
        df = read_table(t[tab], ["subject_id", "hadm_id", "icd_code", "icd_version"], ["seq_num"],
                        require_rows=True)
        icd[kind] = _icd_tokens(df.rename(columns={"icd_code": "code"}), tab, kind, adm_subject, drops, None,
                                "icd_code", t[tab])
    dx, px = icd["dx"], icd["px"]
    ddi = mappings.load_ddi_pairs(str(cfg.ddi_pairs))
    rx = read_table(t["prescriptions"], ["subject_id", "hadm_id", "ndc"],
                    ["pharmacy_id", "starttime", "stoptime", "drug", "dose_val_rx", "dose_unit_rx", "route"],
                    require_rows=True)
    rx = rx.rename(columns={"starttime": "startdate"})
    meds = _drug_tokens(rx, "prescriptions", adm_subject, drops, cfg, ddi[0], t["prescriptions"], "starttime")

    names = _atc_names(cfg)
    for tab, kind in (("d_icd_diagnoses", "dx"), ("d_icd_procedures", "px")):
        d = read_table(t[tab], ["icd_code", "icd_version", "long_title"]).dropna()
        names.update(zip((kind + d["icd_version"] + ":" + d["icd_code"]).tolist(), d["long_title"].tolist()))
    return _assemble("mimic4", adm, ages, gender, dx, px, meds, PROFILE_IV, cfg, drops, names, ddi)
