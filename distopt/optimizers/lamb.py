"""Lamb: Adam with a layer-wise trust ratio."""

from __future__ import annotations

import tensorflow as tf

from distopt.optimizers.base import Optimizer, l2_norm
from distopt.optimizers.schedules import check_rate, check_unit


def trust_ratio(numerator_norm, denominator_norm):
    """numerator / denominator where both norms are > 0, else 1.

    The fallback keeps zero-initialised variables (biases) training at the
    plain learning rate instead of being frozen at zero.
    """
    one = tf.ones_like(numerator_norm)
    safe = tf.where(denominator_norm > 0, denominator_norm, one)
    return tf.where(
        numerator_norm > 0,
        tf.where(denominator_norm > 0, numerator_norm / safe, one),
        one,
    )


def lamb_update(grad, var, m, v, lr, step, beta_1, beta_2, epsilon, norm=l2_norm):
    """One Lamb step, in Keras's arrangement.

    m <- m + (1 - beta_1) * (g - m)
    v <- v + (1 - beta_2) * (g^2 - v)
    u = (m / (1 - beta_1^t)) / (sqrt(v / (1 - beta_2^t)) + epsilon)
    r = ||p|| / ||u||    (r = 1 if either norm is 0)
    p <- p - r * lr * u

    Norms are over the whole variable (one "layer"). Reference: You et al.
    (2020), "Large Batch Optimization for Deep Learning: Training BERT in 76
    minutes". Decoupled weight decay, when set, is applied to p first (by the
    base class), so ||p|| is taken after it, as in Keras.

    Args:
        beta_1, beta_2: Python floats or scalars; as Python floats, `1 - beta`
            is formed in double precision, as Keras does.
        lr, step, epsilon: Scalars in the variable's dtype (`step` 1-based).
        norm: The norm over one variable (`l2_norm`; the fused update passes
            one that gives each element its own variable's norm).

    Returns:
        (new_var, new_m, new_v).
    """
    dt = var.dtype
    beta_1_power = tf.pow(tf.convert_to_tensor(beta_1, dt), step)
    beta_2_power = tf.pow(tf.convert_to_tensor(beta_2, dt), step)
    m = m + (grad - m) * (1 - beta_1)
    v = v + (tf.square(grad) - v) * (1 - beta_2)
    m_hat = m / (1.0 - beta_1_power)
    v_sqrt = tf.sqrt(v / (1.0 - beta_2_power)) + epsilon
    update = m_hat / v_sqrt
    ratio = trust_ratio(norm(var), norm(update))
    return var - ratio * lr * update, m, v


class Lamb(Optimizer):
    """Lamb. Matches `keras.optimizers.Lamb`.

    Update rule: see `lamb_update`. Slots (Keras's names): `momentum`,
    `velocity`.

    Args:
        learning_rate: float or schedule.
        beta_1: decay of the first moment, in [0, 1).
        beta_2: decay of the second moment, in [0, 1).
        epsilon: added to the bias-corrected sqrt(v), >= 0.
        **kwargs: See `distopt.optimizers.Optimizer`.
    """

    # The trust ratio needs each variable's own norms.
    elementwise = False
    layerwise = True

    def __init__(
        self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, **kwargs
    ):
        super().__init__(learning_rate, **kwargs)
        self.beta_1 = check_unit("beta_1", beta_1)
        self.beta_2 = check_unit("beta_2", beta_2)
        self.epsilon = check_rate("epsilon", epsilon)

    def slot_initializers(self, var):
        return {n: tf.zeros(var.shape, var.dtype) for n in ("momentum", "velocity")}

    def update_step(self, grad, var, slots, lr, step, norm=l2_norm):
        # The betas stay Python floats, as in Keras (see `lamb_update`).
        p, m, v = lamb_update(
            grad,
            var,
            slots["momentum"],
            slots["velocity"],
            lr,
            step,
            self.beta_1,
            self.beta_2,
            tf.constant(self.epsilon, var.dtype),
            norm,
        )
        return p, {"momentum": m, "velocity": v}

    def get_config(self):
        return {
            **super().get_config(),
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "epsilon": self.epsilon,
        }
