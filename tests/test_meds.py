"""MEDS reader and writer: the round trip native reader == export_meds -> MEDS reader on every bundled
demo, one tiny fixture per community preset, and each bad input as a one-line error or a counted drop."""
import json
from datetime import datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from leader_jax.cli import UserError
from leader_jax.data.dataset import PreparedData
from leader_jax.data.export_meds import export
from leader_jax.data.prepare import default_config, prepare


def same_content(native, meds):
    """Every prepared file equal, except the dataset name and the reader's own drop counts."""
    a, b = native._files(), meds._files()
    assert sorted(a) == sorted(b)
    for name in ("samples.jsonl", "splits.json", "ddi.npy"):
        if name in a:
            assert a[name] == b[name], name
    va, vb = json.loads(a["vocab.json"]), json.loads(b["vocab.json"])
    assert vb.pop("dataset") == "meds" and va.pop("dataset") == native.dataset
    assert va == vb
    sa, sb = json.loads(a["stats.json"]), json.loads(b["stats.json"])
    for s in (sa, sb):
        s.pop("dataset"), s.pop("dropped")
    assert sa == sb
    # the fingerprints differ only because stats.json/report.md name the dataset and the reader's drops
    assert native.fingerprint() != meds.fingerprint()


@pytest.mark.parametrize("dataset,splits", [("mimic3", "none"), ("mimic4", "native")])
def test_round_trip_mimic(tmp_path, dataset, splits):
    native = prepare(default_config(dataset=dataset))
    if splits == "native":          # the native reader's split, as export(splits="native") computes it
        splits = {s.patient_id: sp for sp in native.splits for s in native.splits[sp]}
    root = export(dataset, tmp_path / "meds", splits=splits, shard_subjects=40)
    assert (root / "metadata" / "subject_splits.parquet").is_file() == (splits != "none")
    meds = prepare(default_config(dataset="meds", raw_dir=str(root), top_k_med=300))
    assert meds.stats["n_patients"] == {"mimic3": 82, "mimic4": 92}[dataset]
    assert len(meds.vocab.med) > 70 and all(t.startswith("atc:") for t in meds.vocab.med)
    same_content(native, meds)
    assert (meds.labels(meds.splits["test"]) == native.labels(native.splits["test"])).all()


def test_round_trip_eicu_with_split_file(tmp_path, prepared_eicu):
    native = PreparedData.load(prepared_eicu)
    split = {s.patient_id: sp for sp in native.splits for s in native.splits[sp]}
    root = export("eicu", tmp_path / "meds", splits=split, shard_subjects=700)
    assert sorted(p.parent.name for p in (root / "data").rglob("*.parquet"))[0] == "held_out"
    meds = prepare(default_config(dataset="meds", raw_dir=str(root)))   # preset auto -> leader_eicu
    assert (meds.stats["n_patients"], meds.stats["n_visits"]) == (1262, 1584)
    same_content(native, meds)


# ---------------------------------------------------------------- tiny fixtures per preset
def T(s):
    return None if s is None else datetime.fromisoformat(s)


def write_meds(root, shards, extra=(), splits=None, codes=None, dataset_json=None, time_type=pa.timestamp("us")):
    """shards: {relative path: [(subject_id, time, code, *extra), ...]}."""
    for rel, rows in shards.items():
        cols = list(zip(*rows)) if rows else [[]] * (3 + len(extra))
        arrays = {"subject_id": pa.array(cols[0], pa.int64()), "time": pa.array([T(x) for x in cols[1]], time_type),
                  "code": pa.array(cols[2], pa.string()), "numeric_value": pa.nulls(len(rows), pa.float32())}
        for i, (name, typ) in enumerate(extra):
            arrays[name] = pa.array(cols[3 + i], typ)
        p = root / "data" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(arrays), p)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    if splits is not None:
        pq.write_table(pa.table({"subject_id": pa.array(list(splits), pa.int64()), "split": list(splits.values())}),
                       root / "metadata" / "subject_splits.parquet")
    if codes:
        pq.write_table(pa.table({"code": list(codes), "description": list(codes.values())}),
                       root / "metadata" / "codes.parquet")
    if dataset_json:
        (root / "metadata" / "dataset.json").write_text(json.dumps(dataset_json))
    return root


def read(root, **meds):
    from leader_jax.data.meds import read_meds

    return read_meds(root, default_config(dataset="meds", raw_dir=str(root), meds=meds))


def visits(raw):
    return {p.id: [(v.id, v.time, v.diagnoses, v.procedures, v.medications) for v in p.visits] for p in raw.patients}


