"""Independent NumPy references of every distopt optimizer and schedule.

Written from the papers (and, for hyperparameter conventions such as where
epsilon goes, from Keras's documentation), not from distopt's code: each
rule is one plain function of float64 arrays, applied variable by variable,
step by step. Tests compare distopt against these within a tolerance.

Conventions shared with distopt and Keras:

* `t` is the 1-based number of the update being made.
* The learning rate of update `t` is `lr(t - 1)`: a schedule sees the number
  of updates already applied.
* Decoupled weight decay (`weight_decay`, all but Lars) shrinks the
  parameter first, `p <- p * (1 - lr * weight_decay)`, then the rule runs on
  the decayed parameter.
* The moving average (`use_ema`, as Keras documents it): after the first
  update it equals the parameter, after each later one
  `ema <- ema_momentum * ema + (1 - ema_momentum) * p`; every
  `ema_overwrite_frequency`-th update then sets `p <- ema`.
"""

from __future__ import annotations

import math

import numpy as np

# --- Learning-rate schedules, closed form -------------------------------------


def constant(t, learning_rate):
    """lr(t) = learning_rate."""
    return learning_rate


def exponential_decay(
    t, initial_learning_rate, decay_steps, decay_rate, staircase=False
):
    """lr(t) = initial * rate^(t / decay_steps), the exponent floored if staircase."""
    e = t / decay_steps
    if staircase:
        e = math.floor(e)
    return initial_learning_rate * decay_rate**e


def piecewise_constant(t, boundaries, values):
    """values[i] for the first boundaries[i] > t; the last value past them all."""
    for b, v in zip(boundaries, values):
        if t < b:
            return v
    return values[-1]


def cosine_decay(t, peak_learning_rate, decay_steps, warmup_steps=0, alpha=0.0):
    """Linear warmup from 0, then half a cosine down to alpha * peak."""
    if t < warmup_steps:
        return peak_learning_rate * t / warmup_steps
    s = min(1.0, (t - warmup_steps) / decay_steps)
    return peak_learning_rate * (
        alpha + (1 - alpha) * 0.5 * (1 + math.cos(math.pi * s))
    )


# --- Update rules: (p, g, state dict, lr, t, hyperparameters) -> p ------------
# Each mutates `state` (the slots, keyed by distopt's slot names) and returns
# the new parameter.


def _gradient_descent(p, g, s, lr, t):
    return p - lr * g


def _momentum(p, g, s, lr, t, momentum=0.9, nesterov=False):
    # Sutskever et al. (2013) in velocity form: v is the step itself.
    v = momentum * s.get("momentum", np.zeros_like(p)) - lr * g
    s["momentum"] = v
    if nesterov:
        # Look-ahead: the step that the next velocity would take, were the
        # gradient unchanged.
        return p + momentum * v - lr * g
    return p + v


def _adam(
    p,
    g,
    s,
    lr,
    t,
    beta_1=0.9,
    beta_2=0.999,
    epsilon=1e-7,
    amsgrad=False,
    freeze_variance_step=None,
):
    # Kingma & Ba (2015), Algorithm 1 with the "epsilon-hat" of Section 2:
    # epsilon is added to sqrt(v) before the bias correction of v is folded
    # into the step size.
    m = beta_1 * s.get("m", np.zeros_like(p)) + (1 - beta_1) * g
    s["m"] = m
    # Tang et al. (2021), 1-bit Adam, Alg. 1: after the warm-up of
    # `freeze_variance_step` updates, v (and with it the bias correction of
    # v, kept at the warm-up's last step) no longer changes.
    frozen = freeze_variance_step is not None and t > freeze_variance_step
    if frozen:
        v, t_v = s["v"], freeze_variance_step
    else:
        v, t_v = beta_2 * s.get("v", np.zeros_like(p)) + (1 - beta_2) * g * g, t
    s["v"] = v
    if amsgrad:
        # Reddi et al. (2018): the running maximum of v.
        v = np.maximum(s.get("vhat", np.zeros_like(p)), v)
        s["vhat"] = v
    step_size = lr * math.sqrt(1 - beta_2**t_v) / (1 - beta_1**t)
    return p - step_size * m / (np.sqrt(v) + epsilon)


