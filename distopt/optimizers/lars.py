"""Lars: momentum SGD with a layer-wise trust ratio."""

from __future__ import annotations

import tensorflow as tf

from distopt.optimizers.base import Optimizer, l2_norm
from distopt.optimizers.schedules import check_rate, check_unit


def lars_update(grad, var, v, lr, momentum, eta, weight_decay, norm=l2_norm):
    """One Lars step (You, Gitman & Ginsburg, 2017, Algorithm 2).

    local_lr = eta * ||p|| / (||g|| + weight_decay * ||p||)
               (local_lr = 1 if ||p|| or the denominator is 0)
    v <- momentum * v + lr * local_lr * (g + weight_decay * p)
    p <- p - v

    Norms are over the whole variable (one "layer"). The weight decay is the
    paper's L2 term, inside the trust ratio and the momentum; it is not the
    base class's decoupled decay. The fallback of 1 keeps zero-initialised
    variables (biases) training, as tensorflow/models' LARS does. Reference:
    You, Gitman & Ginsburg (2017), "Large Batch Training of Convolutional
    Networks", arXiv:1708.03888.

    Args:
        grad, var, v: The gradient, the variable's value and the momentum.
        lr, momentum, eta, weight_decay: Scalars in the variable's dtype.
        norm: The norm over one variable (`l2_norm`; the fused update passes
            one that gives each element its own variable's norm).

    Returns:
        (new_var, new_v).
    """
    w_norm = norm(var)
    g_norm = norm(grad)
    denominator = g_norm + weight_decay * w_norm
    ok = tf.logical_and(w_norm > 0, denominator > 0)
    # The inner select keeps the unused branch finite (no 0/0 under XLA).
    local_lr = tf.where(ok, eta * w_norm / tf.where(ok, denominator, 1.0), 1.0)
    v = momentum * v + lr * local_lr * (grad + weight_decay * var)
    return var - v, v


class Lars(Optimizer):
    """Lars, Layer-wise Adaptive Rate Scaling (You, Gitman & Ginsburg, 2017).

    Update rule: see `lars_update`. Slot: `momentum`. Not in Keras; the
    defaults are those of tensorflow/models' LARS. Every variable gets the
    trust ratio (there is no `exclude` list); pass biases and normalisation
    parameters to a second optimizer to exempt them.

    Args:
        learning_rate: the global learning rate, float or schedule.
        momentum: in [0, 1).
        eta: the trust coefficient, > 0 (the paper's 0.001).
        weight_decay: the L2 coefficient inside the trust ratio, >= 0. Unlike
            other optimizers' `weight_decay`, it is not decoupled.
        **kwargs: See `distopt.optimizers.Optimizer`.
    """

    # The trust ratio needs each variable's own norms.
    elementwise = False
    layerwise = True

    def __init__(
        self, learning_rate=0.01, momentum=0.9, eta=0.001, weight_decay=0.0, **kwargs
    ):
        # The base's decoupled decay stays off: Lars's decay is in its rule.
        super().__init__(learning_rate, **kwargs)
        self.momentum = check_unit("momentum", momentum)
        self.eta = check_rate("eta", eta)
        if self.eta == 0:
            raise ValueError(f"eta: must be > 0, got {eta!r}.")
        self.lars_weight_decay = check_rate("weight_decay", weight_decay)

    def slot_initializers(self, var):
        return {"momentum": tf.zeros(var.shape, var.dtype)}

    def update_step(self, grad, var, slots, lr, step, norm=l2_norm):
        dt = var.dtype
        # tf.constant, not tf.cast: casting a Python float goes through
        # float32, which would round float64 hyperparameters.
        p, v = lars_update(
            grad,
            var,
            slots["momentum"],
            lr,
            tf.constant(self.momentum, dt),
            tf.constant(self.eta, dt),
            tf.constant(self.lars_weight_decay, dt),
            norm,
        )
        return p, {"momentum": v}

    def get_config(self):
        return {
            **super().get_config(),
            "momentum": self.momentum,
            "eta": self.eta,
            "weight_decay": self.lars_weight_decay,
        }
