"""Bad input: each kind either raises a clear error naming file/column, or is dropped and counted by
reason. Small synthetic MIMIC-III fixtures are corrupted on purpose; counts are checked as exact
differences against the clean baseline."""
import gzip
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from leader_jax.cli import REPO_ROOT, UserError
from leader_jax.data.prepare import default_config, prepare
from leader_jax.data.synthetic import write_mimic3


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    raw = write_mimic3(tmp_path_factory.mktemp("bad") / "raw", n_patients=30, seed=1)
    return raw, prepare(default_config(dataset="synthetic", raw_dir=str(raw)))


def copy(base, tmp_path):
    dst = tmp_path / "raw"
    shutil.copytree(base[0], dst)
    return dst


def run(raw):
    return prepare(default_config(dataset="synthetic", raw_dir=str(raw)))


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
