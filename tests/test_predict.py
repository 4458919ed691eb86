"""`python -m leader_jax.predict` / `Recommender` on a tiny no-KD student run of the synthetic data: a
prepared test patient gets exactly its predictions/test.npz row, unknown codes are listed, a malformed
line is reported by number while the others are written (exit status 2), the Python API equals the
CLI, the DDI filters keep their promises against a direct computation from the DDI matrix, the CLI's
column-wise path equals the per-line path byte for byte, and a MEDS folder as input gives the records
of the JSONL of the same patients."""
import json
import subprocess
import sys

import numpy as np
import pytest

from leader_jax import ddi_safety
from leader_jax.cli import REPO_ROOT, UserError, load_config
from leader_jax.data.dataset import PreparedData
from leader_jax.io import load_npz
from leader_jax.patient_input import sample_to_patient


@pytest.fixture(scope="module")
def student_run(prepared_synthetic, tmp_path_factory):
    from leader_jax.train import student as ts

    cfg = load_config("student.py", {
        "data_dir": str(prepared_synthetic), "distill": False, "seed": 0,
        "model": dict(d=16, heads=2, ffn=32, head_hidden=32, bucket_levels=1, dropout=0.0, attn_dropout=0.0),
        "train": dict(batch_size=16, lr=1e-2, epochs=2), "eval": dict(batch_size=32)})
    out = tmp_path_factory.mktemp("predict") / "student"
    with cfg.unlocked():
        cfg.out = str(out)
    ts.train(cfg)
    return out


@pytest.fixture(scope="module")
def data(prepared_synthetic):
    return PreparedData.load(prepared_synthetic)


@pytest.fixture(scope="module")
def rec(student_run):
    from leader_jax import Recommender
    return Recommender.load(student_run)


def test_test_split_patient_gets_its_predictions_row(rec, data, student_run):
    pred = load_npz(student_run / "predictions" / "test.npz")
    test = data.splits["test"]
    assert [s.id for s in test] == pred["ids"].tolist()
    every = rec.predict_proba(rec.parse([sample_to_patient(s) for s in test]))
    np.testing.assert_allclose(every, pred["y_prob"], rtol=0, atol=1e-6)
    multi = next(i for i, s in enumerate(test) if not s.single_visit)
    for i in (0, multi):                                   # alone in its batch, too
        res = rec.predict([sample_to_patient(test[i])])[0]
        assert res["status"] == "ok" and res["unknown_codes"] == [] and res["id"] == test[i].id
        col = {t: j for j, t in enumerate(data.vocab.med)}
        got = np.array([pred["y_prob"][i, col[d["code"]]] for d in res["ranked"]])
        np.testing.assert_allclose([d["probability"] for d in res["ranked"]], got, rtol=0, atol=1e-6)
        assert len(res["ranked"]) == 10 and np.all(np.diff(got) <= 0)
        assert [d["code"] for d in res["recommended"]] == [
            data.vocab.med[j] for j in np.argsort(-pred["y_prob"][i], kind="stable")
            if pred["y_prob"][i, j] >= np.float32(rec.threshold)]


def test_threshold_val_is_the_eval_cli_tuned_threshold(rec, student_run):
    from leader_jax import metrics as M
    val = load_npz(student_run / "predictions" / "val.npz")
    assert rec.threshold == M.best_threshold(val["y_true"], val["y_prob"], M.threshold_grid(0.01))


