"""The student's fast training path: multi-step chunks (same batches as the one-step path), the
hash-based dropout, compile accounting in run.json, and the persistent compilation cache (a second run
in the same cache folder compiles nothing new; unsafe cache folders are refused)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leader_jax import compile_cache
from leader_jax.cli import UserError
from leader_jax.data.dataset import PreparedData
from leader_jax.models.student import Dropout
from leader_jax.train import exported
from leader_jax.train import student as ts
from leader_jax.train import student_inputs as si


@pytest.fixture(scope="module")
def enc(prepared_synthetic):
    data = PreparedData.load(prepared_synthetic)
    return si.encode_samples(data.splits["train"], data.vocab, 10)


def test_chunks_cover_each_row_once_and_equal_one_step_batches(enc):
    caps = si.bucket_caps(enc.needs, 3)
    buckets = si.assign_buckets(enc.needs, caps)
    plan = si.chunk_plan(buckets, 8, 4, np.random.default_rng(3))
    rows = np.concatenate([c.rows[c.rows >= 0] for c in plan])
    assert sorted(rows.tolist()) == list(range(len(enc)))               # every row exactly once
    for c in plan:
        assert 1 <= c.steps <= 4 and (c.rows[c.steps:] < 0).all() and (buckets[c.rows[c.rows >= 0]] == c.bucket).all()
        assert (c.rows[: c.steps - 1] >= 0).all()                      # only a bucket's last batch is partial
    n_batches = sum(c.steps for c in plan)
    assert n_batches == sum(-(-int((buckets == b).sum()) // 8) for b in np.unique(buckets))
    c = max(plan, key=lambda c: c.steps)
    chunk = si.make_chunk(enc, c.rows, caps[c.bucket])
    for k in range(c.steps):
        real = c.rows[k][c.rows[k] >= 0]
        one = si.make_batch(enc, real, caps[c.bucket], 8)
        assert one.keys() == chunk.keys()
        for name in one:
            np.testing.assert_array_equal(chunk[name][k], one[name], err_msg=name)
    assert (chunk["weight"][c.steps:] == 0).all() and (chunk["diag"][c.steps:] == 0).all()


def test_dropout_masks_are_deterministic_and_keep_the_rate():
    x = jnp.ones((64, 50, 32))

    @jax.jit        # one compile for all the masks (eagerly, every hash op compiles on its own)
    def masks(seed_a, seed_b):
        key = jax.random.key(seed_a, impl="rbg")
        a = Dropout(key)
        first, second = a(x, 0.4), a(x, 0.4)                          # two calls of one Dropout
        return first, Dropout(key)(x, 0.4), second, Dropout(jax.random.key(seed_b, impl="rbg"))(x, 0.4)

    y1, y2, y_next, y_other = (np.asarray(y) for y in masks(3, 4))
    np.testing.assert_array_equal(y1, y2)                                # same key and call → same mask
    keep = y1 > 0
    assert abs(keep.mean() - 0.6) < 0.005 and np.allclose(y1[keep], 1 / 0.6)
    assert ((y_next > 0) != keep).mean() > 0.4                           # the next call draws a new mask
    other = y_other > 0
    assert abs((other == keep).mean() - (0.6 ** 2 + 0.4 ** 2)) < 0.01   # independent of the other key's
    assert Dropout(None)(x, 0.4) is x


def test_unsafe_cache_folder_is_refused(tmp_path):
    bad = tmp_path / "shared"
    bad.mkdir(mode=0o777)
    os.chmod(bad, 0o777)
    with pytest.raises(UserError, match=f"refusing the compilation cache folder: {bad} has mode 0o777"):
        compile_cache.enable(bad)
    assert compile_cache.active_dir() is None


@pytest.fixture
def cache_dir(tmp_path):
    folder = compile_cache.enable(tmp_path / "xla")
    yield folder
    compile_cache.enable()                      # back to the session's setting (off in tests)


def _cfg(data_dir, out):
    """The smallest training program with two buckets: what is counted and cached does not depend on
    the model's parts, and without dropout, profile and alignment this file takes ≈ 0.6× the CPU time."""
    from configs.student import get_config
    c = get_config()
    c.update(dict(seed=0, distill=False, data_dir=str(data_dir), out=str(out)))
    c.model.update(dict(d=16, heads=2, ffn=32, head_hidden=32, bucket_levels=2, inference_kernel="off",
                        dropout=0.0, attn_dropout=0.0, use_profile=False))
    c.loss.align_weight = 0.0
    c.train.update(dict(batch_size=32, epochs=1, steps_per_call=4))
    c.eval.batch_size = 64
    return c


