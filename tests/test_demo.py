"""End-to-end demo on a very small config: every stage runs, the comparison table covers every model,
re-running reuses finished stages, and a changed stage setting reruns that stage and what depends on it."""
import json

import pytest

from leader_jax import cli, demo

MODELS = ("teacher", "student_kd", "student_nokd", "most_frequent", "previous_visit", "cooccurrence", "logistic")


def tiny_demo_config(out):
    cfg = cli.load_config("demo.py")
    with cfg.unlocked():
        cfg.dataset, cfg.out, cfg.tokenizer_vocab = "mimic3", str(out), 300
        cfg.teacher_model = "tiny"                     # the from-scratch teacher (the `tiny` blocks)
        pre, teacher = cfg.tiny.pretrain, cfg.tiny.teacher
        pre.train.steps, pre.train.optim.warmup_steps = 2, 0
        pre.corpus.max_titles = 200
        pre.model.arch.update(dict(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=300))
        teacher.train.steps, teacher.train.optim.warmup_steps, teacher.train.eval_every = 2, 0, 0
        teacher.data.eval_max_len = 1024               # a 300-token BPE makes long prompts
        cfg.student.train.epochs = 1
        cfg.student.model.d, cfg.student.model.ffn, cfg.student.model.bucket_levels = 16, 32, 1
        cfg.baseline.logistic.steps, cfg.baseline.logistic.eval_every = 3, 1
        cfg.eval.rounds, cfg.eval.plots = 3, True
    return cfg


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    cfg = tiny_demo_config(out)
    table = demo.run_demo(cfg)
    return cfg, out, table


def test_every_stage_ran_and_the_table_lists_every_model(demo_run):
    cfg, out, table = demo_run
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| run ")]
    assert [r.split("|")[1].strip() for r in rows] == list(MODELS)
    for run in demo.model_runs(cfg):
        res = json.loads((run / "eval" / "test.json").read_text())
        assert res["n"] == json.loads((out / "data" / "stats.json").read_text())["n_samples"]["test"]
        assert 0.0 <= res["overall"]["prauc"] <= 1.0
    report = (out / "report.md").read_text()
    assert table in report and (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert f"Teacher: {demo.TEACHER_NAMES['tiny']}." in report
    store = json.loads((out / "teacher" / "features" / "manifest.json").read_text())
    assert store["complete"] and set(store["splits"]) == {"train"}     # the KD student reads train features only


def test_rerun_reuses_finished_stages_and_reruns_changed_ones(demo_run, capsys):
    cfg, out, table = demo_run
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/" + demo.MARKER)}
    assert demo.run_demo(cfg) == table                        # everything reused: same table
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/" + demo.MARKER)} == mtimes
    assert "reusing" in capsys.readouterr().err
    with cfg.unlocked():
        cfg.student.train.epochs = 2                           # only the two students rerun
    stages = demo.build_stages(cfg)
    keys, stale = {}, []
    for s in stages:
        keys[s.name] = s.key(keys)
        if not s.done(keys[s.name]):
            stale.append(s.name)
    assert stale == ["student_kd", "student_nokd"]
