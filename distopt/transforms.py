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


class SkipNonFinite(GradientTransform):
    """Skips the step (on every replica) if any gradient has a NaN or Inf."""

    def __call__(self, grads):
        finite = [tf.reduce_all(tf.math.is_finite(g)) for g in grads]
        return grads, tf.reduce_all(tf.stack(finite)) if finite else None

    def get_config(self):
        return {"skip_nonfinite": True}


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
