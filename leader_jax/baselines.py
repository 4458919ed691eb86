"""Built-in baselines, written as models that emit `RUN/predictions/{val,test}.npz` + `RUN/run.json`.

    python -m leader_jax.baselines --config configs/baselines.py --config.data_dir=PREPARED \
        --config.name=most_frequent|previous_visit|cooccurrence|logistic --out RUN

- most_frequent:  p_m = fraction of training samples whose target visit has drug m.
- previous_visit: p_m = 1 for the drugs of the last history visit; other drugs get half their training
                  frequency (always < 0.5, so at θ = 0.5 the set is exactly the previous visit's drugs and
                  the ranking below it is by popularity); single-visit samples get the frequencies.
- cooccurrence:   p_m = mean over the target visit's diagnosis/procedure codes c of P(m | c), counted
                  over every visit of the training samples; samples without a known code get frequencies.
- logistic:       one-vs-rest logistic regression on bag-of-codes (target dx + px) + the last history
                  visit's drugs + a single-visit flag; full-batch Adam (optax) on a sparse design matrix, per-drug
                  mean BCE + L2 on the weights, best step by
                  validation PRAUC. A thousand-sample model: it runs on one device, no mesh.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from ml_collections import ConfigDict

from leader_jax.cli import UserError
from leader_jax.io import JsonlLogger, atomic_write_json, progress

NAMES = ("most_frequent", "previous_visit", "cooccurrence", "logistic")
SPLITS = ("train", "val", "test")


def validate_config(cfg: ConfigDict) -> None:
    """Raise UserError on a bad baselines setting (data_dir itself is checked when it is loaded)."""
    def bad(field, value, want):
        raise UserError(f"baselines config: --config.{field}={value!r} is invalid; {want}")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if cfg.name not in NAMES:
        bad("name", cfg.name, f"{cfg.name!r} is not a baseline; choose one of {list(NAMES)}")
    if not isinstance(cfg.data_dir, str):
        bad("data_dir", cfg.data_dir, "expected a folder path (a string)")
    splits = cfg.splits
    if (isinstance(splits, str) or not isinstance(splits, (tuple, list)) or not splits
            or any(s not in SPLITS for s in splits) or len(set(splits)) != len(splits)):
        bad("splits", splits, f"expected distinct split names from {list(SPLITS)}, e.g. ('val', 'test')")
    if not is_int(cfg.seed) or cfg.seed < 0:
        bad("seed", cfg.seed, "expected an integer >= 0")
    lc = cfg.logistic
    if not is_num(lc.lr) or not lc.lr > 0:
        bad("logistic.lr", lc.lr, "expected a learning rate > 0")
    if not is_num(lc.l2) or not lc.l2 >= 0:
        bad("logistic.l2", lc.l2, "expected an L2 strength >= 0")
    for f in ("steps", "eval_every"):
        if not is_int(lc[f]) or lc[f] < 1:
            bad(f"logistic.{f}", lc[f], "expected an integer >= 1")


# ---------------------------------------------------------------- features

def _multi_hot(rows: Sequence[Sequence[str]], index: dict[str, int], width: int) -> np.ndarray:
    """float32 [n, width] multi-hot of token lists; tokens missing from `index` are ignored."""
    out = np.zeros((len(rows), width), dtype=np.float32)
    for i, toks in enumerate(rows):
        cols = [index[t] for t in toks if t in index]
        out[i, cols] = 1.0
    return out


def code_matrix(data, visits) -> np.ndarray:
    """[n, n_diag + n_proc] bag of a list of visits' diagnosis and procedure codes."""
    v = data.vocab
    nd = len(v.diag)
    dx = _multi_hot([x.diagnoses for x in visits], v.index("diag"), nd)
    px = _multi_hot([x.procedures for x in visits], v.index("proc"), len(v.proc))
    return np.concatenate([dx, px], axis=1)


def med_matrix(data, visits) -> np.ndarray:
    return _multi_hot([x.medications for x in visits], data.vocab.index("med"), data.vocab.n_med)


