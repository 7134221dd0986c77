"""How per-replica gradients become one gradient.

Every aggregation sends the same payload, so that one fused all-reduce
carries everything: the (possibly weighted) gradients packed into one buffer
per dtype, with the replica's weight appended as the last element. After the
SUM all-reduce the receiver divides by a normaliser computed from the summed
weight:

| aggregation    | replica sends   | result                          |
| -------------- | --------------- | ------------------------------- |
| `Mean`         | `g_r`, 1        | `sum_r g_r / R`                 |
| `Sum`          | `g_r`, 1        | `sum_r g_r`                     |
| `WeightedMean` | `w_r * g_r`, w_r| `sum_r w_r g_r / sum_r w_r`     |

With gradient accumulation over k micro-steps the payload is accumulated
locally first; `Mean` then divides by `R * k` and `Sum` by `k`, so both equal
their definition on a k-times-larger batch.

Edges of `WeightedMean` (see `distopt.reduce` for the arithmetic):

* Weights may range over 1e-30 .. 1e30. The payload `w * g` is formed in
  float32 (or the variable's dtype if wider), so `|w * g|` must stay below
  float32's 3.4e38; a narrow wire (float16, bfloat16) only ever carries
  `w_r * g_r / sum(w)`, which has the magnitude of a gradient.
* Every weight zero: the mean is undefined, so the step is skipped (no
  variable changes, `optimizer.skipped_steps` counts it), never a silent NaN.
* Some weights zero: those replicas contribute exactly zero, even when
  their gradient is NaN (the mean over an empty batch).
* A negative, NaN or Inf weight on any replica: every replica skips the
  step, and `skipped_steps` and `invalid_weight_steps` count it. This holds
  eagerly, in `tf.function` and under XLA; eager calls raise `ValueError`
  first, naming the weight.

Test a scale with plain gradient descent, never only with Adam: Adam is
invariant to a constant factor on the gradient, so a wrong normaliser would
pass unseen.
"""

from __future__ import annotations

import tensorflow as tf


class Aggregation:
    """Base class: the weight a replica sends and the final normaliser."""

    name = "aggregation"
    #: Whether gradients are multiplied by the replica weight before sending.
    weighted = False

    def replica_weight(self, weight):
        """`(w, valid)`: this replica's float32 weight, and whether it is valid."""
        del weight
        return tf.constant(1.0, tf.float32), tf.constant(True)

    def normalizer(self, total_weight: tf.Tensor, num_replicas: int) -> tf.Tensor:
        """The divisor applied to the summed payload."""
        raise NotImplementedError

    def aggregate_share(self, num_replicas: int) -> float:
        """What each replica sends of an aggregate given outside `strategy.run`.

        Such a gradient reaches every replica whole and is reduced like
        theirs: 1 for a mean (of R equal values), 1/R for a sum.
        """
        del num_replicas
        return 1.0

    def get_config(self) -> dict:
        return {"name": self.name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Mean(Aggregation):
    """The mean of the replicas' gradients (the default)."""

    name = "mean"

    def normalizer(self, total_weight, num_replicas):
        del num_replicas
        return total_weight


class Sum(Aggregation):
    """The sum of the replicas' gradients (each replica's loss pre-scaled)."""

    name = "sum"

    def normalizer(self, total_weight, num_replicas):
        # total_weight = R * micro_steps; Sum averages over micro-steps only.
        return total_weight / tf.cast(num_replicas, total_weight.dtype)

    def aggregate_share(self, num_replicas):
        return 1.0 / num_replicas


class WeightedMean(Aggregation):
    """sum(w_r * g_r) / sum(w_r), with w_r passed by each replica.

    Pass each replica's number of valid examples as `weight` and the result is
    exactly the mean over all examples, even with uneven or ragged per-replica
    batches (tensorflow#29975).
    """

    name = "weighted_mean"
    weighted = True

    def replica_weight(self, weight):
        if weight is None:
            raise ValueError(
                "weight: WeightedMean aggregation needs `weight=` in "
                "apply_gradients (e.g. this replica's number of examples)."
            )
        w = tf.convert_to_tensor(weight)
        if w.shape.rank is not None and w.shape.rank != 0:
            raise ValueError(f"weight: must be a scalar, got shape {w.shape}.")
        if not (w.dtype.is_floating or w.dtype.is_integer):
            raise ValueError(f"weight: must be a number, got dtype {w.dtype.name}.")
        w = tf.cast(w, tf.float32)
        if tf.executing_eagerly():
            value = float(w.numpy())
            if not value >= 0.0 or value == float("inf"):
                raise ValueError(
                    f"weight: must be finite and non-negative, got {value}."
                )
        # Compiled code drops assertions, so validity travels as data: the
        # Reducer turns an invalid weight into a skipped, counted step.
        valid = tf.logical_and(tf.math.is_finite(w), w >= 0.0)
        return w, valid

    def normalizer(self, total_weight, num_replicas):
        del num_replicas
        return total_weight


_REGISTRY = {cls.name: cls for cls in (Mean, Sum, WeightedMean)}


def names() -> list[str]:
    """The names `get` accepts."""
    return sorted(_REGISTRY)


def get(identifier=None) -> Aggregation:
    """An aggregation from a name, an instance or None (the default, Mean)."""
    if identifier is None:
        return Mean()
    if isinstance(identifier, Aggregation):
        return identifier
    if isinstance(identifier, str) and identifier in _REGISTRY:
        return _REGISTRY[identifier]()
    raise ValueError(
        f"aggregation: unknown {identifier!r}; valid names: {', '.join(names())}."
    )