MIMIC_ROWS = [
    (1, None, "GENDER//F"), (1, "2100-01-01", "MEDS_BIRTH"),
    (1, "2150-01-01 10:00", "HOSPITAL_ADMISSION//URGENT//UNK", 11), (1, "2150-01-01 10:00", "INSURANCE//Medicare", 11),
    (1, "2150-01-02 00:00", "MEDICATION//START//Aspirin"),              # no hadm_id, inside the stay
    (1, "2150-01-02 00:00", "PROCEDURE//START//225459", 11),            # decoy (ICU item)
    (1, "2150-01-02 01:00", "MEDICATION//Heparin//Administered"),       # decoy (emar)
    (1, "2150-01-02 02:00", "MEDICATION//STOP//Aspirin"),               # decoy
    (1, "2150-01-03 00:00", "MEDICATION//START//Heparin"),              # exactly at discharge: attached
    (1, "2150-01-03 00:00", "MEDICATION//START//UNK"),                  # null drug name
    (1, "2150-01-03 00:00", "DIAGNOSIS//ICD//9//4019", 11), (1, "2150-01-03 00:00", "DIAGNOSIS//ICD//10//I10", 11),
    (1, "2150-01-03 00:00", "PROCEDURE//ICD//9//3893", 11), (1, "2150-01-03 00:00", "HOSPITAL_DISCHARGE//HOME", 11),
    (1, "2150-02-01 00:00", "MEDICATION//START//Aspirin"),              # outside every stay
    (2, "2151-05-01 08:00", "DIAGNOSIS//ICD//10//E119"),                # no stay codes: time-gap rule
    (2, "2151-05-01 09:00", "PROCEDURE//ICD//10//0DTJ4ZZ"), (2, "2151-05-01 10:00", "MEDICATION//START//Insulin"),
    (2, "2151-06-01 10:00", "DIAGNOSIS//ICD//10//E119"), (2, "2151-06-01 10:00", "PROCEDURE//ICD//10//0DTJ4ZZ"),
    (2, "2151-06-01 11:00", "MEDICATION//START//Metformin"),
]


def test_preset_mimic_iv_meds(tmp_path):
    rows = [r + (None,) * (4 - len(r)) for r in MIMIC_ROWS]
    root = write_meds(tmp_path, {"train/0.parquet": rows[:15], "held_out/0.parquet": rows[15:]},
                      extra=[("hadm_id", pa.int64())], codes={"DIAGNOSIS//ICD//9//4019": "Hypertension NOS"},
                      dataset_json={"etl_name": "MIMIC-IV_MEDS"})
    raw = read(root)      # auto -> mimic_iv_meds from dataset.json
    assert visits(raw) == {
        "1": [("11", "2150-01-01 10:00:00", ("dx9:4019", "dx10:I10"), ("px9:3893",), ("Aspirin", "Heparin"))],
        "2": [("2_1", "2151-05-01 08:00:00", ("dx10:E119",), ("px10:0DTJ4ZZ",), ("Insulin",)),
              ("2_2", "2151-06-01 10:00:00", ("dx10:E119",), ("px10:0DTJ4ZZ",), ("Metformin",))]}
    assert raw.visit_profiles["11"] == {"insurance": "Medicare", "language": "unknown", "admission_type": "URGENT",
                                        "marital_status": "unknown", "race": "unknown", "gender": "F", "age": "50-59"}
    assert raw.names["dx9:4019"] == "Hypertension NOS"
    assert raw.splits == {"1": "train", "2": "test"}           # data/<split>/ folders
    d = raw.drops.as_dict()
    assert d["meds: codes with an UNK part"] == 1
    assert d["meds: rows whose code matches no channel (ignored)"] == 3   # the three decoys
    assert d["meds: rows outside every visit"] == 1


def test_preset_meds_etl_flat_no_splits(tmp_path):
    from leader_jax.data.synthetic import ndc_pool

    atc, ndcs = sorted(ndc_pool().items())[0]
    rows = [(5, None, "Gender/M", None), (5, "2020-01-01 00:00", "Visit/IP", 7),
            (5, "2020-01-01 05:00", "ICD9CM/401.9", 7), (5, "2020-01-01 05:00", "ICD10PCS/0DT.J4ZZ", 7),
            (5, "2020-01-02 00:00", f"NDC/{ndcs[0]}", None), (5, "2020-01-02 00:00", "LOINC/1234-5", 7)]
    root = write_meds(tmp_path, {"data_0.parquet": rows}, extra=[("visit_id", pa.int64())])
    raw = read(root, preset="meds_etl", med_map="ndc_atc3")
    assert raw.splits is None
    (v,) = raw.patients[0].visits
    assert (v.id, v.diagnoses, v.procedures) == ("7", ("dx9:4019",), ("px10:0DTJ4ZZ",))
    assert v.medications == ("atc:" + atc,)                                 # NDC -> RxCUI -> ATC-3
    assert raw.visit_profiles["7"]["gender"] == "M"


def test_preset_eicu_meds(tmp_path):
    rows = [(1, None, "UNIQUEPID//002-1", None), (1, "2014-01-01", "ICU_ADMISSION//MICU", 101),
            (1, "2014-01-01", "AGE//> 89", 101), (1, "2014-01-01 01:00", "DIAGNOSIS//ICD//9//428.0", 101),
            (1, "2014-01-01 02:00", "MEDICATION//STARTED//furosemide", 101),
            (1, "2014-01-02", "ICU_ADMISSION//CCU", 102), (1, "2014-01-02 01:00", "DIAGNOSIS//ICD//9//UNK", 102),
            (1, "2014-01-02 02:00", "MEDICATION//STARTED//aspirin", 102)]
    root = write_meds(tmp_path, {"0.parquet": rows}, extra=[("patientunitstayid", pa.int64())])
    raw = read(root, preset="eicu_meds")
    assert visits(raw) == {"002-1": [("101", "2014-01-01 00:00:00", ("dx9:428.0",), (), ("furosemide",))]}
    assert raw.visit_profiles["101"]["age"] == ">89"
    assert raw.drops.as_dict()["visits without diagnoses"] == 1


