"""The student's neighbour-drug input (`retrieval.mode=fixed`): one tiny 1-epoch no-KD run on the
synthetic data. Each sample's input bag is `Memory.drug_bag` of its saved top-k pool rows (and the mean
multi-hot of those visits' drugs, checked by hand); no visit of the sample's own patient ever contributes;
mode none builds the plain student (same parameters, and the fixed model with an empty bag gives its
outputs exactly); resuming with another `retrieval.k` is refused; the Recommender rebuilds the bags of
new patients from RUN/retrieval/ and reproduces the run's own validation predictions; joint and oracle
are refused where they cannot be used."""
import json

import jax
import numpy as np
import pytest
from flax import nnx

from leader_jax import sharding
from leader_jax.cli import UserError, load_config
from leader_jax.io import load_npz
from leader_jax.models.student import build_student
from leader_jax.patient_input import sample_to_patient
from leader_jax.retrieval.candidates import PoolSettings, load_pools
from leader_jax.retrieval.memory import Memory
from leader_jax.retrieval.run_prompts import RunRetrieval
from leader_jax.train import student as ts
from leader_jax.train import student_inputs as si
from leader_jax.train import student_trainer as st

K = 3


def _cfg(prepared, out, **retrieval):
    cfg = load_config("student.py", {
        "data_dir": str(prepared), "distill": False, "seed": 0,
        "model": dict(d=16, heads=2, ffn=32, head_hidden=32, bucket_levels=1, dropout=0.0, attn_dropout=0.0),
        "train": dict(batch_size=16, lr=1e-2, epochs=1), "eval": dict(batch_size=32),
        "retrieval": {"mode": "fixed", "similarity": "bm25", "k": K, **retrieval}})
    with cfg.unlocked():
        cfg.out = str(out)
    return cfg


@pytest.fixture(scope="module")
def run(prepared_synthetic, tmp_path_factory):
    out = tmp_path_factory.mktemp("student_retrieval") / "run"
    summary = ts.train(_cfg(prepared_synthetic, out)).summary
    assert summary["finished"] and summary["retrieval"]["mode"] == "fixed"
    return out


@pytest.fixture(scope="module")
def memory(data):
    return Memory.from_prepared(data)


@pytest.fixture(scope="module")
def encs(data, run, prepared_synthetic):
    """The encoded splits with the bags exactly as the run built them (pools read back from RUN/retrieval)."""
    cfg = _cfg(prepared_synthetic, run)
    e = {s: si.encode_samples(data.splits[s], data.vocab, cfg.model.max_visits) for s in si.SPLITS}
    si.attach_neighbours(e, data, RunRetrieval.for_run(cfg.retrieval, run, data.vocab, fingerprint=data.fingerprint(),
                                                    write=True))
    return e


