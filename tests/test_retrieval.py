"""Retrieval (leader_jax.retrieval): the memory's leakage rules (with the leak check), deterministic and
stale-proof candidate pools, the prompt budget rule, the re-ranker's losses against direct numpy
computations, and which re-ranker parameters the retriever and teacher losses reach."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from leader_jax import retrieval, sharding
from leader_jax.cli import UserError, load_config
from leader_jax.data.dataset import Sample, Vocab
from leader_jax.data.prompts import build_prompt
from leader_jax.data.records import Visit
from leader_jax.retrieval import candidates as cand
from leader_jax.retrieval import render, reranker
from leader_jax.retrieval.memory import Memory, Queries, eligible
from leader_jax.retrieval.quality import neighbour_quality
from leader_jax.retrieval.run_prompts import MEMORY_FILE, RunRetrieval, retrieval_dir


@pytest.fixture(scope="module")
def memory(data):
    return Memory.from_prepared(data)


def _pools(memory, samples, **kw):
    leak = kw.pop("exclude_same_patient", True)
    return cand.build_pools(memory, samples, cand.PoolSettings(**kw), exclude_same_patient=leak)


# ------------------------------------------------------------------------------------------ leakage rules
def test_memory_holds_every_training_visit_and_nothing_else(data, memory):
    train = {(s.patient_id, v.id) for s in data.splits["train"] for v in s.visits}
    assert set(zip(memory.patient_ids, memory.visit_ids)) == train and len(memory) == len(train) == 244
    others = {s.patient_id for sp in ("val", "test") for s in data.splits[sp]}
    assert others and not others & set(memory.patient_ids)           # val/test patients are only queries


def test_pools_never_hold_the_query_patient(data, memory):
    for split in ("train", "val", "test"):
        pools = _pools(memory, data.splits[split], similarity="jaccard")
        for s, row in zip(data.splits[split], pools.indices):
            assert s.patient_id not in {memory.patient_ids[j] for j in row if j >= 0}
        assert (pools.indices >= 0).all()                             # 244 visits: every pool is full


def test_leak_check_same_patient_exclusion_changes_the_pools(data, memory):
    """Without the same-patient rule a multi-visit training query retrieves its own earlier visits
    (identical codes score highest): the pools change. Even then its own current visit never appears."""
    train = data.splits["train"]
    safe = _pools(memory, train, similarity="jaccard")
    leaky = _pools(memory, train, similarity="jaccard", exclude_same_patient=False)
    changed = np.any(safe.indices != leaky.indices, axis=1)
    multi = np.array([len(s.visits) > 1 for s in train])
    assert changed.sum() >= 10 and not changed[~multi].any()          # single-visit queries: nothing earlier
    own_rows = 0
    for s, row in zip(train, leaky.indices):
        for j in row:
            if memory.patient_ids[j] == s.patient_id:
                own_rows += 1
                assert memory.positions[j] < len(s.visits) - 1        # strictly before the query visit
                assert memory.visit_ids[j] != s.target.id
    assert own_rows >= 10


def test_time_rule_global_keeps_only_earlier_visits(data, memory):
    samples = data.splits["train"] + data.splits["test"]
    glob = _pools(memory, samples, similarity="bm25", time_order="global")
    within = _pools(memory, samples, similarity="bm25", time_order="within_patient")
    n_checked = 0
    for s, row in zip(samples, glob.indices):
        for j in row[row >= 0]:
            assert memory.times[j] < s.target.time
            n_checked += 1
    assert n_checked > 1000 and (glob.indices != within.indices).any()
    assert (glob.indices < 0).any()                                   # the earliest queries see little or nothing
    # a query without a time (a new patient at prediction time) is later than every memory visit
    q = Queries.from_samples(samples[:3])
    q = Queries(q.ids, np.array(["p_new"] * 3), np.array(["", "", ""]), q.positions, q.tokens, q.medications)
    assert eligible(memory, q, time_order="global").all()


# ------------------------------------------------------------------------------------------ pools
def test_similarities_match_a_direct_computation(data, memory):
    samples = data.splits["val"][:6]
    M = len(memory)
    docs = [set(memory.query_tokens(i)) for i in range(M)]
    avgdl = np.mean([len(d) for d in docs])
    for s, row_j, row_b in zip(samples, _pools(memory, samples, similarity="jaccard").indices,
                               _pools(memory, samples, similarity="bm25").indices):
        q = set(s.target.diagnoses + s.target.procedures)
        jac = np.array([len(q & d) / len(q | d) for d in docs])
        idf = {t: math.log(1 + (M - sum(t in d for d in docs) + 0.5) / (sum(t in d for d in docs) + 0.5))
               for t in q}
        bm = np.array([sum(idf[t] * 2.2 / (1 + 1.2 * (0.25 + 0.75 * len(d) / avgdl)) for t in q & d)
                       for d in docs])
        for scores, row in ((jac, row_j), (bm, row_b)):
            want = sorted(range(M), key=lambda j: (-round(scores[j], 9), j))[:20]
            assert list(row) == want


def test_top_with_ties_breaks_ties_by_lower_index():
    s = np.array([[0.5, 1.0, 0.5, 0.5, -np.inf, 1.0, 0.2],
                  [-np.inf, -np.inf, 0.1, -np.inf, -np.inf, -np.inf, -np.inf]])
    cols, vals = cand.top_with_ties(s, 4)
    assert cols[0].tolist() == [1, 5, 0, 2] and vals[0].tolist() == [1.0, 1.0, 0.5, 0.5]
    assert cols[1, 0] == 2 and np.isinf(vals[1, 1:]).all()
    cols, _ = cand.top_with_ties(s[:, :3], 5)                          # pool larger than the memory
    assert cols.shape == (2, 5)


def test_pools_are_deterministic_and_refuse_stale_files(data, memory, tmp_path):
    settings = cand.PoolSettings(similarity="bm25")
    a = cand.build_pools(memory, data.splits["train"], settings, split="train")
    b = cand.build_pools(memory, data.splits["train"], settings, split="train", block=7)
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.scores, b.scores)
    r1 = _pools(memory, data.splits["val"], similarity="random", seed=3).indices
    assert np.array_equal(r1, cand.build_pools(memory, data.splits["val"], cand.PoolSettings(
        similarity="random", seed=3), block=5).indices)
    path = cand.save_pools(tmp_path / "train.npz", a)
    c = cand.load_pools(path, fingerprint=data.fingerprint(), settings=settings)
    assert c.query_ids == a.query_ids and np.array_equal(c.indices, a.indices)
    with pytest.raises(cand.StalePoolsError, match="prepared data"):
        cand.load_pools(path, fingerprint="0" * 64, settings=settings)
    with pytest.raises(cand.StalePoolsError, match="jaccard"):
        cand.load_pools(path, fingerprint=data.fingerprint(), settings=cand.PoolSettings(similarity="jaccard"))
    mem = Memory.load(memory.save(tmp_path / "memory.npz"))            # a run keeps its memory
    assert mem.fingerprint == memory.fingerprint == data.fingerprint()
    for f in ("patient_ids", "visit_ids", "times", "positions"):
        assert np.array_equal(getattr(mem, f), getattr(memory, f))
    assert (mem.diagnoses, mem.procedures, mem.medications) == (memory.diagnoses, memory.procedures,
                                                                 memory.medications)
    assert np.array_equal(cand.build_pools(mem, data.splits["train"], settings).indices, a.indices)
    # split_pools reuses a matching file and rebuilds a stale one in place
    d = cand.split_pools(memory, data.splits["train"], cand.PoolSettings(similarity="jaccard"), "train",
                         tmp_path)
    assert cand.load_pools(path, fingerprint=data.fingerprint(), settings=d.settings).indices.tolist() \
        == d.indices.tolist()


def test_damaged_run_files_are_refused_or_rebuilt(data, memory, tmp_path):
    """A run's memory that is missing, damaged or built from other data is refused with one line naming
    the file; a damaged pool file is rebuilt (and rewritten), never read as pools."""
    rcfg = load_config("retrieval.py")
    rcfg.mode = "fixed"
    run = tmp_path / "run"
    path = retrieval_dir(run) / MEMORY_FILE
    with pytest.raises(UserError, match="memory.npz not found"):
        RunRetrieval.for_run(rcfg, run, data.vocab)
    memory.save(path)
    ok = RunRetrieval.for_run(rcfg, run, data.vocab, fingerprint=data.fingerprint(), write=True)
    with pytest.raises(UserError, match="built from prepared data"):
        RunRetrieval.for_run(rcfg, run, data.vocab, fingerprint="f" * 64)
    path.write_bytes(path.read_bytes()[:100])                       # truncated by a killed copy
    with pytest.raises(UserError, match="cannot read the retrieval memory"):
        RunRetrieval.for_run(rcfg, run, data.vocab)
    val = data.splits["val"]
    want = ok.split_pools(val, "val").indices                       # written to RUN/retrieval/val.npz
    pool_file = retrieval_dir(run) / "val.npz"
    pool_file.write_bytes(b"not an npz")
    assert np.array_equal(ok.split_pools(val, "val").indices, want)
    assert np.array_equal(cand.load_pools(pool_file, fingerprint=data.fingerprint(),
                                          settings=ok.settings).indices, want)


# ------------------------------------------------------------------------------------------ prompts
class _WordTokenizer:
    """One token per whitespace-separated word (encode_text's fallback path: no add_special_tokens)."""

    def encode(self, text):
        return [1] * len(text.split())


def test_budget_rule_drops_lowest_ranked_neighbours_and_never_the_current_visit(data, memory):
    s = next(x for x in data.splits["train"] if len(x.visits) > 1)
    pools = _pools(memory, [s], similarity="jaccard")
    nbrs = render.neighbour_texts(memory, pools.top(3)[0], data.vocab)
    assert len(nbrs) == 3 and all(t.startswith("A similar past patient had diagnosis: ") for t in nbrs)
    base = build_prompt(s, data.vocab)
    full = render.augment(base, nbrs)
    assert full.shown == 3 and full.text.index(nbrs[2]) < full.text.index(render.CURRENT_VISIT)
    assert full.text.endswith(base[base.rfind(render.CURRENT_VISIT):])  # current visit and question last
    two = render.augment(base, nbrs, budget=len(nbrs[0]) + len(nbrs[1]))
    assert (two.shown, two.dropped) == (2, 1) and nbrs[2] not in two.text and nbrs[1] in two.text
    none = render.augment(base, nbrs, fits=lambda t: len(t) <= len(base) + 5)
    assert none.text == base and none.shown == 0

    # inside encode_samples: neighbours fill what the base prompt leaves under max_len
    from leader_jax.train.text_batches import SpecialIds, encode_samples
    tok, special = _WordTokenizer(), SpecialIds(bos=1, eos=2, pad=0)
    words = lambda t: len(t.split())
    base_len = words(base) + 2
    for room, want in ((0, 0), (words(nbrs[0]), 1), (words(nbrs[0] + nbrs[1] + nbrs[2]), 3)):
        builder = render.prompt_builder(build_prompt, {s.id: nbrs}, max_len=base_len + room, measure=words)
        enc = encode_samples([s], data.vocab, tok, special, base_len + room, build_prompt=builder)
        assert enc.lengths[0] == base_len + sum(words(n) for n in nbrs[:want]) and enc.n_truncated == 0
    with pytest.raises(ValueError, match="no retrieved neighbours"):
        render.prompt_builder(build_prompt, {}, max_len=999, measure=words)(s, data.vocab)

    # token-level composition (per-step prompts of the joint mode): same rule
    head, tail = render.split_at_current_visit(base)
    assert head + tail == base and tail.startswith(render.CURRENT_VISIT)
    nb = [[7] * 5, [8] * 4, [9] * 6]
    ids = render.compose_ids([3] * 10, nb, [4] * 6, max_len=2 + 16 + 9, bos=1, eos=2)
    assert ids == [1] + [3] * 10 + [7] * 5 + [8] * 4 + [4] * 6 + [2]
    assert render.compose_ids([3] * 10, nb, [4] * 6, max_len=99, budget=8) == [3] * 10 + [7] * 5 + [4] * 6
    with pytest.raises(ValueError, match="without neighbours"):
        render.compose_ids([3] * 10, nb, [4] * 6, max_len=15)


# ------------------------------------------------------------------------------------------ re-ranker
def _np_ranknet(s, L, valid, margin):
    total, n = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            for j in range(i + 1, s.shape[1]):
                if not (valid[b, i] and valid[b, j]):
                    continue
                if abs(L[b, j] - L[b, i]) <= margin * 0.5 * (abs(L[b, i]) + abs(L[b, j])):
                    continue
                y = 1.0 if L[b, j] > L[b, i] else 0.0
                sig = 1 / (1 + np.exp(-(s[b, i] - s[b, j])))
                total += -(y * np.log(sig) + (1 - y) * np.log(1 - sig))
                n += 1
    return total / max(n, 1), n


def test_ranknet_and_replug_match_numpy():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(4, 6)).astype(np.float32)
    L = rng.uniform(1.0, 2.0, size=(4, 6)).astype(np.float32)
    L[0, 1] = L[0, 0] * 1.001                                          # a near-tie the margin drops
    valid = np.ones((4, 6), bool)
    valid[2, 4:] = False
    for margin in (0.0, 0.002):
        want, _ = _np_ranknet(s, L, valid, margin)
        got = reranker.ranknet_loss(jnp.asarray(s), jnp.asarray(L), jnp.asarray(valid), margin)
        assert got == pytest.approx(want, rel=1e-5)
    assert _np_ranknet(s, L, valid, 0.002)[1] == _np_ranknet(s, L, valid, 0.0)[1] - 1 == 50
    gamma, tau = 0.5, 0.3
    kl = []
    for b in range(4):
        v = valid[b]
        p = np.exp(s[b, v] / gamma - np.logaddexp.reduce(s[b, v] / gamma))
        q = np.exp(-L[b, v] / tau - np.logaddexp.reduce(-L[b, v] / tau))
        kl.append(np.sum(p * (np.log(p) - np.log(q))))
    got = reranker.replug_loss(jnp.asarray(s), jnp.asarray(L), jnp.asarray(valid), gamma, tau)
    assert got == pytest.approx(np.mean(kl), rel=1e-4)


