"""Stage-2 teacher training on 8 virtual CPU devices: mesh (1,1,1) vs (2,2,2) give the same losses and
adapters; kill-and-resume replays the identical loss sequence; a checkpoint restores onto another mesh;
the run writes predictions that `leader_jax.eval` reads."""
import json

import jax
import numpy as np
import pytest

from leader_jax.io import read_jsonl

N_STEPS = 10


@pytest.fixture(scope="module")
def setup(prepared_synthetic, tiny_tokenizer, tmp_path_factory):
    """(this module's run root, prepared data folder, the session's tiny tokenizer)."""
    return tmp_path_factory.mktemp("teacher"), prepared_synthetic, tiny_tokenizer


def make_cfg(setup, name, mesh, **train):
    from configs.teacher_tiny import get_config

    root, data_dir, tokenizer = setup
    c = get_config()
    c.out = str(root / name)
    c.data_dir = str(data_dir)
    c.mesh = mesh
    c.model.source = "scratch"
    # the paper's plain head: head_norm's 1/std scaling amplifies fp32 reduction-order differences between
    # meshes (head elements then differ by up to 1.5e-5 after 5 steps); head_norm is covered by the
    # feature-extraction and multi-process tests
    c.model.head_norm = False
    c.model.arch.update(dict(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2))
    c.tokenizer = str(tokenizer)
    c.data.max_len = 160
    c.data.eval_max_len = 256
    c.data.max_history = 1
    c.lora.task.rank = 4
    c.train.steps = N_STEPS
    c.train.micro_batch = 8
    c.train.accum = 2
    c.train.eval_every = 0
    c.train.ckpt_every = 5
    c.train.optim.lr = 1e-2
    c.train.optim.warmup_steps = 2
    c.eval.batch_size = 8
    c.eval.splits = ()
    c.train.update(train)
    return c


def shared_run_cfg(setup, name):
    """The config of the session's shared run (conftest `tiny_teacher_run`): make_cfg's model with head_norm
    on mesh (2,2,2), validation every 5 steps (best step kept), validation predictions."""
    c = make_cfg(setup, name, (2, 2, 2), eval_every=5)
    c.model.head_norm = True
    c.eval.splits = ("val",)
    return c


def losses(run):
    return [r["loss"] for r in read_jsonl(run / "metrics.jsonl")]


def ckpt_trainable(run, step):
    from leader_jax.train.engine import Checkpointer
    import orbax.checkpoint as ocp

    ck = Checkpointer(run / "checkpoints")
    out = ck.mngr.restore(step, args=ocp.args.Composite(trainable=ocp.args.StandardRestore()))
    ck.close()
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in
            jax.tree_util.tree_leaves_with_path(out["trainable"])}


@pytest.fixture(scope="module")
def runs(setup):
    """M1: (1,1,1) killed after 5 (ckpt 5); B: (2,2,2) killed after 7 (ckpt 5) then resumed to 10;
    A: (2,2,2) straight to 10 with predictions; C: M1's checkpoint resumed on (2,2,2)."""
    import shutil
    from leader_jax.train.teacher import train

    root = setup[0]
    out = {}
    out["M1"] = train(make_cfg(setup, "M1", (1, 1, 1), stop_after=5))
    shutil.copytree(root / "M1", root / "C")
    out["B1"] = train(make_cfg(setup, "B", (2, 2, 2), stop_after=7))
    out["B1_losses"] = losses(root / "B")
    out["B2"] = train(make_cfg(setup, "B", (2, 2, 2)))
    cfg_a = make_cfg(setup, "A", (2, 2, 2))
    cfg_a.eval.splits = ("val", "test")
    out["A"] = train(cfg_a)
    cfg_c = make_cfg(setup, "C", (2, 2, 2))
    out["C"] = train(cfg_c)
    return root, out


def test_logs_have_required_keys(runs):
    root, out = runs
    recs = read_jsonl(root / "A" / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, N_STEPS + 1))
    for r in recs:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time"} <= set(r)
        assert np.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["tokens_per_s"] > 0
    # warmup then linear decay (lr logged is the one used at that step)
    lrs = [r["lr"] for r in recs]
    np.testing.assert_allclose(lrs[:3], [0.0, 5e-3, 1e-2], rtol=1e-6)
    assert lrs[-1] < lrs[3]
    assert recs[-1]["loss"] < recs[0]["loss"]          # it learns
    assert out["A"]["n_trainable"] > 0 and out["A"]["n_frozen"] > out["A"]["n_trainable"]


