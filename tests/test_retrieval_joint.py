"""Retrieval mode `joint` (B1) on the tiny teacher: the re-ranker is trained from the teacher's loss in the
one training loop (every re-ranker parameter moves; fixed mode has none), the teacher gets the teacher
loss's gradient only, kill and resume replays the same losses, and feature extraction and the Recommender
rank the pools with the saved re-ranker exactly as the run's own predictions did."""
import json

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from leader_jax.cli import UserError
from leader_jax.retrieval import joint as rjoint, render
from leader_jax.train import common, text_batches as tdata

from test_retrieval_teacher import make_cfg as fixed_cfg, train_retrieval_tokenizer

K, M, STEPS = 2, 3, 4


def make_cfg(root, data_dir, name, **train):
    """The fixed-mode test teacher of test_retrieval_teacher in joint mode: one length bucket, no LoRA
    dropout, the plain head (no head-statistics pass), two micro-batches per step."""
    c = fixed_cfg(root, data_dir, name)
    c.data.length_buckets = (256,)
    c.lora.task.dropout = 0.0
    c.model.head_norm, c.model.head_init = False, "normal"
    c.train.update(dict(steps=STEPS, micro_batch=4, accum=2, **train))
    c.retrieval.update(dict(mode="joint", k=K))
    c.retrieval.joint.update(dict(m=M, lam=1.0, lr=0.3, margin=0.0))     # large: the ranking moves in 4 steps
    return c