def test_two_bucket_run_counts_its_compiles_and_a_rerun_hits_the_cache(prepared_synthetic, cache_dir, tmp_path):
    first = ts.train(_cfg(prepared_synthetic, tmp_path / "a")).summary
    assert len(first["buckets"]) == 2
    assert first["compile_counts"] == {"train_step": 2, "predict_step": 1}     # one train loop per bucket
    c1 = json.loads((tmp_path / "a" / "run.json").read_text())["compile"]
    assert c1 == first["compile"] and c1["persistent_cache"] == str(cache_dir)
    assert c1["by_function"]["jit(train_chunk)"] == 2 and c1["by_function"]["jit(predict_packed_step)"] == 1
    assert c1["compiles"] >= 3 and c1["compile_seconds"] > 0 and c1["cache_misses"] >= 3
    assert first["launch_clock"] == ("proc" if os.path.exists("/proc/self/stat") else "import")
    assert first["seconds_from_launch_to_first_step"] > first["seconds_to_first_step"]
    files = sorted(p.name for p in cache_dir.iterdir())
    assert len(files) >= 3
    # a second process-like run (new trainer, new jitted functions) in the same cache folder
    second = ts.train(_cfg(prepared_synthetic, tmp_path / "b")).summary
    c2 = second["compile"]
    assert c2["cache_misses"] == 0 and c2["cache_hits"] >= 3 and c2["by_function"]["jit(train_chunk)"] == 2
    assert sorted(p.name for p in cache_dir.iterdir()) == files            # nothing new written
    assert second["val"] == first["val"]                                    # the cached programs compute the same
    # the training loops' traced programs: written once per bucket by the first run, read by the second
    assert c1["exported_programs"] == {"loaded": 0, "traced": 2}
    assert c2["exported_programs"] == {"loaded": 2, "traced": 0}
    assert len(list(exported.exported_dir().iterdir())) == 2
    # and the plain jitted path (compilation cache off) computes exactly the same run
    assert compile_cache.enable() is None                                   # the session's setting: off
    third = ts.train(_cfg(prepared_synthetic, tmp_path / "c")).summary
    assert third["compile"]["exported_programs"] == {"loaded": 0, "traced": 0}
    assert third["val"] == first["val"] and third["test"] == first["test"]


def test_exported_program_is_keyed_by_its_inputs_and_a_damaged_file_is_traced_again(cache_dir, caplog):
    """ExportedJit on a small sharded, donating function: equal to the jitted function; a new object (a new
    process) reads the program instead of tracing; another key, another input shape or a changed module
    source gives another file; a damaged file is traced again and rewritten, with a warning."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

    def step(w, x, scale):
        return {"w": w["w"] - scale * x.sum(0)}, x.mean()

    def make(key="k", modules=("leader_jax.train.exported",)):
        jitted = jax.jit(step, in_shardings=({"w": rep}, rows, rep), out_shardings=({"w": rep}, rep),
                         donate_argnums=(0,))
        return exported.ExportedJit(jitted, step, name="step", key=key, modules=modules, donate_argnums=(0,),
                                    shardings=lambda w, x, s: (({"w": rep}, rows, rep), ({"w": rep}, rep)))

    def args(n=16):
        x = jax.device_put(np.arange(n * 3, dtype=np.float32).reshape(n, 3), rows)
        return {"w": jax.device_put(np.ones(3, np.float32), rep)}, x, np.float32(0.5)

    want = jax.device_get(jax.jit(step)(*args()))
    first = make()
    got = first(*args())
    np.testing.assert_array_equal(got[0]["w"], want[0]["w"])
    np.testing.assert_array_equal(got[1], want[1])
    assert got[0]["w"].sharding == rep and (first.traced, first.loaded, first.cache_size()) == (1, 0, 1)
    folder = exported.exported_dir()
    assert folder == cache_dir.with_name("xla_exported") and oct(folder.stat().st_mode & 0o777) == "0o700"
    [path] = folder.iterdir()
    again = make()
    np.testing.assert_array_equal(again(*args())[0]["w"], want[0]["w"])
    assert (again.traced, again.loaded) == (0, 1)
    make(key="other")(*args())                                       # another structure key
    make()(*args(n=24))                                              # another input shape
    exported.source_digest.cache_clear()
    make(modules=("leader_jax.train.exported", "leader_jax.sharding"))(*args())   # other defining sources
    assert len(list(folder.iterdir())) == 4
    path.write_bytes(b"not a program")
    damaged = make()
    with caplog.at_level("WARNING", logger="leader_jax.train.exported"):
        np.testing.assert_array_equal(damaged(*args())[0]["w"], want[0]["w"])
    assert (damaged.traced, damaged.loaded) == (1, 0) and "is unreadable" in caplog.text
    assert path.read_bytes() != b"not a program"