def test_mesh_111_vs_222_same_losses_and_adapters(runs):
    root, out = runs
    l1, l2 = losses(root / "M1"), out["B1_losses"][:5]
    assert len(l1) == 5
    np.testing.assert_allclose(l1, l2, rtol=1e-4)
    t1, t2 = ckpt_trainable(root / "M1", 5), ckpt_trainable(root / "B", 5)
    assert t1.keys() == t2.keys() and len(t1) > 4
    assert any("task" in k for k in t1) and any("head" in k for k in t1)
    # (2,2,2) sums the batch's gradient contributions in another order than (1,1,1); Adam divides by
    # sqrt(v), so after 5 steps at lr 1e-2 a single element may differ by ~1e-5 (measured max 1.2e-5 on
    # values ~0.04). A layout bug moves whole tensors by orders of magnitude more.
    for k in t1:
        np.testing.assert_allclose(t1[k], t2[k], rtol=1e-5, atol=3e-5, err_msg=k)


def test_kill_and_resume_identical(runs):
    root, out = runs
    straight, resumed = losses(root / "A"), losses(root / "B")
    assert len(out["B1_losses"]) == 7            # killed after step 7, last checkpoint at 5
    assert [r["step"] for r in read_jsonl(root / "B" / "metrics.jsonl")] == list(range(1, N_STEPS + 1))
    assert resumed == straight                   # bit-identical replay
    ta, tb = ckpt_trainable(root / "A", N_STEPS), ckpt_trainable(root / "B", N_STEPS)
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k])


def test_checkpoint_restores_onto_other_mesh(runs):
    root, _ = runs
    np.testing.assert_allclose(losses(root / "C"), losses(root / "A"), rtol=1e-4)


def test_predictions_and_eval(runs, setup):
    from leader_jax.data.dataset import PreparedData
    from leader_jax.eval import read_predictions

    root, out = runs
    data = PreparedData.load(setup[1])
    p = read_predictions(root / "A" / "predictions" / "test.npz")
    assert p["ids"].tolist() == [s.id for s in data.splits["test"]]
    np.testing.assert_array_equal(p["y_true"], data.labels(data.splits["test"]))
    assert p["y_prob"].shape == (len(data.splits["test"]), data.vocab.n_med)
    run = json.loads((root / "A" / "run.json").read_text())
    assert run["model"] == "teacher" and run["data_dir"]
    from leader_jax.metrics import ranking_metrics
    ap, _ = ranking_metrics(p["y_true"], p["y_prob"])
    assert abs(float(np.mean(ap)) - out["A"]["test_prauc"]) < 1e-6
    # adapters exported in PEFT format + head
    assert (root / "A" / "adapters" / "task" / "adapter_model.safetensors").exists()
    assert np.load(root / "A" / "head.npy").shape == (32, data.vocab.n_med)


def test_bf16_frozen_base_fp32_trainables():
    """The frozen base is cast to bf16 inside the engine; adapters (a frozen domain adapter included), head
    and optimizer state stay fp32; the bf16 step's loss is close to the fp32 step's, and only trainable
    leaves have optimizer state."""
    import jax
    import optax
    from flax import nnx
    from leader_jax import sharding as shd
    from leader_jax.models import lora
    from leader_jax.models.llama import LlamaConfig, init_model
    from leader_jax.models.teacher import HeadParam, Teacher
    from leader_jax.train.engine import Engine, place
    from leader_jax.train.teacher import teacher_loss

    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 64, size=(1, 4, 16)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "labels": (rng.random((1, 4, 10)) < 0.3).astype(np.uint8)}
    losses = {}
    for dt in ("float32", "bfloat16"):
        base = init_model(LlamaConfig.tiny(vocab_size=64, hidden_size=32, intermediate_size=64), seed=0)
        lora.add_adapter(base, "domain", "q,v", rank=2, alpha=4, param_type=lora.DomainLoRA)
        lora.add_adapter(base, "task", "q,v", rank=2, alpha=4)
        with nnx.use_eager_sharding(False):
            t = place(Teacher(base, 10, rngs=nnx.Rngs(1)), mesh)
        e = Engine(t, nnx.Any(lora.TaskLoRA, HeadParam), optax.adam(1e-3), mesh, teacher_loss, frozen_dtype=dt)
        frozen = jax.tree.leaves(e.frozen, is_leaf=lambda x: isinstance(x, nnx.Variable))
        base_dtypes = {str(v.get_value().dtype) for v in frozen
                       if v.get_value().ndim > 1 and not isinstance(v, lora.DomainLoRA)}
        domain_dtypes = {str(v.get_value().dtype) for v in frozen if isinstance(v, lora.DomainLoRA)}
        assert base_dtypes == {dt} and domain_dtypes == {"float32"}
        assert {str(x.dtype) for x in jax.tree.leaves(e.trainable)} == {"float32"}
        opt_leaves = [x for x in jax.tree.leaves(e.opt_state) if x.ndim > 0]
        assert len(opt_leaves) == 2 * len(jax.tree.leaves(e.trainable))       # adam mu, nu: trainables only
        assert all(str(x.dtype) == "float32" for x in opt_leaves)
        sharded = {k: jax.device_put(v, jax.sharding.NamedSharding(mesh, jax.P())) for k, v in batch.items()}
        losses[dt] = e.train_step(sharded)["loss"]
    assert np.isfinite(losses["bfloat16"])
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)