def losses(run):
    return [r["loss"] for r in common.read_log(run / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def runs(prepared_synthetic, tmp_path_factory):
    """A: joint run straight to STEPS; B: the same config killed after step 2, then resumed."""
    from leader_jax.data.dataset import PreparedData
    from leader_jax.train.teacher import train

    root = tmp_path_factory.mktemp("retrieval_joint")
    data = PreparedData.load(prepared_synthetic)
    train_retrieval_tokenizer(data, root / "tok")
    out = {"A": train(make_cfg(root, prepared_synthetic, "A"))}
    out["B1"] = train(make_cfg(root, prepared_synthetic, "B", stop_after=2))
    out["B"] = train(make_cfg(root, prepared_synthetic, "B"))
    return root, data, out


def _leaves(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_every_reranker_parameter_trains_and_fixed_mode_has_none(runs, prepared_synthetic):
    from leader_jax.retrieval.reranker import CodeSpace, build_reranker
    from leader_jax.train.engine import Checkpointer, _abstract
    from leader_jax.train.teacher import build_teacher, trainable_filter

    root, data, out = runs
    cfg = make_cfg(root, prepared_synthetic, "A")
    mesh = common.make_mesh(cfg)
    teacher = build_teacher(cfg, data.vocab.n_med, mesh, vocab=data.vocab)
    _, trainable, _ = nnx.split(teacher, trainable_filter(cfg), ...)
    ckpt = Checkpointer(root / "A" / "checkpoints", max_to_keep=None)
    final, _, _ = ckpt.restore(STEPS, _abstract(trainable))
    with nnx.use_eager_sharding(False):
        init = _leaves(nnx.state(build_reranker(CodeSpace.from_vocab(data.vocab).size, cfg.retrieval.joint.d,
                                                cfg.retrieval.joint.hidden, cfg.seed + 3)))
    trained = _leaves(final[rjoint.RERANKER])
    assert sorted(init) == sorted(trained) and len(init) == 5
    for name, x in init.items():
        assert not np.array_equal(x, trained[name]), name          # every re-ranker parameter moved
    built = _leaves(trainable[rjoint.RERANKER])
    assert all(np.array_equal(init[a], built[b]) for a, b in zip(sorted(init), sorted(built)))  # seeded init

    fixed = make_cfg(root, prepared_synthetic, "F")
    fixed.retrieval.mode = "fixed"
    t2 = build_teacher(fixed, data.vocab.n_med, mesh, vocab=data.vocab)
    assert not any("reranker" in k for k in _leaves(nnx.state(t2)))
    assert not any("reranker" in k for k in _leaves(nnx.split(t2, trainable_filter(fixed), ...)[1]))


def test_teacher_gets_the_teacher_loss_gradient_only(runs, prepared_synthetic):
    """On a real joint batch the retriever loss's gradient is exactly zero for every teacher parameter (the
    candidate losses are under stop_gradient) and non-zero for every re-ranker parameter. The top-k prompts
    are composed on the host, so the teacher loss cannot reach the re-ranker; total = teacher + λ·retriever,
    so the teacher's gradient is the teacher loss's own."""
    from leader_jax.retrieval.run_prompts import RunRetrieval
    from leader_jax.train.engine import Engine
    from leader_jax.train.teacher import build_teacher, teacher_loss, trainable_filter

    root, data, _ = runs
    cfg = make_cfg(root, prepared_synthetic, "G")
    mesh = common.make_mesh(cfg)
    engine = Engine(build_teacher(cfg, data.vocab.n_med, mesh, vocab=data.vocab), trainable_filter(cfg),
                    optax.identity(), mesh, teacher_loss)
    tok = common.load_tokenizer(root / "tok")
    special = tdata.SpecialIds.from_tokenizer(tok)
    retr = RunRetrieval.for_training(cfg.retrieval, data, root / "G", write=False)
    retr.follow(engine)
    train = data.splits["train"]
    parts = retr.parts(train, "train", tok, special, 512, max_history=1, profile=False,
                       labels=data.labels(train), overlong="drop")
    batches = rjoint.JointBatches(parts, retr.composer(tok, special), retr.ranker, rjoint.memory_drug_sets(retr.memory),
                                  cfg.retrieval, accum=1, micro=8, seed=0, mesh=mesh, max_len=512, lengths=(512,))
    batch, _ = batches(0)
    assert batch["cand_ids"].shape[:3] == (1, 8, M) and bool(batch["cand_valid"].all())
    def text(x):
        return tok.decode(x, skip_special_tokens=True)

    # each prompt's skipped pooling span (model.pool=query) is its whole neighbour block (top-k prompts: up to
    # k sentences, candidate prompts: one), right before the current visit
    for ids, spans, n in ((batch["input_ids"][0], batch["pool_skip"][0], cfg.retrieval.k),
                          (batch["cand_ids"][0].reshape(8 * M, -1), batch["cand_skip"][0].reshape(8 * M, 2), 1)):
        shown = 0
        for row, (a, b) in zip(np.asarray(ids), np.asarray(spans)):
            assert render.NEIGHBOUR not in text(row[:a]) + text(row[b:])
            if b > a:
                shown += 1
                assert text(row[a:b]).strip().startswith(render.NEIGHBOUR.strip())
                assert 1 <= text(row[a:b]).count(render.NEIGHBOUR) <= n
                assert text(row[b:]).strip().startswith(render.CURRENT_VISIT.strip())
        assert shown >= 0.9 * len(spans)
    mb = jax.tree.map(lambda x: x[0], batch)
    loss = rjoint.JointLoss.from_config(cfg.retrieval)
    gd, tr, rest = nnx.split(engine.model(eval_mode=False), trainable_filter(cfg), ...)

    def retriever(t):
        total, aux = loss(nnx.merge(gd, t, rest), mb)
        return aux["retriever_loss"], (total, aux["teacher_loss"])

    (rl, (total, tl)), g = jax.jit(jax.value_and_grad(retriever, has_aux=True))(tr)
    g = _leaves(g)
    assert float(rl) > 0 and abs(float(total) - (float(tl) + cfg.retrieval.joint.lam * float(rl))) < 1e-5
    assert sum("reranker" in n for n in g) == 5 and len(g) > 5
    for name, x in g.items():
        if "reranker" in name:
            assert np.abs(x).max() > 0, name
        else:
            assert not x.any(), name

    # the m candidate forwards (under stop_gradient) keep no activations for the backward pass: the joint
    # step's scratch memory stays near the top-k step's, not (1 + m) x
    def total_loss(t):
        return loss(nnx.merge(gd, t, rest), mb)[0]

    def topk_loss(t):
        return teacher_loss(nnx.merge(gd, t, rest), mb)[0]

    def scratch(fn):
        return jax.jit(jax.grad(fn)).lower(tr).compile().memory_analysis().temp_size_in_bytes

    joint_b, topk_b = scratch(total_loss), scratch(topk_loss)
    assert joint_b < 1.5 * topk_b, (joint_b, topk_b)


def test_kill_and_resume_replays_the_same_losses(runs):
    root, _, out = runs
    straight, resumed = losses(root / "A"), losses(root / "B")
    assert len(straight) == STEPS and resumed == straight             # bit-identical replay
    assert out["B1"]["steps_done"] == 2 and out["B"]["best_val_prauc"] == out["A"]["best_val_prauc"]
    recs = [r for r in common.read_log(root / "A" / "metrics.jsonl") if "loss" in r]
    for r in recs:
        assert r["retriever_loss"] > 0 and 0 <= r["retriever_jaccard"] <= 1
        assert abs(r["loss"] - (r["teacher_loss"] + 1.0 * r["retriever_loss"])) < 1e-5
    summary = json.loads((root / "A" / "summary.json").read_text())
    assert summary["retrieval"]["mode"] == "joint" and summary["retrieval"]["joint"]["m"] == M


def test_features_and_recommender_use_the_reranked_top_k(runs):
    """The feature store and the Recommender reproduce the run's val predictions (atol 1e-6): both rank
    the pools with the saved re-ranker. The trained ranking differs from the B0 pool order for some val
    patients, and composing the B0 top-k instead gives other predictions."""
    from configs.extract_features import get_config
    from leader_jax import Recommender
    from leader_jax.feature_store import FeatureStore
    from leader_jax.io import load_npz
    from leader_jax.patient_input import sample_to_patient

    root, data, _ = runs
    pred = load_npz(root / "A" / "predictions" / "val.npz")
    f = get_config()
    f.run_dir, f.out, f.mesh, f.batch_size, f.splits = str(root / "A"), str(root / "feat"), (1, 1, 1), 8, ("val",)
    from leader_jax.train.extract_features import extract
    extract(f)
    store = FeatureStore(root / "feat")
    assert store.manifest["meta"]["retrieval"]["mode"] == "joint"
    np.testing.assert_allclose(store.probs("val", pred["ids"].tolist()), pred["y_prob"], rtol=0, atol=1e-6)

    rec = Recommender.load(root / "A", threshold=0.5, batch_size=8, mesh=(1, 1, 1))
    patients = [sample_to_patient(s) for s in data.splits["val"]]
    got = rec.predict_proba(rec.parse(patients))
    np.testing.assert_allclose(got, pred["y_prob"], rtol=0, atol=1e-6)

    # the saved re-ranker's top-k is not the B0 pool order (best first) for some val patients
    from leader_jax.retrieval.run_prompts import RunRetrieval
    from leader_jax.train.engine import Engine, _abstract
    from leader_jax.train.extract_features import load_teacher_run
    from leader_jax.train.teacher import build_teacher, teacher_loss, trainable_filter

    tcfg, ckpt, info = load_teacher_run(root / "A", "best", (1, 1, 1))
    mesh = common.make_mesh(tcfg)
    engine = Engine(build_teacher(tcfg, data.vocab.n_med, mesh, vocab=data.vocab), trainable_filter(tcfg),
                    optax.identity(), mesh, teacher_loss)
    engine.trainable, _, _ = ckpt.restore(info["step"], _abstract(engine.trainable))
    retr = RunRetrieval.for_run(tcfg.retrieval, root / "A", data.vocab)
    retr.follow(engine)
    tok = common.load_tokenizer(root / "tok")
    val = data.splits["val"]
    parts = retr.parts(val, "val", tok, tdata.SpecialIds.from_tokenizer(tok), 512, max_history=1, profile=False,
                       labels=None, overlong="error")
    pos, ok = retr.ranker.top_k(parts.inputs, K)
    assert ok.all() and (pos != np.arange(K)).any(axis=1).sum() > 0

    # retrieval quality of the run (before/after joint training) is measured on exactly these neighbours
    from leader_jax.retrieval.quality import neighbour_quality
    from leader_jax.retrieval.run_quality import teacher_run_quality

    before, after = teacher_run_quality(root / "A", "val")
    truth = [s.target.medications for s in val]
    mem = retr.memory
    assert before["ranking"] == "pool order" and after["ranking"] == "joint re-ranker"
    assert before["mean_jaccard"] == neighbour_quality(mem, parts.pool[:, :K], truth)["mean_jaccard"]
    assert after["mean_jaccard"] == neighbour_quality(mem, np.take_along_axis(parts.pool, pos, 1), truth)["mean_jaccard"]
    assert after["rows_reordered"] == int((pos != np.arange(K)).any(axis=1).sum()) > 0


def test_config_errors():
    from configs.teacher_tiny import get_config
    from leader_jax.train.teacher import validate_config

    c = get_config()
    c.retrieval.mode = "joint"
    validate_config(c)                                              # joint is wired
    c.model.cache_prefix, c.lora.task.first_layer = True, 1
    with pytest.raises(UserError, match="cache_prefix.*retrieval.mode=joint"):
        validate_config(c)
    c = get_config()
    c.retrieval.joint.m = 1
    with pytest.raises(UserError, match="retrieval.joint.m=1"):
        validate_config(c)