def _adamax(p, g, s, lr, t, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    # Kingma & Ba (2015), Section 7.1 (AdaMax): the second moment becomes an
    # exponentially weighted infinity norm, which needs no bias correction;
    # epsilon (Keras's) keeps a zero gradient from dividing by zero.
    m = beta_1 * s.get("momentum", np.zeros_like(p)) + (1 - beta_1) * g
    u = np.maximum(beta_2 * s.get("norm", np.zeros_like(p)), np.abs(g))
    s["momentum"], s["norm"] = m, u
    return p - (lr / (1 - beta_1**t)) * m / (u + epsilon)


def _rmsprop(p, g, s, lr, t, rho=0.9, momentum=0.0, epsilon=1e-7, centered=False):
    # Tieleman & Hinton (2012); centered as in Graves (2013). Keras puts
    # epsilon under the square root.
    ms = rho * s.get("velocity", np.zeros_like(p)) + (1 - rho) * g * g
    s["velocity"] = ms
    var = ms
    if centered:
        mg = rho * s.get("average_gradient", np.zeros_like(p)) + (1 - rho) * g
        s["average_gradient"] = mg
        var = ms - mg * mg
    delta = lr * g / np.sqrt(var + epsilon)
    if momentum > 0:
        delta = momentum * s.get("momentum", np.zeros_like(p)) + delta
        s["momentum"] = delta
    return p - delta


def _adagrad(p, g, s, lr, t, initial_accumulator_value=0.1, epsilon=1e-7):
    # Duchi, Hazan & Singer (2011), diagonal form.
    acc = s.get("accumulator", np.full_like(p, initial_accumulator_value)) + g * g
    s["accumulator"] = acc
    return p - lr * g / np.sqrt(acc + epsilon)


def _lion(p, g, s, lr, t, beta_1=0.9, beta_2=0.99):
    # Chen et al. (2023), Program 1 (weight decay handled outside).
    m = s.get("momentum", np.zeros_like(p))
    direction = np.sign(beta_1 * m + (1 - beta_1) * g)
    s["momentum"] = beta_2 * m + (1 - beta_2) * g
    return p - lr * direction


def _norm(x):
    """The Euclidean norm of the whole array (one layer)."""
    return math.sqrt(float(np.sum(np.square(x))))


def _lamb(p, g, s, lr, t, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    # You et al. (2020), Algorithm 2 with phi = identity, one layer per
    # variable; ratio 1 where a norm is zero.
    m = beta_1 * s.get("momentum", np.zeros_like(p)) + (1 - beta_1) * g
    v = beta_2 * s.get("velocity", np.zeros_like(p)) + (1 - beta_2) * g * g
    s["momentum"], s["velocity"] = m, v
    r = (m / (1 - beta_1**t)) / (np.sqrt(v / (1 - beta_2**t)) + epsilon)
    wn, rn = _norm(p), _norm(r)
    ratio = wn / rn if wn > 0 and rn > 0 else 1.0
    return p - lr * ratio * r


def _lars(p, g, s, lr, t, momentum=0.9, eta=0.001, weight_decay=0.0):
    # You, Gitman & Ginsburg (2017), Algorithm 2; local lr 1 where the
    # trust ratio is undefined (zero weights or zero denominator).
    wn, gn = _norm(p), _norm(g)
    den = gn + weight_decay * wn
    local = eta * wn / den if wn > 0 and den > 0 else 1.0
    v = momentum * s.get("momentum", np.zeros_like(p)) + lr * local * (
        g + weight_decay * p
    )
    s["momentum"] = v
    return p - v


RULES = {
    "gradient_descent": _gradient_descent,
    "momentum": _momentum,
    "adam": _adam,
    "adamw": _adam,
    "adamax": _adamax,
    "rmsprop": _rmsprop,
    "adagrad": _adagrad,
    "lion": _lion,
    "lamb": _lamb,
    "lars": _lars,
}

# Keras's AdamW default; the other optimizers default to no decoupled decay.
_DEFAULT_DECAY = {"adamw": 0.004}


def run(name, params, grad_steps, learning_rate, **hyper):
    """Applies `len(grad_steps)` updates of optimizer `name`.

    Args:
        name: A registry name of distopt.
        params: The initial values, a list of arrays.
        grad_steps: One list of gradients (like `params`) per step.
        learning_rate: A float, or a function of the 0-based step count.
        **hyper: The optimizer's hyperparameters (distopt/Keras names),
            including `weight_decay`.

    Returns:
        (final params, final slots): float64 arrays, and one dict of slot
        arrays per variable.
    """
    rule = RULES[name]
    lr_fn = learning_rate if callable(learning_rate) else (lambda _: learning_rate)
    hyper = dict(hyper)
    if name == "lars":
        decay = 0.0  # Lars's weight_decay is its own, inside the rule.
    else:
        decay = hyper.pop("weight_decay", _DEFAULT_DECAY.get(name)) or 0.0
    use_ema = hyper.pop("use_ema", False)
    ema_momentum = hyper.pop("ema_momentum", 0.99)
    overwrite = hyper.pop("ema_overwrite_frequency", None)
    params = [np.array(p, np.float64) for p in params]
    states = [{} for _ in params]
    for t, grads in enumerate(grad_steps, start=1):
        lr = float(lr_fn(t - 1))
        for i, g in enumerate(grads):
            if g is None:
                continue
            p = params[i] * (1 - lr * decay)
            params[i] = rule(p, np.asarray(g, np.float64), states[i], lr, t, **hyper)
            if use_ema:
                s = states[i]
                s["ema"] = (
                    ema_momentum * s["ema"] + (1 - ema_momentum) * params[i]
                    if "ema" in s
                    else params[i].copy()
                )
                if overwrite and t % overwrite == 0:
                    params[i] = s["ema"].copy()
    # Slots an update never touched keep their initial value.
    return params, states


# --- Shared test problems -------------------------------------------------------

#: Shapes of the variables every test optimizes: a matrix, a vector, and a
#: zero-initialised vector (a bias: exercises the trust ratios' fallback).
#: Few distinct shapes keep XLA compilations (one per shape) few.
SHAPES = [(3, 4), (5,), (5,)]


def problem(num_steps, seed=0, dtype=np.float32, num_replicas=None):
    """Initial parameters and per-step gradients, reproducible from `seed`.

    Returns:
        (params, grad_steps): `grad_steps[t][i]` is variable i's gradient at
        step t; with `num_replicas`, `grad_steps[t][r][i]` is replica r's.
    """
    rng = np.random.default_rng(seed)
    params = [
        rng.normal(size=s).astype(dtype) if k < 2 else np.zeros(s, dtype)
        for k, s in enumerate(SHAPES)
    ]

    def grads():
        return [rng.normal(size=s).astype(dtype) for s in SHAPES]

    if num_replicas is None:
        steps = [grads() for _ in range(num_steps)]
    else:
        steps = [[grads() for _ in range(num_replicas)] for _ in range(num_steps)]
    return params, steps


#: One configuration per optimizer, with its options on where it has some:
#: the table the strategy and execution-mode tests cross with their cases.
CONFIGS = [
    ("gradient_descent", {"learning_rate": 0.1}),
    ("momentum", {"learning_rate": 0.1, "nesterov": True}),
    # A moving average that overwrites the variables at the 2nd update, so
    # that comparing the variables compares the average too.
    (
        "momentum",
        {
            "learning_rate": 0.1,
            "use_ema": True,
            "ema_momentum": 0.9,
            "ema_overwrite_frequency": 2,
        },
    ),
    ("adam", {"learning_rate": 0.1, "amsgrad": True}),
    ("adamw", {"learning_rate": 0.1, "weight_decay": 0.1}),
    ("adamax", {"learning_rate": 0.1}),
    ("rmsprop", {"learning_rate": 0.1, "centered": True, "momentum": 0.5}),
    ("adagrad", {"learning_rate": 0.1}),
    ("lion", {"learning_rate": 0.1, "weight_decay": 0.1}),
    ("lamb", {"learning_rate": 0.1}),
    ("lars", {"learning_rate": 1.0, "eta": 0.1, "weight_decay": 0.01}),
]


# --- Gradient compression with error feedback ----------------------------------
# Written from the papers, one replica at a time, with no knowledge of how
# distopt packs or fuses its collectives. Each function takes every replica's
# input (a list indexed by replica) and returns what each replica sends, what
# each one decompresses for itself, and the sum every replica receives. The
# arithmetic runs in the inputs' dtype: the tests pass float32 where a
# selection (top-k, a sign) must make the same choices as float32 code, and
# float64 elsewhere. The error-feedback loop around them is `ef_sgd`.


def gram_schmidt(matrix):
    """Orthonormalises the columns of `matrix` in order (classical Gram-Schmidt).

    Vogels et al. (2019), Algorithm 1, ORTHOGONALIZE. A column in the span of
    the earlier ones (left with under sqrt(machine epsilon) of its norm once
    they are projected out: rounding only) has no direction to keep and is
    zero, so that the columns stay orthonormal or zero.
    """
    out = np.array(matrix, copy=True)
    tolerance = np.sqrt(np.finfo(out.dtype).eps)
    for j in range(out.shape[1]):
        c = out[:, j].copy()
        before = np.sqrt(np.sum(c * c))
        for i in range(j):
            c = c - np.dot(out[:, i], c) * out[:, i]
        norm = np.sqrt(np.sum(c * c))
        out[:, j] = c / norm if norm > tolerance * before else 0.0
    return out


def powersgd_compresses(shape, rank, min_compression_rate=2.0):
    """Whether a tensor is worth compressing at `rank` (PyTorch's rule).

    A tensor of rank >= 2 is a matrix of its leading dimensions by its last
    (the paper's view of a convolution kernel, output channels against the
    rest, in TensorFlow's (kh, kw, in, out) layout); it is compressed when
    its rank-r factors, times the rate, are smaller than the matrix.
    """
    if len(shape) < 2:
        return False
    n, m = int(np.prod(shape[:-1])), shape[-1]
    r = min(n, m, rank)
    return (n + m) * r * min_compression_rate < n * m


def powersgd_round(xs, q):
    """One rank-r PowerSGD round over replicas (Vogels et al. 2019, Alg. 1-2).

    Args:
        xs: Replica r's matrix M_r (its share plus its residual), [n, m] each.
        q: The [m, r] start of the power iteration (last round's Q: warm start).

    Returns:
        dict with `p_sent` (each replica's M_r Q), `p_hat` (the orthonormalised
        sum), `q_sent` (each replica's M_r^T P^), `q` (their sum, the next
        warm start), `own` (each replica's decompressed part P^ Q_r^T) and
        `aggregate` (P^ Q^T, what every replica applies).
    """
    p_sent = [x @ q for x in xs]
    p_hat = gram_schmidt(sum(p_sent))
    q_sent = [x.T @ p_hat for x in xs]
    q_new = sum(q_sent)
    return {
        "p_sent": p_sent,
        "p_hat": p_hat,
        "q_sent": q_sent,
        "q": q_new,
        "own": [p_hat @ qr.T for qr in q_sent],
        "aggregate": p_hat @ q_new.T,
    }


def topk_compress(x, fraction):
    """Top-k sparsification (Stich, Cordonnier & Jaggi 2018, "top_k").

    Keeps the k = max(1, ceil(fraction * d)) entries of largest magnitude of
    the flattened `x`; among equal magnitudes the lower index wins.

    Returns:
        (indices in increasing order, their values, the decompressed `x`).
    """
    flat = np.ravel(x)
    # fraction is the decimal written (0.07 of 100 is 7), not its binary double.
    k = max(1, min(flat.size, math.ceil(round(fraction * flat.size, 9))))
    idx = np.sort(np.argsort(-np.abs(flat), kind="stable")[:k])
    dense = np.zeros_like(flat)
    dense[idx] = flat[idx]
    return idx, flat[idx], dense.reshape(np.shape(x))


def scaled_sign_compress(x):
    """Scaled sign (Karimireddy et al. 2019, Alg. 1): (||x||_1 / d) sign(x).

    A zero entry counts as positive (one bit per entry has no third value).

    Returns:
        (the signs packed 32 to a little-endian 32-bit word, bit j of word w
        being entry 32 w + j, as int32; the scale; the decompressed `x`).
    """
    flat = np.ravel(x)
    scale = np.mean(np.abs(flat))
    positive = flat >= 0
    padded = np.zeros(-(-flat.size // 32) * 32, np.uint8)
    padded[: flat.size] = positive
    words = np.packbits(padded, bitorder="little").view("<i4")
    decompressed = np.where(positive, scale, -scale).astype(flat.dtype)
    return words, scale, decompressed.reshape(np.shape(x))


def ef_sgd(
    kind,
    shares,
    *,
    error_feedback=True,
    error_feedback_decay=1.0,
    q0=None,
    rank=1,
    fraction=0.01,
    min_compression_rate=2.0,
    skip=(),
    residual0=None,
):
    """Compressed aggregation with per-replica error feedback, step by step.

    Stich et al. (2018) and Karimireddy et al. (2019): on replica r,
    x_r = s_r + beta e_r; replica r contributes C(x_r) and keeps e_r <- x_r - C(x_r)
    (PowerSGD: Vogels et al. 2019, Alg. 2, the same with the rank-r round,
    C(x_r) = P^ (x_r^T P^)^T). Every replica receives sum_r C(x_r).

    Args:
        kind: "powersgd", "topk" or "onebit".
        shares: shares[t][r][i]: replica r's share of variable i at step t.
        error_feedback: Keep the residuals (False: e_r stays zero).
        error_feedback_decay: beta, the residual's decay (SparseLoCo, Sarfi
            et al. 2025); 1: Stich et al.'s.
        q0: PowerSGD's first Q per variable (None where not compressed).
        rank, fraction, min_compression_rate: the compressors' parameters.
        skip: Steps whose result is discarded: their residuals and Q are not
            kept, their aggregate not applied (a skipped step).
        residual0: The residuals before the first step (`[R, ...]` per
            variable, None where not compressed); zeros if not given.

    Returns:
        A list with one dict per step: `aggregate[i]`, `residual[i]` (an
        [R, ...] array after the step, None where not compressed), `q[i]`,
        `x[i]` (every replica's x_r, [R, ...]), `p_hat[i]` (PowerSGD's P^),
        and the payload: `sent[i][r]`, per kind PowerSGD (P_r, Q_r), top-k
        (indices, values), scaled sign (words, scale); the tensor itself
        where uncompressed.
    """
    num_vars = len(shares[0][0])
    num_replicas = len(shares[0])
    shapes = [np.shape(s) for s in shares[0][0]]
    if kind == "powersgd":
        compressed = [
            powersgd_compresses(s, rank, min_compression_rate) for s in shapes
        ]
    else:
        compressed = [True] * num_vars
    dtype = np.asarray(shares[0][0][0]).dtype
    residual = [
        np.zeros((num_replicas, *s), dtype) if c else None
        for s, c in zip(shapes, compressed)
    ]
    if residual0 is not None:
        residual = [None if r is None else np.array(r, dtype) for r in residual0]
    q0 = q0 if q0 is not None else [None] * num_vars
    q = [None if x is None else np.array(x, dtype) for x in q0]
    out = []
    for t, step in enumerate(shares):
        rec = {
            "aggregate": [],
            "residual": [],
            "q": [],
            "sent": [],
            "x": [],
            "p_hat": [],
        }
        new_residual, new_q = [], []
        for i in range(num_vars):
            s = [np.asarray(step[r][i], dtype) for r in range(num_replicas)]
            if not compressed[i]:
                rec["aggregate"].append(sum(s))
                rec["sent"].append(s)
                rec["x"].append(np.stack(s))
                rec["p_hat"].append(None)
                new_residual.append(None)
                new_q.append(q[i])
                continue
            xs = [
                s[r] + error_feedback_decay * residual[i][r] if error_feedback else s[r]
                for r in range(num_replicas)
            ]
            if kind == "powersgd":
                mats = [x.reshape(-1, shapes[i][-1]) for x in xs]
                rnd = powersgd_round(mats, q[i])
                own = [o.reshape(shapes[i]) for o in rnd["own"]]
                agg = rnd["aggregate"].reshape(shapes[i])
                sent = list(zip(rnd["p_sent"], rnd["q_sent"]))
                new_q.append(rnd["q"])
                rec["p_hat"].append(rnd["p_hat"])
            else:
                fn = (
                    (lambda x: topk_compress(x, fraction))
                    if kind == "topk"
                    else scaled_sign_compress
                )
                parts = [fn(x) for x in xs]
                own = [p[2] for p in parts]
                agg = sum(own)
                sent = [p[:2] for p in parts]
                new_q.append(None)
                rec["p_hat"].append(None)
            rec["aggregate"].append(agg)
            rec["sent"].append(sent)
            rec["x"].append(np.stack(xs))
            new_residual.append(
                np.stack([x - o for x, o in zip(xs, own)])
                if error_feedback
                else residual[i]
            )
        if t not in skip:
            residual, q = new_residual, new_q
        rec["residual"] = [None if r is None else r.copy() for r in residual]
        rec["q"] = [None if x is None else x.copy() for x in q]
        out.append(rec)
    return out