# ------------------------------------------------------------------------------- resume faults
def _copy_run(root, src, dst):
    import shutil
    shutil.copytree(root / src, root / dst)
    return root / dst


def test_resume_after_best_written_before_checkpoint(tiny_teacher_run, setup):
    """Killed after best/N was written but before checkpoint N: the restart replays from the previous
    checkpoint, rewrites best/N and finishes with the uninterrupted run's losses and best step. The
    uninterrupted run is the session's shared one (conftest `tiny_teacher_run`), copied here as E."""
    import shutil
    from leader_jax.train.engine import Checkpointer
    from leader_jax.train.teacher import train

    root = setup[0]
    _, shared, straight = tiny_teacher_run
    shutil.copytree(shared, root / "E")
    want = losses(root / "E")
    assert [r["step"] for r in read_jsonl(root / "E" / "metrics.jsonl")] == list(range(1, N_STEPS + 1))
    best_steps = Checkpointer(root / "E" / "best", max_to_keep=None).steps()
    assert best_steps == [straight["best_step"]]                 # pruned to the best at the end
    # the state of a kill between best/10 and checkpoints/10: a best newer than the last checkpoint
    shutil.rmtree(root / "E" / "checkpoints" / str(N_STEPS))
    ck = Checkpointer(root / "E" / "checkpoints")
    assert ck.steps() == [5]
    ck.close()
    if straight["best_step"] != N_STEPS:                         # make best/10 exist whatever won
        shutil.copytree(root / "E" / "best" / str(straight["best_step"]), root / "E" / "best" / str(N_STEPS))
    resumed = train(shared_run_cfg(setup, "E"))
    assert resumed["steps_done"] == N_STEPS and resumed["best_step"] == straight["best_step"]
    assert resumed["best_val_prauc"] == straight["best_val_prauc"]
    assert losses(root / "E") == want
    assert Checkpointer(root / "E" / "best", max_to_keep=None).steps() == [straight["best_step"]]


def test_corrupt_latest_checkpoint_and_torn_log_fall_back(runs, setup, caplog):
    """A truncated file in the latest checkpoint: the previous one is restored with a warning naming the
    bad one; a torn last line of metrics.jsonl is dropped; the replay ends on the straight run's losses."""
    from leader_jax.train.teacher import train

    root, _ = runs
    run = _copy_run(root, "A", "D")
    bad = run / "checkpoints" / str(N_STEPS)
    files = [p for p in (bad / "trainable").rglob("*") if p.is_file() and p.stat().st_size > 64]
    assert files
    for p in files:
        p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "loss": 0.1')                       # killed mid-write
    caplog.set_level("WARNING")
    cfg = make_cfg(setup, "D", (2, 2, 2))
    cfg.eval.splits = ("val", "test")
    out = train(cfg)
    msgs = [r.getMessage() for r in caplog.records]
    assert any(str(bad) in m and "falling back" in m for m in msgs), msgs
    assert any("torn last line" in m for m in msgs), msgs
    assert out["steps_done"] == N_STEPS and losses(run) == losses(root / "A")
    assert out["test_prauc"] == pytest.approx(runs[1]["A"]["test_prauc"], abs=1e-6)


