"""eICU-CRD reader → `RawCohort`.

A patient is a `uniquepid`; a visit is an ICU unit stay (`patientunitstayid`) with ≥1 diagnosis and
≥1 HICL-coded drug order (cancelled orders count unless `eicu_drop_cancelled`). Stays are ordered by the convention
(hospitaldischargeyear, patienthealthsystemstayid, unitvisitnumber, patientunitstayid), numerically,
because eICU has no absolute dates; `Visit.time` spells that key as a zero-padded string.
Rows whose order key is missing or not an integer are dropped and counted, and keys are compared as
numbers, never as strings.
Tokens: `dx9:<code>` for each ICD-9 code in the comma-separated `icd9code` (ICD-10 codes there are
skipped), `dxs:<diagnosisstring>` when a row has no ICD-9 code, `tx:<treatmentstring>` as the
procedure channel (may be empty), `hicl:<drughiclseqno>` as drugs. No DDI graph exists for HICL codes.
Profile: gender, age bucket, ethnicity, unittype, unitadmitsource.
Cleaning (see tables.py): missing-value markers are missing, `123.0` ids and HICL codes are `123`,
codes/strings that are too long or hold control characters are dropped, each counted.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Dict

import numpy as np
import pandas as pd

from leader_jax.data.cohort import RawCohort, age_bucket, clean_value, id_key
from leader_jax.data.records import Patient, Visit
from leader_jax.data.tables import (Drops, drop_bad_codes, drop_bad_numbers, drop_duplicates, drop_missing,
                                    drop_rows, find_table, group_unique, integral_ids, read_table, unmark)
from leader_jax.io import progress

PROFILE = ("gender", "age", "ethnicity", "unittype", "unitadmitsource")
ICD9 = re.compile(r"^(\d{3}(\.\d{1,2})?|V\d{2}(\.\d{1,2})?|E\d{3}(\.\d)?)$")


# stay order key: (column, digits of its zero-padded spelling in Visit.time)
ORDER_KEY = (("hospitaldischargeyear", 4), ("patienthealthsystemstayid", 10), ("unitvisitnumber", 3),
             ("patientunitstayid", 10))


def _eicu_age(a) -> str:
    if isinstance(a, str) and ">" in a:
        return ">89"
    return age_bucket(a)


def _link(df, label, stays: set, drops: Drops, key="patientunitstayid"):
    return drop_rows(df, ~df[key].isin(stays).to_numpy(), drops, f"{label}: patientunitstayid matches no unit stay")


def _ordered(df: pd.DataFrame, offset_col: str, label: str, drops: Drops) -> pd.DataFrame:
    """Order rows by an offset column (numerically; missing last). A present offset that is not an
    integer drops its row (counted)."""
    if offset_col in df.columns:
        df, o = drop_bad_numbers(unmark(df, [offset_col]), offset_col, drops, label, need=False)
        df = df.iloc[np.argsort(o.fillna(np.inf).to_numpy(), kind="stable")]
    return df


def _most_common_names(codes, names) -> Dict[str, str]:
    c = Counter(zip(codes, names))
    best: Dict[str, tuple] = {}
    for (code, name), n in c.items():
        if name is None or name != name:
            continue
        cur = best.get(code)
        if cur is None or (-n, name) < cur:
            best[code] = (-n, name)
    return {k: v[1] for k, v in best.items()}


def _leaf(path: str) -> str:
    return path.rsplit("|", 1)[-1].strip() or path


def read_eicu(raw_dir, cfg) -> RawCohort:
    drops = Drops()
    t = {n: find_table(raw_dir, n) for n in ("patient", "diagnosis", "treatment", "medication")}
    pat = read_table(t["patient"], ["patientunitstayid", "patienthealthsystemstayid", "uniquepid",
                                    "hospitaldischargeyear", "unitvisitnumber"], PROFILE, require_rows=True)
    pat = integral_ids(pat, ["patientunitstayid", "patienthealthsystemstayid"], t["patient"])
    pat = drop_missing(pat, ["patientunitstayid", "uniquepid"], drops, "patient",
                       "patient: missing patientunitstayid or uniquepid")
    pat = drop_duplicates(pat, drops, "patient: duplicate row")
    pat = drop_duplicates(pat, drops, "patient: repeated patientunitstayid (first row kept)",
                          subset=["patientunitstayid"])
    for col, _ in ORDER_KEY:
        pat, v = drop_bad_numbers(unmark(pat, [col]), col, drops, "patient", need=True)
        pat = pat.assign(**{"_" + col: v})
    stays = set(pat["patientunitstayid"])

    dx = read_table(t["diagnosis"], ["patientunitstayid", "icd9code", "diagnosisstring"], ["diagnosisoffset"],
                    require_rows=True)
    dx = integral_ids(dx, ["patientunitstayid"], t["diagnosis"])
    dx = drop_missing(dx, ["icd9code", "diagnosisstring"], drops, "diagnosis", "diagnosis: empty code", need="any")
    for col in ("icd9code", "diagnosisstring"):
        dx = drop_bad_codes(dx, col, drops, "diagnosis", text=True)
    dx = drop_duplicates(dx, drops, "diagnosis: duplicate row")
    dx = _link(dx, "diagnosis", stays, drops)
    dx = _ordered(dx, "diagnosisoffset", "diagnosis", drops)
    keys, toks, n9, nstr = [], [], 0, 0
    dx_names_codes, dx_names = [], []
    for sid, icd, dstr in progress(zip(dx["patientunitstayid"].tolist(), dx["icd9code"].tolist(),
                                       dx["diagnosisstring"].tolist()), desc="eicu diagnoses", total=len(dx),
                                   unit="row"):
        codes = [c for c in (x.strip() for x in icd.split(",")) if ICD9.match(c)] if isinstance(icd, str) else []
        if codes:
            for c in codes:
                keys.append(sid)
                toks.append("dx9:" + c)
                if isinstance(dstr, str):
                    dx_names_codes.append("dx9:" + c)
                    dx_names.append(_leaf(dstr))
            n9 += 1
        elif isinstance(dstr, str):
            keys.append(sid)
            toks.append("dxs:" + dstr)
            nstr += 1
        else:
            drops.add("diagnosis: icd9code without an ICD-9 code and no diagnosisstring", 1)
    dx_map = group_unique(np.array(keys, dtype=object), np.array(toks, dtype=object))

    tx = read_table(t["treatment"], ["patientunitstayid", "treatmentstring"], ["treatmentoffset"])
    tx = integral_ids(tx, ["patientunitstayid"], t["treatment"])
    tx = drop_missing(tx, ["treatmentstring"], drops, "treatment", "treatment: empty code")
    tx = drop_bad_codes(tx, "treatmentstring", drops, "treatment", text=True)
    tx = drop_duplicates(tx, drops, "treatment: duplicate row")
    tx = _link(tx, "treatment", stays, drops)
    tx = _ordered(tx, "treatmentoffset", "treatment", drops)
    tx_map = group_unique(tx["patientunitstayid"].to_numpy(), ("tx:" + tx["treatmentstring"]).to_numpy())

    med = read_table(t["medication"], ["patientunitstayid", "drughiclseqno"],
                     ["drugname", "drugordercancelled", "drugstartoffset", "drugorderoffset", "dosage",
                      "routeadmin", "frequency", "drugstopoffset"], require_rows=True)
    med = integral_ids(med, ["patientunitstayid", "drughiclseqno"], t["medication"])
    if cfg.eicu_drop_cancelled and "drugordercancelled" in med.columns:
        med = drop_rows(med, (med["drugordercancelled"].str.lower() == "yes").fillna(False).to_numpy(dtype=bool),
                        drops, "medication: cancelled order")
    med = drop_missing(med, ["drughiclseqno"], drops, "medication", "medication: empty drughiclseqno")
    med = drop_bad_codes(med, "drughiclseqno", drops, "medication")
    med = drop_duplicates(med, drops, "medication: duplicate row")
    med = _link(med, "medication", stays, drops)
    med = _ordered(med, "drugstartoffset", "medication", drops)
    med_tok = ("hicl:" + med["drughiclseqno"]).to_numpy()
    med_map = group_unique(med["patientunitstayid"].to_numpy(), med_tok)

    names = {}
    names.update(_most_common_names(dx_names_codes, dx_names))
    names.update({t: _leaf(t[4:]) for s in dx_map.values() for t in s if t.startswith("dxs:")})
    names.update({t: _leaf(t[3:]) for s in tx_map.values() for t in s})
    if "drugname" in med.columns:
        names.update(_most_common_names(med_tok.tolist(), med["drugname"].tolist()))

    sid = pat["patientunitstayid"].to_numpy()
    has_dx = np.fromiter((s in dx_map for s in sid), bool, len(sid))
    has_rx = np.fromiter((s in med_map for s in sid), bool, len(sid))
    drops.add("visits without diagnoses", np.count_nonzero(~has_dx))
    drops.add("visits without a HICL-coded drug", np.count_nonzero(~has_rx))
    keep = has_dx & has_rx
    drops.add("visits dropped (any reason above)", np.count_nonzero(~keep))
    pat = pat.loc[keep]
    okey = list(zip(*[pat["_" + c].to_numpy(dtype=np.int64).tolist() for c, _ in ORDER_KEY])) if len(pat) else []
    tkey = ["-".join(f"{v:0{w}d}" for v, (_, w) in zip(k, ORDER_KEY)) for k in okey]
    prof = {f: (pat[f].tolist() if f in pat.columns else [None] * len(pat)) for f in PROFILE}
    rows = sorted(zip(pat["uniquepid"].tolist(), okey, tkey, pat["patientunitstayid"].tolist(),
                      *[prof[f] for f in PROFILE]), key=lambda r: (id_key(r[0]), r[1]))   # numeric key
    patients, visit_profiles = [], {}
    cur, visits = None, []
    for r in progress(rows, desc="eicu stays", unit="stay"):
        pid, _, key, s = r[:4]
        vals = r[4:]
        if pid != cur:
            if visits:
                patients.append(Patient(cur, visit_profiles[visits[-1].id], tuple(visits)))
            cur, visits = pid, []
        p = {f: clean_value(v) for f, v in zip(PROFILE, vals)}
        p["age"] = _eicu_age(vals[PROFILE.index("age")])
        visit_profiles[s] = p
        visits.append(Visit(s, key, dx_map[s], tx_map.get(s, ()), med_map[s]))
    if visits:
        patients.append(Patient(cur, visit_profiles[visits[-1].id], tuple(visits)))
    notes = [f"eICU diagnosis rows: {n9} with ≥1 ICD-9 code (dx9 tokens), {nstr} without (dxs tokens). "
             "Stay order: (hospitaldischargeyear, patienthealthsystemstayid, unitvisitnumber, patientunitstayid). "
             "No DDI graph exists for HICL codes: DDI rate is reported as not available."]
    return RawCohort("eicu", patients, visit_profiles, names, drops, ("diagnoses", "medications"),
                     PROFILE, None, None, notes)