def test_unknown_codes_are_listed_never_ignored(rec, data):
    s = next(s for s in data.splits["test"] if not s.single_visit)
    p = sample_to_patient(s)
    bare = p["visits"][-1]["diagnoses"][0].partition(":")[2]
    p["visits"][-1]["diagnoses"] = [bare, "NOT-A-CODE"] + p["visits"][-1]["diagnoses"][1:]
    p["visits"][0]["procedures"].append("px9:0000000")
    p["visits"].insert(0, {"diagnoses": ["ZZZ"], "procedures": [], "medications": []})
    p["profile"]["shoe_size"] = "44"
    res = rec.predict([p, {"id": "nobody", "visits": [{"diagnoses": ["X1"], "procedures": ["X2"]}]}])
    unknown = {(u.get("visit"), u["field"], u["code"]) for u in res[0]["unknown_codes"]}
    assert unknown == {(len(p["visits"]) - 1, "diagnoses", "NOT-A-CODE"), (1, "procedures", "px9:0000000"),
                       (0, "diagnoses", "ZZZ"), (None, "profile.shoe_size", "44")}
    assert res[0]["status"] == "ok" and res[0]["dropped_visits"] == [0]
    # the bare code resolved to the namespaced token, the dropped visit changed nothing: same probabilities
    ref = rec.predict([sample_to_patient(s)])[0]
    assert res[0]["ranked"] == ref["ranked"]
    assert res[1]["status"] == "no_prediction" and "current" in res[1]["reason"]
    assert [u["code"] for u in res[1]["unknown_codes"]] == ["X1", "X2"]
    with pytest.raises(UserError, match="patient 0: visits must be a non-empty list"):
        rec.predict([{"visits": []}])