def test_resume_refuses_changed_config_or_data(runs, setup, tmp_path):
    """A run folder restarted with another config or another prepared folder is refused, naming what
    changed and how to start afresh."""
    import shutil
    from leader_jax.cli import UserError
    from leader_jax.train.teacher import train

    root, data_dir = runs[0], setup[1]
    _copy_run(root, "M1", "F")
    with pytest.raises(UserError, match=r"the config changed.*--config.train.resume=False") as e:
        train(_with_lr(make_cfg(setup, "F", (1, 1, 1)), 2e-2))
    assert "prepared data" not in str(e.value)
    other = tmp_path / "prepared"
    shutil.copytree(data_dir, other)
    stats = json.loads((other / "stats.json").read_text())
    stats["note"] = "re-prepared"
    (other / "stats.json").write_text(json.dumps(stats))
    cfg = make_cfg(setup, "F", (1, 1, 1))
    cfg.data_dir = str(other)
    with pytest.raises(UserError, match=r"the prepared data.*changed.*--config.train.resume=False"):
        train(cfg)
    cfg.train.resume = False                                      # the documented way out
    cfg.train.stop_after = 1
    assert train(cfg)["steps_done"] == 1


def _with_lr(cfg, lr):
    cfg.train.optim.lr = lr
    return cfg


def test_trainable_filter_never_trains_a_frozen_domain_adapter():
    """model.trainable_base=True trains the base (and head, task adapter) but a domain adapter only when
    lora.domain_trainable=True."""
    from flax import nnx
    from configs.teacher_tiny import get_config
    from leader_jax.models import lora
    from leader_jax.models.llama import LlamaConfig, init_model
    from leader_jax.train.teacher import trainable_filter

    m = init_model(LlamaConfig.tiny(vocab_size=64, hidden_size=16, intermediate_size=32), seed=0)
    lora.add_adapter(m, "domain", "q,v", rank=2, alpha=4, param_type=lora.DomainLoRA)
    lora.add_adapter(m, "task", "q,v", rank=2, alpha=4, param_type=lora.TaskLoRA)

    def kinds(cfg):                                         # (nnx.split leaves the model as it is)
        _, tr, _ = nnx.split(m, trainable_filter(cfg), ...)
        return {type(v).__name__ for v in jax.tree.leaves(tr, is_leaf=lambda x: isinstance(x, nnx.Variable))}

    c = get_config()
    c.lora.domain_path = "PRE/domain_adapter"
    c.model.trainable_base = True
    assert kinds(c) == {"Param", "TaskLoRA"}
    c.lora.domain_trainable = True
    assert kinds(c) == {"Param", "TaskLoRA", "DomainLoRA"}
    c.model.trainable_base = False
    assert kinds(c) == {"TaskLoRA", "DomainLoRA"}
    c.lora.domain_trainable = False
    assert kinds(c) == {"TaskLoRA"}


# ---------------------------------------------------------------- head start (model.head_init)
def test_probe_fit_is_the_optimum_and_beats_the_prior():
    """The probe's weights satisfy the optimality condition of its objective, recomputed in numpy (zero
    gradient; the objective is strictly convex in W, so this pins the unique solution); its training BCE is
    below the prior-only BCE; a huge l2 gives back the prior."""
    from leader_jax.train import head_probe

    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 12)).astype(np.float32)
    y = (rng.random((120, 7)) < 1 / (1 + np.exp(-(x @ rng.standard_normal((12, 7)) - 1.5)))).astype(np.float32)
    y[:3, 6] = 1.0                                          # a rare label with 3 positives
    l2 = 0.05
    w, b, info = head_probe.fit(x, y, l2, iters=100)
    p = 1 / (1 + np.exp(-(x.astype(np.float64) @ w + b)))
    gw = x.T.astype(np.float64) @ (p - y) / len(x) + l2 * w
    gb = (p - y).sum(0) / len(x)
    assert np.abs(gw).max() < 1e-4 and np.abs(gb).max() < 1e-4 and info["grad_norm"] < 1e-4
    assert np.abs(w).max() > 0.1                           # not the start point
    assert info["train_bce"] < info["prior_train_bce"] - 0.05
    w_big, b_big, _ = head_probe.fit(x, y, 1e6, iters=100)
    assert np.abs(w_big).max() < 1e-4
    np.testing.assert_allclose(b_big, head_probe.prior_logit(y), atol=1e-3)


