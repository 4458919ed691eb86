"""The evaluator checks every predictions file against the prepared data named by run.json: exact ids,
labels, single-visit flags and the data fingerprint; rows in another order are put back in the
prepared order. Broken files (truncated .npz, corrupt eval JSON) and bad settings are one-line
UserErrors naming the file or field."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from leader_jax import eval as E
from leader_jax.cli import UserError, load_config
from leader_jax.data.dataset import PreparedData, Sample, Vocab
from leader_jax.data.records import Visit

N_MED = 6


def _data(seed: int) -> PreparedData:
    rng = np.random.default_rng(seed)
    med = tuple(f"atc:M{i}" for i in range(N_MED))
    splits = {}
    for split, k in (("train", 4), ("val", 30), ("test", 40)):
        samples = []
        for i in range(k):
            meds = tuple(np.array(med)[rng.random(N_MED) < 0.4]) or (med[i % N_MED],)
            target = Visit(f"{split}{i}", "1", ("dx9:1",), (), meds)
            history = (Visit(f"h{split}{i}", "0", ("dx9:1",), (), (med[0],)),) if i % 3 else ()
            samples.append(Sample(id=f"{split}{i}", patient_id=f"{split}{i}", visits=history + (target,)))
        splits[split] = samples
    vocab = Vocab(diag=("dx9:1",), proc=(), med=med, names={m: m for m in med})
    return PreparedData("synthetic", vocab, None, splits, {})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("checks")
    data = _data(0)
    data_dir = data.save(tmp / "prepared")
    other = _data(1).save(tmp / "other")            # same ids, other labels: another prepared folder
    return {"tmp": tmp, "data": PreparedData.load(data_dir), "data_dir": data_dir, "other": other,
            "fp": data.fingerprint()}


def _arrays(data: PreparedData, split: str, seed: int = 0) -> dict:
    samples = data.splits[split]
    y = data.labels(samples)
    p = np.clip(0.4 * y + 0.6 * np.random.default_rng(seed).random(y.shape), 0, 1)
    return {"ids": [s.id for s in samples], "y_true": y, "y_prob": p,
            "single_visit": [s.single_visit for s in samples], "data_fingerprint": data.fingerprint()}


def _run(setup, name: str, test: dict, val: dict | None = None, data_dir=None) -> Path:
    run = setup["tmp"] / name
    E.write_predictions(run, "test", **test)
    if val is not None:
        E.write_predictions(run, "val", **val)
    (run / "run.json").write_text(json.dumps({"data_dir": str(data_dir or setup["data_dir"]), "model": name}))
    return run


def _eval(run: Path, **kw) -> dict:
    cfg = load_config("eval.py", {"run_dir": str(run), "rounds": 3, "plots": False, **kw})
    return E.evaluate_run(cfg)


def test_matching_predictions_pass_and_fingerprint_is_hashed_once(setup, monkeypatch):
    d = setup["data"]
    run = _run(setup, "good", _arrays(d, "test"), _arrays(d, "val", 1))
    calls = []
    real = PreparedData.fingerprint
    monkeypatch.setattr(PreparedData, "fingerprint", lambda self: calls.append(1) or real(self))
    res = _eval(run)
    assert len(calls) == 1                                       # two files, one hash
    assert res["checks"]["test"] == {"file": str(run / "predictions" / "test.npz"), "n": 40,
                                     "data_fingerprint": "match", "reordered": False}
    assert res["checks"]["val"]["data_fingerprint"] == "match" and res["tuned"] is not None


def test_rows_in_another_order_are_put_in_the_prepared_order(setup):
    d = setup["data"]
    a = _arrays(d, "test")
    ref = _eval(_run(setup, "ordered", a))
    perm = np.random.default_rng(3).permutation(40)
    shuffled = {k: (np.asarray(v)[perm] if k != "data_fingerprint" else v) for k, v in a.items()}
    res = _eval(_run(setup, "shuffled", shuffled))
    assert res["checks"]["test"]["reordered"] is True
    # same samples in the same order => identical numbers, rounds included (the draws are by position)
    assert res["overall"] == ref["overall"] and res["rounds"] == ref["rounds"]
    md = (setup["tmp"] / "shuffled" / "eval" / "test.md").read_text()
    assert "put in the prepared split's order" in md


@pytest.mark.parametrize("case,message", [
    ("partial", r"test\.npz .*10 of the split's 40 sample\(s\) missing, e\.g\. 'test30', 'test31', 'test32', …"),
    ("foreign", r"1 sample id\(s\) are not in the prepared data's 'test' split, e\.g\. 'intruder'"),
    ("labels", r"test\.npz .*y_true differs from the prepared labels for 2 of 40 sample\(s\), e\.g\. 'test5', 'test7'"),
    ("single_visit", r"single_visit differs from the prepared data for 1 of 40 sample\(s\), e\.g\. 'test3'"),
    ("fingerprint", r"made on prepared data with fingerprint 0000000000000000…, but this folder's"),
    ("val_labels", r"val\.npz .*'val' split.*y_true differs from the prepared labels for 1 of 30"),
    ("drugs", r"5 drug columns, but the prepared vocabulary has 6"),
])
def test_mismatches_name_the_file_and_the_difference(setup, case, message):
    d = setup["data"]
    a, v = _arrays(d, "test"), _arrays(d, "val", 1)
    if case == "partial":
        a = {k: (x[:30] if k != "data_fingerprint" else x) for k, x in a.items()}
    elif case == "foreign":
        a["ids"][4] = "intruder"
    elif case == "labels":
        a["y_true"][[5, 7], 0] ^= 1
    elif case == "single_visit":
        a["single_visit"][3] = not a["single_visit"][3]
    elif case == "fingerprint":
        a["data_fingerprint"] = "0" * 64
    elif case == "val_labels":
        v["y_true"][2, 1] ^= 1
    elif case == "drugs":
        a["y_true"], a["y_prob"] = a["y_true"][:, :5], a["y_prob"][:, :5]
    run = _run(setup, f"bad_{case}", a, v)
    with pytest.raises(UserError, match=message):
        _eval(run)


def test_predictions_scored_against_another_folder_are_refused(setup):
    """Same ids, other labels: caught by the fingerprint, and by the labels when none is recorded."""
    a = _arrays(setup["data"], "test")
    with pytest.raises(UserError, match="fingerprint"):
        _eval(_run(setup, "other_fp", a, data_dir=setup["other"]))
    del a["data_fingerprint"]
    with pytest.warns(UserWarning, match="records no data fingerprint"), \
            pytest.raises(UserError, match="y_true differs from the prepared labels"):
        _eval(_run(setup, "other_nofp", a, data_dir=setup["other"]))


def test_predictions_without_fingerprint_are_accepted_with_a_warning(setup):
    a = _arrays(setup["data"], "test")
    del a["data_fingerprint"]
    with pytest.warns(UserWarning, match=r"test\.npz: records no data fingerprint"):
        res = _eval(_run(setup, "old", a))
    assert res["checks"]["test"]["data_fingerprint"] == "not recorded"


def test_truncated_npz_and_corrupt_eval_json_are_one_line_errors(setup):
    d = setup["data"]
    run = _run(setup, "trunc", _arrays(d, "test"))
    path = run / "predictions" / "test.npz"
    raw = path.read_bytes()
    mid = len(raw) // 2
    for broken in (raw[:mid], raw[:-40], raw[:mid] + bytes(64) + raw[mid + 64:]):   # cut; bytes zeroed
        path.write_bytes(broken)
        with pytest.raises(UserError, match=rf"{path}: not a readable \.npz predictions file \(truncated or corrupt"):
            _eval(run)
    good = _run(setup, "cmp_good", _arrays(d, "test"))
    _eval(good)
    bad = setup["tmp"] / "cmp_bad"
    (bad / "eval").mkdir(parents=True)
    (bad / "eval" / "test.json").write_text('{"threshold": 0.5, "rounds": {')
    with pytest.raises(UserError, match=rf"{bad / 'eval' / 'test.json'}: not valid JSON"):
        E.compare_runs([str(good), str(bad)])
    (bad / "eval" / "test.json").write_text('{"threshold": 0.5, "rounds": []}')
    with pytest.raises(UserError, match=rf"{bad / 'eval' / 'test.json'}: not an eval result"):
        E.compare_runs([str(good), str(bad)])
    path.write_bytes(raw)
    (run / "run.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="run.json: expected a JSON object"):
        _eval(run)


@pytest.mark.parametrize("field,value", [("split", "dev"), ("val_split", "tset"), ("threshold", 0.0),
                                         ("threshold", 1.5), ("threshold_step", 0.0), ("rounds", -1),
                                         ("fraction", 0.0), ("fraction", 1.2), ("seed", -3),
                                         ("n_top_drugs", 0), ("plots", None), ("run_dir", None),
                                         ("rounds", True)])
def test_validate_config_rejects_bad_values(field, value):
    E.validate_config(load_config("eval.py"))            # the bundled config is valid as is
    cfg = load_config("eval.py", {field: value})
    with pytest.raises(UserError, match=re.escape(f"--config.{field}={value!r} is invalid")):
        E.validate_config(cfg)