@pytest.fixture(scope="module")
def rerank_setup(data, memory):
    samples = data.splits["train"][:8]
    pools = _pools(memory, samples, similarity="bm25", pool=10)
    space = reranker.CodeSpace.from_vocab(data.vocab)
    inputs = reranker.rerank_inputs(space, memory, Queries.from_samples(samples), pools.indices, pools.scores)
    batch = {k: jnp.asarray(v) for k, v in reranker.batch_inputs(inputs, np.arange(8)).items()}
    with sharding.use_mesh(None):
        model = reranker.build_reranker(space.size, d=16, hidden=32, seed=0)
    return model, batch, data.labels(samples), pools


def test_reranker_starts_at_the_b0_ranking(rerank_setup):
    model, batch, _, _ = rerank_setup
    s = model(batch["query"], batch["candidates"], batch["prior"])
    assert s.shape == (8, 10)
    order = np.argsort(-np.asarray(s), axis=1, kind="stable")
    assert (order[:, :3] == np.arange(3)).mean() >= 0.9                # B0 pools are sorted best first


def _toy_teacher_losses(batch, pos, labels, w):
    """A stand-in teacher: logits from the chosen candidates' code bags (w [codes, n_med])."""
    bags = jnp.take_along_axis(batch["candidates"], pos[..., None], axis=1)        # [B, m, Lc]
    logits = jnp.take(w, bags, axis=0).sum(axis=2)                                 # [B, m, n_med]
    return logits


