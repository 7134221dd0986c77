"""Adagrad."""

from __future__ import annotations

import tensorflow as tf

from distopt.optimizers.base import Optimizer
from distopt.optimizers.schedules import check_rate


def adagrad_update(grad, var, accumulator, lr, epsilon):
    """One Adagrad step, in Keras's arrangement.

    acc <- acc + g^2
    p <- p - lr * g / sqrt(acc + epsilon)

    Reference: Duchi, Hazan & Singer (2011), "Adaptive Subgradient Methods
    for Online Learning and Stochastic Optimization", JMLR 12.
    Returns (new_var, new_accumulator).
    """
    accumulator = accumulator + tf.square(grad)
    return var - (lr * grad) / tf.sqrt(accumulator + epsilon), accumulator


class Adagrad(Optimizer):
    """Adagrad. Matches `keras.optimizers.Adagrad`.

    Update rule: see `adagrad_update`. Slot: `accumulator`, initialised to
    `initial_accumulator_value`.

    Sparse gradients (`tf.IndexedSlices`) update the touched rows of the
    variable and the accumulator only (`sparse_rows`), as Keras 3 does (a
    `scatter_add` of the squared rows, then a `scatter_sub`); the result
    equals the dense gradient's, whose zero rows change nothing.

    Args:
        learning_rate: float or schedule.
        initial_accumulator_value: starting value of the sum of squared
            gradients, >= 0.
        epsilon: added to the accumulator under the square root, >= 0.
        **kwargs: See `distopt.optimizers.Optimizer`.
    """

    sparse_rows = True

    def __init__(
        self, learning_rate=0.001, initial_accumulator_value=0.1, epsilon=1e-7, **kwargs
    ):
        super().__init__(learning_rate, **kwargs)
        self.initial_accumulator_value = check_rate(
            "initial_accumulator_value", initial_accumulator_value
        )
        self.epsilon = check_rate("epsilon", epsilon)

    def slot_initializers(self, var):
        return {
            "accumulator": tf.fill(
                var.shape, tf.constant(self.initial_accumulator_value, var.dtype)
            )
        }

    def update_step(self, grad, var, slots, lr, step):
        # tf.constant, not tf.cast: casting a Python float goes through
        # float32, which would round float64 hyperparameters.
        p, acc = adagrad_update(
            grad, var, slots["accumulator"], lr, tf.constant(self.epsilon, var.dtype)
        )
        return p, {"accumulator": acc}

    def get_config(self):
        return {
            **super().get_config(),
            "initial_accumulator_value": self.initial_accumulator_value,
            "epsilon": self.epsilon,
        }
