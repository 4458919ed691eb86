"""Retrieval mode `fixed` (B0) wired end to end on one tiny teacher run: the run's prompts hold exactly the
rendered top-k neighbours of their pools (never the query's own patient), feature extraction and the
Recommender rebuild the same prompts (features = the teacher's own pooled states, predictions = the run's
val predictions), a changed retrieval block is refused on resume, oracle and bad values are refused where they
cannot run."""
import dataclasses
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from leader_jax.cli import UserError
from leader_jax.data.prompts import build_prompt
from leader_jax.retrieval import render
from leader_jax.retrieval.candidates import PoolSettings, build_pools, load_pools, save_pools
from leader_jax.retrieval.memory import Memory
from leader_jax.train import common, text_batches as tdata

K = 2


def make_cfg(root, data_dir, name, **retrieval):
    from configs.teacher_tiny import get_config

    c = get_config()
    c.out, c.data_dir, c.tokenizer, c.mesh = str(root / name), str(data_dir), str(root / "tok"), (1, 1, 1)
    c.model.source = "scratch"
    c.model.arch.update(dict(vocab_size=2000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2))
    # synthetic prompts with 2 neighbours: mean 330, max 509 tokens with this tokenizer; one length each
    c.data.update(dict(max_len=512, eval_max_len=512, max_history=1, length_buckets=()))
    c.lora.task.rank = 4
    c.train.update(dict(steps=4, micro_batch=8, accum=1, eval_every=2, ckpt_every=2))
    c.train.optim.update(dict(lr=1e-2, warmup_steps=0))
    c.eval.batch_size, c.eval.splits = 8, ("val",)
    c.retrieval.update(dict(mode="fixed", k=K, **retrieval))
    return c


def train_retrieval_tokenizer(data, folder) -> None:
    """A 2,000-token BPE trained on the training prompts and every memory visit's neighbour sentence, so the
    retrieval prompts stay short."""
    from leader_jax.train.pretrain import train_tokenizer

    memory = Memory.from_prepared(data)
    texts = [build_prompt(s, data.vocab, max_history=1) for s in data.splits["train"]]
    texts += [render.neighbour_sentence(memory, j, data.vocab) for j in range(len(memory))]
    train_tokenizer(texts, 2000, folder)


@pytest.fixture(scope="module")
def run(prepared_synthetic, tmp_path_factory):
    """One fixed-mode (BM25, k=2) tiny teacher run; a tokenizer trained on the prompts and the neighbour
    sentences (vocabulary 2000) keeps the augmented prompts short."""
    from leader_jax.data.dataset import PreparedData
    from leader_jax.train.teacher import train

    root = tmp_path_factory.mktemp("retrieval_teacher")
    data = PreparedData.load(prepared_synthetic)
    train_retrieval_tokenizer(data, root / "tok")
    cfg = make_cfg(root, prepared_synthetic, "run")
    summary = train(cfg)
    tok = common.load_tokenizer(root / "tok")
    return root, cfg, data, tok, summary


def _ids(tok, text):
    special = tdata.SpecialIds.from_tokenizer(tok)
    return [special.bos] + tdata.encode_text(tok, text) + [special.eos]


