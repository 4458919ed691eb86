"""Stage 2: `python -m leader_jax.train.teacher --config configs/teacher_tiny.py --out RUN`.

Loads the base LLaMA (+ the stage-1 domain adapter, frozen or trainable), adds a task adapter and the
drug head, and trains them with sigmoid BCE on the teacher prompts (sharded, gradient accumulation,
warmup + linear decay, clipping, optional bf16 frozen base and remat). Every `train.eval_every` steps the
validation PRAUC is computed and the best step's trainable weights are kept in `RUN/best/` (the final
adapters, head and predictions come from that step). Writes
`RUN/metrics.jsonl`, `RUN/checkpoints/` (resume), `RUN/best/`, `RUN/adapters/task/` (HF PEFT format),
`RUN/head.npy` (+ `RUN/head_bias.npy` with `model.head_norm`), `RUN/predictions/{val,test}.npz`,
`RUN/run.json`, `RUN/config.json`, `RUN/summary.json` (with the compile count and the padding fraction),
and `RUN/tokenizer/` when the base is a GGUF file.

Sequences are padded to length buckets (`data.length_buckets`, see `length_buckets`), not to one fixed
length. With `lora.task.first_layer=K` the task adapter sits on layers K.. only; `model.cache_prefix`
then runs the frozen layers below K once per sample and trains on their cached output
(`models.frozen_prefix`): same loss and gradients, less compute. `model.head_init` starts the head
(`normal`, `zero`, or `probe`: a logistic probe on the frozen pooled states, `head_probe`); with `zero` and
`probe` step 0 is scored on validation and can be the kept best step.

`retrieval.mode=fixed` shows the k most similar training visits in every prompt of the run (training,
validation, the head statistics and probe, predictions): the memory and the candidate pools are written to
`RUN/retrieval/` (`leader_jax.retrieval.run_prompts`; docs/retrieval.md). `retrieval.mode=joint` also
trains a re-ranker (`teacher.reranker`, its own optimizer group) that picks those k from each pool; the
prompts are composed per step from the current ranking (`leader_jax.retrieval.joint`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from leader_jax.cli import UserError
from leader_jax.models import frozen_prefix as fp, lora
from leader_jax.models.teacher import POOLS, HeadParam, Teacher, bce_loss, forward
from leader_jax.retrieval import joint as rjoint, validate_config as validate_retrieval
from leader_jax.retrieval.run_prompts import RunRetrieval
from leader_jax.train import common, head_probe, loop, text_batches as tdata, distributed
from leader_jax.train.length_buckets import BucketedStream, PadStats, bucket_set, validate_buckets
from leader_jax.train.engine import Checkpointer, Engine, place

SOURCES = ("hf", "scratch")
FROZEN_DTYPES = ("float32", "bfloat16", "float16")
HEAD_INITS = ("normal", "zero", "probe")


# ----------------------------------------------------------------------------------------- building
def trainable_filter(cfg: ConfigDict):
    """What stage 2 trains: head + task adapter (+ the domain adapter when `lora.domain_trainable`);
    `model.trainable_base` adds every base weight, never a domain adapter that is meant to stay frozen."""
    domain_trainable = bool(cfg.lora.domain_path) and bool(cfg.lora.domain_trainable)
    if cfg.model.trainable_base:                      # full fine-tuning (tiny from-scratch models)
        return nnx.Param if domain_trainable else nnx.All(nnx.Param, nnx.Not(lora.DomainLoRA))
    parts = [HeadParam]
    if cfg.retrieval.mode == "joint":                 # the re-ranker (retrieval.joint)
        parts.append(nnx.PathContains(rjoint.RERANKER))
    if cfg.lora.task.rank > 0:
        parts.append(lora.TaskLoRA)
    if domain_trainable:
        parts.append(lora.DomainLoRA)
    return nnx.Any(*parts)


def build_teacher(cfg: ConfigDict, n_med: int, mesh, *, vocab=None) -> Teacher:
    """Base (+ domain adapter) + task adapter + head (+ with `retrieval.mode=joint` the re-ranker as
    `teacher.reranker`, sized by the prepared `vocab`), every variable on `mesh`."""
    _, base = common.load_base(cfg.model, mesh, cfg.seed)
    if cfg.lora.domain_path:
        if not Path(cfg.lora.domain_path).exists():
            raise UserError(f"lora.domain_path={cfg.lora.domain_path}: folder not found")
        lora.load_adapter(base, cfg.lora.domain_path, name="domain", param_type=lora.DomainLoRA)
    t = cfg.lora.task
    n_layers = base.config.num_hidden_layers
    if int(t.first_layer) > n_layers:
        raise UserError(f"lora.task.first_layer={t.first_layer} > the model's {n_layers} layers")
    if cfg.model.cache_prefix and cfg.lora.domain_path:
        lower = [i for i in lora.adapter_config(base, "domain")["layers"] if i < int(t.first_layer)]
        if lower and lora.adapter_config(base, "domain")["dropout"] > 0:
            raise UserError(f"model.cache_prefix: the domain adapter {cfg.lora.domain_path} has dropout > 0 in "
                            f"the cached layers < lora.task.first_layer={t.first_layer}")
    if t.rank > 0:
        try:
            lora.add_adapter(base, "task", t.targets, rank=t.rank, alpha=t.alpha, dropout=t.dropout,
                             param_type=lora.TaskLoRA, seed=cfg.seed + 1,
                             layers=range(int(t.first_layer), n_layers) if int(t.first_layer) else None)
        except ValueError as e:
            raise UserError(f"lora.task: {e}") from None
    with nnx.use_eager_sharding(False):
        teacher = Teacher(base, n_med, rngs=nnx.Rngs(cfg.seed + 2), pool=cfg.model.pool,
                          head_norm=bool(cfg.model.head_norm))
        if cfg.retrieval.mode == "joint":
            if vocab is None:
                raise ValueError("build_teacher: retrieval.mode=joint needs the prepared vocab")
            rjoint.attach_reranker(teacher, cfg.retrieval, vocab, cfg.seed + 3)
    return place(teacher, mesh)


def teacher_loss(model: Teacher, mb: dict):
    logits, _ = forward(model, mb)
    return bce_loss(logits, mb["labels"]), {}


def teacher_predict(model: Teacher, b: dict):
    logits, pooled = forward(model, b)
    return jax.nn.sigmoid(logits), pooled


def tokenizer_path(cfg: ConfigDict) -> str:
    return cfg.tokenizer or cfg.model.path


def eval_max_len(cfg: ConfigDict) -> int:
    """Length limit of predictions and features (`data.eval_max_len`; 0 = `data.max_len`)."""
    return int(cfg.data.eval_max_len) or int(cfg.data.max_len)


def encode_split(cfg: ConfigDict, prepared, split: str, tokenizer, special,
                 training: bool | None = None, retrieval: RunRetrieval | None = None) -> tdata.Encoded:
    """Training encoding (max_len, overlong samples dropped) for the train split during training;
    evaluation encoding (eval_max_len, nothing dropped) otherwise (predictions, feature store).
    `retrieval` (required when `retrieval.mode` is not none): the run's neighbours go into every prompt
    (mode joint: ranked by the re-ranker it follows at this moment)."""
    samples = prepared.splits[split]
    if not samples:
        raise UserError(f"prepared data {cfg.data_dir}: split {split!r} is empty")
    if (retrieval is None) != (cfg.retrieval.mode == "none"):
        raise ValueError(f"encode_split: retrieval.mode={cfg.retrieval.mode} but retrieval="
                         f"{'given' if retrieval is not None else 'None'}")
    is_train = (split == "train") if training is None else training
    max_len = cfg.data.max_len if is_train else eval_max_len(cfg)
    kw = dict(max_history=cfg.data.max_history, profile=cfg.data.profile, labels=prepared.labels(samples),
              overlong="drop" if is_train else "error")
    try:
        if retrieval is not None:
            return retrieval.encode(samples, split, tokenizer, special, max_len, **kw)
        return tdata.encode_samples(samples, prepared.vocab, tokenizer, special, max_len, split=split, **kw)
    except ValueError as e:
        raise UserError(str(e)) from None


def predict_split(engine: Engine, enc: tdata.Encoded, batch_size: int, desc: str = "predict", **kw):
    """(probs float32 [N, n_med], pooled float32 [N, D]) over a whole split (process-gathered); `kw`:
    buckets, stats, prefix, fn of `loop.gather`."""
    probs, pooled = loop.gather(engine, enc, batch_size, desc=desc, **kw)
    return probs.astype(np.float32), pooled.astype(np.float32)


def set_head(engine: Engine, **values: np.ndarray) -> None:
    """Overwrite head variables of the trainable state by name (`head`, `head_mean`, `head_scale`,
    `head_bias`), keeping their dtype and sharding."""
    def put(path, x):
        hit = [n for n in (getattr(p, "key", getattr(p, "name", None)) for p in path) if n in values]
        return jax.device_put(np.asarray(values[hit[-1]]).astype(x.dtype), x.sharding) if hit else x

    engine.trainable = jax.tree_util.tree_map_with_path(put, engine.trainable)


def set_head_stats(engine: Engine, enc: tdata.Encoded, batch_size: int, **kw) -> np.ndarray:
    """head_norm: mean and 1/std of the initial pooled state over the training split, and the head bias
    at the logit of each drug's training prior (clipped to [1e-4, 1 - 1e-4]). Returns the training split's
    standardised pooled states (what the head sees at step 0; the probe's features)."""
    _, pooled = predict_split(engine, enc, batch_size, desc="head stats", **kw)
    mean = pooled.mean(0)
    inv = 1.0 / (pooled.std(0) + 1e-6)
    set_head(engine, head_mean=mean, head_scale=inv, head_bias=head_probe.prior_logit(enc.labels))
    return (pooled - mean) * inv


def probe_l2s(m: ConfigDict) -> list[float]:
    """The probe's l2 candidates (`model.head_probe_l2`: one value or a tuple)."""
    v = m.head_probe_l2
    return [float(x) for x in (v if isinstance(v, (tuple, list)) else (v,))]


def init_head(cfg: ConfigDict, engine: Engine, train_enc, val_enc, batch_size: int, *, train_kw: dict,
              val_kw: dict) -> tuple[dict, np.ndarray | None]:
    """Start of the head at step 0: `head_norm` statistics (and bias at the prior logit), then the weights by
    `model.head_init`: normal = N(0, 0.02) as built; zero = 0 (with head_norm the step-0 probabilities are
    exactly the training priors); probe = the L2-regularised logistic regression on the frozen model's
    standardised pooled states (`head_probe`; l2 chosen on validation PRAUC). Returns (summary record,
    validation probabilities of the step-0 model or None when not known without a validation pass)."""
    m = cfg.model
    feats = set_head_stats(engine, train_enc, batch_size, **train_kw) if m.head_norm else None
    if m.head_init == "normal":
        return {"kind": "normal"}, None
    n_med = int(train_enc.labels.shape[1])
    if m.head_init == "zero":
        dim = int(engine.model().llama.config.hidden_size)
        set_head(engine, head=np.zeros((dim, n_med), np.float32))
        if not m.head_norm:
            return {"kind": "zero"}, None
        prior = jax.nn.sigmoid(head_probe.prior_logit(train_enc.labels))
        return {"kind": "zero"}, np.broadcast_to(np.asarray(prior, np.float32), val_enc.labels.shape)
    # probe (validate_config: needs head_norm): the frozen model's validation pooled states, standardised
    _, val_pooled = predict_split(engine, val_enc, batch_size, desc="probe val", **val_kw)
    model = engine.model()
    val_feats = (val_pooled - np.asarray(model.head_mean[...])) * np.asarray(model.head_scale[...])
    probe = head_probe.choose(feats, train_enc.labels, val_feats, val_enc.labels,
                              probe_l2s(m), int(m.head_probe_iters), val_prauc)
    set_head(engine, head=probe.w, head_bias=probe.b)
    rec = {"kind": "probe", "l2": probe.l2, "val_prauc": probe.val_prauc, **probe.info}
    return rec, head_probe.predict(val_feats, probe.w, probe.b)


def val_prauc(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    from leader_jax.metrics import ranking_metrics
    ap, _ = ranking_metrics(y_true, y_prob)
    return float(np.mean(ap))


# ----------------------------------------------------------------------------------------- training
def validate_config(cfg: ConfigDict) -> None:
    """UserError on a bad stage-2 config value (the mesh-dependent batch checks come later)."""
    m = cfg.model
    if m.source not in SOURCES:
        raise UserError(f"model.source={m.source!r}; expected {' | '.join(SOURCES)}")
    if m.pool not in POOLS:
        raise UserError(f"model.pool={m.pool!r}; expected {' | '.join(POOLS)}")
    if m.frozen_dtype not in FROZEN_DTYPES:
        raise UserError(f"model.frozen_dtype={m.frozen_dtype!r}; expected {' | '.join(FROZEN_DTYPES)}")
    common.check_dot_dtype(m)
    if m.head_init not in HEAD_INITS:
        raise UserError(f"model.head_init={m.head_init!r}; expected {' | '.join(HEAD_INITS)}")
    if m.head_init == "probe" and not m.head_norm:
        raise UserError("model.head_init=probe needs model.head_norm=True (the probe is fitted on the "
                        "standardised pooled states and uses the head bias)")
    l2s = probe_l2s(m)
    if not l2s or any(float(v) < 0 for v in l2s) or int(m.head_probe_iters) <= 0:
        raise UserError(f"model.head_probe_l2={m.head_probe_l2} must be one or more values >= 0 and "
                        f"model.head_probe_iters={m.head_probe_iters} positive")
    d = cfg.data
    if int(d.max_len) <= 2 or int(d.eval_max_len) < 0 or int(d.max_history) < 0:
        raise UserError(f"data.max_len={d.max_len} must be > 2, data.eval_max_len={d.eval_max_len} and "
                        f"data.max_history={d.max_history} >= 0")
    t = cfg.lora.task
    if int(t.rank) < 0 or not 0 <= float(t.dropout) < 1:
        raise UserError(f"lora.task.rank={t.rank} must be >= 0 (0 = no task adapter) and lora.task.dropout="
                        f"{t.dropout} in [0, 1)")
    if cfg.lora.domain_trainable and not cfg.lora.domain_path:
        raise UserError("lora.domain_trainable=True needs lora.domain_path (a stage-1 domain adapter)")
    try:
        validate_buckets("data.length_buckets", d.length_buckets)
    except ValueError as e:
        raise UserError(str(e)) from None
    if int(t.first_layer) < 0:
        raise UserError(f"lora.task.first_layer={t.first_layer} must be >= 0 (0 = every layer)")
    if m.cache_prefix:
        if int(t.first_layer) <= 0:
            raise UserError("model.cache_prefix=True needs lora.task.first_layer > 0 (the frozen layers below it "
                            "are cached)")
        if m.trainable_base or cfg.lora.domain_trainable:
            raise UserError("model.cache_prefix=True needs frozen lower layers: set model.trainable_base=False "
                            "and lora.domain_trainable=False")
    if int(cfg.train.eval_every) < 0:
        raise UserError(f"train.eval_every must be >= 0 (0 = keep the last step), got {cfg.train.eval_every}")
    if int(cfg.eval.batch_size) <= 0:
        raise UserError(f"eval.batch_size must be positive, got {cfg.eval.batch_size}")
    loop.validate_train(cfg.train)
    validate_retrieval(cfg.retrieval, prefix="retrieval.")
    if cfg.retrieval.mode == "joint" and m.cache_prefix:
        raise UserError("model.cache_prefix=True cannot run with retrieval.mode=joint (the prompts change with "
                        "the re-ranker at every step; nothing per sample can be cached)")


class BestKeeper:
    """The best-validation weights in RUN/best (every kept step; pruned explicitly). A step's best is
    kept until a later regular checkpoint records a newer one, so a resumed run (which replays every
    step after its checkpoint, validations included) always finds the best of the step it restored."""

    def __init__(self, run: Path):
        self.ckpt = Checkpointer(run / "best", max_to_keep=None)
        self.val, self.step = -1.0, -1

    def resumed(self, meta: dict | None, step: int) -> None:
        """State of the restored checkpoint; bests written after it (they will be replayed) are dropped."""
        if meta is not None:
            self.val, self.step = float(meta["best_val"]), int(meta["best_step"])
        for s in self.ckpt.steps():
            if s > step or meta is None:                   # a fresh start keeps nothing (step 0 included)
                self.ckpt.delete(s)

    def offer(self, engine: Engine, val: float) -> None:
        if val > self.val:
            self.val, self.step = val, engine.step
            self.ckpt.save(engine.step, engine.trainable, None, {"step": engine.step, "val_prauc": val})

    def prune(self) -> None:
        """Drop kept steps older than the current best (only once a regular checkpoint recorded it)."""
        for s in self.ckpt.steps():
            if s < self.step:
                self.ckpt.delete(s)

    def meta(self) -> dict:
        return {"best_val": self.val, "best_step": self.step}


def train(cfg: ConfigDict) -> dict[str, Any]:
    """Run stage 2 in `cfg.out`; returns the summary dict."""
    validate_config(cfg)
    if not cfg.data_dir:
        raise UserError("set --config.data_dir=PREPARED (a folder written by python -m leader_jax.data.prepare)")
    if not cfg.out:
        raise UserError("set --out RUN (the run folder)")
    run, prepared = common.start_run(cfg)
    mesh = common.make_mesh(cfg)
    tok = common.load_run_tokenizer(tokenizer_path(cfg), run)
    special = tdata.SpecialIds.from_tokenizer(tok)
    retr = RunRetrieval.for_training(cfg.retrieval, prepared, run, write=distributed.is_main_process())
    joint = cfg.retrieval.mode == "joint"

    tr = cfg.train
    common.check_batch_sizes(mesh, {"train.micro_batch": tr.micro_batch, "eval.batch_size": cfg.eval.batch_size})
    teacher = build_teacher(cfg, prepared.vocab.n_med, mesh, vocab=prepared.vocab)
    tx, schedule = loop.make_tx(tr)
    k = int(cfg.lora.task.first_layer) if cfg.model.cache_prefix else 0
    if joint:
        tx, loss_fn = rjoint.joint_tx(tx, float(cfg.retrieval.joint.lr)), rjoint.JointLoss.from_config(cfg.retrieval)
    else:
        loss_fn = fp.UpperLoss(k) if k else teacher_loss
    engine = Engine(teacher, trainable_filter(cfg), tx, mesh, loss_fn, frozen_dtype=cfg.model.frozen_dtype,
                    predict_fn=teacher_predict)
    ckpt = Checkpointer(run / "checkpoints", max_to_keep=2)
    best = BestKeeper(run)
    identity = common.run_identity(cfg, prepared.fingerprint())
    meta = loop.resume(engine, ckpt, tr, identity, run)
    best.resumed(meta, engine.step)
    if retr is not None:
        retr.follow(engine)              # joint: prompts ranked by the engine's (restored) re-ranker
    train_enc = encode_split(cfg, prepared, "train", tok, special, retrieval=retr)
    val_enc = encode_split(cfg, prepared, "val", tok, special, retrieval=retr)
    eval_bs = int(cfg.eval.batch_size)
    buckets = tuple(int(b) for b in cfg.data.length_buckets) or None
    stats = {"train": PadStats(), "eval": PadStats(), "prefix": PadStats()}
    stream = BucketedStream(train_enc.lengths, bucket_set(buckets, cfg.data.max_len), tr.accum * tr.micro_batch,
                            cfg.seed) if buckets and not joint else None
    caches = {name: fp.PrefixCache(engine, enc, k, eval_bs, buckets=buckets, stats=stats["prefix"],
                                   desc=f"frozen prefix {name}")
              for name, enc in (("train", train_enc), ("val", val_enc))} if k else {}
    cached = (lambda name: {"prefix": caches[name], "fn": fp.UpperPredict(k)}) if k else (lambda name: {})
    head_file = run / "head_init.json"
    if engine.step == 0:
        head_rec, val0 = init_head(cfg, engine, train_enc, val_enc, eval_bs,
                                   train_kw={"buckets": buckets, **cached("train")},
                                   val_kw={"buckets": buckets, "stats": stats["eval"], **cached("val")})
        if val0 is not None and tr.eval_every:  # step 0 competes for the best step (the probe, the prior)
            head_rec["step0_val_prauc"] = val_prauc(val_enc.labels, val0)
            best.offer(engine, head_rec["step0_val_prauc"])
        common.write_json(head_file, head_rec)
    log = common.open_log(run, engine.step)
    info = {"n_trainable": engine.n_trainable(), "n_frozen": engine.n_frozen(), **common.mesh_info(mesh),
            "n_train": len(train_enc), "n_val": len(val_enc),
            "train_truncated": train_enc.n_truncated, "val_truncated": val_enc.n_truncated,
            "train_history_dropped": train_enc.n_history_dropped,
            "train_dropped_overlong": len(train_enc.dropped_ids),
            "length_buckets": {"train": list(bucket_set(buckets or (), cfg.data.max_len)),
                               "eval": list(bucket_set(buckets or (), eval_max_len(cfg)))},
            "head_init": json.loads(head_file.read_text()) if head_file.exists() else {"kind": cfg.model.head_init},
            "prompt_tokens": {"train_mean": float(train_enc.lengths.mean()), "val_mean": float(val_enc.lengths.mean())},
            "retrieval": retr.info() if retr is not None else {"mode": "none"}}

    def validate(done: int) -> dict | None:
        if not tr.eval_every or (done % tr.eval_every and done != tr.steps):
            return None
        enc = encode_split(cfg, prepared, "val", tok, special, retrieval=retr) if joint else val_enc
        probs, _ = predict_split(engine, enc, eval_bs, desc="val", buckets=buckets, stats=stats["eval"],
                                 **cached("val"))
        val = val_prauc(enc.labels, probs)
        best.offer(engine, val)
        return {"val_prauc": val}

    if joint:                            # per step: the current ranking's top-k + m sampled candidates
        batches = rjoint.JointBatches(
            retr.parts(prepared.splits["train"], "train", tok, special, int(cfg.data.max_len),
                       max_history=cfg.data.max_history, profile=cfg.data.profile,
                       labels=prepared.labels(prepared.splits["train"]), overlong="drop"),
            retr.composer(tok, special), retr.ranker, rjoint.memory_drug_sets(retr.memory), cfg.retrieval,
            accum=int(tr.accum), micro=int(tr.micro_batch), seed=int(cfg.seed), mesh=mesh,
            max_len=int(cfg.data.max_len), lengths=bucket_set(buckets or (), cfg.data.max_len),
            stats=stats["train"])
        next_batch, after_step = batches, (lambda done: {**batches.info, **(validate(done) or {})})
    else:
        next_batch = lambda step: tdata.train_batch(train_enc, step, tr.accum, tr.micro_batch, cfg.seed,
                                                    mesh, stream=stream, stats=stats["train"],
                                                    prefix=caches.get("train"))
        after_step = validate

    def ckpt_meta() -> dict:
        return {**identity, **best.meta()}

    res = loop.fit(engine, ckpt, tr, log=log, desc="teacher", schedule=schedule, after_step=after_step,
                   next_batch=next_batch, meta=ckpt_meta, after_checkpoint=best.prune)
    summary = {**info, "steps_done": res.steps_done, "train_seconds_this_run": res.seconds,
               "best_step": best.step, "best_val_prauc": best.val}
    if caches:
        summary["prefix_cache"] = {"layers": k, **{name: c.info() for name, c in caches.items()}}
    if not res.finished:                                       # stopped early (stop_after)
        return loop.write_unfinished(run, {**summary, **run_costs(engine, stats)})

    # ---- final: the best step's weights -> adapters, head, predictions
    if best.step >= 0:
        tr_best, _, _ = best.ckpt.restore(best.step, jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), engine.trainable))
        engine.trainable = tr_best
    finish(cfg, engine, prepared, tok, special, run, summary, buckets=buckets, stats=stats,
           cached={"val": cached("val")} if k else None, retrieval=retr)
    return summary


