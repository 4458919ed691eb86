"""Bad input for `prepare`: each kind either raises a one-line error naming the file/column/value, or is
dropped and counted by reason, or gives the correct result. Small synthetic MIMIC-III fixtures are
corrupted on purpose; counts are checked as exact differences against the clean baseline. Covered:
missing files/columns, empty and missing-value-marker codes, unmapped drugs, duplicate rows, unparseable
or mixed-format dates, numeric order keys, ambiguous files, duplicate headers, malformed codes, float ids,
header-only tables, an unwritable output folder."""
import gzip
import os
import shutil
import subprocess
import sys
import tempfile

import pandas as pd
import pytest

from leader_jax.cli import REPO_ROOT, UserError
from leader_jax.data import prepare as prep
from leader_jax.data.prepare import default_config, prepare
from leader_jax.data.synthetic import write_mimic3

MARK = "is a missing-value marker (NaN/NULL/NA/None)"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    raw = write_mimic3(tmp_path_factory.mktemp("bad") / "raw", n_patients=30, seed=1)
    return raw, prepare(default_config(dataset="synthetic", raw_dir=str(raw)))


def copy(base, tmp_path):
    dst = tmp_path / "raw"
    shutil.copytree(base[0], dst)
    return dst


def run(raw, **kw):
    return prepare(default_config(dataset="synthetic", raw_dir=str(raw), **kw))


def edit(path, fn):
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    fn(df).to_csv(path, index=False)


def delta(base, data, reason):
    return data.stats["dropped"].get(reason, 0) - base[1].stats["dropped"].get(reason, 0)


def test_missing_file(base, tmp_path):
    raw = copy(base, tmp_path)
    (raw / "PROCEDURES_ICD.csv").unlink()
    with pytest.raises(UserError, match=r"missing table PROCEDURES_ICD\.csv"):
        run(raw)


def test_missing_column(base, tmp_path):
    raw = copy(base, tmp_path)
    edit(raw / "PRESCRIPTIONS.csv", lambda d: d.drop(columns=["NDC"]))
    with pytest.raises(UserError, match=r"PRESCRIPTIONS\.csv: missing column\(s\) ndc"):
        run(raw)


def test_empty_codes_counted(base, tmp_path):
    raw = copy(base, tmp_path)
    edit(raw / "DIAGNOSES_ICD.csv", lambda d: d.assign(ICD9_CODE=[("" if i in (3, 4, 5) else c)
                                                                  for i, c in enumerate(d["ICD9_CODE"])]))
    pre = pd.read_csv(base[0] / "DIAGNOSES_ICD.csv", dtype=str, keep_default_na=False)
    extra = int((pre["ICD9_CODE"].iloc[3:6] != "").sum())
    assert delta(base, run(raw), "DIAGNOSES_ICD: empty code") == extra == 3


def test_unmapped_and_zero_ndc_counted(base, tmp_path):
    raw = copy(base, tmp_path)
    edit(raw / "PRESCRIPTIONS.csv", lambda d: pd.concat(
        [d, d.iloc[:4].assign(NDC=[f"1234567890{i}" for i in range(4)]), d.iloc[4:6].assign(NDC="0"), d.iloc[6:7].assign(NDC=" ")]))
    data = run(raw)
    assert delta(base, data, "PRESCRIPTIONS: NDC not in the NDC→RxCUI map") == 4
    assert delta(base, data, "PRESCRIPTIONS: NDC missing or 0") == 3


def test_duplicate_rows_counted(base, tmp_path):
    raw = copy(base, tmp_path)
    edit(raw / "DIAGNOSES_ICD.csv", lambda d: pd.concat([d, d.iloc[10:15]]))
    data = run(raw)
    assert delta(base, data, "DIAGNOSES_ICD: duplicate row") == 5
    assert data.stats["n_visits"] == base[1].stats["n_visits"]
    assert [s.visits for s in data.all_samples()] == [s.visits for s in base[1].all_samples()]


def test_rows_matching_no_admission_or_wrong_subject(base, tmp_path):
    raw = copy(base, tmp_path)
    edit(raw / "PROCEDURES_ICD.csv", lambda d: pd.concat([d, d.iloc[:2].assign(HADM_ID="999999999")]))
    edit(raw / "DIAGNOSES_ICD.csv", lambda d: pd.concat([d, d.iloc[:1].assign(SUBJECT_ID="1", SEQ_NUM="99")]))
    data = run(raw)
    assert delta(base, data, "PROCEDURES_ICD: hadm_id matches no admission") == 2
    assert delta(base, data, "DIAGNOSES_ICD: subject_id differs from the admission's") == 1