def test_training_prompts_hold_exactly_the_top_k_neighbours(run):
    """The saved memory and pools are the library's own; each training prompt (ids as trained) is the
    LEADER prompt with the sentences of its pool's top-k inserted before the current visit, or (when they
    do not fit max_len) of a prefix of them, and its skipped pooling span is that block; the query's patient
    is never among the neighbours."""
    from leader_jax.train.teacher import encode_split
    from leader_jax.retrieval.run_prompts import RunRetrieval

    root, cfg, data, tok, summary = run
    rdir = root / "run" / "retrieval"
    memory = Memory.load(rdir / "memory.npz")
    direct = Memory.from_prepared(data)
    assert len(memory) == len(direct) == summary["retrieval"]["memory_visits"] == 244
    assert memory.medications == direct.medications and list(memory.patient_ids) == list(direct.patient_ids)
    settings = PoolSettings.from_config(cfg.retrieval)
    train = data.splits["train"]
    pools = load_pools(rdir / "train.npz", fingerprint=data.fingerprint(), settings=settings)
    np.testing.assert_array_equal(pools.indices, build_pools(direct, train, settings).indices)

    retr = RunRetrieval.for_run(cfg.retrieval, root / "run", data.vocab, fingerprint=data.fingerprint())
    enc = encode_split(cfg, data, "train", tok, tdata.SpecialIds.from_tokenizer(tok), retrieval=retr)
    assert enc.sample_ids == [s.id for s in train]               # no training prompt dropped
    full = 0
    for s, row, ids, n, (a, b) in zip(train, pools.top(K), enc.ids, enc.lengths, enc.skip):
        assert (row >= 0).all() and s.patient_id not in set(memory.patient_ids[row])
        sentences = [render.neighbour_sentence(memory, int(j), data.vocab) for j in row]
        h = min(1, len(s.history))
        prompts = [render.insert_block(build_prompt(s, data.vocab, max_history=h), "".join(sentences[:m]))
                   for m in range(K, -1, -1)]
        got = ids[:n].tolist()
        match = [m for m, p in zip(range(K, -1, -1), prompts) if _ids(tok, p) == got]
        assert match, s.id
        full += match[0] == K
        # the query pooling's skipped span is exactly the shown neighbour sentences
        if match[0]:
            assert tok.decode(ids[a:b]).strip() == "".join(sentences[:match[0]]).strip(), s.id
        else:
            assert a == b == 0
        if match[0] == K:
            assert prompts[0].count("A similar past patient had diagnosis:") == K
    assert full >= 0.9 * len(train)                                 # nearly all prompts show both
    for split in ("val",):                                          # every written pool: own patient never
        p = load_pools(rdir / f"{split}.npz", fingerprint=data.fingerprint(), settings=settings)
        for s, row in zip(data.splits[split], p.indices):
            assert s.patient_id not in {memory.patient_ids[j] for j in row if j >= 0}
    assert summary["prompt_tokens"]["train_mean"] > 250           # neighbours included (none: ~104)


def test_features_are_the_teachers_states_on_the_retrieval_prompts(run):
    """The feature store of the run (its val pools file replaced by stale Jaccard pools first: rebuilt) holds
    the teacher's own val probabilities and an eager forward's pooled states on the retrieval prompts, which
    differ clearly from the states on the plain prompts."""
    from flax import nnx

    from configs.extract_features import get_config
    from leader_jax.feature_store import FeatureStore
    from leader_jax.io import load_npz
    from leader_jax.models import lora
    from leader_jax.models.teacher import HeadParam
    from leader_jax.retrieval.run_prompts import RunRetrieval
    from leader_jax.train.engine import _abstract
    from leader_jax.train.extract_features import extract, load_teacher_run
    from leader_jax.train.teacher import build_teacher, encode_split

    root, cfg, data, tok, _ = run
    pool_file = root / "run" / "retrieval" / "val.npz"
    bm25 = PoolSettings.from_config(cfg.retrieval)
    save_pools(pool_file, build_pools(Memory.from_prepared(data), data.splits["val"],
                                      dataclasses.replace(bm25, similarity="jaccard"), split="val"))
    f = get_config()
    f.run_dir, f.out, f.mesh, f.batch_size, f.splits = str(root / "run"), str(root / "feat"), (1, 1, 1), 8, ("val",)
    extract(f)
    load_pools(pool_file, fingerprint=data.fingerprint(), settings=bm25)     # StalePoolsError if not rebuilt
    store = FeatureStore(root / "feat")
    assert store.manifest["meta"]["retrieval"]["k"] == K
    pred = load_npz(root / "run" / "predictions" / "val.npz")
    np.testing.assert_allclose(store.probs("val", pred["ids"].tolist()), pred["y_prob"], rtol=1e-5, atol=1e-6)

    tcfg, ckpt, info = load_teacher_run(root / "run", "best", (1, 1, 1))
    teacher = build_teacher(tcfg, data.vocab.n_med, common.make_mesh(tcfg))
    graphdef, trainable, rest = nnx.split(teacher, nnx.Any(HeadParam, lora.TaskLoRA), ...)
    restored, _, _ = ckpt.restore(info["step"], _abstract(trainable))
    teacher = nnx.merge(graphdef, restored, rest)
    lora.set_deterministic(teacher, True)
    special = tdata.SpecialIds.from_tokenizer(tok)
    retr = RunRetrieval.for_run(tcfg.retrieval, root / "run", data.vocab)
    rows = [0, 1, 2, 3]
    enc = encode_split(tcfg, data, "val", tok, special, training=False, retrieval=retr).subset(rows)
    _, pooled = teacher(jnp.asarray(enc.ids), jnp.asarray(enc.mask()))
    stored = store.hidden("val", enc.sample_ids).astype(np.float32)
    np.testing.assert_allclose(stored, np.asarray(pooled), rtol=2e-3, atol=2e-3)     # float16 storage
    tcfg.retrieval.mode = "none"
    plain = encode_split(tcfg, data, "val", tok, special, training=False).subset(rows)
    assert (plain.lengths < enc.lengths).all()
    _, pooled_plain = teacher(jnp.asarray(plain.ids), jnp.asarray(plain.mask()))
    assert np.abs(stored - np.asarray(pooled_plain)).max(axis=1).min() > 0.05


