"""Lion (EvoLved Sign Momentum)."""

from __future__ import annotations

import tensorflow as tf

from distopt.optimizers.base import Optimizer
from distopt.optimizers.schedules import check_unit


def lion_update(grad, var, m, lr, beta_1, beta_2):
    """One Lion step, in Keras's arrangement.

    p <- p - lr * sign(beta_1 * m + (1 - beta_1) * g)
    m <- beta_2 * m + (1 - beta_2) * g

    The interpolation with beta_1 sets the direction; the slower average
    with beta_2 is what is kept. Reference: Chen et al. (2023), "Symbolic
    Discovery of Optimization Algorithms". Returns (new_var, new_m).
    """
    new_var = var - lr * tf.sign(m * beta_1 + grad * (1.0 - beta_1))
    return new_var, m * beta_2 + grad * (1.0 - beta_2)


class Lion(Optimizer):
    """Lion. Matches `keras.optimizers.Lion`.

    Update rule: see `lion_update`. Slot: `momentum`. Its steps all have
    size lr per coordinate, so it wants a learning rate 3-10x smaller than
    Adam's (Chen et al., 2023).

    Args:
        learning_rate: float or schedule.
        beta_1: interpolation factor of the update direction, in (0, 1], as
            in Keras: at 0 the direction is sign(g) and Lion degenerates to
            SignSGD; at 1 it is sign(m), the kept momentum alone.
        beta_2: decay of the kept momentum, in [0, 1).
        **kwargs: See `distopt.optimizers.Optimizer`.

    Raises:
        ValueError: naming `beta_1` or `beta_2` when it is out of range.
    """

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.99, **kwargs):
        super().__init__(learning_rate, **kwargs)
        self.beta_1 = _check_beta_1(beta_1)
        self.beta_2 = check_unit("beta_2", beta_2)

    def slot_initializers(self, var):
        return {"momentum": tf.zeros(var.shape, var.dtype)}

    def update_step(self, grad, var, slots, lr, step):
        dt = var.dtype
        # tf.constant, not tf.cast: casting a Python float goes through
        # float32, which would round float64 hyperparameters.
        p, m = lion_update(
            grad,
            var,
            slots["momentum"],
            lr,
            tf.constant(self.beta_1, dt),
            tf.constant(self.beta_2, dt),
        )
        return p, {"momentum": m}

    def get_config(self):
        return {**super().get_config(), "beta_1": self.beta_1, "beta_2": self.beta_2}


def _check_beta_1(value) -> float:
    """A float in (0, 1] (Keras's range), or a ValueError naming `beta_1`."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"beta_1: must be a number in (0, 1], got {value!r}."
        ) from None
    if not 0.0 < v <= 1.0:
        raise ValueError(
            f"beta_1: must be in (0, 1], got {value!r}; at 0 Lion degenerates to "
            "SignSGD."
        )
    return v
