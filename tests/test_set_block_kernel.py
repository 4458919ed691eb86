"""The CPU inference kernel (leader_jax/kernels/set_block.cc) against the pure-JAX student block (the
flat packer and the trainer's kernel/XLA switch are tested in test_student.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leader_jax import sharding
from leader_jax.kernels import set_block
from leader_jax.models import student as ms


def _model(**kw):
    cfg = ms.StudentConfig(n_diag=60, n_proc=12, n_med=9, **kw)
    with sharding.use_mesh(sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])):
        return ms.build_student(cfg, 3)


def _reference(block, emb, sets):
    """Per set: masked mean of the padded block output (the training forward pass)."""
    w = max(len(s) for s in sets)
    ids = np.zeros((len(sets), w), np.int32)
    for i, s in enumerate(sets):
        ids[i, :len(s)] = s
    mask = jnp.asarray(ids > 0)
    return np.array(ms.masked_mean(block(emb(jnp.asarray(ids)), mask, ms.Dropout(None)), mask, 1))


@pytest.mark.parametrize("heads,ffn", [(4, 300), (8, 40), (2, 16)])   # head size 16, 8 (scalar path), 32
def test_kernel_matches_block_set_means(heads, ffn):
    ok, why = set_block.available()
    assert ok, why
    model = _model(heads=heads, ffn=ffn)
    rng = np.random.default_rng(heads)
    lens = [3, 0, 1, 16, 17, 7, 40, 2, 33]            # empty, single, exactly one and several key vectors
    sets = [list(rng.choice(np.arange(1, 61), n, replace=False)) for n in lens]
    # the kernel reads sets as runs of an index array: put them in shuffled order with a gap between
    order = rng.permutation(len(sets))
    idx, starts = [7, 7], np.zeros(len(sets), np.int32)
    for s in order:
        starts[s] = len(idx)
        idx += sets[s] + [5]
    table = model.inference_tables()["diag"]
    counts = np.asarray(lens, np.int32)
    f = jax.jit(lambda t, i, a, c: set_block.set_block_means(model.diag_enc, t, i, a, c))
    got = np.asarray(f(table, jnp.asarray(idx, jnp.int32), jnp.asarray(starts), jnp.asarray(counts)))
    assert got.shape == (len(sets), 64)
    want = _reference(model.diag_enc, model.diag_emb, [s if s else [0] for s in sets])
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    assert np.all(got[counts == 0] == 0.0) and np.all(np.abs(got[counts > 0]).sum(1) > 0)
    # threads only split the work: one thread gives the same numbers
    one = jax.jit(lambda t, i, a, c: set_block.set_block_means(model.diag_enc, t, i, a, c, threads=1))
    np.testing.assert_array_equal(np.asarray(one(table, jnp.asarray(idx, jnp.int32), jnp.asarray(starts),
                                                 jnp.asarray(counts))), got)


def test_kernel_rejects_sets_outside_idx():
    model = _model()
    table = model.inference_tables()["diag"]
    f = jax.jit(lambda a, c: set_block.set_block_means(model.diag_enc, table, jnp.asarray([1, 2, 3], jnp.int32), a, c))
    with pytest.raises(Exception, match="a set lies outside idx"):
        jax.block_until_ready(f(jnp.asarray([2], jnp.int32), jnp.asarray([5], jnp.int32)))


def test_build_names_a_missing_compiler():
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler 'no-such-cxx'"):
        set_block.build(cxx="no-such-cxx")