def _head_run(setup, name, head_init, **model):
    cfg = make_cfg(setup, name, (1, 1, 1), steps=2, eval_every=1)
    cfg.model.head_norm = True
    cfg.model.head_init = head_init
    cfg.model.update(model)
    cfg.train.optim.warmup_steps = 1                        # step 1 runs at lr 0: the model of step 0
    cfg.eval.splits = ("val",)
    return cfg


@pytest.fixture(scope="module")
def head_runs(setup):
    from leader_jax.train.teacher import train

    root = setup[0]
    probe = _head_run(setup, "probe", "probe", head_probe_l2=(1e-3, 1.0), cache_prefix=True)
    probe.lora.task.first_layer = 1
    # zero: the shared run's model, mesh and optimizer (conftest `tiny_teacher_run`; its step 1 also runs
    # at lr 0 after warmup), stopped after step 1: it reuses that run's compiled train and predict steps
    zero = shared_run_cfg(setup, "zero")
    zero.model.head_init = "zero"
    zero.train.update(eval_every=1, stop_after=1)
    return root, {"probe": train(probe), "zero": train(zero)}


def test_probe_head_is_the_step0_teacher(head_runs):
    """head_init=probe: the l2 with the best validation PRAUC is chosen; step 0 (the probe, scored on host
    from the frozen pooled states) is offered to the best-step keeper; the engine's own validation at step
    1 (lr 0, so the step-0 model) gives the same PRAUC, so the probe installed in the teacher is exact."""
    root, out = head_runs
    s = out["probe"]
    h = s["head_init"]
    assert h["kind"] == "probe" and h["l2"] in (1e-3, 1.0)
    assert abs(h["val_prauc"] - max(h["val_prauc_by_l2"].values())) < 1e-6          # stored rounded to 1e-6
    assert abs(h["val_prauc"] - h["step0_val_prauc"]) < 1e-6
    assert h["train_bce"] < h["prior_train_bce"]
    assert len(set(h["val_prauc_by_l2"].values())) == 2    # the candidates differ
    recs = read_jsonl(root / "probe" / "metrics.jsonl")
    assert recs[0]["lr"] == 0.0
    assert abs(recs[0]["val_prauc"] - h["step0_val_prauc"]) < 1e-5
    assert s["best_val_prauc"] >= h["step0_val_prauc"] - 1e-6       # the keeper saw step 0


def test_zero_head_starts_at_the_priors(head_runs, setup):
    """head_init=zero with head_norm: the head starts at zero and the bias at the prior logit, so the
    validation of step 1 (lr 0: the step-0 model, run through the engine) scores exactly the PRAUC of
    predicting each drug's training prior (clipped) for every patient, as does the host-side step-0 score."""
    from leader_jax.data.dataset import PreparedData
    from leader_jax.train.teacher import val_prauc

    root, out = head_runs
    assert out["zero"]["head_init"]["kind"] == "zero"
    data = PreparedData.load(setup[1])
    prior = np.clip(data.labels(data.splits["train"]).mean(0), 1e-4, 1 - 1e-4)
    assert out["zero"]["n_train"] == len(data.splits["train"])       # nothing dropped: the same prior
    y_val = data.labels(data.splits["val"])
    expect = val_prauc(y_val, np.broadcast_to(prior, y_val.shape))
    # PRAUC ranks the drugs of each visit: another order of the same values scores far from it
    assert abs(val_prauc(y_val, np.broadcast_to(prior[::-1], y_val.shape)) - expect) > 1e-2
    step1 = read_jsonl(root / "zero" / "metrics.jsonl")[0]
    assert step1["lr"] == 0.0
    assert abs(step1["val_prauc"] - expect) < 1e-6
    assert abs(out["zero"]["head_init"]["step0_val_prauc"] - expect) < 1e-6


def test_head_init_config_errors():
    from configs.teacher_tiny import get_config
    from leader_jax.cli import UserError
    from leader_jax.train.teacher import validate_config

    for field, value, match in (("head_init", "xavier", "head_init"), ("head_probe_l2", (-1.0,), "head_probe_l2")):
        c = get_config()
        c.model[field] = value
        with pytest.raises(UserError, match=match):
            validate_config(c)
    c = get_config()
    c.model.head_init, c.model.head_norm = "probe", False
    with pytest.raises(UserError, match="head_norm"):
        validate_config(c)
