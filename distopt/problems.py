"""Test problems for optimizer studies (`python -m distopt.compare`).

Each problem gives its loss, its analytic gradient, a start point and its
known minimum. Parameters are float32 vectors of shape `[dim]`, so a 1-D
problem's parameter is a vector of one element.

* `quartic`: L(x) = 2x^4 + 3x^3 + 2, the test function of TensorFlow's Core
  optimizers guide. L'(x) = x^2 (8x + 9): a saddle point (a flat inflection)
  at 0 and the global minimum at x* = -9/8, with L(x*) = 2 - 2187/2048. From
  the poor start x = 2, an optimizer must cross the saddle to reach it.
* `rosenbrock`: f(x, y) = (1 - x)^2 + 100 (y - x^2)^2 from (-1.2, 1), the
  classic curved valley; minimum f(1, 1) = 0.
* `noisy_quadratic`: L(x) = (x0 - 1)^2 / 2 + 10 (x1 - 1)^2 / 2, condition number
  10, whose gradient at step t carries Gaussian noise of standard deviation
  `noise_scale`, drawn from a stateless generator seeded by (seed, t): every
  run, optimizer and replica sees the same noise sequence. Minimum L(1, 1) = 0.

The functions use TensorFlow ops and accept tensors or NumPy arrays (with the
parameters on the last axis, so a grid of points evaluates at once).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


class Problem:
    """A minimisation test problem.

    Attributes:
        name: The registry name.
        title: The formula, for figures.
        dim: The number of parameters.
        start: The start point, shape `[dim]`.
        minimum: The global minimiser x*, shape `[dim]`.
        min_loss: L(x*).
        saddle: A saddle point, shape `[dim]`, or None.
        bounds: `((lo, hi), ...)` per parameter: the region figures show.
        stochastic: Whether the gradient depends on the step (noise).
    """

    name = "problem"
    title = ""
    dim = 1
    start: np.ndarray
    minimum: np.ndarray
    min_loss = 0.0
    saddle: np.ndarray | None = None
    bounds: tuple = ()
    stochastic = False

    def loss(self, x):
        """The objective L(x), over the last axis of `x`."""
        raise NotImplementedError

    def gradient(self, x, step=None):
        """The analytic gradient at `x`; at step `step` for a stochastic problem."""
        raise NotImplementedError

    def objective(self, x, step=None):
        """The loss a step sees: its autodiff gradient equals `gradient(x, step)`.

        For a deterministic problem, `loss(x)`; a stochastic one adds a term
        linear in `x` whose gradient is the step's noise. Optimizers that
        evaluate the loss themselves (`SAM`, `Heun`) minimise this.
        """
        del step
        return self.loss(x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Quartic(Problem):
    """L(x) = 2x^4 + 3x^3 + 2, from x = 2 (TensorFlow's Core optimizers guide)."""

    name = "quartic"
    title = "L(x) = 2x^4 + 3x^3 + 2"
    dim = 1

    def __init__(self):
        self.start = np.array([2.0], np.float32)
        self.minimum = np.array([-9.0 / 8.0], np.float32)
        # 2 (9/8)^4 - 3 (9/8)^3 + 2 = 2 - 3^7 / 2^11.
        self.min_loss = 2.0 - 2187.0 / 2048.0
        self.saddle = np.array([0.0], np.float32)
        self.bounds = ((-2.0, 2.5),)

    def loss(self, x):
        x = x[..., 0]
        return 2 * x**4 + 3 * x**3 + 2

    def gradient(self, x, step=None):
        del step
        return 8 * x**3 + 9 * x**2


class Rosenbrock(Problem):
    """f(x, y) = (a - x)^2 + b (y - x^2)^2 with a = 1, b = 100, from (-1.2, 1)."""

    name = "rosenbrock"
    title = "f(x, y) = (1 - x)^2 + 100 (y - x^2)^2"
    dim = 2

    def __init__(self, a: float = 1.0, b: float = 100.0):
        self.a, self.b = float(a), float(b)
        self.start = np.array([-1.2, 1.0], np.float32)
        self.minimum = np.array([self.a, self.a**2], np.float32)
        self.min_loss = 0.0
        self.bounds = ((-2.0, 2.0), (-1.0, 3.0))

    def loss(self, x):
        x0, x1 = x[..., 0], x[..., 1]
        return (self.a - x0) ** 2 + self.b * (x1 - x0**2) ** 2

    def gradient(self, x, step=None):
        del step
        x0, x1 = x[..., 0], x[..., 1]
        r = x1 - x0**2
        g0 = -2 * (self.a - x0) - 4 * self.b * x0 * r
        g1 = 2 * self.b * r
        return _stack([g0, g1])


class NoisyQuadratic(Problem):
    """An ill-conditioned quadratic whose gradient carries seeded Gaussian noise.

    L(x) = sum_i h_i (x_i - 1)^2 / 2 with h = (1, 10); the gradient at step t
    is h (x - 1) + noise_scale * z_t, z_t ~ N(0, I) from
    `tf.random.stateless_normal` seeded by (seed, t).

    Args:
        noise_scale: The standard deviation of the gradient noise.
        seed: The noise seed.
    """

    name = "noisy_quadratic"
    title = "L(x) = (x0 - 1)^2 / 2 + 10 (x1 - 1)^2 / 2, noisy gradient"
    dim = 2
    stochastic = True

    def __init__(self, noise_scale: float = 0.5, seed: int = 0):
        # NaN fails this too; a negative scale is the same noise, mirrored.
        if not 0 <= float(noise_scale) < float("inf"):
            raise ValueError(
                f"noise_scale: must be >= 0 and finite, got {noise_scale!r}."
            )
        self.noise_scale = float(noise_scale)
        self.seed = int(seed)
        self.curvature = np.array([1.0, 10.0], np.float32)
        self.start = np.array([-1.5, 2.0], np.float32)
        self.minimum = np.array([1.0, 1.0], np.float32)
        self.min_loss = 0.0
        self.bounds = ((-2.0, 2.0), (0.0, 2.5))

    def loss(self, x):
        d = x - self.minimum
        return 0.5 * _sum_last(d * d * self.curvature)

    def noise(self, step) -> tf.Tensor:
        """The gradient noise of step `step` (shape `[dim]`, float32)."""
        seed = tf.stack([tf.constant(self.seed, tf.int64), tf.cast(step, tf.int64)])
        z = tf.random.stateless_normal([self.dim], seed=seed, dtype=tf.float32)
        return self.noise_scale * z

    def gradient(self, x, step=None):
        g = (x - self.minimum) * self.curvature
        if step is None:
            return g
        return g + tf.cast(self.noise(step), g.dtype)

    def objective(self, x, step=None):
        if step is None:
            return self.loss(x)
        # The gradient of <z_t, x> is z_t: autodiff sees the noisy gradient.
        noise = tf.stop_gradient(tf.cast(self.noise(step), x.dtype))
        return self.loss(x) + tf.reduce_sum(noise * x, axis=-1)


_REGISTRY = {cls.name: cls for cls in (Quartic, Rosenbrock, NoisyQuadratic)}


def names() -> list[str]:
    """The registered problem names, sorted."""
    return sorted(_REGISTRY)


def get(name: str, **kwargs) -> Problem:
    """A problem by name, e.g. `get("rosenbrock")`.

    Raises:
        ValueError: for an unknown name, listing the valid ones.
    """
    if isinstance(name, Problem):
        return name
    if name not in _REGISTRY:
        raise ValueError(
            f"problem: unknown {name!r}; valid names: {', '.join(names())}."
        )
    return _REGISTRY[name](**kwargs)


def _stack(parts):
    if any(isinstance(p, (tf.Tensor, tf.Variable)) for p in parts):
        return tf.stack(parts, axis=-1)
    return np.stack(parts, axis=-1)


def _sum_last(x):
    if isinstance(x, (tf.Tensor, tf.Variable)):
        return tf.reduce_sum(x, axis=-1)
    return np.sum(x, axis=-1)
