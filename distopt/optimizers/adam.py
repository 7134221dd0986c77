"""Adam (with AMSGrad) and AdamW."""

from __future__ import annotations

import tensorflow as tf

from distopt.optimizers.base import Optimizer
from distopt.optimizers.schedules import check_unit


def adam_update(grad, var, m, v, vhat, lr, step, beta_1, beta_2, epsilon):
    """One Adam step, in Keras's arrangement of the bias correction.

    m <- m + (1 - beta_1) * (g - m)
    v <- v + (1 - beta_2) * (g^2 - v)
    vhat <- max(vhat, v)                     (AMSGrad only; vhat=None skips)
    alpha = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)
    p <- p - alpha * m / (sqrt(v or vhat) + epsilon)

    References: Kingma & Ba (2015), "Adam: A Method for Stochastic
    Optimization"; Reddi, Kale & Kumar (2018), "On the Convergence of Adam and
    Beyond" (AMSGrad).

    Args:
        grad, var, m, v, vhat: The gradient, the variable and its slots
            (`vhat` None without AMSGrad), all in the variable's dtype.
        lr, step, epsilon: Scalars in the variable's dtype (`step` 1-based).
        beta_1, beta_2: Python floats or scalars; as Python floats, `1 - beta`
            is formed in double precision and rounded once to the variable's
            dtype, as Keras does (a float32 `1 - beta` differs by an ulp).

    Returns:
        (new_var, new_m, new_v, new_vhat).
    """
    dt = var.dtype
    beta_1_power = tf.pow(tf.convert_to_tensor(beta_1, dt), step)
    beta_2_power = tf.pow(tf.convert_to_tensor(beta_2, dt), step)
    alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
    m = m + (grad - m) * (1 - beta_1)
    v = v + (tf.square(grad) - v) * (1 - beta_2)
    denom_v = v
    if vhat is not None:
        vhat = tf.maximum(vhat, v)
        denom_v = vhat
    return var - (m * alpha) / (tf.sqrt(denom_v) + epsilon), m, v, vhat


class Adam(Optimizer):
    """Adam, optionally AMSGrad. Matches `keras.optimizers.Adam`.

    Update rule: see `adam_update`.

    Sparse gradients (`tf.IndexedSlices`) travel sparse, then are densified
    for the update: Keras 3's semantics (its TF backend forms `g - m` with
    dense `m`, so every row's moments decay, and a row touched once keeps
    moving). The result equals the dense gradient's. A "lazy" Adam that
    updates the touched rows only (TF Addons' `LazyAdam`) is not offered.

    Args:
        learning_rate: float or schedule.
        beta_1: decay of the first moment, in [0, 1).
        beta_2: decay of the second moment, in [0, 1).
        epsilon: added to sqrt(v) in the denominator.
        amsgrad: use the running maximum of v (Reddi et al., 2018).
        **kwargs: See `distopt.optimizers.Optimizer`.
    """

    def __init__(
        self,
        learning_rate=0.001,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-7,
        amsgrad=False,
        **kwargs,
    ):
        super().__init__(learning_rate, **kwargs)
        self.beta_1 = check_unit("beta_1", beta_1)
        self.beta_2 = check_unit("beta_2", beta_2)
        self.epsilon = float(epsilon)
        if not self.epsilon >= 0:
            raise ValueError(f"epsilon: must be >= 0, got {epsilon!r}.")
        self.amsgrad = bool(amsgrad)

    def slot_initializers(self, var):
        names = ["m", "v"] + (["vhat"] if self.amsgrad else [])
        return {n: tf.zeros(var.shape, var.dtype) for n in names}

    def update_step(self, grad, var, slots, lr, step):
        dt = var.dtype
        p, m, v, vhat = adam_update(
            grad,
            var,
            slots["m"],
            slots["v"],
            slots.get("vhat"),
            lr,
            step,
            # Python floats, as in Keras (see `adam_update`).
            self.beta_1,
            self.beta_2,
            tf.constant(self.epsilon, dt),
        )
        new = {"m": m, "v": v}
        if self.amsgrad:
            new["vhat"] = vhat
        return p, new

    def get_config(self):
        return {
            **super().get_config(),
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "epsilon": self.epsilon,
            "amsgrad": self.amsgrad,
        }


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019).

    p <- p - lr * weight_decay * p, then the Adam step. Matches
    `keras.optimizers.AdamW` (default weight_decay 0.004). Sparse gradients
    are densified for the update, as for `Adam`.
    """

    def __init__(self, learning_rate=0.001, weight_decay=0.004, **kwargs):
        super().__init__(learning_rate, weight_decay=weight_decay, **kwargs)