def test_cli_reports_bad_lines_writes_the_rest_and_equals_the_api(rec, data, student_run, tmp_path):
    patients = [sample_to_patient(s) for s in data.splits["test"][:5]]
    lines = [json.dumps(p) for p in patients[:2]] + ['{"visits": [ oops', json.dumps(patients[2]), "",
                                                      '{"visits": "none"}', json.dumps(patients[3])]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    r = subprocess.run([sys.executable, "-m", "leader_jax.predict", f"--config.run_dir={student_run}",
                        f"--config.input={inp}", f"--config.out={out}", "--config.ddi_filter=drop_lower"],
                       capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "line 3: not valid JSON" in r.stderr and "line 6: visits must be" in r.stderr
    assert "2 of 6 input line(s) failed (line 3, 6)" in r.stderr.splitlines()[-1]
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [g["line"] for g in got] == [1, 2, 3, 4, 6, 7]
    assert [g["status"] for g in got] == ["ok", "ok", "error", "ok", "error", "ok"]
    from leader_jax import Recommender
    api = Recommender.load(student_run, ddi_filter="drop_lower").predict([patients[i] for i in (0, 1, 2, 3)])
    assert [{k: v for k, v in g.items() if k != "line"} for g in got if g["status"] == "ok"] == api
    assert all(g["ddi"]["pairs"] == [] for g in got if g["status"] == "ok")


def _direct_pairs(sets, ddi):
    m = ddi.shape[0]
    return [[(i, j) for i in range(m) for j in range(i + 1, m) if row[i] and row[j] and (ddi[i, j] or ddi[j, i])]
            for row in sets]


def test_ddi_filters_against_a_direct_computation(data):
    rng = np.random.default_rng(0)
    ddi = data.ddi
    m = ddi.shape[0]
    probs = (rng.random((200, m)) ** 3).astype(np.float32)
    theta = 0.3
    off, s_off = ddi_safety.filter_sets(probs, theta, ddi, "off")
    assert (off == (probs >= np.float32(theta))).all() and (s_off == probs).all()
    assert ddi_safety.interacting_pairs(off, ddi) == _direct_pairs(off, ddi)
    assert sum(map(len, _direct_pairs(off, ddi))) > 100          # the test data really has interactions
    drop, s_drop = ddi_safety.filter_sets(probs, theta, ddi, "drop_lower")
    assert not (drop & ~off).any() and all(p == [] for p in _direct_pairs(drop, ddi))
    assert ((s_drop >= np.float32(theta)) == drop).all()
    for r in range(len(probs)):                 # greedy by probability: every removed drug has a kept,
        kept = np.flatnonzero(drop[r])          # more probable partner
        for j in np.flatnonzero(off[r] & ~drop[r]):
            partners = kept[(ddi[j, kept] | ddi[kept, j]).astype(bool)]
            assert (probs[r, partners] >= probs[r, j]).any()
    p0, _ = ddi_safety.filter_sets(probs, theta, ddi, "penalty", 0.0)
    p1, _ = ddi_safety.filter_sets(probs, theta, ddi, "penalty", 1.0)
    assert (p0 == off).all() and (p1 == drop).all()
    mid, s_mid = ddi_safety.filter_sets(probs, theta, ddi, "penalty", 0.2)
    n_pairs = [sum(map(len, ddi_safety.interacting_pairs(x, ddi))) for x in (off, mid, drop)]
    assert n_pairs[0] > n_pairs[1] > n_pairs[2] == 0
    assert ddi_safety.interacting_pairs(mid, ddi) == _direct_pairs(mid, ddi)
    assert ((s_mid >= np.float32(theta)) == mid).all()
    assert (ddi_safety.filter_sets(probs, theta, None, "drop_lower")[0] == off).all()   # no graph: off


def test_filtered_run_is_scored_by_the_eval_cli(student_run, tmp_path):
    from leader_jax.eval import evaluate_run
    out = tmp_path / "drop"
    ddi_safety.write_filtered_run(student_run, out, "drop_lower", 0.0, 0.3)
    res = evaluate_run(load_config("eval.py", {"run_dir": str(out), "threshold": 0.3, "tune_threshold": False,
                                               "plots": False}))
    base = evaluate_run(load_config("eval.py", {"run_dir": str(student_run), "threshold": 0.3,
                                                "tune_threshold": False, "plots": False}))
    assert res["overall"]["ddi_rate"] == 0.0 and base["overall"]["ddi_rate"] > 0
    assert json.loads((out / "run.json").read_text())["ddi_filter"]["mode"] == "drop_lower"


@pytest.mark.parametrize("field,value", [("threshold", "0"), ("threshold", "best"), ("ddi_filter", "strict"),
                                         ("ddi_penalty", -1.0), ("top_k", -1)])
def test_validate_config_rejects(field, value):
    from leader_jax.predict import validate_config
    cfg = load_config("predict.py")
    cfg[field] = value
    with pytest.raises(UserError, match=field):
        validate_config(cfg)


def test_import_leader_jax_stays_cheap():
    code = "import sys, leader_jax; assert 'jax' not in sys.modules; print(leader_jax.Recommender.__name__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "Recommender", r.stderr


def test_teacher_run_without_its_tokenizer_or_base_says_so(prepared_synthetic, tmp_path):
    from leader_jax import Recommender
    cfg = load_config("teacher_tiny.py", {"data_dir": str(prepared_synthetic), "model": {"path": str(tmp_path / "base")},
                                          "tokenizer": str(tmp_path / "tok")})
    (tmp_path / "config.json").write_text(cfg.to_json_best_effort())
    (tmp_path / "run.json").write_text(json.dumps({"model": "teacher", "data_dir": str(prepared_synthetic)}))
    with pytest.raises(UserError, match="needs its tokenizer, but .*tok is missing"):
        Recommender.load(tmp_path, threshold="0.5")
    (tmp_path / "tok").mkdir()
    with pytest.raises(UserError, match="needs its base model, but .*base holds no HF LLaMA"):
        Recommender.load(tmp_path, threshold="0.5")


def test_teacher_run_predicts_its_own_test_rows(prepared_synthetic, data, tmp_path):
    """A tiny teacher (2 steps, scratch base): predict through its prompts equals predictions/test.npz."""
    from leader_jax import Recommender
    from leader_jax.data.prompts import build_prompt
    from leader_jax.train import teacher as tt
    from leader_jax.train.pretrain import train_tokenizer

    train_tokenizer([build_prompt(s, data.vocab, max_history=1) for s in data.splits["train"]], 400, tmp_path / "tok")
    cfg = load_config("teacher_tiny.py", {
        "data_dir": str(prepared_synthetic), "mesh": (1, 1, 1), "tokenizer": str(tmp_path / "tok"),
        "model": {"source": "scratch", "head_norm": False,
                  "arch": dict(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2)},
        "data": dict(max_len=160, eval_max_len=256, max_history=1), "lora": {"task": {"rank": 4}},
        "train": {"steps": 2, "micro_batch": 8, "accum": 1, "eval_every": 0, "ckpt_every": 2,
                  "optim": {"warmup_steps": 0}},
        "eval": {"batch_size": 8, "splits": ("test",)}})
    with cfg.unlocked():
        cfg.out = str(tmp_path / "teacher")
    tt.train(cfg)
    rec = Recommender.load(tmp_path / "teacher", threshold=0.5, batch_size=8)
    got = rec.predict_proba(rec.parse([sample_to_patient(s) for s in data.splits["test"]]))
    np.testing.assert_allclose(got, load_npz(tmp_path / "teacher" / "predictions" / "test.npz")["y_prob"],
                               rtol=0, atol=1e-6)


def test_probability_text_is_python_repr_of_the_rounded_value():
    from leader_jax.predict_render import _prob_index, _prob_tables
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.random(100_000, dtype=np.float32), rng.random(20_000, dtype=np.float32) * 2e-4,
                        np.float32([0, 1, 1e-7, 4e-8, 6e-8, 9.99e-5, 1e-4, 0.5, 0.1, 0.99999995])])
    rounded = np.round(p.astype(np.float64), 7)
    a, b = _prob_index(np.rint(rounded * 1e7).astype(np.int64))
    head, tail = _prob_tables()
    got = [(x + y).decode() for x, y in zip(head[a], tail[b])]
    assert got == [repr(v) + "}" for v in rounded.tolist()]


