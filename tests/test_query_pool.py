"""Query pooling (`model.pool=query`): the teacher's mean over a prompt's real tokens *outside* the retrieved
neighbours' block. The pooled state equals a direct numpy mean without the skipped span (and the plain mean
when nothing is skipped), the frozen-prefix path gives the same, the span of a rendered prompt covers exactly
its neighbour sentences (fast-tokenizer offsets and the fallback), composed prompts (joint mode) mark the
same block, and the batches carry each row's span."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from leader_jax.models import frozen_prefix as fp
from leader_jax.models.llama import LlamaConfig, init_model
from leader_jax.models.teacher import Teacher, pool_weights
from leader_jax.retrieval import render
from leader_jax.train import text_batches as tdata

LENGTHS = np.array([20, 9, 16, 5])
SKIP = np.array([[3, 12], [0, 0], [2, 15], [1, 4]], np.int32)     # [start, end) per row; row 1: none


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 128, size=(4, 20)).astype(np.int32)
    mask = (np.arange(20)[None] < LENGTHS[:, None]).astype(np.int32)
    llama = init_model(LlamaConfig.tiny(), seed=0)
    with nnx.use_eager_sharding(False):
        teachers = {p: Teacher(llama, 6, rngs=nnx.Rngs(4), pool=p, head_norm=True) for p in ("mean", "query")}
    hidden = np.asarray(nnx.jit(lambda m, i, k: m.hidden_states(i, k))(llama, jnp.asarray(ids),
                                                                        jnp.asarray(mask)), np.float64)
    return ids, mask, teachers, hidden


def _pooled(teacher, ids, mask, skip):
    return np.asarray(nnx.jit(lambda t, i, m, s: t(i, m, s)[1])(teacher, jnp.asarray(ids), jnp.asarray(mask),
                                                                 None if skip is None else jnp.asarray(skip)))


def test_query_pool_is_the_mean_outside_the_skipped_span(tiny):
    ids, mask, teachers, hidden = tiny
    got = _pooled(teachers["query"], ids, mask, SKIP)
    for r, (n, (a, b)) in enumerate(zip(LENGTHS, SKIP)):
        keep = [t for t in range(n) if not a <= t < b]
        np.testing.assert_allclose(got[r], hidden[r, keep].mean(0), rtol=1e-5, atol=1e-6)
    mean = _pooled(teachers["mean"], ids, mask, SKIP)                   # mean ignores the spans
    np.testing.assert_allclose(mean[1], got[1], rtol=1e-6)               # row 1 skips nothing
    assert np.abs(mean[0] - got[0]).max() > 1e-3                         # a skipped span changes the state
    np.testing.assert_allclose(_pooled(teachers["query"], ids, mask, None), mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(pool_weights(jnp.asarray(mask), jnp.asarray(SKIP))).sum(1),
                                  LENGTHS - (SKIP[:, 1] - SKIP[:, 0]))


def test_frozen_prefix_path_pools_the_same_span(tiny):
    ids, mask, teachers, _ = tiny
    t = teachers["query"]
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "pool_skip": jnp.asarray(SKIP)}
    cached = {**batch, "hidden": nnx.jit(fp.PrefixFn(1))(t, batch)}
    probs, pooled = nnx.jit(fp.UpperPredict(1))(t, cached)
    np.testing.assert_allclose(pooled, _pooled(t, ids, mask, SKIP), rtol=1e-5, atol=1e-6)
    full = nnx.jit(lambda m, i, k, s: jax.nn.sigmoid(m(i, k, s)[0]))(t, batch["input_ids"], batch["attention_mask"],
                                                                      batch["pool_skip"])
    np.testing.assert_allclose(probs, full, atol=1e-6)


HEAD = "Patient history: he had diagnosis: sepsis; procedures: none. \n "
BLOCK = (f"{render.NEIGHBOUR}sepsis, pneumonia; procedures: intubation; and was prescribed: heparin. \n "
         f"{render.NEIGHBOUR}renal failure; procedures: dialysis; and was prescribed: insulin. \n ")
TAIL = f"{render.CURRENT_VISIT}sepsis; procedures: none. Which drugs?"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from leader_jax.tokenizer import load_tokenizer, train_bpe_tokenizer

    texts = [HEAD + BLOCK + TAIL, HEAD + TAIL] * 20
    return load_tokenizer(train_bpe_tokenizer(texts, 320, tmp_path_factory.mktemp("qtok") / "tok", min_frequency=1))


def test_block_span_finds_the_neighbour_sentences():
    text = HEAD + BLOCK + TAIL
    assert render.block_span(text) == (len(HEAD), len(HEAD) + len(BLOCK))
    assert render.block_span(HEAD + TAIL) is None
    assert render.block_span(BLOCK) is None                               # no current visit: nothing to pool
    assert render.insert_block(HEAD + TAIL, BLOCK) == text


def test_token_span_covers_exactly_the_block(tok):
    text = HEAD + BLOCK + TAIL
    ids, (a, b) = tdata.encode_span(tok, text, render.block_span(text))
    assert ids == tdata.encode_text(tok, text)
    assert tok.decode(ids[a:b]).strip() == BLOCK.strip()
    assert tok.decode(ids[:a]).strip() == HEAD.strip() and tok.decode(ids[b:]).strip() == TAIL.strip()
    assert tdata.encode_span(tok, HEAD + TAIL, None) == (tdata.encode_text(tok, HEAD + TAIL), (0, 0))

    class Slow:                                           # no offsets: spans from token counts of the prefixes
        def encode(self, s, add_special_tokens=False):
            return tok.encode(s, add_special_tokens=add_special_tokens)

    ids2, (a2, b2) = tdata.encode_span(Slow(), text, render.block_span(text))
    assert ids2 == ids and abs(a2 - a) <= 1 and abs(b2 - b) <= 1


def test_encoded_prompts_and_batches_carry_the_span(tok):
    from leader_jax.sharding import make_mesh

    special = tdata.SpecialIds.from_tokenizer(tok)
    samples = [types.SimpleNamespace(id=f"s{i}", history=[], single_visit=True) for i in range(4)]
    texts = {"s0": HEAD + BLOCK + TAIL, "s1": HEAD + TAIL, "s2": HEAD + BLOCK + TAIL, "s3": HEAD + TAIL}
    enc = tdata.encode_samples(samples, None, tok, special, 256, build_prompt=lambda s, v, **kw: texts[s.id],
                               skip_span=render.block_span)
    a, b = enc.skip[0]
    assert tok.decode(enc.ids[0, a:b]).strip() == BLOCK.strip() and enc.ids[0, 0] == special.bos
    np.testing.assert_array_equal(enc.skip[1], [0, 0])
    np.testing.assert_array_equal(enc.subset([2, 1]).skip, enc.skip[[2, 1]])
    assert tdata.encode_samples(samples, None, tok, special, 256,
                                build_prompt=lambda s, v, **kw: texts[s.id]).skip is None
    mesh = make_mesh((2, 1, 1), devices=jax.devices()[:2])
    rows, batch = next(tdata.eval_batches(enc, 4, mesh))
    np.testing.assert_array_equal(np.asarray(batch["pool_skip"]), enc.skip[rows])
    batch, _ = tdata.train_batch(enc, 0, 1, 4, 0, mesh)
    order = tdata.stream_indices(4, 0, 4, 0)
    np.testing.assert_array_equal(np.asarray(batch["pool_skip"])[0], enc.skip[order])


def test_composed_prompt_marks_the_neighbour_tokens():
    from leader_jax.retrieval.joint import Composer

    parts = types.SimpleNamespace(heads=[[3] * 10], tails=[[4] * 6])
    special = tdata.SpecialIds(bos=1, eos=2, pad=0)
    comp = Composer([[7] * 5, [8] * 4], special, budget=0)
    toks = comp.ids(parts, 0, [1, 0], max_len=64)
    a, b = Composer.span(parts, 0, toks)
    assert toks[a:b] == [8] * 4 + [7] * 5 and toks[:a] == [1] + [3] * 10
    assert Composer.span(parts, 0, comp.ids(parts, 0, [], max_len=64)) == (0, 0)
    assert Composer.span(parts, 0, comp.ids(parts, 0, [1, 0], max_len=2 + 16 + 4)) == (11, 15)   # one kept