def test_retriever_loss_reaches_every_reranker_parameter_and_the_teacher_path_none(rerank_setup):
    model, batch, labels, _ = rerank_setup
    labels = jnp.asarray(labels)
    w = 0.01 * jax.random.normal(jax.random.key(1), (model.table.shape[0], labels.shape[1]))
    pos, picked = reranker.sample_candidates(jax.random.key(0), batch["prior"], batch["valid"], 6, 1.0)
    assert picked.all() and all(len(set(r)) == 6 for r in np.asarray(pos).tolist())

    def retriever(m, w, kind):
        s = m(batch["query"], batch["candidates"], batch["prior"])
        s_m = jnp.take_along_axis(s, pos, axis=1)
        losses = reranker.candidate_losses(_toy_teacher_losses(batch, pos, labels, w), labels)
        return reranker.retriever_loss(kind, s_m, losses, picked, margin=0.0, gamma=1.0, tau=1.0)

    def teacher_path(m, w):
        s = m(batch["query"], batch["candidates"], batch["prior"])
        top, _ = reranker.select_top_k(s, batch["valid"], 3)
        logits = _toy_teacher_losses(batch, top, labels, w).mean(axis=1)
        return jnp.mean(jax.nn.softplus(logits) - labels * logits)

    graphdef, state = nnx.split(model, nnx.Param)

    @jax.jit
    def grads(state, w):      # one compilation each instead of many eager ones
        out = {k: jax.grad(lambda st, w_, k=k: retriever(nnx.merge(graphdef, st), w_, k), argnums=(0, 1))(state, w)
               for k in ("ranknet", "replug")}
        out["teacher"] = jax.grad(lambda st, w_: teacher_path(nnx.merge(graphdef, st), w_),
                                  argnums=(0, 1))(state, w)
        return out

    out = grads(state, w)
    for kind in ("ranknet", "replug"):
        g_state, g_w = out[kind]
        norms = {jax.tree_util.keystr(p): float(jnp.abs(x).sum())
                 for p, x in jax.tree_util.tree_leaves_with_path(g_state)}
        assert sorted(norms) == ["['b1'].value", "['prior_weight'].value", "['table'].value",
                                 "['w1'].value", "['w2'].value"]
        assert all(v > 0 for v in norms.values()), (kind, norms)
        assert float(jnp.abs(g_w).sum()) == 0.0                        # per-candidate losses: stop_gradient
    g_state, g_w = out["teacher"]
    assert all(float(jnp.abs(x).sum()) == 0.0 for x in jax.tree.leaves(g_state))
    assert float(jnp.abs(g_w).sum()) > 0                               # the teacher itself does learn