def _edited_lines(data, n=240):
    """JSONL lines of prepared patients with every kind of oddity the per-line path handles."""
    rng = np.random.default_rng(3)
    samples = data.splits["train"][:n]
    dx = list(data.vocab.diag)
    lines = []
    for i, s in enumerate(samples):
        d = sample_to_patient(s)
        v = d["visits"]
        bare = lambda c: c.partition(":")[2]  # noqa: E731
        for vis in v:                                   # bare codes, as a user writes them
            vis["diagnoses"] = [bare(c) for c in vis["diagnoses"]]
        r = i % 16
        if r == 0:
            v[-1]["diagnoses"] += ["NOPE", " " + v[-1]["diagnoses"][0] + " ", 'é"x\\']
        elif r == 1:
            v[0]["procedures"] = ["X"] + v[0]["procedures"] + v[0]["procedures"]
        elif r == 2:
            v.insert(0, {"diagnoses": ["ZZ"], "procedures": [], "medications": ["QQ"]})
        elif r == 3:
            d["profile"]["gender"] = "alien"
        elif r == 4:
            d["profile"]["gender"], d["profile"]["age"] = "alien", "old"
        elif r == 5:
            v[-1]["diagnoses"], v[-1]["procedures"] = ["bad"], []
        elif r == 6:
            d["id"] = 17
        elif r == 7:
            lines.append("{oops\n" if i % 32 == 7 else "   \n")
            continue
        elif r == 8:
            v[-1]["medications"] = ["nonsense", None]
        elif r == 9:
            del d["id"]
            v[0]["diagnoses"] = [dx[0], bare(dx[0]), dx[1]] + v[0]["diagnoses"]
        elif r == 10:
            d["visits"] = [] if i % 32 == 10 else "none"
        elif r == 11:
            d["id"], d["profile"]["shoe"] = 'ü\n"q', "44"
        elif r == 12:
            v[0]["diagnoses"] = [c[:3] + "." + c[3:] for c in v[0]["diagnoses"]]
        elif r == 13:
            v[-1]["medications"] = ["whatever"]
            v.extend([{"diagnoses": [], "procedures": []}] * int(rng.integers(0, 2)))
        elif r == 14:
            v *= 6                                       # more visits than the student keeps
        lines.append(json.dumps(d, ensure_ascii=bool(i % 2)) + ("\n" if i + 1 < len(samples) else ""))
    return lines


