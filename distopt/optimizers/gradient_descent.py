"""Gradient descent and momentum (heavy-ball and Nesterov)."""

from __future__ import annotations

import tensorflow as tf

from distopt.checks import check_bool
from distopt.optimizers.base import Optimizer
from distopt.optimizers.schedules import check_unit


def gradient_descent(grad, var, lr):
    """p <- p - lr * g."""
    return var - lr * grad


def momentum_update(grad, var, m, lr, momentum, nesterov):
    """Heavy-ball or Nesterov momentum, in Keras's SGD arrangement.

    m <- momentum * m - lr * g
    p <- p + m                            (heavy ball, Polyak 1964)
    p <- p + momentum * m - lr * g        (Nesterov, Sutskever et al. 2013)

    Returns (new_var, new_m).
    """
    m = m * momentum - grad * lr
    step = m * momentum - grad * lr if nesterov else m
    return var + step, m


class GradientDescent(Optimizer):
    """Plain gradient descent: p <- p - lr * g.

    Matches `keras.optimizers.SGD(momentum=0)`.

    Sparse gradients (`tf.IndexedSlices`) update the touched rows only
    (`sparse_rows`), as Keras's `scatter_sub` does; the result equals the
    dense gradient's.

    Args:
        learning_rate: float or schedule (Keras's default, 0.01).
        **kwargs: See `distopt.optimizers.Optimizer`.
    """

    sparse_rows = True

    def __init__(self, learning_rate=0.01, **kwargs):
        super().__init__(learning_rate, **kwargs)

    def update_step(self, grad, var, slots, lr, step):
        return gradient_descent(grad, var, lr), {}


class Momentum(Optimizer):
    """Gradient descent with heavy-ball or Nesterov momentum.

    m <- momentum * m - lr * g;  p <- p + m  (or, Nesterov,
    p <- p + momentum * m - lr * g). Matches `keras.optimizers.SGD` with the
    same `momentum` and `nesterov`. References: Polyak (1964); Sutskever,
    Martens, Dahl & Hinton (2013), "On the importance of initialization and
    momentum in deep learning".

    Sparse gradients (`tf.IndexedSlices`): the touched rows only
    (`sparse_rows`). A touched row's momentum decays and takes the gradient;
    an untouched row keeps its momentum and its value, as in TF1's
    `MomentumOptimizer` (`SparseApplyMomentum`) and tf.keras 2's
    `optimizer_v2` SGD (`ResourceSparseApplyKerasMomentum`): an embedding row
    moves only when it is looked up. This differs from the dense gradient, and from Keras 3,
    whose SGD densifies the slices so that every row's momentum decays and
    keeps moving the row.

    Args:
        learning_rate: float or schedule.
        momentum: in [0, 1); 0 gives plain gradient descent.
        nesterov: use Nesterov momentum.
        **kwargs: See `distopt.optimizers.Optimizer`.
    """

    sparse_rows = True

    def __init__(self, learning_rate=0.01, momentum=0.9, nesterov=False, **kwargs):
        super().__init__(learning_rate, **kwargs)
        self.momentum = check_unit("momentum", momentum)
        self.nesterov = check_bool("nesterov", nesterov)

    def slot_initializers(self, var):
        return {"momentum": tf.zeros(var.shape, var.dtype)}

    def update_step(self, grad, var, slots, lr, step):
        p, m = momentum_update(
            grad,
            var,
            slots["momentum"],
            lr,
            tf.constant(self.momentum, var.dtype),
            self.nesterov,
        )
        return p, {"momentum": m}

    def get_config(self):
        return {
            **super().get_config(),
            "momentum": self.momentum,
            "nesterov": self.nesterov,
        }