def previous_meds(data, samples) -> tuple[np.ndarray, np.ndarray]:
    """(last history visit's drugs [n, n_med], has_history [n])."""
    has = np.array([not s.single_visit for s in samples], dtype=bool)
    rows = [s.history[-1].medications if not s.single_visit else () for s in samples]
    return _multi_hot(rows, data.vocab.index("med"), data.vocab.n_med), has


def drug_frequency(data) -> np.ndarray:
    train = data.splits["train"]
    if not train:
        raise UserError("the prepared data has an empty train split; baselines need training samples")
    return data.labels(train).astype(np.float64).mean(axis=0)


# ---------------------------------------------------------------- the four models

def fit_most_frequent(data, cfg) -> Callable:
    freq = drug_frequency(data)
    return lambda samples: np.broadcast_to(freq, (len(samples), freq.size)).copy()


def fit_previous_visit(data, cfg) -> Callable:
    freq = drug_frequency(data)

    def predict(samples):
        prev, has = previous_meds(data, samples)
        p = np.broadcast_to(np.minimum(freq, 0.99) * 0.5, prev.shape).copy()
        p[has] = np.maximum(p[has], prev[has])
        p[~has] = freq
        return p

    return predict


def fit_cooccurrence(data, cfg) -> Callable:
    freq = drug_frequency(data)
    visits = [v for s in data.splits["train"] for v in s.visits]
    x = code_matrix(data, visits).astype(np.float64)
    y = med_matrix(data, visits).astype(np.float64)
    count = x.sum(axis=0)
    cond = (x.T @ y) / np.maximum(count, 1.0)[:, None]        # [n_codes, n_med] = P(drug | code)
    seen = count > 0

    def predict(samples):
        c = code_matrix(data, [s.target for s in samples]).astype(np.float64) * seen
        k = c.sum(axis=1)
        p = (c @ cond) / np.maximum(k, 1.0)[:, None]
        p[k == 0] = freq
        return p

    return predict


def logistic_features(data, samples) -> np.ndarray:
    prev, has = previous_meds(data, samples)
    codes = code_matrix(data, [s.target for s in samples])
    return np.concatenate([codes, prev, (~has).astype(np.float32)[:, None]], axis=1)