def test_columnwise_chunks_equal_the_per_line_path(rec, data):
    """The column-wise parser (the CLI's path for student runs) gives the per-line path's records,
    encoding and output bytes, including every line it hands over to that path."""
    from leader_jax.patient_columns import records_from_parsed
    from leader_jax.patient_input import parse_lines
    from leader_jax.train.student_inputs import encode_samples

    lines = _edited_lines(data)
    fast = rec._chunk_parser.parse(lines, first_line=11)
    slow = records_from_parsed(parse_lines(lines, rec.resolver, first_line=11))
    slow.enc = encode_samples(slow.samples, data.vocab, rec._predict_fn.max_visits)
    assert fast.line.tolist() == slow.line.tolist() and fast.kind.tolist() == slow.kind.tolist()
    assert sorted(set(fast.kind.tolist())) == [0, 1, 2]
    for name in ("ids", "text", "unknown", "dropped"):
        assert getattr(fast, name) == getattr(slow, name), name
    assert sum(u != "[]" for u in fast.unknown) > 50 and sum(d != "[]" for d in fast.dropped) > 5
    for name in ("ids", "n_visits", "profile", "single_visit", "needs"):
        np.testing.assert_array_equal(getattr(fast.enc, name), getattr(slow.enc, name), err_msg=name)
    for name in ("diag", "proc", "med"):
        a, b = getattr(fast.enc, name), getattr(slow.enc, name)
        w = max(a.shape[-1], b.shape[-1])
        np.testing.assert_array_equal(np.pad(a, ((0, 0), (0, 0), (0, w - a.shape[-1]))),
                                      np.pad(b, ((0, 0), (0, 0), (0, w - b.shape[-1]))), err_msg=name)
    probs = rec._records_proba(fast)
    assert rec.renderer.render(fast, probs) == rec.renderer.render(slow, rec._predict_fn.model(slow.enc))


@pytest.fixture(scope="module")
def meds_root(prepared_synthetic, tmp_path_factory):
    """The synthetic raw tables exported to MEDS (with the native split)."""
    from leader_jax.data.export_meds import export
    return export("mimic3", tmp_path_factory.mktemp("meds") / "meds", raw_dir=str(prepared_synthetic.parent / "raw"),
                  splits="native")


def test_meds_folder_input_equals_the_jsonl_of_its_patients(rec, data, student_run, meds_root, tmp_path):
    """--config.input=MEDS_ROOT predicts each subject's last visit: the test subjects give the records of
    the JSONL of the prepared test patients (so their predictions/test.npz rows), also when the newest
    visit has no drug recorded yet."""
    import shutil

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from leader_jax.predict import run_predict

    def predict(inp, out, **kw):
        run_predict(load_config("predict.py", {"run_dir": str(student_run), "input": str(inp), "out": str(out),
                                               **kw}), recommender=rec)
        return [json.loads(x) for x in out.read_text().splitlines()]

    test = data.splits["test"]
    jsonl = tmp_path / "test.jsonl"
    jsonl.write_text("".join(json.dumps(sample_to_patient(s)) + "\n" for s in test))
    ref = [{k: v for k, v in r.items() if k != "line"} for r in predict(jsonl, tmp_path / "a.jsonl")]
    got = predict(meds_root, tmp_path / "b.jsonl", meds_split="test")
    assert len(got) == len(test) > 5 and got == ref
    # drop the drugs of one multi-visit subject's newest admission: still that visit, same records
    s = next(s for s in test if not s.single_visit)
    sid = int(s.patient_id)
    shard = next(p for p in sorted((meds_root / "data").rglob("*.parquet"))
                 if sid in pq.read_table(p, columns=["subject_id"]).column("subject_id").to_pylist())
    tbl = pq.read_table(shard)
    mine = pc.equal(tbl["subject_id"], sid)
    adm = pc.max(tbl.filter(pc.and_(mine, pc.starts_with(tbl["code"], "HOSPITAL_ADMISSION//")))["time"])
    drop = pc.fill_null(pc.and_(pc.and_(mine, pc.starts_with(tbl["code"], "MEDICATION//")),
                                pc.greater_equal(tbl["time"], adm)), False)          # static rows: no time
    assert pc.sum(drop).as_py() > 0
    edited = tmp_path / "meds"
    shutil.copytree(meds_root, edited)
    pq.write_table(tbl.filter(pc.invert(drop)), edited / shard.relative_to(meds_root))
    got2 = predict(edited, tmp_path / "c.jsonl", meds_split="test")
    assert got2 == ref
    with pytest.raises(UserError, match="meds_split"):
        predict(meds_root, tmp_path / "d.jsonl", meds_split="tuning")
