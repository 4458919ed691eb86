"""Synthetic MIMIC-III-format raw tables of any size, for tests and scale benchmarks.

Latent conditions drive everything: each patient has one or two conditions; each condition owns a
pool of diagnosis codes, procedure codes and ATC-3 drug classes, and a visit draws most of its codes
from its patient's conditions (the rest is noise), so drugs are learnable from diagnoses/procedures.
Drug rows carry real NDCs that map through the bundled ndc2RXCUI → RXCUI2atc4 tables to ATC-3 codes
of the DDI vocabulary, so the data goes through the real MIMIC-III reader. A small fraction of rows is
deliberately bad (NDC "0", unmapped NDC, empty diagnosis code) to exercise the drop accounting.
Column names are upper case (the credentialed release's spelling); codes keep leading zeros.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Dict, List

import numpy as np
import pandas as pd

from leader_jax.cli import REPO_ROOT
from leader_jax.data import mappings

MAPS = REPO_ROOT / "data" / "mappings"
N_COND, N_DX, N_PX = 24, 600, 200
INSURANCE = ["Medicare", "Private", "Medicaid", "Government", "Self Pay"]
LANGUAGE = ["ENGL", "SPAN", "RUSS", "PTUN", ""]
RELIGION = ["CATHOLIC", "PROTESTANT QUAKER", "JEWISH", "NOT SPECIFIED", "UNOBTAINABLE"]
MARITAL = ["MARRIED", "SINGLE", "WIDOWED", "DIVORCED", ""]
ETHNICITY = ["WHITE", "BLACK/AFRICAN AMERICAN", "HISPANIC OR LATINO", "ASIAN", "UNKNOWN/NOT SPECIFIED"]


@functools.lru_cache(maxsize=1)
def ndc_pool() -> Dict[str, List[str]]:
    """ATC-3 (inside the DDI vocabulary) -> sorted NDCs that map to it through the bundled tables."""
    ndc2rx = mappings.load_ndc_to_rxcui(str(MAPS / "ndc2RXCUI.txt"))
    rx2atc = mappings.load_rxcui_to_atc3(str(MAPS / "RXCUI2atc4.csv.gz"))
    codes, _ = mappings.load_ddi_pairs(str(MAPS / "ddi_atc3_pairs.csv"))
    ok = set(codes)
    pool: Dict[str, List[str]] = {}
    for ndc in sorted(ndc2rx):
        atc = rx2atc.get(ndc2rx[ndc])
        if atc in ok:
            pool.setdefault(atc, []).append(ndc)
    return pool


def _codes(rng, n: int, width: int, lead_zero: float) -> np.ndarray:
    nums = rng.choice(10 ** (width - 1), size=n * 3, replace=False)[:n]
    out = np.array([f"{x:0{width}d}" for x in nums], dtype=object)
    z = rng.random(n) < lead_zero           # some codes with a leading zero (must survive as strings)
    out[z] = np.array(["0" + c[1:] for c in out[z]], dtype=object)
    return np.array(sorted(set(out.tolist())), dtype=object)


def _time(year: np.ndarray, day: np.ndarray, minute: np.ndarray) -> np.ndarray:
    base = pd.to_datetime(pd.Series(year).astype(str) + "-01-01")
    t = base + pd.to_timedelta(day, unit="D") + pd.to_timedelta(minute, unit="m")
    return t.dt.strftime("%Y-%m-%d %H:%M:%S").to_numpy()


def write_mimic3(out_dir, n_patients: int, seed: int = 0, compress: bool = False) -> Path:
    """Write ADMISSIONS, PATIENTS, DIAGNOSES_ICD, PROCEDURES_ICD, PRESCRIPTIONS, D_ICD_DIAGNOSES and
    D_ICD_PROCEDURES (.csv, or .csv.gz with compress=True) for `n_patients` patients into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pool = ndc_pool()
    atcs = np.array(sorted(pool), dtype=object)
    dx_codes, px_codes = _codes(rng, N_DX, 5, 0.1), _codes(rng, N_PX, 4, 0.2)
    cond_dx = [rng.choice(len(dx_codes), 10, replace=False) for _ in range(N_COND)]
    cond_px = [rng.choice(len(px_codes), 4, replace=False) for _ in range(N_COND)]
    cond_atc = [rng.choice(len(atcs), 5, replace=False) for _ in range(N_COND)]

    # patients and visits
    subj = np.sort(rng.choice(np.arange(100, 100 + 20 * n_patients), n_patients, replace=False))
    n_vis = rng.choice([1, 2, 3, 4, 5, 6], size=n_patients, p=[0.72, 0.16, 0.06, 0.03, 0.02, 0.01])
    cond_a = rng.integers(N_COND, size=n_patients)
    cond_b = np.where(rng.random(n_patients) < 0.5, rng.integers(N_COND, size=n_patients), cond_a)
    nv = int(n_vis.sum())
    v_pat = np.repeat(np.arange(n_patients), n_vis)
    v_idx = np.arange(nv) - np.repeat(np.cumsum(n_vis) - n_vis, n_vis)
    hadm = rng.choice(np.arange(100000, 100000 + 10 * nv), nv, replace=False)   # not chronological
    start_year = rng.integers(2100, 2190, size=n_patients)
    v_day = np.repeat(rng.integers(0, 300, size=n_patients), n_vis) + v_idx * 120 + rng.integers(0, 60, size=nv)
    admittime = _time(np.repeat(start_year, n_vis), v_day, rng.integers(0, 1440, size=nv))
    age0 = rng.integers(18, 95, size=n_patients)
    dob_year = np.where(age0 > 89, start_year - age0 - 300 + 90, start_year - age0)   # MIMIC's >89 shift
    dob = _time(dob_year, rng.integers(0, 365, size=n_patients), np.zeros(n_patients, int))

    def pick(lst, n):
        return np.array(lst, dtype=object)[rng.integers(len(lst), size=n)]

    adm = pd.DataFrame({"ROW_ID": np.arange(1, nv + 1), "SUBJECT_ID": subj[v_pat], "HADM_ID": hadm,
                        "ADMITTIME": admittime, "ADMISSION_TYPE": pick(["EMERGENCY", "ELECTIVE", "URGENT"], nv),
                        "INSURANCE": pick(INSURANCE, nv), "LANGUAGE": pick(LANGUAGE, nv),
                        "RELIGION": pick(RELIGION, nv), "MARITAL_STATUS": pick(MARITAL, nv),
                        "ETHNICITY": pick(ETHNICITY, nv)})
    pats = pd.DataFrame({"ROW_ID": np.arange(1, n_patients + 1), "SUBJECT_ID": subj,
                         "GENDER": pick(["F", "M"], n_patients), "DOB": dob})

    def rows(n_per_visit, pools, noise_n, p_noise):
        counts = n_per_visit
        r_v = np.repeat(np.arange(nv), counts)
        n = len(r_v)
        which = rng.random(n) < 0.5
        cond = np.where(which, cond_a[v_pat[r_v]], cond_b[v_pat[r_v]])
        k = pools[0].shape[0]
        table = np.stack(pools)                       # [N_COND, k]
        code = table[cond, rng.integers(k, size=n)]
        noise = rng.random(n) < p_noise
        code[noise] = rng.integers(noise_n, size=int(noise.sum()))
        return r_v, code

    r_v, c = rows(rng.integers(3, 16, size=nv), cond_dx, len(dx_codes), 0.2)
    dx_code = dx_codes[c].copy()
    dx_code[rng.random(len(dx_code)) < 0.002] = ""                       # bad: empty code
    seq = np.arange(len(r_v)) - np.repeat(np.cumsum(np.bincount(r_v, minlength=nv)) - np.bincount(r_v, minlength=nv),
                                           np.bincount(r_v, minlength=nv)) + 1
    dxt = pd.DataFrame({"ROW_ID": np.arange(1, len(r_v) + 1), "SUBJECT_ID": subj[v_pat[r_v]],
                        "HADM_ID": hadm[r_v], "SEQ_NUM": seq, "ICD9_CODE": dx_code})
    r_v, c = rows(rng.integers(1, 6, size=nv), cond_px, len(px_codes), 0.15)
    pcnt = np.bincount(r_v, minlength=nv)
    pxt = pd.DataFrame({"ROW_ID": np.arange(1, len(r_v) + 1), "SUBJECT_ID": subj[v_pat[r_v]],
                        "HADM_ID": hadm[r_v], "SEQ_NUM": np.arange(len(r_v)) - np.repeat(np.cumsum(pcnt) - pcnt, pcnt) + 1,
                        "ICD9_CODE": px_codes[c]})
    r_v, c = rows(rng.integers(10, 110, size=nv), cond_atc, len(atcs), 0.1)   # ≈60 rows/admission (MIMIC-III: ≈70)
    atc = atcs[c]
    ndc_lists = [pool[a] for a in atcs]
    ndc = np.array([ndc_lists[i][j % len(ndc_lists[i])] for i, j in
                    zip(c.tolist(), rng.integers(1 << 30, size=len(c)).tolist())], dtype=object)
    u = rng.random(len(ndc))
    ndc[u < 0.02] = "0"                                                  # bad: NDC "0"
    ndc[(u >= 0.02) & (u < 0.03)] = "99999999999"                        # bad: unmapped NDC
    start = _time(np.full(len(r_v), 2000), rng.integers(0, 5, size=len(r_v)), np.zeros(len(r_v), int))
    rxt = pd.DataFrame({"ROW_ID": np.arange(1, len(r_v) + 1), "SUBJECT_ID": subj[v_pat[r_v]],
                        "HADM_ID": hadm[r_v], "ICUSTAY_ID": "", "STARTDATE": admittime[r_v],
                        "DRUG": "drug " + atc, "NDC": ndc, "ROUTE": pick(["PO", "IV", "SC"], len(r_v))})
    del start
    d_dx = pd.DataFrame({"ROW_ID": np.arange(1, len(dx_codes) + 1), "ICD9_CODE": dx_codes,
                         "SHORT_TITLE": [f"synthetic diagnosis {c}" for c in dx_codes],
                         "LONG_TITLE": [f"Synthetic diagnosis {c}" for c in dx_codes]})
    d_px = pd.DataFrame({"ROW_ID": np.arange(1, len(px_codes) + 1), "ICD9_CODE": px_codes,
                         "SHORT_TITLE": [f"synthetic procedure {c}" for c in px_codes],
                         "LONG_TITLE": [f"Synthetic procedure {c}" for c in px_codes]})
    ext = ".csv.gz" if compress else ".csv"
    for name, df in (("ADMISSIONS", adm), ("PATIENTS", pats), ("DIAGNOSES_ICD", dxt), ("PROCEDURES_ICD", pxt),
                     ("PRESCRIPTIONS", rxt), ("D_ICD_DIAGNOSES", d_dx), ("D_ICD_PROCEDURES", d_px)):
        df.to_csv(out / f"{name}{ext}", index=False)
    return out