def test_visit_left_empty_is_dropped(base, tmp_path):
    raw = copy(base, tmp_path)
    px = pd.read_csv(raw / "PROCEDURES_ICD.csv", dtype=str, keep_default_na=False)
    # an admission of a patient with several admissions loses all its procedures
    adm = pd.read_csv(raw / "ADMISSIONS.csv", dtype=str, keep_default_na=False)
    multi = adm.groupby("SUBJECT_ID")["HADM_ID"].transform("count") > 1
    h = adm.loc[multi, "HADM_ID"].iloc[0]
    px[px["HADM_ID"] != h].to_csv(raw / "PROCEDURES_ICD.csv", index=False)
    data = run(raw)
    assert delta(base, data, "visits without procedures") == 1
    assert data.stats["n_visits"] == base[1].stats["n_visits"] - 1
    assert data.stats["n_patients"] == base[1].stats["n_patients"]
    assert h not in {v.id for s in data.all_samples() for v in s.visits}


def test_truncated_gzip(base, tmp_path):
    raw = copy(base, tmp_path)
    blob = gzip.compress((raw / "ADMISSIONS.csv").read_bytes())
    (raw / "ADMISSIONS.csv").unlink()
    (raw / "ADMISSIONS.csv.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UserError, match=r"ADMISSIONS\.csv\.gz: cannot read CSV"):
        run(raw)


def test_unreadable_csv(base, tmp_path):
    raw = copy(base, tmp_path)
    with open(raw / "PATIENTS.csv", "a") as f:
        f.write('1,2,3,4,5,6,7,8\n"unterminated,\n')
    with pytest.raises(UserError, match=r"PATIENTS\.csv: cannot read CSV"):
        run(raw)


def test_lower_case_headers_and_gzip_equivalent(base, tmp_path):
    raw = copy(base, tmp_path)
    for p in list(raw.iterdir()):
        text = p.read_text()
        head, rest = text.split("\n", 1)
        (raw / (p.stem.lower() + ".csv.gz")).write_bytes(gzip.compress((head.lower() + "\n" + rest).encode()))
        p.unlink()
    assert run(raw).fingerprint() == base[1].fingerprint()


def test_eicu_small_tables(tmp_path):
    """Multi-code icd9code strings split, ICD-10-only rows fall back to diagnosisstring, cancelled and
    uncoded drugs handled, stays with no diagnosis dropped."""
    raw = tmp_path / "eicu"
    raw.mkdir()
    pd.DataFrame({"patientunitstayid": ["11", "12", "13"], "patienthealthsystemstayid": ["1", "1", "2"],
                  "uniquepid": ["p1", "p1", "p2"], "hospitaldischargeyear": ["2015", "2015", "2014"],
                  "unitvisitnumber": ["2", "1", "1"], "gender": ["Male", "Male", "Female"],
                  "age": ["> 89", "> 89", "45"], "ethnicity": ["", "", "Asian"]}).to_csv(raw / "patient.csv", index=False)
    pd.DataFrame({"patientunitstayid": ["11", "11", "12", "12"], "diagnosisoffset": ["5", "1", "0", "0"],
                  "diagnosisstring": ["cardio|hypertension", "renal|aki", "neuro|coma", ""],
                  "icd9code": ["401.9, I10", "N17.9", "780.01, R40.20", ""]}).to_csv(raw / "Diagnosis.csv", index=False)
    pd.DataFrame({"patientunitstayid": ["11"], "treatmentstring": ["a|b|dialysis"]}).to_csv(raw / "treatment.csv", index=False)
    pd.DataFrame({"patientunitstayid": ["11", "11", "12", "12", "13", "99"],
                  "drughiclseqno": ["100", "", "200", "300", "100", "100"],
                  "drugname": ["ASPIRIN", "X", "HEPARIN", "Y", "ASA", "Z"],
                  "drugordercancelled": ["No", "No", "No", "Yes", "No", "No"]}).to_csv(raw / "medication.csv", index=False)
    d = prepare(default_config(dataset="eicu", raw_dir=str(raw), split="sequential", split_fractions=(1.0, 0.0, 0.0)))
    (s,) = [x for x in d.splits["train"] if x.patient_id == "p1"]
    assert [v.id for v in s.visits] == ["12", "11"]              # unitvisitnumber order within the stay
    assert s.visits[1].diagnoses == ("dxs:renal|aki", "dx9:401.9")  # offset order; ICD-10-only -> string
    assert s.visits[0].diagnoses == ("dx9:780.01",)
    assert s.visits[0].medications == ("hicl:200", "hicl:300")    # cancelled kept by default
    assert s.visits[1].procedures == ("tx:a|b|dialysis",) and s.visits[0].procedures == ()
    assert s.profile == {"gender": "Male", "age": ">89", "ethnicity": "unknown", "unittype": "unknown",
                         "unitadmitsource": "unknown"}
    assert d.vocab.names["hicl:100"] == "ASA"  # most frequent name; tie -> alphabetical
    assert d.vocab.names["dx9:401.9"] == "hypertension"
    dr = d.stats["dropped"]
    assert dr["medication: empty drughiclseqno"] == 1 and dr["diagnosis: empty code"] == 1
    assert dr["medication: patientunitstayid matches no unit stay"] == 1
    assert dr["visits without diagnoses"] == 1 and d.stats["n_patients"] == 1
    d2 = prepare(default_config(dataset="eicu", raw_dir=str(raw), eicu_drop_cancelled=True,
                                split="sequential", split_fractions=(1.0, 0.0, 0.0)))
    assert d2.splits["train"][0].visits[0].medications == ("hicl:200",)


def test_cli_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "leader_jax.data.prepare", "--config", str(REPO_ROOT / "configs/data.py"),
                        "--config.dataset=mimic3", f"--config.raw_dir={tmp_path / 'nope'}", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=REPO_ROOT, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: raw data folder {tmp_path / 'nope'} does not exist"]
    assert not (tmp_path / "o").exists()


def table(path):
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def reasons(data, start):
    return {k: v for k, v in data.stats["dropped"].items() if k.startswith(start)}


def tokens(data):
    return {t for s in data.all_samples() for v in s.visits for ch in (v.diagnoses, v.procedures, v.medications)
            for t in ch}


def two_visit_patient(raw):
    adm = table(raw / "ADMISSIONS.csv")
    n = adm.groupby("SUBJECT_ID")["HADM_ID"].transform("count")
    sid = adm.loc[n == 2, "SUBJECT_ID"].iloc[0]
    return adm, sid, adm.index[adm["SUBJECT_ID"] == sid].tolist()


# ---------------------------------------------------------------- 1. missing-value markers
def test_missing_value_markers_are_missing_and_counted(base, tmp_path):
    raw = copy(base, tmp_path)
    dx = table(raw / "DIAGNOSES_ICD.csv")
    dx.loc[3:8, "ICD9_CODE"] = ["NaN", "NULL", "None", "na", "   ", "N/A"]
    dx.to_csv(raw / "DIAGNOSES_ICD.csv", index=False)
    rx = table(raw / "PRESCRIPTIONS.csv")
    rx.loc[0:1, "NDC"] = ["nan", "NULL"]
    rx.to_csv(raw / "PRESCRIPTIONS.csv", index=False)
    adm = table(raw / "ADMISSIONS.csv")
    adm.loc[0, "INSURANCE"] = "NULL"
    adm.to_csv(raw / "ADMISSIONS.csv", index=False)
    was_empty = int((table(base[0] / "DIAGNOSES_ICD.csv")["ICD9_CODE"].iloc[3:9] == "").sum())
    d = run(raw)
    assert delta(base, d, f"DIAGNOSES_ICD: icd9_code {MARK}") == 5
    assert delta(base, d, "DIAGNOSES_ICD: empty code") == 1 - was_empty
    assert delta(base, d, f"PRESCRIPTIONS: ndc {MARK}") == 2
    toks = tokens(d)
    assert not {t for t in toks if t.split(":", 1)[1].lower() in ("nan", "null", "none", "na", "n/a", "")}
    assert "NULL" not in d.vocab.profile["insurance"]
    if adm.loc[0, "HADM_ID"] in {s.target.id for s in d.all_samples()}:
        (s,) = [s for s in d.all_samples() if s.target.id == adm.loc[0, "HADM_ID"]]
        assert s.profile["insurance"] == "unknown"


# ---------------------------------------------------------------- 2. dates
def test_admittime_parsed_not_string_sorted(base, tmp_path):
    """'2150-2-1' (February) precedes '2150-10-01' (October); as strings it sorts after it."""
    raw = copy(base, tmp_path)
    adm, sid, (i, j) = two_visit_patient(raw)
    adm.loc[i, "ADMITTIME"], adm.loc[j, "ADMITTIME"] = "2150-2-1 10:00:00", "2150-10-01T08:00:00"
    adm.to_csv(raw / "ADMISSIONS.csv", index=False)
    d = run(raw)
    (s,) = [s for s in d.all_samples() if s.patient_id == sid]
    assert [v.id for v in s.visits] == [adm.loc[i, "HADM_ID"], adm.loc[j, "HADM_ID"]]
    assert [v.time for v in s.visits] == ["2150-02-01 10:00:00", "2150-10-01 08:00:00"]
    assert d.stats["n_visits"] == base[1].stats["n_visits"]


def test_unparseable_dates_dropped_and_counted(base, tmp_path):
    raw = copy(base, tmp_path)
    adm, sid, (i, j) = two_visit_patient(raw)
    adm.loc[j, "ADMITTIME"] = "01/02/2150 10:00"
    adm.to_csv(raw / "ADMISSIONS.csv", index=False)
    pat = table(raw / "PATIENTS.csv")
    pat.loc[pat["SUBJECT_ID"] == sid, "DOB"] = "2090-13-45 00:00:00"
    pat.to_csv(raw / "PATIENTS.csv", index=False)
    rx = table(raw / "PRESCRIPTIONS.csv")
    rx.loc[5:7, "STARTDATE"] = ["yesterday", "2150-02-30", ""]
    rx.to_csv(raw / "PRESCRIPTIONS.csv", index=False)
    d = run(raw)
    dr = d.stats["dropped"]
    assert dr["ADMISSIONS: admittime is not an ISO date (e.g. '01/02/2150 10:00')"] == 1
    assert dr["PATIENTS: dob is not an ISO date, age left unknown (e.g. '2090-13-45 00:00:00')"] == 1
    assert dr["PRESCRIPTIONS: startdate is not an ISO date (e.g. 'yesterday')"] == 2   # the empty one is kept
    (s,) = [s for s in d.all_samples() if s.patient_id == sid]
    assert [v.id for v in s.visits] == [adm.loc[i, "HADM_ID"]] and s.profile["age"] == "unknown"
    assert d.stats["n_visits"] == base[1].stats["n_visits"] - 1
    assert "PRESCRIPTIONS: startdate is not an ISO date" in d.report


# ---------------------------------------------------------------- 3./4. ambiguous files, duplicate headers
def test_csv_beside_csv_gz_is_ambiguous(base, tmp_path):
    raw = copy(base, tmp_path)
    (raw / "PATIENTS.csv.gz").write_bytes(gzip.compress((raw / "PATIENTS.csv").read_bytes()))
    with pytest.raises(UserError, match=r"ambiguous table PATIENTS: both .*PATIENTS\.csv and .*PATIENTS\.csv\.gz"):
        run(raw)


def test_duplicate_header_column(base, tmp_path):
    raw = copy(base, tmp_path)
    text = (raw / "DIAGNOSES_ICD.csv").read_text().split("\n", 1)
    (raw / "DIAGNOSES_ICD.csv").write_text(text[0].replace("SEQ_NUM", "ICD9_CODE") + "\n" + text[1])
    with pytest.raises(UserError, match=r"DIAGNOSES_ICD\.csv: column 'icd9_code' appears 2 times"):
        run(raw)
    # a repeated column that is not read is harmless
    raw2 = tmp_path / "raw2"
    shutil.copytree(base[0], raw2)
    dx = table(raw2 / "DIAGNOSES_ICD.csv")
    pd.concat([dx, dx[["ROW_ID"]]], axis=1).to_csv(raw2 / "DIAGNOSES_ICD.csv", index=False)
    assert (raw2 / "DIAGNOSES_ICD.csv").read_text().startswith("ROW_ID,SUBJECT_ID,HADM_ID,SEQ_NUM,ICD9_CODE,ROW_ID\n")
    assert run(raw2).fingerprint() == base[1].fingerprint()


# ---------------------------------------------------------------- 5. malformed codes
def test_codes_too_long_or_with_separators_dropped(base, tmp_path):
    raw = copy(base, tmp_path)
    dx = table(raw / "DIAGNOSES_ICD.csv")
    dx.loc[0:4, "ICD9_CODE"] = ["401\n9", "40;19", "4019,1", "X" * 65, "tab\there"]
    dx.loc[5, "ICD9_CODE"] = "Y" * 64                                   # at the cap: kept
    dx.to_csv(raw / "DIAGNOSES_ICD.csv", index=False)
    d = run(raw)
    r = reasons(d, "DIAGNOSES_ICD: icd9_code")
    assert r == {"DIAGNOSES_ICD: icd9_code longer than 64 characters (e.g. '" + "X" * 38 + "…)": 1,
                 "DIAGNOSES_ICD: icd9_code holds a control character, ';' or ',' (e.g. '401\\n9')": 4}
    assert not {t for t in tokens(d) if any(c in t for c in "\n\t;,")}
    assert "dx9:" + "Y" * 64 in tokens(d) | set(d.vocab.diag)


# ---------------------------------------------------------------- 6. unwritable output folder
def test_read_only_output_folder(base, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    cfg = default_config(dataset="synthetic", raw_dir=str(base[0]), out=str(ro / "prepared"))
    if os.geteuid() == 0:     # root ignores permission bits: simulate what the OS says to a normal user
        def deny(*a, **k):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(tempfile, "mkstemp", deny)
    else:
        ro.chmod(0o500)
    try:
        with pytest.raises(UserError, match=rf"{ro / 'prepared'}: output folder is not writable .*Permission denied"):
            prep.main(cfg, [])
    finally:
        ro.chmod(0o700)
    assert not (ro / "prepared").exists()


# ---------------------------------------------------------------- eICU: float ids, order keys, empty tables
def eicu_tables(raw, *, stay_ids=("11", "12", "13"), uvn=("2", "1", "1"), year=("2015", "2015", "2014"),
                med_rows=True, hicl=("100", "", "200", "300", "100", "100")):
    raw.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"patientunitstayid": list(stay_ids), "patienthealthsystemstayid": ["1", "1", "2"],
                  "uniquepid": ["p1", "p1", "p2"], "hospitaldischargeyear": list(year),
                  "unitvisitnumber": list(uvn), "gender": ["Male", "Male", "Female"],
                  "age": ["> 89", "> 89", "45"], "ethnicity": ["NA", "", "Asian"]}).to_csv(raw / "patient.csv", index=False)
    pd.DataFrame({"patientunitstayid": ["11", "11", "12", "12", "13", "13"],
                  "diagnosisoffset": ["5", "1", "0", "0", "3", "x7"],
                  "diagnosisstring": ["cardio|hypertension", "renal|aki", "neuro|coma", "NaN", "a|b", "c|d"],
                  "icd9code": ["401.9, I10", "N17.9", "780.01, R40.20", "", "NULL", "428.0"]}
                 ).to_csv(raw / "diagnosis.csv", index=False)
    pd.DataFrame({"patientunitstayid": ["11", "12", "12", "13"],
                  "treatmentstring": ["a|b|dialysis", "NULL", "x\ty", "a|" + "b" * 300]}
                 ).to_csv(raw / "treatment.csv", index=False)
    med = pd.DataFrame({"patientunitstayid": ["11", "11", "12", "12", "13", "99"], "drughiclseqno": list(hicl),
                        "drugname": ["ASPIRIN", "X", "HEPARIN", "Y", "ASA", "Z"],
                        "drugordercancelled": ["No", "No", "No", "Yes", "No", "No"]})
    (med if med_rows else med.iloc[:0]).to_csv(raw / "medication.csv", index=False)
    return raw


