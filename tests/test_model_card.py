"""RUN/model_card.md: data counts, label space, config, the eval CLI's metrics (read when present, computed
with its evaluate_run when not, or a pointer to the eval CLI) and the limits, on a run folder whose
predictions are written directly (the card never needs the model itself)."""
import json

import numpy as np
import pytest

from leader_jax.cli import UserError, load_config
from leader_jax.data.dataset import PreparedData
from leader_jax.eval import write_predictions
from leader_jax.model_card import model_card, write_model_card


@pytest.fixture(scope="module")
def run(prepared_synthetic, tmp_path_factory):
    data = PreparedData.load(prepared_synthetic)
    out = tmp_path_factory.mktemp("card") / "student"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"model": "student", "data_dir": str(prepared_synthetic),
                                              "finished": True, "best_epoch": 3}))
    cfg = load_config("student.py", {"data_dir": str(prepared_synthetic), "distill": False})
    (out / "config.json").write_text(cfg.to_json_best_effort())
    rng = np.random.default_rng(0)
    for split in ("val", "test"):
        s = data.splits[split]
        y = data.labels(s)
        p = np.clip(0.6 * y + 0.5 * rng.random(y.shape), 0, 1).astype(np.float32)
        write_predictions(out, split, ids=[x.id for x in s], y_true=y, y_prob=p,
                          single_visit=[x.single_visit for x in s], data_fingerprint=data.fingerprint())
    return out, data


def test_card_without_evaluation_points_to_the_eval_cli(run):
    out, data = run
    text = model_card(out, load_config("model_card.py", {"evaluate": False}))
    assert f"python -m leader_jax.eval --config.run_dir={out} --config.split=test" in text
    assert not (out / "eval").exists()
    st = data.stats
    assert f"cohort: {st['n_patients']} patients, {st['n_visits']} visits" in text
    assert f"train {len(data.splits['train'])}, val {len(data.splits['val'])}, test {len(data.splits['test'])}" in text
    assert f"{data.vocab.n_med} drugs: ATC level-3" in text and "467 interacting pairs" in text
    assert "`loss`: " in text and "align_loss=\"infonce\"" in text and "`distill`: false" in text
    assert "Not a clinical device" in text and "say nothing about clinical performance" in text


def test_card_metrics_are_the_eval_cli_results(run):
    out, _ = run
    path = write_model_card(out)
    text = path.read_text()
    assert path == out / "model_card.md"
    for split in ("val", "test"):
        res = json.loads((out / "eval" / f"{split}.json").read_text())      # written by evaluate_run
        o = res["overall"]
        row = f"| overall | {o['n']} | {o['jaccard']:.4f} | {o['prauc']:.4f} | {o['f1']:.4f} |"
        assert row in text
    tuned = json.loads((out / "eval" / "test.json").read_text())["tuned"]
    assert f"Threshold tuned on val (max mean Jaccard): p >= {tuned['threshold']:g}" in text
    # an existing eval result is read, not recomputed
    res = json.loads((out / "eval" / "test.json").read_text())
    res["overall"]["jaccard"] = 0.123456
    (out / "eval" / "test.json").write_text(json.dumps(res))
    assert "| 0.1235 |" in model_card(out)


def test_card_refuses_other_runs_and_bad_config(run, tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"model": "baseline:logistic"}))
    with pytest.raises(UserError, match="student and teacher runs"):
        model_card(tmp_path)
    with pytest.raises(UserError, match="splits"):
        model_card(run[0], load_config("model_card.py", {"splits": ("holdout",)}))
