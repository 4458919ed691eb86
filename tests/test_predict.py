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
    from leader_jax.predict_render import _prob_index, _prob_rows, _prob_tables
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.random(100_000, dtype=np.float32), rng.random(20_000, dtype=np.float32) * 2e-4,
                        np.float32([0, 1, 1e-7, 4e-8, 6e-8, 9.99e-5, 1e-4, 0.5, 0.1, 0.99999995])])
    rounded = np.round(p.astype(np.float64), 7)
    head, tail = _prob_tables()
    want = [repr(v) + "}" for v in rounded.tolist()]
    a, b = _prob_index(np.rint(rounded * 1e7).astype(np.int64))
    assert [(x + y).decode() for x, y in zip(head[a], tail[b])] == want
    a, b = _prob_rows(np.rint(p.astype(np.float64) * 1e7))        # the fast renderer's form: same rows
    assert [(x + y).decode() for x, y in zip(head[a], tail[b])] == want


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
    probs = rec.records_proba(fast)
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


# ------------------------------------------------------------------- the renderer against json.dumps
_NAMES = ['plain', 'a "quoted" name', 'back\\slash\\', 'ünïcode – 药 \U0001f48a', 'tab\tand\nnewline\x01', None,
          'p', 'q', 'r', 's', 't', 'u']


def _odd_vocab():
    """A label vocabulary with odd codes and names (quotes, backslashes, non-ASCII, control characters,
    a drug without a display name) and a DDI graph over it."""
    from types import SimpleNamespace
    codes = ["atc:A01", 'atc:Q"1', "atc:B\\2", "atc:é3"] + [f"atc:Z{i}" for i in range(4, len(_NAMES))]
    names = {c: nm for c, nm in zip(codes, _NAMES) if nm is not None}
    m = len(codes)
    ddi = np.zeros((m, m), np.int64)
    for a, b in [(0, 1), (2, 1), (3, 4), (0, 6), (7, 8), (9, 3), (1, 11)]:
        ddi[a, b] = 1                                     # one direction only: A or Aᵀ counts
    return SimpleNamespace(n_med=m, med=codes, names=names), ddi


def _odd_records(rng, n=60):
    from leader_jax.patient_columns import ERROR, NO_PREDICTION, OK, Records
    kind = np.array([OK if i % 5 else (NO_PREDICTION if i % 10 else ERROR) for i in range(n)], np.int8)
    ids = ["" if k == ERROR else ['p', 'ü\n"q', 'back\\', '药'][i % 4] + str(i) for i, k in enumerate(kind)]
    text = ["" if k == OK else ("line 3: not valid JSON ('é\"\\')" if k == ERROR else "no known code")
            for k in kind]
    unknown = ["" if k == ERROR else json.dumps([{"visit": 0, "field": "diagnoses", "code": 'é"\\',
                                                  "reason": "not in the run's vocabulary"}] * (i % 3),
                                                ensure_ascii=False) for i, k in enumerate(kind)]
    dropped = ["" if k == ERROR else json.dumps([0, 2][: i % 3]) for i, k in enumerate(kind)]
    line = np.arange(n, dtype=np.int64) + 3
    line[::7] = -1                                       # the Python API's records: no line number
    n_ok = int((kind == OK).sum())
    p = rng.random((n_ok, len(_NAMES))).astype(np.float32)
    p[0] = [0.16, 0.16, 0.5, 0.5, 1.0, 0.0, 3e-5, 0.25, 0.1234, 0.99999995, 0.16000001, 0.7]   # ties, edges
    p[1] = 0.0                                          # nothing recommended
    p[2:6, :4] = np.float32([0.9, 0.8, 0.7, 0.6])       # interacting drugs above θ
    return Records(line, kind, ids, text, unknown, dropped), p