def eicu(raw):
    return prepare(default_config(dataset="eicu", raw_dir=str(raw), split="sequential",
                                  split_fractions=(1.0, 0.0, 0.0)))


def test_eicu_markers_offsets_and_float_ids(tmp_path):
    d = eicu(eicu_tables(tmp_path / "a", stay_ids=("11.0", "12.0", "13"), hicl=("100.0", "", "200", "300.00", "100",
                                                                                "100")))
    (p1,) = [s for s in d.splits["train"] if s.patient_id == "p1"]
    assert [v.id for v in p1.visits] == ["12", "11"]
    assert p1.visits[0].medications == ("hicl:200", "hicl:300") and p1.visits[1].medications == ("hicl:100",)
    assert p1.visits[0].diagnoses == ("dx9:780.01",) and p1.visits[0].procedures == ()
    assert p1.profile["ethnicity"] == "unknown"
    (p2,) = [s for s in d.splits["train"] if s.patient_id == "p2"]
    assert p2.visits[0].diagnoses == ("dxs:a|b",)          # icd9code NULL -> the diagnosisstring
    dr = d.stats["dropped"]
    assert dr["diagnosis: diagnosisoffset is not an integer (e.g. 'x7')"] == 1
    assert dr[f"diagnosis: diagnosisstring {MARK}"] == 1
    assert dr[f"treatment: treatmentstring {MARK}"] == 1
    assert dr["treatment: treatmentstring holds a control character (e.g. 'x\\ty')"] == 1
    long = "treatment: treatmentstring longer than 256 characters (e.g. 'a|" + "b" * 36 + "…)"
    assert dr[long] == 1 and f"| {long.replace('|', chr(92) + '|')} | 1 |" in d.report   # table cell escaped
    assert not {t for t in tokens(d) if t.lower().endswith(("nan", "null"))}