# ---------------------------------------------------------------- bad input
def test_bad_inputs(tmp_path):
    ok = [(1, "2150-01-01", "DIAGNOSIS//ICD//9//4019"), (1, "2150-01-01", "PROCEDURE//ICD//9//3893"),
          (1, "2150-01-01", "MEDICATION//START//x")]
    with pytest.raises(FileNotFoundError, match="no data/ folder"):
        read(tmp_path)
    bad = tmp_path / "notparquet"
    (bad / "data").mkdir(parents=True)
    (bad / "data" / "0.parquet").write_text("subject_id,time,code\n")
    with pytest.raises(ValueError, match="0.parquet: not a parquet file"):
        read(bad, preset="mimic_iv_meds")
    t = pa.table({"subject_id": pa.array([1]), "code": ["x"]})
    (tmp_path / "nocol" / "data").mkdir(parents=True)
    pq.write_table(t, tmp_path / "nocol" / "data" / "0.parquet")
    with pytest.raises(ValueError, match=r"missing column\(s\) time"):
        read(tmp_path / "nocol", preset="mimic_iv_meds")
    t = pa.table({"subject_id": pa.array(["1"]), "time": pa.array([T("2150-01-01")]), "code": ["x"]})
    (tmp_path / "strid" / "data").mkdir(parents=True)
    pq.write_table(t, tmp_path / "strid" / "data" / "0.parquet")
    with pytest.raises(ValueError, match="subject_id has type string, expected an integer"):
        read(tmp_path / "strid", preset="mimic_iv_meds")
    tz = write_meds(tmp_path / "tz", {"0.parquet": ok}, time_type=pa.timestamp("us", tz="UTC"))
    with pytest.raises(ValueError, match="time-zone aware"):
        read(tz, preset="mimic_iv_meds")
    spread = write_meds(tmp_path / "spread", {"a.parquet": ok[:1], "b.parquet": ok[1:]})
    with pytest.raises(ValueError, match="subject_id 1 has rows in .*a.parquet and .*b.parquet"):
        read(spread, preset="mimic_iv_meds")
    unknown = write_meds(tmp_path / "unk", {"0.parquet": ok}, splits={1: "train", 99: "held_out"})
    with pytest.raises(ValueError, match=r"split file names 1 subject_id\(s\) not in data/ \(e.g. \[99\]\)"):
        read(unknown, preset="mimic_iv_meds")
    nomed = write_meds(tmp_path / "nomed", {"0.parquet": ok[:2] + [(1, "2150-01-01", "LAB//x")]})
    with pytest.raises(ValueError, match=r"every one of 1 visits lacks a required channel .*visits without a mapped drug"):
        read(nomed, preset="mimic_iv_meds")
    with pytest.raises(UserError, match="lacks a required channel"):        # the CLI path: one line
        prepare(default_config(dataset="meds", raw_dir=str(nomed), meds={"preset": "mimic_iv_meds"}))
    with pytest.raises(UserError, match="meds.preset='auto' cannot tell"):
        prepare(default_config(dataset="meds", raw_dir=str(nomed)))
    with pytest.raises(UserError, match="config meds.diagnosis: bad regex"):
        prepare(default_config(dataset="meds", meds={"preset": "meds_etl", "diagnosis": (("(", "x"),)}))


def test_counted_drops(tmp_path):
    rows = [(1, "2150-01-01", "DIAGNOSIS//ICD//9//4019"), (1, "2150-01-01", "PROCEDURE//ICD//9//3893"),
            (1, "2150-01-01", "MEDICATION//START//x"), (1, "2150-01-01", "LAB//50912"),
            (None, "2150-01-01", "DIAGNOSIS//ICD//9//4019"), (1, "2150-03-01", "DIAGNOSIS//ICD//9//25000")]
    root = write_meds(tmp_path, {"0.parquet": rows})
    raw = read(root, preset="mimic_iv_meds", gap_hours=0.0, admission="^DIAGNOSIS//ICD//9//4019$")
    d = raw.drops.as_dict()
    assert d["meds: rows with a null subject_id"] == 1
    assert d["meds: rows whose code matches no channel (ignored)"] == 1
    assert d["meds: rows outside every visit"] == 1      # the March diagnosis: after the only stay
    data = prepare(default_config(dataset="meds", raw_dir=str(root), meds={"preset": "mimic_iv_meds"}))
    assert data.stats["dropped"]["meds: rows with a null subject_id"] == 1
    assert "meds: rows whose code matches no channel" in data.report