def test_reranker_optimizer_updates_every_parameter(rerank_setup, data):
    _, batch, _, _ = rerank_setup
    space = reranker.CodeSpace.from_vocab(data.vocab)
    with sharding.use_mesh(None):
        model = reranker.build_reranker(space.size, d=16, hidden=32, seed=0)
    before = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    opt = reranker.make_optimizer(model, 1e-3)
    L = jnp.asarray(np.random.default_rng(0).uniform(1, 2, (8, 10)).astype(np.float32))

    def loss(m):
        return reranker.ranknet_loss(m(batch["query"], batch["candidates"], batch["prior"]), L,
                                     batch["valid"], 0.0)

    @nnx.jit
    def step(model, opt):
        opt.update(model, nnx.grad(loss)(model))

    step(model, opt)
    after = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    assert len(before) == 5 and all(not np.array_equal(a, b) for a, b in zip(before, after))
    specs = {jax.tree_util.keystr(p): v.get_metadata().get("out_sharding")
             for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param),
                                                            is_leaf=lambda x: isinstance(x, nnx.Variable))}
    assert all(s is not None for s in specs.values()), specs


# ------------------------------------------------------------------------------------------ quality, config
def test_neighbour_quality_on_a_hand_made_memory():
    v = lambda i, meds: Visit(str(i), "2000", ("dx9:1",), (), meds)
    mem = Memory.from_samples([Sample("a", "a", (v(1, ("m1", "m2")),)), Sample("b", "b", (v(2, ("m3",)),))])
    q = neighbour_quality(mem, np.array([[0, 1], [1, -1], [-1, -1]]), [("m1",), ("m3", "m4"), ("m1",)])
    assert q["mean_jaccard"] == pytest.approx(((0.5 + 0.0) / 2 + 0.5) / 2)
    assert q["union_jaccard"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert (q["n_queries"], q["n_without_neighbours"]) == (2, 1)
    vocab = Vocab(diag=("dx9:1",), proc=(), med=("m1", "m2", "m3"), names={})
    bag = mem.drug_bag(np.array([[0, 1], [1, -1], [-1, -1]]), vocab)   # the student's neighbour-drug input
    assert bag.tolist() == [[0.5, 0.5, 0.5], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]


def test_retrieval_quality_ordering_on_synthetic(data, memory):
    """Oracle pools (chosen by the true drugs) score far above B0 and random pools on val: the measure
    sees what it should (synthetic codes carry little drug signal, so B0 vs random is not asserted)."""
    val = data.splits["val"]
    truth = [s.target.medications for s in val]
    q = {sim: neighbour_quality(memory, _pools(memory, val, similarity=sim).top(3), truth)["mean_jaccard"]
         for sim in ("oracle", "bm25", "random")}
    assert q["oracle"] > q["bm25"] + 0.05 and q["oracle"] > q["random"] + 0.05


@pytest.mark.parametrize("field,value,text", [("mode", "hybrid", "mode='hybrid'"), ("k", 50, "k=50"),
                                              ("joint.m", 1, "joint.m=1"), ("joint.gamma", 0.0, "joint.gamma"),
                                              ("similarity", "cosine", "similarity='cosine'")])
def test_validate_config_rejects_bad_values(field, value, text):
    cfg = load_config("retrieval.py")
    retrieval.validate_config(cfg)
    *parent, leaf = field.split(".")
    node = cfg[parent[0]] if parent else cfg
    node[leaf] = value
    with pytest.raises(UserError) as err:
        retrieval.validate_config(cfg, prefix="retrieval.")
    assert ("retrieval." + text) in str(err.value) and "\n" not in str(err.value)