def test_eicu_order_keys_numeric_and_bad_ones_dropped(tmp_path):
    d = eicu(eicu_tables(tmp_path / "a", uvn=("1000", "999", "1")))
    (p1,) = [s for s in d.splits["train"] if s.patient_id == "p1"]
    assert [v.id for v in p1.visits] == ["12", "11"]          # 999 before 1000 (as strings: after)
    assert p1.visits[1].time == "2015-0000000001-1000-0000000011"
    d = eicu(eicu_tables(tmp_path / "b", year=("20l5", "2015", "")))
    assert d.stats["dropped"]["patient: hospitaldischargeyear is not an integer (e.g. '20l5')"] == 1
    assert d.stats["dropped"]["patient: hospitaldischargeyear missing"] == 1
    assert [v.id for s in d.all_samples() for v in s.visits] == ["12"]


def test_eicu_non_integral_id_and_empty_tables(tmp_path):
    with pytest.raises(UserError, match=r"patient\.csv: column 'patientunitstayid' holds a non-integral id '12\.5'"):
        eicu(eicu_tables(tmp_path / "a", stay_ids=("11", "12.5", "13")))
    with pytest.raises(UserError, match=r"medication\.csv: the table has no data rows \(header only\)"):
        eicu(eicu_tables(tmp_path / "b", med_rows=False))
    with pytest.raises(UserError, match=r"eicu: no patient left in the cohort"):   # every drug order unusable
        eicu(eicu_tables(tmp_path / "c", hicl=("", "", "NaN", "", "", "")))


