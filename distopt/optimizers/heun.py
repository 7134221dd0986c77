"""Heun's method: an explicit second-order Runge-Kutta step on gradient flow."""

from __future__ import annotations

import tensorflow as tf

from distopt import distribute as dist
from distopt import reduce as reduce_lib
from distopt.optimizers.base import Optimizer


class Heun(Optimizer):
    """Heun's method on the gradient flow dp/dt = -grad L(p).

    One step of `minimize(loss_fn, var_list)`, with lr the learning rate:

        g1 = grad L(p)
        p~ = p - lr * g1                  (the Euler trial point)
        g2 = grad L(p~)
        p <- p - lr/2 * (g1 + g2)         (the trapezoidal correction)

    This is Heun's method, also called the explicit trapezoidal rule or
    improved Euler, the two-stage Runge-Kutta method with Butcher tableau
    c = (0, 1), a21 = 1, b = (1/2, 1/2); its local error is O(lr^3) against
    O(lr^2) for the Euler step of gradient descent. References: Heun (1900),
    "Neue Methoden zur approximativen Integration der Differentialgleichungen
    einer unabhängigen Veränderlichen", Z. Math. Phys. 45, 23-38; Butcher
    (2016), "Numerical Methods for Ordinary Differential Equations", 3rd ed.

    It needs the loss at the trial point, so `apply_gradients` is not
    available: use `minimize`, which evaluates `loss_fn` twice per step.

    Under a distribution strategy (`minimize` inside `strategy.run`, each
    replica with its own data) both g1 and g2 are the aggregated gradients
    (per `aggregation`, the mean by default), so every replica's copy stays
    identical: g1 is all-reduced to place the trial point, and the final
    update applies the replicas' (g1 + g2) / 2 through the ordinary update
    path, which aggregates it; aggregation is linear, so that is exactly
    (mean g1 + mean g2) / 2. Two all-reduces per step. A `tf.IndexedSlices`
    gradient (an embedding) stays sparse in both: the trial point moves only
    the rows g1 touches, and the update sends the rows of (g1 + g2) / 2,
    each index once. An invalid weight skips the step and counts once in
    `invalid_weight_steps`.

    The final update goes through the ordinary path, so `weight_decay`,
    `global_clipnorm`, `clipvalue` and `skip_nonfinite` act on it (the
    decay once per step, the clipping on the averaged gradient); the trial
    point uses the same clipping of g1. `iterations` advances once per step.

    Args:
        learning_rate: float or schedule; the step size of the integrator.
        **kwargs: See `distopt.optimizers.Optimizer`; `sync` must be
            "every_step" (the default): a trial point needs the aggregated
            gradient of this very step.
    """

    #: Optimizers with this attribute need `minimize`: they evaluate the loss.
    needs_loss = True

    def __init__(self, learning_rate=0.01, **kwargs):
        super().__init__(learning_rate, **kwargs)
        if self.sync.name != "every_step":
            raise ValueError(
                f"sync: Heun needs 'every_step' (its trial point uses this step's "
                f"aggregated gradient), got {self.sync.name!r}."
            )

    def update_step(self, grad, var, slots, lr, step):
        # `grad` is the aggregated (g1 + g2) / 2 that `minimize` passes in.
        return var - lr * grad, {}

    def apply_gradients(self, *args, **kwargs):
        """Not available: Heun needs the loss. Use `minimize(loss_fn, var_list)`."""
        del args, kwargs
        raise NotImplementedError(
            "Heun needs the loss, not gradients: call minimize(loss_fn, var_list). "
            "apply_gradients cannot evaluate the gradient at the trial point "
            "p - lr * g(p)."
        )

    @tf.autograph.experimental.do_not_convert
    def minimize(self, loss_fn, var_list, *, weight=None):
        """One Heun step: two evaluations of `loss_fn`, one update.

        Args:
            loss_fn: A callable of no arguments returning the scalar loss; it
                must read the variables (it is called at p and at p~).
            var_list: The variables to optimise.
            weight: This replica's weight, for `WeightedMean` aggregation.

        Returns:
            The loss at p, before the step.
        """
        var_list = list(var_list)
        # The rate the update below will use (it reads the same iterations).
        lr = self.learning_rate_value()
        with tf.GradientTape() as tape:
            loss = loss_fn()
            scaled = self.scale_loss(loss)
        g1 = tape.gradient(scaled, var_list)
        pairs = [(g, v) for g, v in zip(g1, var_list) if g is not None]
        if not pairs:
            raise ValueError("var_list: loss_fn depends on none of the variables.")
        # A `tf.IndexedSlices` gradient (an embedding) stays sparse.
        g1 = [g for g, _ in pairs]
        moved = [v for _, v in pairs]
        # Aggregated and transformed (clipped) exactly as the update will be;
        # sparse on the wire, back with each index once.
        g1_mean = self.reducer.reduce_in_replica_context(g1, weight)
        saved = [tf.identity(v) for v in moved]
        # Identical deltas on every replica (g1_mean is all-reduced): the
        # copies stay identical at the trial point.
        dist.add_per_replica(
            moved,
            [
                reduce_lib.map_values(g, lambda x: -tf.cast(lr, x.dtype) * x)
                for g in g1_mean
            ],
        )
        with tf.GradientTape() as tape:
            trial_loss = self.scale_loss(loss_fn())
        g2 = tape.gradient(trial_loss, moved)
        # Back to p exactly: p - lr*g1 + lr*g1 need not be p in floating point.
        dist.assign_per_replica(moved, saved)
        avg = [_half_sum(a, b) for a, b in zip(g1, g2)]
        super().apply_gradients(avg, moved, weight=weight)
        return loss


def _half_sum(a, b):
    """`(a + b) / 2` of two gradients of one variable; `b` may be None.

    Two `tf.IndexedSlices` stay sparse: their rows are halved (exact) and
    concatenated, and the rows of equal index summed here, so that the
    update's all-gather carries each index once (g1 and g2 of an embedding
    touch the same rows). Otherwise the sum is dense.
    """
    if b is None:
        return reduce_lib.map_values(a, lambda x: 0.5 * x)
    if isinstance(a, tf.IndexedSlices) and isinstance(b, tf.IndexedSlices):
        both = tf.IndexedSlices(
            tf.concat([0.5 * a.values, 0.5 * tf.cast(b.values, a.values.dtype)], 0),
            tf.concat([a.indices, tf.cast(b.indices, a.indices.dtype)], 0),
            a.dense_shape,
        )
        return reduce_lib.sum_duplicates(both)
    return 0.5 * (tf.convert_to_tensor(a) + tf.convert_to_tensor(b))