def _expected_lines(records, probs, vocab, ddi, theta, mode, strength, top_k, graph):
    """The documented output records, built as dicts and written with json.dumps."""
    from leader_jax.patient_columns import ERROR, OK
    m = vocab.n_med
    names = [vocab.names.get(c, c.partition(":")[2]) for c in vocab.med]
    k = m if top_k == 0 else min(top_k, m)
    sets, scores = ddi_safety.filter_sets(probs, theta, ddi, mode, strength)
    sym = None if ddi is None else ddi_safety.symmetric(ddi)

    def drug(j, p):
        return {"code": vocab.med[j], "name": names[j], "probability": float(np.round(np.float64(p), 7))}

    out, r = [], 0
    for i in range(len(records)):
        d = {} if records.line[i] < 0 else {"line": int(records.line[i])}
        if records.kind[i] == ERROR:
            d.update(status="error", error=records.text[i])
        elif records.kind[i] != OK:
            d.update(id=records.ids[i], status="no_prediction", reason=records.text[i],
                     unknown_codes=json.loads(records.unknown[i]), dropped_visits=json.loads(records.dropped[i]))
        else:
            p = probs[r]
            order = sorted(range(m), key=lambda j: (-p[j], j))
            cand = [j for j in order if p[j] >= np.float32(theta)]
            kept = sorted(np.flatnonzero(sets[r]).tolist())
            d.update(id=records.ids[i], status="ok", threshold=round(theta, 7),
                     recommended=[drug(j, p[j]) for j in cand if sets[r, j]],
                     ranked=[drug(j, p[j]) for j in order[:k]])
            d["ddi"] = None if ddi is None else {"graph": graph, "pairs": [
                {"drugs": [vocab.med[a], vocab.med[b]], "names": [names[a], names[b]]}
                for a in kept for b in kept if a < b and sym[a, b]]}
            if mode != "off" and ddi is not None:
                d["ddi_filter"] = {"mode": mode, **({"strength": strength} if mode == "penalty" else {}),
                                   "removed": [{**drug(j, p[j]), "score": round(float(scores[r, j]), 7)}
                                               for j in cand if not sets[r, j]]}
            d.update(unknown_codes=json.loads(records.unknown[i]), dropped_visits=json.loads(records.dropped[i]))
            r += 1
        out.append(json.dumps(d, ensure_ascii=False))
    return out


@pytest.mark.parametrize("mode,strength,top_k,graph", [("off", 0.25, 3, True), ("drop_lower", 0.25, 0, True),
                                                        ("penalty", 0.3, 5, True), ("off", 0.25, 4, False)])
def test_renderer_lines_are_json_dumps_of_the_documented_records(mode, strength, top_k, graph):
    """Every record kind (ok, no prediction, error; with and without a line number), unknown codes,
    dropped visits, DDI pairs and filters, ties, probabilities 0, 1 and below 1e-4, and odd characters
    in codes, names, ids and messages: the fast renderer writes json.dumps of the documented structure,
    and the same bytes as the previous renderer."""
    from leader_jax.predict_render import ReferenceRenderer, Renderer
    vocab, ddi = _odd_vocab()
    ddi = ddi if graph else None
    records, probs = _odd_records(np.random.default_rng(top_k))
    cfg = load_config("predict.py", {"ddi_filter": mode, "ddi_penalty": strength, "top_k": top_k})
    args = (vocab, 0.16, ddi, "a graph", cfg)
    text = Renderer(*args).render(records, probs)
    assert text.endswith(b"\n")
    got = text.decode("utf-8").split("\n")[:-1]
    want = _expected_lines(records, probs, vocab, ddi, 0.16, mode, strength, top_k, "a graph")
    assert len(got) == len(want) == len(records)
    for g, w in zip(got, want):
        assert g == w
    assert sum('"pairs": [{' in g for g in got) >= (4 if graph and mode != "drop_lower" else 0)
    assert any('"recommended": []' in g for g in got)
    assert top_k or any('"probability": 3e-05}' in g for g in got)
    assert ReferenceRenderer(*args).render(records, probs) == text
    errors = np.flatnonzero(records.kind == 2).tolist()
    assert Renderer(*args).render(_take(records, []), probs[:0]) == b""
    assert Renderer(*args).render(_take(records, errors), probs[:0]) == "".join(
        want[i] + "\n" for i in errors).encode("utf-8")


def _take(records, rows):
    from leader_jax.patient_columns import Records
    return Records(records.line[rows], records.kind[rows], *([getattr(records, f)[i] for i in rows]
                                                             for f in ("ids", "text", "unknown", "dropped")))


def test_pipelined_cli_writes_the_bytes_of_one_stage_at_a_time(rec, data, student_run, tmp_path):
    """run_predict overlaps the model and the writes with parsing and rendering across chunks: with
    small chunks (errors and blank lines inside them) it writes the same file as one stage at a time in
    one chunk, and reports the same failed lines."""
    from leader_jax.predict import run_predict
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(x if x.endswith("\n") else x + "\n" for x in _edited_lines(data, 120)))
    got = {}
    for name, chunk, overlap in (("one", 10_000, False), ("seq", 7, False), ("pipe", 7, True), ("pipe2", 64, True)):
        out = tmp_path / f"{name}.jsonl"
        cfg = load_config("predict.py", {"run_dir": str(student_run), "input": str(inp), "out": str(out),
                                         "chunk_size": chunk, "ddi_filter": "drop_lower"})
        with pytest.raises(UserError, match=r"18 of 116 input line\(s\) failed \(line 8, 9, 11, 25, ") as e:
            run_predict(cfg, recommender=rec, overlap=overlap)
        got[name] = (out.read_bytes(), str(e.value).rsplit(" into ", 1)[0])
    assert got["one"][0].count(b"\n") > 100
    assert got["seq"] == got["pipe"] == got["pipe2"] == got["one"]