def fit_logistic(data, cfg, log: JsonlLogger | None = None) -> Callable:
    """One-vs-rest logistic regression trained full-batch with optax Adam; best step by val PRAUC."""
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax.experimental import sparse

    from leader_jax.metrics import ranking_metrics

    class OneVsRestLogistic(nnx.Module):
        """logits = x @ W + b, one independent sigmoid per drug."""

        def __init__(self, n_in: int, n_out: int, bias_init: np.ndarray, rngs: nnx.Rngs):
            self.kernel = nnx.Param(jnp.zeros((n_in, n_out), jnp.float32), out_sharding=("embed", "labels"))
            self.bias = nnx.Param(jnp.asarray(bias_init, jnp.float32), out_sharding=("labels",))

        def __call__(self, x):
            return x @ self.kernel[...] + self.bias[...]

    lc = cfg.logistic
    train = data.splits["train"]
    x_tr, y_tr = logistic_features(data, train), data.labels(train).astype(np.float32)
    val = data.splits["val"]
    x_va, y_va = (logistic_features(data, val), data.labels(val)) if val else (None, None)
    freq = np.clip(y_tr.mean(axis=0), 1e-4, 1 - 1e-4)
    with nnx.use_eager_sharding(False):        # single device: logical names are kept as metadata
        model = OneVsRestLogistic(x_tr.shape[1], y_tr.shape[1], np.log(freq / (1 - freq)), nnx.Rngs(cfg.seed))
    opt = nnx.Optimizer(model, optax.adam(lc.lr), wrt=nnx.Param)
    l2 = float(lc.l2)

    @nnx.jit
    def step(model, opt, x, y):
        def loss_fn(m):
            # per drug: mean BCE over samples + l2·|w|² (sklearn's C = 1 / (2·l2·n)), summed over drugs
            bce = optax.losses.sigmoid_binary_cross_entropy(m(x), y).mean(axis=0).sum()
            return bce + l2 * jnp.sum(m.kernel[...] ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    def probs(x: np.ndarray) -> np.ndarray:          # inference in numpy: no compile per input shape
        z = x @ np.asarray(model.kernel[...]) + np.asarray(model.bias[...])
        return 1.0 / (1.0 + np.exp(-z))

    def to_bcoo(x: np.ndarray):
        rows, cols = np.nonzero(x)
        return sparse.BCOO((jnp.asarray(x[rows, cols]), jnp.asarray(np.stack([rows, cols], 1))), shape=x.shape)

    # bags of codes are ~1 % dense: a sparse matmul makes a full-batch step cost nnz·n_med, not n·n_in·n_med
    xt, yt = to_bcoo(x_tr), jnp.asarray(y_tr)
    best = (-1.0, 0, None)
    for it in progress(range(1, int(lc.steps) + 1), desc="logistic", unit="step"):
        loss = step(model, opt, xt, yt)
        if it % int(lc.eval_every) == 0 or it == int(lc.steps):
            rec: dict[str, Any] = {"step": it, "train_loss": float(loss)}
            if x_va is not None:
                ap, _ = ranking_metrics(y_va, probs(x_va))
                rec["val_prauc"] = float(ap.mean())
                if rec["val_prauc"] > best[0]:
                    best = (rec["val_prauc"], it, (np.array(model.kernel[...]), np.array(model.bias[...])))
            if log is not None:
                log.log(rec)
    if best[2] is not None:
        model.kernel[...], model.bias[...] = jnp.asarray(best[2][0]), jnp.asarray(best[2][1])
        if log is not None:
            log.log({"best_step": best[1], "best_val_prauc": best[0]})

    return lambda samples: probs(logistic_features(data, samples))


FITTERS: dict[str, Callable] = {"most_frequent": fit_most_frequent, "previous_visit": fit_previous_visit,
                                "cooccurrence": fit_cooccurrence, "logistic": fit_logistic}


# ---------------------------------------------------------------- run

def run_baseline(cfg: ConfigDict, out: str | Path) -> dict[str, Any]:
    """Fit baseline `cfg.name` on the prepared data `cfg.data_dir`; write predictions + run.json."""
    from leader_jax.data.dataset import PreparedData
    from leader_jax.eval import write_predictions

    validate_config(cfg)
    if not cfg.data_dir:
        raise UserError("set --config.data_dir=PREPARED (a folder written by the data stage)")
    try:
        data = PreparedData.load(cfg.data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    out = Path(out)
    log = JsonlLogger(out / "metrics.jsonl")
    fit = FITTERS[cfg.name]
    predict = fit(data, cfg, log) if cfg.name == "logistic" else fit(data, cfg)
    fingerprint = data.fingerprint()
    written = {}
    for split in cfg.splits:
        samples = data.splits.get(split, [])
        if not samples:
            continue
        p = np.clip(predict(samples), 0.0, 1.0).astype(np.float32)
        write_predictions(out, split, ids=[s.id for s in samples], y_true=data.labels(samples), y_prob=p,
                          single_visit=[s.single_visit for s in samples], data_fingerprint=fingerprint)
        written[split] = len(samples)
    meta = {"data_dir": str(Path(cfg.data_dir).resolve()), "model": f"baseline:{cfg.name}",
            "dataset": data.dataset, "data_fingerprint": fingerprint, "n_med": data.vocab.n_med,
            "predictions": written, "config": cfg.to_dict()}
    atomic_write_json(out / "run.json", meta)
    return meta


def main(cfg: ConfigDict, args: list[str]) -> None:
    if args:
        raise UserError(f"unexpected arguments {args}")
    validate_config(cfg)
    out = cfg.get("out")
    if not out:
        raise UserError("set --out RUN (the run folder to write predictions into)")
    meta = run_baseline(cfg, out)
    print(f"baseline {cfg.name}: wrote {meta['predictions']} predictions to {out}/predictions; "
          f"evaluate with: python -m leader_jax.eval --config.run_dir={out}")


if __name__ == "__main__":
    from leader_jax import cli

    cli.run(main, "baselines.py")
