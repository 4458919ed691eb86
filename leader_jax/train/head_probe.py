"""Linear-probe start of the drug head (`model.head_init=probe`): fit the head on the frozen model first.

Fine-tuning a pretrained model under a randomly started head moves the features before the head is any
good (Kumar et al. 2022, "Fine-tuning can distort pretrained features"); fitting the head first as a
linear probe on the frozen pooled states and then training LoRA + head from there (LP-FT) avoids it. With
a fresh task adapter (B = 0) the model's pooled states at step 0 are the frozen model's, so the fitted
probe is exactly the teacher at step 0.

The probe is a multi-label L2-regularised logistic regression on the standardised pooled states of the
training split (`head_norm`), fitted full batch by L-BFGS in JAX:
`(1/N) sum_n sum_d BCE(x_n w_d + b_d, y_nd) + (l2 / 2) ||W||^2` (one independent logistic regression per
drug; the bias is not penalised; l2 = 1 / (N C) in scikit-learn's terms). With several l2 candidates the one
with the best validation PRAUC is kept (never the test split).
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax


def prior_logit(y: np.ndarray) -> np.ndarray:
    """Logit of each label's training prior, clipped to [1e-4, 1 - 1e-4] (the prior-only head's bias)."""
    p = np.clip(np.asarray(y, np.float64).mean(0), 1e-4, 1 - 1e-4)
    return (np.log(p) - np.log1p(-p)).astype(np.float32)


def objective(params, x, y, l2):
    """Summed-over-labels, mean-over-rows BCE + (l2/2)||W||^2 (the bias is not penalised)."""
    w, b = params
    bce = optax.losses.sigmoid_binary_cross_entropy(x @ w + b, y)
    return jnp.sum(bce) / x.shape[0] + 0.5 * l2 * jnp.sum(w * w)


@jax.jit
def _fit(x, y, l2, w0, b0, iters):
    opt = optax.lbfgs()
    f = lambda p: objective(p, x, y, l2)
    vg = optax.value_and_grad_from_state(f)

    def body(_, carry):
        params, state = carry
        value, grad = vg(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=f)
        return optax.apply_updates(params, updates), state

    params = (w0, b0)
    params, _ = jax.lax.fori_loop(0, iters, body, (params, opt.init(params)))
    value, grad = jax.value_and_grad(f)(params)
    return params, value, optax.tree.norm(grad)


def fit(x: np.ndarray, y: np.ndarray, l2: float, iters: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(W float32 [D, L], b float32 [L], info) of the probe on features `x` [N, D] and 0/1 labels `y`
    [N, L]; started at W = 0, b = the prior logit. `info`: objective, gradient norm at the end, training
    mean BCE (per row and label, as the teacher's loss) and the prior-only one."""
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    b0 = jnp.asarray(prior_logit(np.asarray(y)))
    (w, b), value, gnorm = _fit(x, y, jnp.float32(l2), jnp.zeros((x.shape[1], y.shape[1]), jnp.float32), b0,
                                int(iters))
    mean_bce = lambda logits: float(jnp.mean(optax.losses.sigmoid_binary_cross_entropy(logits, y)))
    info = {"objective": float(value), "grad_norm": float(gnorm), "train_bce": mean_bce(x @ w + b),
            "prior_train_bce": mean_bce(jnp.broadcast_to(b0, y.shape))}
    return np.asarray(w), np.asarray(b), info


def predict(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Probabilities float32 [N, L] of the probe."""
    return np.asarray(jax.nn.sigmoid(jnp.asarray(x, jnp.float32) @ jnp.asarray(w) + jnp.asarray(b)))


@dataclasses.dataclass
class Probe:
    w: np.ndarray
    b: np.ndarray
    l2: float
    val_prauc: float
    info: dict


def choose(x_train, y_train, x_val, y_val, l2s, iters: int, score) -> Probe:
    """Fit one probe per l2 candidate and keep the best by `score(y_val, probs_val)` (validation PRAUC);
    ties keep the earlier candidate. `info` lists every candidate's validation score and the fit times."""
    best, by_l2, t0 = None, {}, time.perf_counter()
    for l2 in l2s:
        w, b, info = fit(x_train, y_train, float(l2), iters)
        val = float(score(y_val, predict(x_val, w, b)))
        by_l2[repr(float(l2))] = round(val, 6)
        if best is None or val > best.val_prauc:
            best = Probe(w, b, float(l2), val, info)
    best.info = {**best.info, "val_prauc_by_l2": by_l2, "iters": int(iters),
                 "seconds": round(time.perf_counter() - t0, 2)}
    return best