def run_costs(engine: Engine, stats: dict[str, PadStats]) -> dict[str, Any]:
    """summary.json fields on what this run computed: compilations (distinct batch shapes per compiled
    function) and, per phase, the padding fraction (padded positions / positions computed)."""
    return {"compiles": engine.compiles(),
            "padding": {name: st.summary() for name, st in stats.items() if st.computed_tokens}}


def finish(cfg, engine: Engine, prepared, tok, special, run: Path, summary: dict, *, buckets=None,
           stats: dict[str, PadStats] | None = None, cached: dict[str, dict] | None = None,
           retrieval: RunRetrieval | None = None) -> None:
    """Export the adapters and head, write the predictions of `eval.splits` (a split in `cached` runs on
    its frozen-prefix cache: the same values, computed from the cached activations), run.json, summary."""
    host = distributed.host_copy(engine.trainable)           # collective: every process calls it
    model = nnx.merge(engine.graphdef_eval, host, engine.rng_keys, engine.frozen)
    if distributed.is_main_process():
        if cfg.lora.task.rank > 0:
            lora.save_adapter(model.llama, "task", run / "adapters" / "task",
                              base_model_name_or_path=str(cfg.model.path))
        if cfg.lora.domain_path and cfg.lora.domain_trainable:
            lora.save_adapter(model.llama, "domain", run / "adapters" / "domain",
                              base_model_name_or_path=str(cfg.model.path))
        from leader_jax.io import atomic_save_npy
        atomic_save_npy(run / "head.npy", np.asarray(jax.device_get(model.head[...])))
        if model.head_norm:
            atomic_save_npy(run / "head_bias.npy", np.asarray(jax.device_get(model.head_bias[...])))
    from leader_jax.eval import write_predictions

    for split in cfg.eval.splits:
        enc = encode_split(cfg, prepared, split, tok, special, retrieval=retrieval)
        probs, _ = predict_split(engine, enc, int(cfg.eval.batch_size), desc=split, buckets=buckets,
                                 stats=(stats or {}).get("eval"), **(cached or {}).get(split, {}))
        if distributed.is_main_process():
            write_predictions(run, split, ids=enc.sample_ids, y_true=enc.labels, y_prob=probs,
                              single_visit=enc.single_visit, data_fingerprint=prepared.fingerprint())
        summary[f"{split}_prauc"] = val_prauc(enc.labels, probs)
        summary[f"{split}_truncated"] = enc.n_truncated
    common.write_json(run / "run.json", {"data_dir": str(Path(cfg.data_dir).absolute()), "model": "teacher",
                                         "config": cfg.config_name, "best_step": summary["best_step"],
                                         "checkpoint": str((run / "best").absolute())})
    if stats is not None:
        summary.update(run_costs(engine, stats))
    common.write_json(run / "summary.json", {**summary, "finished": True})
    if distributed.is_main_process() and cfg.eval.splits:
        from leader_jax.model_card import write_after_training
        write_after_training(run)


def main(cfg: ConfigDict, argv: list[str]) -> None:
    s = train(cfg)
    if distributed.is_main_process():
        print(json.dumps({k: s[k] for k in s if k.endswith("prauc") or k in ("steps_done", "best_step")}))


if __name__ == "__main__":
    from leader_jax import cli
    cli.run(main, "teacher_tiny.py")