def test_bag_is_drug_bag_of_the_saved_pools_and_the_mean_multi_hot(data, run, memory, encs):
    settings = PoolSettings.from_config(load_config("retrieval.py", {"similarity": "bm25"}))
    med = data.vocab.index("med")
    for split in si.SPLITS:
        pools = load_pools(run / "retrieval" / f"{split}.npz", fingerprint=data.fingerprint(), settings=settings)
        assert pools.query_ids == [s.id for s in data.splits[split]]
        top = pools.top(K)
        np.testing.assert_array_equal(encs[split].nbr, memory.drug_bag(top, data.vocab))
        for i in (0, len(top) // 2):                       # by hand: mean multi-hot of the k neighbours' drugs
            want = np.zeros(data.vocab.n_med, np.float32)
            rows = [j for j in top[i] if j >= 0]
            for j in rows:
                for t in set(memory.medications[j]):
                    want[med[t]] += 1.0 / len(rows)
            np.testing.assert_allclose(encs[split].nbr[i], want, rtol=0, atol=1e-6)
        assert (top >= 0).all() and encs[split].nbr.sum(axis=1).min() > 0
    assert Memory.load(run / "retrieval" / "memory.npz").visit_ids.tolist() == memory.visit_ids.tolist()


def test_own_patients_visits_never_contribute(data, run, memory):
    settings = PoolSettings.from_config(load_config("retrieval.py", {"similarity": "bm25"}))
    own_in_memory = 0
    for split in si.SPLITS:
        pools = load_pools(run / "retrieval" / f"{split}.npz", fingerprint=data.fingerprint(), settings=settings)
        pids = np.array([s.patient_id for s in data.splits[split]])
        rows = pools.top(K)
        assert not (memory.patient_ids[rows] == pids[:, None]).any(), split
        if split == "train":        # the rule is exercised: every training sample's own visits are in the memory
            own_in_memory = int(np.isin(pids, memory.patient_ids).sum())
    assert own_in_memory == len(data.splits["train"])


def test_mode_none_is_the_plain_student(data):
    none = load_config("student.py", {"model": dict(d=16, heads=2, ffn=32, head_hidden=32)})
    fixed = load_config("student.py", {"model": dict(d=16, heads=2, ffn=32, head_hidden=32),
                                       "retrieval": dict(mode="fixed")})
    m0, m1 = (st.model_config(c, data.vocab, None) for c in (none, fixed))
    assert not m0.neighbour_input and m1.neighbour_input
    with sharding.use_mesh(None):
        model0, model1 = build_student(m0, 0), build_student(m1, 0)
    p0 = {tuple(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model0, nnx.Param))}
    p1 = {tuple(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model1, nnx.Param))}
    paths0, paths1 = set(p0), set(p1)
    assert not any("nbr_proj" in p for p in paths0)
    assert paths1 - paths0 == {("nbr_proj", "kernel")}
    assert p1[("nbr_proj", "kernel")].shape == (m1.n_med, 3 * m1.d)
    for k, v in p0.items():                                # same initial values: nbr_proj is drawn last
        np.testing.assert_array_equal(v, p1[k], err_msg=str(k))
    enc = si.encode_samples(data.splits["val"][:16], data.vocab, 10)
    caps = si.bucket_caps(enc.needs, 1)
    batch = si.make_batch(enc, np.arange(16), caps[0], 16)
    forward = [jax.jit(lambda p, b, g=nnx.graphdef(m): nnx.merge(g, p)(b)["logits"]) for m in (model0, model1)]
    out0 = np.asarray(forward[0](nnx.state(model0, nnx.Param), batch))
    bag = np.zeros((2, 16, m1.n_med), np.float32)
    bag[1, :, :5] = 1.0                                    # an empty bag, then five drugs for every row
    zero, five = (np.asarray(forward[1](nnx.state(model1, nnx.Param), {**batch, "nbr": b})) for b in bag)
    np.testing.assert_array_equal(zero, out0)
    assert np.abs(five - out0).max() > 1e-3


def test_resume_with_another_k_is_refused(run, prepared_synthetic):
    before = (run / "config.json").read_text()
    with pytest.raises(UserError, match="cannot resume, the config changed"):
        ts.train(_cfg(prepared_synthetic, run, k=2))
    assert (run / "config.json").read_text() == before


def test_recommender_reproduces_the_runs_val_predictions(data, run, encs):
    from leader_jax import Recommender

    rec = Recommender.load(run)
    val = data.splits["val"]
    pred = load_npz(run / "predictions" / "val.npz")
    assert pred["ids"].tolist() == [s.id for s in val]
    got = rec.predict_proba(rec.parse([sample_to_patient(s) for s in val]))
    np.testing.assert_allclose(got, pred["y_prob"], rtol=0, atol=1e-6)
    lines = [json.dumps(sample_to_patient(s)) for s in val]          # the CLI's column-wise path
    records = rec._chunk_parser.parse(lines)
    np.testing.assert_allclose(rec.records_proba(records), pred["y_prob"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(records.enc.nbr, encs["val"].nbr)
    trainer, caps = rec._predict_fn.trainer, json.loads((run / "run.json").read_text())["buckets"]
    for kw in (dict(kernel=False), dict(kernel=trainer.kernel), dict(packed=False)):    # every inference path
        np.testing.assert_allclose(trainer.predict(encs["val"], caps, 32, **kw), pred["y_prob"], rtol=0, atol=1e-5)
    enc = si.encode_samples(val, data.vocab, rec._predict_fn.max_visits)    # the input matters
    enc.nbr = np.zeros_like(encs["val"].nbr)
    assert np.abs(rec._predict_fn.model(enc) - pred["y_prob"]).max() > 1e-4


def test_joint_and_oracle_are_refused_where_unusable(data, run, tmp_path):
    cfg = load_config("student.py", {"retrieval": dict(mode="joint")})
    with pytest.raises(UserError, match=r"retrieval.mode='joint'"):
        ts.validate_config(cfg)
    oracle = _cfg(run.parent, run, similarity="oracle").retrieval      # new patients have no known drugs
    retrieval = RunRetrieval.for_run(oracle, run, data.vocab, fingerprint=data.fingerprint())
    enc = si.encode_samples(data.splits["val"][:3], data.vocab)
    with pytest.raises(UserError, match="upper bound"):
        si.neighbour_bags(retrieval, enc, data.vocab)
