"""Adam (with AMSGrad) and AdamW."""

from __future__ import annotations

import tensorflow as tf

from distopt.checks import check_bool, check_int
from distopt.optimizers.base import Optimizer
from distopt.optimizers.schedules import check_unit


def adam_update(
    grad, var, m, v, vhat, lr, step, beta_1, beta_2, epsilon, freeze_step=None
):
    """One Adam step, in Keras's arrangement of the bias correction.

    m <- m + (1 - beta_1) * (g - m)
    v <- v + (1 - beta_2) * (g^2 - v)
    vhat <- max(vhat, v)                     (AMSGrad only; vhat=None skips)
    alpha = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)
    p <- p - alpha * m / (sqrt(v or vhat) + epsilon)

    With `freeze_step` F, updates t > F keep v (and its bias correction,
    beta_2^F) as they were after update F: 1-bit Adam's compression stage,
    where v, estimated from full-precision gradients during a warm-up, is a
    fixed preconditioner and the update is linear in the gradient, so error
    feedback on compressed gradients works as it does for SGD.

    References: Kingma & Ba (2015), "Adam: A Method for Stochastic
    Optimization"; Reddi, Kale & Kumar (2018), "On the Convergence of Adam and
    Beyond" (AMSGrad); Tang et al. (2021), "1-bit Adam: Communication
    Efficient Large-Scale Training with Adam's Convergence Speed", Alg. 1
    (the frozen variance).

    Args:
        grad, var, m, v, vhat: The gradient, the variable and its slots
            (`vhat` None without AMSGrad), all in the variable's dtype.
        lr, step, epsilon: Scalars in the variable's dtype (`step` 1-based).
        freeze_step: None, or the last update (a Python int) that changes v.
        beta_1, beta_2: Python floats or scalars; as Python floats, `1 - beta`
            is formed in double precision and rounded once to the variable's
            dtype, as Keras does (a float32 `1 - beta` differs by an ulp).

    Returns:
        (new_var, new_m, new_v, new_vhat).
    """
    dt = var.dtype
    v_step = step if freeze_step is None else tf.minimum(step, freeze_step)
    beta_1_power = tf.pow(tf.convert_to_tensor(beta_1, dt), step)
    beta_2_power = tf.pow(tf.convert_to_tensor(beta_2, dt), v_step)
    alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
    m = m + (grad - m) * (1 - beta_1)
    new_v = v + (tf.square(grad) - v) * (1 - beta_2)
    # A select, not a cond: one kernel for every step (fuses, suits XLA).
    v = new_v if freeze_step is None else tf.where(step > freeze_step, v, new_v)
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
        freeze_variance_step: None, or an update count F: from update F + 1
            on, v stays as it was after update F (1-bit Adam's recipe, with
            `compression=OneBit(start_step=F)`: F full-precision steps
            estimate v, then the signs are compressed; see `adam_update`).
        **kwargs: See `distopt.optimizers.Optimizer`.
    """

    def __init__(
        self,
        learning_rate=0.001,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-7,
        amsgrad=False,
        freeze_variance_step=None,
        **kwargs,
    ):
        super().__init__(learning_rate, **kwargs)
        self.beta_1 = check_unit("beta_1", beta_1)
        self.beta_2 = check_unit("beta_2", beta_2)
        self.epsilon = float(epsilon)
        if not self.epsilon >= 0:
            raise ValueError(f"epsilon: must be >= 0, got {epsilon!r}.")
        self.amsgrad = check_bool("amsgrad", amsgrad)
        if freeze_variance_step is not None:
            freeze_variance_step = check_int(
                "freeze_variance_step", freeze_variance_step, minimum=1
            )
        self.freeze_variance_step = freeze_variance_step

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
            None
            if self.freeze_variance_step is None
            else tf.constant(self.freeze_variance_step, dt),
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
            "freeze_variance_step": self.freeze_variance_step,
        }


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019).

    p <- p - lr * weight_decay * p, then the Adam step. Matches
    `keras.optimizers.AdamW` (default weight_decay 0.004). Sparse gradients
    are densified for the update, as for `Adam`.
    """

    def __init__(self, learning_rate=0.001, weight_decay=0.004, **kwargs):
        super().__init__(learning_rate, weight_decay=weight_decay, **kwargs)
