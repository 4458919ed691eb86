"""Cohorts, protocols, splits, profiles, top-k, DDI and determinism on the bundled demos, each checked
against an independent computation from the raw CSVs (not via the reader under test)."""
import csv
import gzip
import json
from collections import Counter
from datetime import datetime

import numpy as np
import pytest

from leader_jax.cli import REPO_ROOT
from leader_jax.data.dataset import SPLITS, PreparedData
from leader_jax.data.prepare import default_config, prepare

DATA = REPO_ROOT / "data"


def rows(path):
    op = gzip.open if str(path).endswith(".gz") else open
    with op(path, "rt", newline="") as f:
        return [{k.lower(): v for k, v in r.items()} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def m3():
    return prepare(default_config(dataset="mimic3"))


@pytest.fixture(scope="module")
def m4():
    return prepare(default_config(dataset="mimic4"))


def multi(d):
    ps = [s for k in SPLITS for s in d.splits[k] if len(s.visits) >= 2]
    return len(ps), sum(len(s.visits) for s in ps)


def test_cohort_counts(m3, m4, prepared_eicu):
    e = PreparedData.load(prepared_eicu)
    assert (m3.stats["n_patients"], m3.stats["n_visits"]) == (82, 107)
    assert (m4.stats["n_patients"], m4.stats["n_visits"]) == (92, 186)
    assert (e.stats["n_patients"], e.stats["n_visits"]) == (1262, 1584)
    assert (multi(m3), multi(m4), multi(e)) == ((11, 36), (38, 132), (208, 530))
    for d in (m3, m4, e):
        s = d.stats
        assert sum(s["n_samples"].values()) == s["n_patients"]
        n = s["n_patients"]
        assert [s["n_samples"][k] for k in SPLITS] == [int(0.8 * n), int(0.1 * n), n - int(0.8 * n) - int(0.1 * n)]
        assert set(s) >= {"n_diag", "n_proc", "n_med", "avg_meds_per_visit", "n_single_visit", "dropped"}
        meds = [len(v.medications) for x in d.all_samples() for v in x.visits]
        assert s["avg_meds_per_visit"] == pytest.approx(np.mean(meds), abs=1e-6)
        assert s["n_single_visit"] == {k: sum(len(x.visits) == 1 for x in d.splits[k]) for k in SPLITS}


def test_eicu_cancelled_orders_option():
    d = prepare(default_config(dataset="eicu", eicu_drop_cancelled=True))
    assert (d.stats["n_patients"], d.stats["n_visits"]) == (1262, 1583)
    assert d.stats["dropped"]["medication: cancelled order"] == sum(
        r["drugordercancelled"].lower() == "yes" for r in rows(DATA / "eicu_demo/medication.csv.gz"))


def test_eicu_stay_order_convention(prepared_eicu):
    d = PreparedData.load(prepared_eicu)
    pat = {r["patientunitstayid"]: r for r in rows(DATA / "eicu_demo/patient.csv.gz")}
    key = lambda s: (int(pat[s]["hospitaldischargeyear"]), int(pat[s]["patienthealthsystemstayid"]),  # noqa: E731
                     int(pat[s]["unitvisitnumber"]), int(s))
    n_checked = 0
    for x in d.all_samples():
        ids = [v.id for v in x.visits]
        assert ids == sorted(ids, key=key)
        assert all(pat[i]["uniquepid"] == x.patient_id for i in ids)
        n_checked += len(ids) > 1
    assert n_checked == 208
    assert d.stats["n_med"] == len({t for x in d.all_samples() for v in x.visits for t in v.medications})
    assert all(t.startswith("hicl:") for t in d.vocab.med)
    assert all(t.split(":")[0] in ("dx9", "dxs") for t in d.vocab.diag)


def test_namespaces_and_icd_versions(m3, m4):
    for d in (m3, m4):
        assert not set(d.vocab.diag) & set(d.vocab.proc)
        assert all(t.startswith("atc:") and len(t) == 8 for t in d.vocab.med)
    pre = Counter(t.split(":")[0] for t in m4.vocab.diag)
    assert pre["dx9"] > 0 and pre["dx10"] > 0 and set(pre) == {"dx9", "dx10"}
    titles = {(r["icd_version"], r["icd_code"]): r["long_title"] for r in rows(DATA / "mimic4_demo/hosp/d_icd_diagnoses.csv.gz")}
    for t in m4.vocab.diag[:50]:
        kind, code = t.split(":")
        assert m4.vocab.names[t] == titles[(kind[2:], code)]
    short = {r["icd9_code"]: r["short_title"] for r in rows(DATA / "mimic3_demo/D_ICD_PROCEDURES.csv.gz")}
    lead0 = [t for t in m3.vocab.proc if t[4] == "0"]
    assert lead0 and all(m3.vocab.names[t] == short[t[4:]] for t in lead0)   # leading zeros kept


@pytest.mark.parametrize("order", ["admittime", "hadm_id"])
def test_visit_order_matches_raw_admissions(m3, order):
    d = m3 if order == "admittime" else prepare(default_config(dataset="mimic3", visit_order=order))
    t = {r["hadm_id"]: r["admittime"] for r in rows(DATA / "mimic3_demo/ADMISSIONS.csv.gz")}
    key = (lambda h: (t[h], int(h))) if order == "admittime" else int
    for x in d.all_samples():
        ids = [v.id for v in x.visits]
        assert ids == sorted(ids, key=key)
    if order == "hadm_id":  # the target changes for some multi-visit patients
        base = {x.patient_id: x.target.id for x in m3.all_samples()}
        changed = sum(base[x.patient_id] != x.target.id for x in d.all_samples())
        expect = sum(max((v.id for v in x.visits), key=int) != x.target.id for x in m3.all_samples())
        assert changed == expect > 0


def test_profile_at_target_with_age_and_train_vocab(m3):
    adm = {r["hadm_id"]: r for r in rows(DATA / "mimic3_demo/ADMISSIONS.csv.gz")}
    pat = {r["subject_id"]: r for r in rows(DATA / "mimic3_demo/PATIENTS.csv.gz")}
    buckets = Counter()
    for x in m3.all_samples():
        a = adm[x.target.id]
        admit = datetime.strptime(a["admittime"], "%Y-%m-%d %H:%M:%S")
        dob = datetime.strptime(pat[x.patient_id]["dob"], "%Y-%m-%d %H:%M:%S")
        age = admit.year - dob.year - ((admit.month, admit.day) < (dob.month, dob.day))
        exp = ">89" if age > 89 else ("<18" if age < 18 else ("18-29" if age < 30 else f"{age // 10 * 10}-{age // 10 * 10 + 9}"))
        assert x.profile["age"] == exp
        buckets[exp] += 1
        assert x.profile["gender"] == pat[x.patient_id]["gender"]
        assert x.profile["insurance"] == (a["insurance"] or "unknown")
        assert x.profile["language"] == (a["language"] or "unknown")
    assert buckets[">89"] > 0
    for f, vals in m3.vocab.profile.items():
        assert vals[0] == "unknown"
        assert set(vals[1:]) == {x.profile[f] for x in m3.splits["train"]} - {"unknown"}
    assert m3.vocab.profile_index("insurance", "never seen") == 0


def test_splits_seeded_sequential_and_disjoint(m3):
    ids = [[x.patient_id for x in m3.splits[k]] for k in SPLITS]
    assert not (set(ids[0]) & set(ids[1]) or set(ids[0]) & set(ids[2]) or set(ids[1]) & set(ids[2]))
    seq = prepare(default_config(dataset="mimic3", split="sequential"))
    allids = sorted((x.patient_id for x in m3.all_samples()), key=int)
    assert [x.patient_id for x in seq.splits["train"]] == allids[:65]
    assert [x.patient_id for x in seq.splits["test"]] == allids[73:]
    other = prepare(default_config(dataset="mimic3", split_seed=7))
    assert [x.patient_id for x in other.splits["test"]] != ids[2]


def test_per_visit_protocol(m3):
    d = prepare(default_config(dataset="mimic3", protocol="per_visit"))
    assert sum(len(d.splits[k]) for k in SPLITS) == 107
    by_pat = {x.patient_id: x for x in m3.all_samples()}
    for k in SPLITS:
        pats = {x.patient_id for x in m3.splits[k]}
        assert {x.patient_id for x in d.splits[k]} == pats          # same patient split
    for x in d.all_samples():
        full = by_pat[x.patient_id].visits
        n = len(x.visits)
        assert x.id == f"{x.patient_id}/{x.target.id}" and full[:n] == x.visits
    assert d.stats["n_single_visit"]["train"] + d.stats["n_single_visit"]["val"] + d.stats["n_single_visit"]["test"] == 82


def test_top_k_filter_against_counts(m3):
    cnt = Counter(t for x in m3.all_samples() for v in x.visits for t in v.diagnoses)
    top = {t for t, _ in sorted(cnt.items(), key=lambda kv: (-kv[1], kv[0]))[:10]}
    emptied = sum(not (set(v.diagnoses) & top) for x in m3.all_samples() for v in x.visits)
    d = prepare(default_config(dataset="mimic3", top_k_diag=10))
    assert set(d.vocab.diag) <= top and d.stats["n_visits"] == 107 - emptied
    assert d.stats["dropped"]["visits emptied by the top-k filters"] == emptied
    assert d.stats["dropped"]["diagnoses: code occurrences outside top-10"] == sum(c for t, c in cnt.items() if t not in top)
    assert list(m3.vocab.diag) == [t for t, _ in sorted(cnt.items(), key=lambda kv: (-kv[1], kv[0]))]


def test_ddi_matrix_from_pairs_file(m3):
    med = list(m3.vocab.med)
    exp = np.zeros((len(med), len(med)), np.uint8)
    for r in rows(DATA / "mappings/ddi_atc3_pairs.csv"):
        a, b = "atc:" + r["atc3_a"], "atc:" + r["atc3_b"]
        if a in med and b in med:
            exp[med.index(a), med.index(b)] = exp[med.index(b), med.index(a)] = 1
    assert exp.sum() > 0 and (m3.ddi == exp).all()
    assert m3.stats["ddi"]["n_pairs"] == exp.sum() // 2


def test_two_runs_byte_identical(tmp_path, prepared_eicu):
    from leader_jax.data.prepare import prepare_to

    a = prepare_to(tmp_path / "a", dataset="mimic3")
    prepare_to(tmp_path / "b", dataset="mimic3")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["ddi.npy", "report.md", "samples.jsonl", "splits.json", "stats.json", "vocab.json"]
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n
    assert a.fingerprint() == PreparedData.load(tmp_path / "b").fingerprint()
    assert prepare(default_config(dataset="eicu")).fingerprint() == PreparedData.load(prepared_eicu).fingerprint()
    st = json.loads((tmp_path / "a" / "stats.json").read_text())
    assert st["n_patients"] == 82


def test_min_admissions_and_sample_fraction_options(m3, m4):
    rx = [r for r in rows(DATA / "mimic3_demo/PRESCRIPTIONS.csv.gz") if r["ndc"] not in ("", "0")]
    hadms = {}
    for r in rx:
        hadms.setdefault(r["subject_id"], set()).add(r["hadm_id"])
    eligible = {s for s, h in hadms.items() if len(h) >= 2}
    d = prepare(default_config(dataset="mimic3", min_admissions=2))
    pats = {x.patient_id for x in d.all_samples()}
    assert pats == eligible & {x.patient_id for x in m3.all_samples()}
    assert d.stats["n_patients"] < 82 and "PRESCRIPTIONS: patient with < 2 admissions" in d.stats["dropped"]
    half = prepare(default_config(dataset="mimic4", sample_fraction=0.5))
    ids = sorted((x.patient_id for x in m4.all_samples()), key=int)
    chosen = set(np.random.RandomState(42).choice(ids, 46, replace=False).tolist())
    assert {x.patient_id for x in half.all_samples()} == chosen
