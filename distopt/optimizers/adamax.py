"""Adamax: Adam with the infinity norm."""

from __future__ import annotations

import tensorflow as tf

from distopt.optimizers.base import Optimizer
from distopt.optimizers.schedules import check_rate, check_unit


def adamax_update(grad, var, m, u, lr, step, beta_1, beta_2, epsilon):
    """One Adamax step, in Keras's arrangement.

    m <- m + (1 - beta_1) * (g - m)
    u <- max(beta_2 * u, |g|)
    p <- p - lr * m / ((1 - beta_1^t) * (u + epsilon))

    Reference: Kingma & Ba (2015), "Adam: A Method for Stochastic
    Optimization", Section 7.1 (epsilon is Keras's, for a zero gradient).

    Args:
        grad, var, m, u: The gradient, the variable and its slots, in the
            variable's dtype.
        lr, step, epsilon: Scalars in the variable's dtype (`step` 1-based).
        beta_1, beta_2: Python floats, as in Keras (`1 - beta_1` formed in
            double precision, then rounded once).

    Returns:
        (new_var, new_m, new_u).
    """
    beta_1_power = tf.pow(tf.convert_to_tensor(beta_1, var.dtype), step)
    m = m + (grad - m) * (1 - beta_1)
    u = tf.maximum(beta_2 * u, tf.abs(grad))
    return var - (lr * m) / ((1 - beta_1_power) * (u + epsilon)), m, u


class Adamax(Optimizer):
    """Adamax. Matches `keras.optimizers.Adamax`.

    Update rule: see `adamax_update`. Slots (Keras's names): `momentum`,
    `norm`. Sparse gradients are densified for the update, as for `Adam`.

    Args:
        learning_rate: float or schedule.
        beta_1: decay of the first moment, in [0, 1).
        beta_2: decay of the infinity norm, in [0, 1).
        epsilon: added to the norm in the denominator, >= 0.
        **kwargs: See `distopt.optimizers.Optimizer`.
    """

    def __init__(
        self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, **kwargs
    ):
        super().__init__(learning_rate, **kwargs)
        self.beta_1 = check_unit("beta_1", beta_1)
        self.beta_2 = check_unit("beta_2", beta_2)
        self.epsilon = check_rate("epsilon", epsilon)

    def slot_initializers(self, var):
        return {n: tf.zeros(var.shape, var.dtype) for n in ("momentum", "norm")}

    def update_step(self, grad, var, slots, lr, step):
        p, m, u = adamax_update(
            grad,
            var,
            slots["momentum"],
            slots["norm"],
            lr,
            step,
            self.beta_1,
            self.beta_2,
            tf.constant(self.epsilon, var.dtype),
        )
        return p, {"momentum": m, "norm": u}

    def get_config(self):
        return {
            **super().get_config(),
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "epsilon": self.epsilon,
        }