def test_mimic_header_only_prescriptions(base, tmp_path):
    raw = copy(base, tmp_path)
    (raw / "PRESCRIPTIONS.csv").write_text((raw / "PRESCRIPTIONS.csv").read_text().split("\n", 1)[0] + "\n")
    with pytest.raises(UserError, match=r"PRESCRIPTIONS\.csv: the table has no data rows"):
        run(raw)


def test_mimic_float_ids(base, tmp_path):
    raw = copy(base, tmp_path)
    for name in ("DIAGNOSES_ICD", "PRESCRIPTIONS"):
        t = table(raw / f"{name}.csv")
        t["HADM_ID"] = t["HADM_ID"] + ".0"
        t.to_csv(raw / f"{name}.csv", index=False)
    assert run(raw).fingerprint() == base[1].fingerprint()


# ---------------------------------------------------------------- 8. config validation
@pytest.mark.parametrize("field,value,msg", [
    ("dataset", "mimic5", "expected one of mimic3, mimic4, eicu, synthetic"),
    ("protocol", "all_visits", "expected one of last_visit, per_visit"),
    ("visit_order", "time", "expected one of admittime, hadm_id"),
    ("split", "shuffle", "expected one of random, sequential"),
    ("split_fractions", (0.8, 0.1), "need 3 non-negative numbers summing to 1"),
    ("top_k_diag", -5, "expected a positive size or 0"),
    ("top_k_med", -2, "expected a positive size, 0 .* or -1"),
    ("min_admissions", 0, "expected an integer >= 1"),
    ("sample_fraction", 1.5, r"expected a number in \(0, 1\]"),
])
def test_validate_config_refuses(field, value, msg):
    cfg = default_config()
    with cfg.unlocked():
        cfg[field] = value
    with pytest.raises(UserError, match=rf"config {field}=.*: {msg}"):
        prep.validate_config(cfg)


def test_validate_config_accepts_bundled():
    from leader_jax.cli import load_config

    prep.validate_config(default_config())
    prep.validate_config(load_config("demo.py").data)
    with pytest.raises(UserError, match=r"data\.py: unknown config field 'datset' \(did you mean 'dataset'\?\)"):
        default_config(datset="eicu")