def test_recommender_reproduces_the_val_predictions(run):
    """New-patient prediction (pools from the saved memory, time "" for the queries, positional ids) gives
    the run's own val predictions for the val patients; an oracle-pool run is refused."""
    from leader_jax import Recommender
    from leader_jax.io import load_npz
    from leader_jax.patient_input import sample_to_patient

    root, _, data, _, _ = run
    rec = Recommender.load(root / "run", threshold=0.5, batch_size=8, mesh=(1, 1, 1))
    val = data.splits["val"]
    patients = [sample_to_patient(s) for s in val]
    got = rec.predict_proba(rec.parse(patients))
    np.testing.assert_allclose(got, load_npz(root / "run" / "predictions" / "val.npz")["y_prob"], rtol=0, atol=1e-6)
    again = rec.predict_proba(rec.parse([patients[3], patients[3]]))     # repeated ids: same prompts
    np.testing.assert_allclose(again, got[[3, 3]], rtol=0, atol=1e-6)

    oracle = root / "oracle_run"
    shutil.copytree(root / "run", oracle, ignore=shutil.ignore_patterns("features", "feat"))
    c = json.loads((oracle / "config.json").read_text())
    c["retrieval"]["similarity"] = "oracle"
    (oracle / "config.json").write_text(json.dumps(c))
    with pytest.raises(UserError, match="oracle.*new patients have no known drugs"):
        Recommender.load(oracle, threshold=0.5, batch_size=8, mesh=(1, 1, 1))


def test_resume_with_a_changed_retrieval_block_is_refused(run):
    from leader_jax.train.teacher import train

    root, _, _, _, _ = run
    shutil.copytree(root / "run" / "checkpoints", root / "k1" / "checkpoints")
    cfg = make_cfg(root, run[1].data_dir, "k1")
    cfg.retrieval.k = 1
    with pytest.raises(UserError, match=r"the config changed.*--config.train.resume=False"):
        train(cfg)


def test_random_and_oracle_pools_render_through_the_same_path(run):
    """random (the equal-length control) and oracle (upper bound) prompts hold the same number of
    neighbours as BM25's, never of the query's patient; oracle neighbours share more drugs."""
    from leader_jax.retrieval.run_prompts import RunRetrieval

    root, cfg, data, tok, _ = run
    val = data.splits["val"]
    overlap = {}
    for sim in ("bm25", "random", "oracle"):
        rc = make_cfg(root, cfg.data_dir, "x", similarity=sim).retrieval
        retr = RunRetrieval.for_training(rc, data, root / "x", write=False)
        pools = retr.split_pools(val, "val")
        build = retr.builder(pools, tok, 4096)
        for s, row in zip(val, pools.top(K)):
            assert build(s, data.vocab, max_history=1).count("A similar past patient") == K
            assert s.patient_id not in set(retr.memory.patient_ids[row])
        overlap[sim] = np.mean([len(set(s.target.medications) & set(retr.memory.medications[j]))
                                for s, row in zip(val, pools.top(K)) for j in row])
    assert overlap["oracle"] > overlap["bm25"] > overlap["random"]
    assert not (root / "x").exists()                                # write=False: nothing saved


def test_config_errors():
    from configs.teacher_tiny import get_config
    from leader_jax.train.teacher import validate_config

    for field, value, text in (("mode", "jointly", "retrieval.mode='jointly'"),
                               ("k", 0, "retrieval.k=0"), ("similarity", "cosine", "retrieval.similarity")):
        c = get_config()
        c.retrieval[field] = value
        with pytest.raises(UserError, match=text):
            validate_config(c)
