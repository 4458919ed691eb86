"""Synthetic MIMIC-III tables: format, determinism, NDCs that map through the real tables, and
latent structure that makes drugs predictable from diagnoses."""
import csv
from collections import defaultdict

import numpy as np
import pytest

from leader_jax.data import mappings
from leader_jax.data.dataset import PreparedData
from leader_jax.data.synthetic import MAPS, write_mimic3


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return write_mimic3(tmp_path_factory.mktemp("syn") / "raw", n_patients=60, seed=3)


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tables_columns_and_determinism(raw, tmp_path):
    names = sorted(p.name for p in raw.iterdir())
    assert names == sorted(f"{n}.csv" for n in ("ADMISSIONS", "PATIENTS", "DIAGNOSES_ICD", "PROCEDURES_ICD",
                                                "PRESCRIPTIONS", "D_ICD_DIAGNOSES", "D_ICD_PROCEDURES"))
    assert {"SUBJECT_ID", "HADM_ID", "ADMITTIME"} <= set(read(raw / "ADMISSIONS.csv")[0])
    again = write_mimic3(tmp_path / "again", n_patients=60, seed=3)
    other = write_mimic3(tmp_path / "other", n_patients=60, seed=4)
    for n in names:
        assert (raw / n).read_bytes() == (again / n).read_bytes(), n
    assert (raw / "PRESCRIPTIONS.csv").read_bytes() != (other / "PRESCRIPTIONS.csv").read_bytes()
    assert len({r["SUBJECT_ID"] for r in read(raw / "PATIENTS.csv")}) == 60
    adm = read(raw / "ADMISSIONS.csv")
    assert len({r["HADM_ID"] for r in adm}) == len(adm)


def test_ndcs_map_into_ddi_vocabulary(raw):
    ndc2rx = mappings.load_ndc_to_rxcui(str(MAPS / "ndc2RXCUI.txt"))
    rx2atc = mappings.load_rxcui_to_atc3(str(MAPS / "RXCUI2atc4.csv.gz"))
    codes, _ = mappings.load_ddi_pairs(str(MAPS / "ddi_atc3_pairs.csv"))
    rx = read(raw / "PRESCRIPTIONS.csv")
    good = [r for r in rx if r["NDC"] not in ("0", "99999999999")]
    assert 0.95 * len(rx) < len(good) < len(rx)            # a few deliberately bad rows
    for r in good:
        assert rx2atc[ndc2rx[r["NDC"]]] in codes
        assert r["DRUG"] == "drug " + rx2atc[ndc2rx[r["NDC"]]]


def test_leading_zero_codes_survive_prepare(prepared_synthetic):
    d = PreparedData.load(prepared_synthetic)
    assert any(t.startswith("dx9:0") for t in d.vocab.diag)
    assert any(t.startswith("px9:0") for t in d.vocab.proc)
    t = next(t for t in d.vocab.diag if t.startswith("dx9:0"))
    assert d.vocab.names[t] == f"synthetic diagnosis {t[4:]}"


def test_drugs_predictable_from_diagnoses(prepared_synthetic):
    """A diagnosis→drug co-occurrence scorer fitted on train beats drug frequency on test (PRAUC-free
    check: mean rank of true drugs), i.e. the latent conditions carry signal."""
    d = PreparedData.load(prepared_synthetic)
    med = d.vocab.index("med")
    co = defaultdict(lambda: np.zeros(d.vocab.n_med))
    freq = np.zeros(d.vocab.n_med)
    for s in d.splits["train"]:
        for v in s.visits:
            y = np.zeros(d.vocab.n_med)
            y[[med[t] for t in v.medications]] = 1
            freq += y
            for t in v.diagnoses:
                co[t] += y
    hits_co, hits_fr, n = 0, 0, 0
    for s in d.splits["val"] + d.splits["test"]:
        v = s.target
        score = sum((co[t] for t in v.diagnoses if t in co), np.zeros(d.vocab.n_med))
        truth = {med[t] for t in v.medications}
        k = len(truth)
        hits_co += len(truth & set(np.argsort(-score, kind="stable")[:k].tolist()))
        hits_fr += len(truth & set(np.argsort(-freq, kind="stable")[:k].tolist()))
        n += k
    assert hits_co / n > hits_fr / n + 0.1, (hits_co / n, hits_fr / n)
