"""RMSprop, plain or centered, with optional momentum."""

from __future__ import annotations

import tensorflow as tf

from distopt.checks import check_bool
from distopt.optimizers.base import Optimizer
from distopt.optimizers.schedules import check_rate, check_unit


def rmsprop_update(grad, var, velocity, average_grad, mom, lr, rho, momentum, epsilon):
    """One RMSprop step, in Keras's arrangement.

    v <- rho * v + (1 - rho) * g^2
    a <- rho * a + (1 - rho) * g               (centered only; a=None skips)
    d = v - a^2 + epsilon   (centered)   or   d = v + epsilon
    inc = lr * g / sqrt(d)
    mom <- momentum * mom + inc;  p <- p - mom     (mom=None: p <- p - inc)

    Note that epsilon is inside the square root, as in Keras (and unlike
    Adam). Reference: Tieleman & Hinton (2012), "Lecture 6.5 - RMSprop",
    COURSERA: Neural Networks for Machine Learning; Graves (2013),
    "Generating Sequences With Recurrent Neural Networks" (centered form).

    Args:
        grad, var: The gradient and the variable's value.
        velocity: The running mean of g^2.
        average_grad: The running mean of g, or None when not centered.
        mom: The momentum accumulator, or None without momentum.
        lr, rho, momentum, epsilon: Scalars in the variable's dtype; `rho`
            and `momentum` may also be Python floats (then `1 - rho` is
            formed in double precision, as Keras does).

    Returns:
        (new_var, new_velocity, new_average_grad, new_mom); the last two are
        None where their input was.
    """
    velocity = rho * velocity + (1 - rho) * tf.square(grad)
    if average_grad is not None:
        average_grad = rho * average_grad + (1 - rho) * grad
        denominator = velocity - tf.square(average_grad) + epsilon
    else:
        denominator = velocity + epsilon
    increment = (lr * grad) / tf.sqrt(denominator)
    if mom is not None:
        mom = momentum * mom + increment
        return var - mom, velocity, average_grad, mom
    return var - increment, velocity, average_grad, mom


class RMSprop(Optimizer):
    """RMSprop, optionally centered and with momentum.

    Matches `keras.optimizers.RMSprop`; update rule: see `rmsprop_update`.
    Slots (Keras's names): `velocity`; `momentum` when momentum > 0;
    `average_gradient` when centered.

    Args:
        learning_rate: float or schedule.
        rho: decay of the running averages, in [0, 1).
        momentum: in [0, 1); 0 keeps no momentum slot.
        epsilon: added to the mean square under the square root, >= 0.
        centered: divide by an estimate of the gradient's variance
            (E[g^2] - E[g]^2) instead of its second moment.
        **kwargs: See `distopt.optimizers.Optimizer`.
    """

    def __init__(
        self,
        learning_rate=0.001,
        rho=0.9,
        momentum=0.0,
        epsilon=1e-7,
        centered=False,
        **kwargs,
    ):
        super().__init__(learning_rate, **kwargs)
        self.rho = check_unit("rho", rho)
        self.momentum = check_unit("momentum", momentum)
        self.epsilon = check_rate("epsilon", epsilon)
        self.centered = check_bool("centered", centered)

    def slot_initializers(self, var):
        names = ["velocity"]
        if self.momentum > 0:
            names.append("momentum")
        if self.centered:
            names.append("average_gradient")
        return {n: tf.zeros(var.shape, var.dtype) for n in names}

    def update_step(self, grad, var, slots, lr, step):
        dt = var.dtype
        # rho stays a Python float: Keras multiplies by `rho` and `1 - rho`
        # formed in double precision, and bit-parity needs the same rounding.
        # tf.constant, not tf.cast: casting a Python float goes through
        # float32, which would round float64 hyperparameters.
        p, velocity, avg, mom = rmsprop_update(
            grad,
            var,
            slots["velocity"],
            slots.get("average_gradient"),
            slots.get("momentum"),
            lr,
            self.rho,
            tf.constant(self.momentum, dt),
            tf.constant(self.epsilon, dt),
        )
        new = {"velocity": velocity}
        if mom is not None:
            new["momentum"] = mom
        if avg is not None:
            new["average_gradient"] = avg
        return p, new

    def get_config(self):
        return {
            **super().get_config(),
            "rho": self.rho,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "centered": self.centered,
        }
