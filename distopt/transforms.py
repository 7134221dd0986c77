"""Transforms of the aggregated gradient, applied after the all-reduce.

Clipping before the reduce is "usually wrong" (tensorflow#33929,
horovod#1346): each replica would clip a different, noisier gradient. Here
every transform sees the reduced gradient, which every replica holds
identically, so every replica reaches the same decision; in particular
`SkipNonFinite` makes all replicas skip a step together when any replica
produced a NaN or Inf (a NaN anywhere survives the sum).

A transform maps a list of gradients to `(gradients, ok)`, where `ok` is a
scalar bool tensor (False: skip this step) or None.

Before the reduce, only the wire format can change (`wire_dtype` of the
optimizer): the packed buffer is cast to bfloat16 or float16 for the
all-reduce and back afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import tensorflow as tf

from distopt.checks import check_bool


class GradientTransform:
    """Base class of post-reduce transforms."""

    def __call__(self, grads: list[tf.Tensor]):
        raise NotImplementedError

    def get_config(self) -> dict:
        return {}


class ClipByGlobalNorm(GradientTransform):
    """g <- g * min(1, clipnorm / ||g||_2), with the norm over all gradients."""

    def __init__(self, clipnorm: float):
        _check_positive("global_clipnorm", clipnorm)
        self.clipnorm = float(clipnorm)

    def __call__(self, grads):
        clipped, _ = tf.clip_by_global_norm(grads, self.clipnorm)
        return clipped, None

    def get_config(self):
        return {"global_clipnorm": self.clipnorm}


class ClipByValue(GradientTransform):
    """g <- clip(g, -clipvalue, clipvalue), elementwise."""

    def __init__(self, clipvalue: float):
        _check_positive("clipvalue", clipvalue)
        self.clipvalue = float(clipvalue)

    def __call__(self, grads):
        return [
            tf.clip_by_value(g, -self.clipvalue, self.clipvalue) for g in grads
        ], None

    def get_config(self):
        return {"clipvalue": self.clipvalue}


class ClipByNorm(GradientTransform):
    """g <- g * min(1, clipnorm / ||g||_2), with each gradient's own norm.

    Keras's `clipnorm`, and its arithmetic (`tf.clip_by_norm`). A sparse
    gradient's norm is that of its rows, each index once: the norm of the
    dense gradient.
    """

    def __init__(self, clipnorm: float):
        _check_positive("clipnorm", clipnorm)
        self.clipnorm = float(clipnorm)

    def __call__(self, grads):
        return [tf.clip_by_norm(g, self.clipnorm) for g in grads], None

    def get_config(self):
        return {"clipnorm": self.clipnorm}


class SkipNonFinite(GradientTransform):
    """Skips the step (on every replica) if any gradient has a NaN or Inf."""

    def __call__(self, grads):
        finite = [tf.reduce_all(tf.math.is_finite(g)) for g in grads]
        return grads, tf.reduce_all(tf.stack(finite)) if finite else None

    def get_config(self):
        return {"skip_nonfinite": True}


class LossScale(tf.Module, GradientTransform):
    """Loss scaling for float16 training, static or dynamic (Keras's schedule).

    The loss is multiplied by `scale` before differentiation
    (`Optimizer.scale_loss`), so small float16 gradients do not flush to
    zero; the aggregated gradient is divided by it here, first in the chain,
    so clipping sees true gradients. A non-finite aggregated gradient skips
    the step on every replica (the verdict is taken on the all-reduced
    gradient, identical everywhere). Dynamic scaling then halves the scale
    (down to 1); after `growth_steps` finite steps in a row it doubles it.
    `update` returns the factor, for compression's residuals, which are kept
    in loss-scaled units (`Compressor.rescale`).

    Reference: Micikevicius et al. (2018), "Mixed Precision Training", and
    `keras.optimizers.LossScaleOptimizer` (initial scale 2^15, growth every
    2000 steps, factor 2).

    Args:
        initial_scale: The starting scale (a fixed scale if not dynamic).
        dynamic: Adjust the scale as above.
        growth_steps: Finite steps in a row before the scale doubles.
    """

    def __init__(self, initial_scale=2.0**15, dynamic=True, growth_steps=2000):
        tf.Module.__init__(self, name="loss_scale")
        _check_positive("loss_scale", initial_scale)
        if (
            isinstance(growth_steps, bool)
            or not isinstance(growth_steps, int)
            or growth_steps < 1
        ):
            raise ValueError(
                f"loss_scale: growth_steps must be an integer >= 1, got {growth_steps!r}."
            )
        self.initial_scale = float(initial_scale)
        self.dynamic = check_bool("dynamic", dynamic)
        self.growth_steps = growth_steps
        with tf.name_scope(self.name):
            self.scale = tf.Variable(self.initial_scale, trainable=False, name="scale")
            self.good_steps = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="good_steps"
            )

    def __call__(self, grads):
        inv = 1.0 / tf.convert_to_tensor(self.scale)
        grads = [g * tf.cast(inv, g.dtype) for g in grads]
        finite = [tf.reduce_all(tf.math.is_finite(g)) for g in grads]
        return grads, tf.reduce_all(tf.stack(finite)) if finite else None

    def update(self, ok):
        """Adjusts the scale after a step; `ok` is that step's verdict (cross-replica).

        Returns:
            The factor the scale was multiplied by (new / old: 1, 2, or 0.5
            or less at the floor of 1), for the state kept in loss-scaled
            units (compression's residuals: `Compressor.rescale`); None when
            the scale is fixed.
        """
        if not self.dynamic:
            return None
        good = tf.where(ok, self.good_steps + 1, 0)
        grow = tf.logical_and(ok, good >= self.growth_steps)
        scale = tf.convert_to_tensor(self.scale)
        new_scale = tf.where(
            ok, tf.where(grow, scale * 2.0, scale), tf.maximum(scale * 0.5, 1.0)
        )
        self.scale.assign(new_scale)
        self.good_steps.assign(tf.where(grow, tf.constant(0, tf.int64), good))
        return new_scale / scale

    def get_config(self):
        return {
            "loss_scale": "dynamic" if self.dynamic else self.initial_scale,
        }


def get_loss_scale(loss_scale):
    """A `LossScale` from None, "dynamic", or a positive number (fixed)."""
    if loss_scale is None:
        return None
    if isinstance(loss_scale, LossScale):
        return loss_scale
    if loss_scale == "dynamic":
        return LossScale()
    try:
        value = float(loss_scale)
    except (TypeError, ValueError):
        raise ValueError(
            f"loss_scale: must be None, 'dynamic' or a positive number, got {loss_scale!r}."
        ) from None
    return LossScale(value, dynamic=False)


def apply(transforms: Sequence[GradientTransform], grads: list[tf.Tensor]):
    """Runs `transforms` in order; returns `(grads, ok)`, ok a bool or None."""
    ok = None
    for t in transforms:
        grads, t_ok = t(grads)
        if t_ok is not None:
            ok = t_ok if ok is None else tf.logical_and(ok, t_ok)
    return grads, ok


WIRE_DTYPES = ("bfloat16", "float16")


def check_wire_dtype(wire_dtype):
    """Validates the `wire_dtype` argument; returns a tf.DType or None."""
    if wire_dtype is None:
        return None
    name = (
        tf.as_dtype(wire_dtype).name if not isinstance(wire_dtype, str) else wire_dtype
    )
    if name not in WIRE_DTYPES:
        raise ValueError(
            f"wire_dtype: must be None or one of {', '.join(WIRE_DTYPES)}, got {wire_dtype!r}."
        )
    return tf.as_dtype(name)


def _check_positive(name, value):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: must be a positive number, got {value!r}.") from None
    if not v > 0 or math.isinf(v):
        raise ValueError(f"{name}: must be a positive finite number, got {value!r}.")
