"""Learning-rate schedules: callables of the int64 step returning float32.

The step a schedule sees is `optimizer.iterations`, the number of updates
actually applied: with gradient accumulation over k micro-steps it advances
once per k micro-steps, and skipped (non-finite) steps do not advance it.
"""

from __future__ import annotations

import math

import tensorflow as tf

from distopt.checks import check_bool


class Schedule:
    """Base class. Subclasses implement `__call__(step)` and `get_config()`."""

    def __call__(self, step):
        raise NotImplementedError

    def get_config(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict) -> Schedule:
        return cls(**config)


class Constant(Schedule):
    """lr(t) = learning_rate."""

    def __init__(self, learning_rate: float):
        self.learning_rate = check_rate("learning_rate", learning_rate)

    def __call__(self, step):
        del step
        return tf.constant(self.learning_rate, tf.float32)

    def get_config(self):
        return {"learning_rate": self.learning_rate}


class ExponentialDecay(Schedule):
    """lr(t) = initial_learning_rate * decay_rate ** (t / decay_steps).

    With `staircase`, the exponent is floored.
    """

    def __init__(self, initial_learning_rate, decay_steps, decay_rate, staircase=False):
        self.initial_learning_rate = check_rate(
            "initial_learning_rate", initial_learning_rate
        )
        self.decay_steps = _check_steps("decay_steps", decay_steps)
        self.decay_rate = check_rate("decay_rate", decay_rate)
        self.staircase = check_bool("staircase", staircase)

    def __call__(self, step):
        p = tf.cast(step, tf.float32) / self.decay_steps
        if self.staircase:
            p = tf.floor(p)
        return self.initial_learning_rate * tf.pow(self.decay_rate, p)

    def get_config(self):
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "decay_steps": self.decay_steps,
            "decay_rate": self.decay_rate,
            "staircase": self.staircase,
        }


class PiecewiseConstant(Schedule):
    """lr(t) = values[i] for boundaries[i-1] <= t < boundaries[i]."""

    def __init__(self, boundaries, values):
        boundaries = [int(b) for b in boundaries]
        values = [check_rate("values", v) for v in values]
        if len(values) != len(boundaries) + 1:
            raise ValueError(
                f"values: needs len(boundaries) + 1 = {len(boundaries) + 1} entries, "
                f"got {len(values)}."
            )
        if boundaries != sorted(boundaries):
            raise ValueError(f"boundaries: must be increasing, got {boundaries}.")
        self.boundaries, self.values = boundaries, values

    def __call__(self, step):
        idx = tf.searchsorted(
            tf.constant(self.boundaries, tf.int64),
            tf.reshape(tf.cast(step, tf.int64), [1]),
            side="right",
        )[0]
        return tf.gather(tf.constant(self.values, tf.float32), idx)

    def get_config(self):
        return {"boundaries": self.boundaries, "values": self.values}


class CosineDecay(Schedule):
    """Linear warmup from 0 to `peak_learning_rate`, then cosine decay.

    lr(t) = peak * t / warmup_steps                         for t < warmup_steps
    lr(t) = peak * (alpha + (1 - alpha) * (1 + cos(pi * s)) / 2)  afterwards,
    with s = min(1, (t - warmup_steps) / decay_steps)
    (Loshchilov & Hutter, 2017, "SGDR"; Goyal et al., 2017, for the warmup).
    """

    def __init__(self, peak_learning_rate, decay_steps, warmup_steps=0, alpha=0.0):
        self.peak_learning_rate = check_rate("peak_learning_rate", peak_learning_rate)
        self.decay_steps = _check_steps("decay_steps", decay_steps)
        self.warmup_steps = int(warmup_steps)
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {warmup_steps}.")
        self.alpha = float(alpha)
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha: must be in [0, 1], got {alpha}.")

    def __call__(self, step):
        t = tf.cast(step, tf.float32)
        warm = self.peak_learning_rate * t / max(self.warmup_steps, 1)
        s = tf.minimum(1.0, tf.maximum(0.0, t - self.warmup_steps) / self.decay_steps)
        cos = 0.5 * (1.0 + tf.cos(math.pi * s))
        decayed = self.peak_learning_rate * (self.alpha + (1.0 - self.alpha) * cos)
        return tf.where(t < self.warmup_steps, warm, decayed)

    def get_config(self):
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "decay_steps": self.decay_steps,
            "warmup_steps": self.warmup_steps,
            "alpha": self.alpha,
        }


_SCHEDULES = {
    "constant": Constant,
    "exponential": ExponentialDecay,
    "piecewise": PiecewiseConstant,
    "cosine": CosineDecay,
}


def serialize(learning_rate):
    """A JSON-able form of a float or a schedule of this module.

    A `tf.Variable` is saved as its current value, as Keras does.
    """
    if isinstance(learning_rate, Schedule):
        name = next(k for k, v in _SCHEDULES.items() if v is type(learning_rate))
        return {"schedule": name, "config": learning_rate.get_config()}
    if isinstance(learning_rate, tf.Variable):
        return float(learning_rate.numpy())
    return learning_rate


def deserialize(value):
    """Inverse of `serialize`."""
    if isinstance(value, dict):
        return _SCHEDULES[value["schedule"]].from_config(value["config"])
    return value


def check_learning_rate(learning_rate):
    """Validates a float, a callable or a scalar float `tf.Variable`; returns it.

    The variable is kept, not its value: assigning it changes the rate, in
    traced functions too.
    """
    if callable(learning_rate):
        return learning_rate
    if isinstance(learning_rate, tf.Variable):
        if learning_rate.shape.rank != 0 or not learning_rate.dtype.is_floating:
            raise ValueError(
                "learning_rate: a tf.Variable must be a float scalar, got "
                f"shape {learning_rate.shape} and dtype {learning_rate.dtype.name}."
            )
        return learning_rate
    return check_rate("learning_rate", learning_rate)


def check_rate(name: str, value) -> float:
    """A finite, non-negative float, or a ValueError naming `name`."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{name}: must be a number or a schedule, got {value!r}."
        ) from None
    if math.isnan(v) or math.isinf(v) or v < 0:
        raise ValueError(f"{name}: must be finite and non-negative, got {value!r}.")
    return v


def check_unit(name: str, value) -> float:
    """A float in [0, 1), or a ValueError naming `name`."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{name}: must be a number in [0, 1), got {value!r}."
        ) from None
    if not 0.0 <= v < 1.0:
        raise ValueError(f"{name}: must be in [0, 1), got {value!r}.")
    return v


def _check_steps(name, value) -> int:
    v = int(value)
    if v <= 0:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}.")
    return v
