"""Top-k sparsification with error feedback.

Stich, Cordonnier & Jaggi (NeurIPS 2018), "Sparsified SGD with Memory",
arXiv 1809.07599; Aji & Heafield (2017). On replica r, for each variable's
x_r = s_r + e_r (flattened, d elements):

    k = max(1, ceil(fraction * d))
    I_r = the indices of the k entries of largest |x_r|   (ties: lower index)
    send (x_r[I_r], I_r)                  values and int32 indices
    aggregate = sum_r scatter(I_r, x_r[I_r])   every replica's, gathered
    e_r <- x_r with the entries of I_r set to zero

The selected entries do not add up across replicas (each replica picks its
own indices), so they travel in an all-gather, not an all-reduce: every
replica receives every replica's k values and indices, and the bytes grow
with the number of replicas (`allgather_bytes`). All variables' values
(bitcast to int32) and indices go in one int32 buffer per replica, one
all-gather per step. The sum over replicas is taken in replica order on
every replica, from the same gathered rows, so every replica holds the same
bits.
"""

from __future__ import annotations

import fractions
import math

import tensorflow as tf

from distopt import distribute as dist
from distopt.checks import check_number, owned_by
from distopt.compression.base import Compressor


class TopK(Compressor):
    """Each replica sends its largest-magnitude entries per variable.

    Args:
        fraction: The share of each variable's entries sent, in (0, 1].
        error_feedback: Keep and send the residuals (default).
        start_step: Plain all-reduces for the first reductions.
        name: The module's name.
        error_feedback_decay: The residual's decay (see `Compressor`).
    """

    name = "topk"
    propagates_nonfinite = True  # (see Compressor)

    def __init__(
        self,
        fraction=0.01,
        error_feedback=True,
        start_step=0,
        name=None,
        error_feedback_decay=1.0,
    ):
        super().__init__(
            error_feedback=error_feedback,
            error_feedback_decay=error_feedback_decay,
            start_step=start_step,
            name=name,
        )
        with owned_by(type(self).__name__):
            # A number, not "0.1": the trainer's flag is parsed into one.
            f = check_number("fraction", fraction)
            if not 0.0 < f <= 1.0:
                raise ValueError(f"fraction: must be in (0, 1], got {fraction!r}.")
        self.fraction = f

    def k(self, shape) -> int:
        """The entries sent of a variable of `shape`."""
        d = int(tf.TensorShape(shape).num_elements())
        if d == 0:  # A layer of 0 units: nothing to send.
            return 0
        # The fraction as the decimal it prints as: 0.07 * 100 is
        # 7.000000000000001 in binary floating point, and one more entry.
        return max(1, min(d, math.ceil(fractions.Fraction(repr(self.fraction)) * d)))

    def exchange(self, reducer, strategy, xs, indices):
        ks = [self.k(self._shapes[i]) for i in indices]
        shapes = [self._shapes[i] for i in indices]

        def select(*xs_):
            payload, own = [], []
            for x, k, shape in zip(xs_, ks, shapes):
                flat = tf.reshape(x, [-1])
                if k:
                    _, idx = tf.math.top_k(_magnitude(flat), k=k, sorted=False)
                else:  # top_k refuses an empty input.
                    idx = tf.zeros([0], tf.int32)
                values = tf.gather(flat, idx)
                payload += [tf.bitcast(values, tf.int32), idx]
                own.append(tf.reshape(_scatter(idx, values, flat.shape[0]), shape))
            return [tf.concat(payload, 0)] + own

        out = _as_list(dist.map_per_replica(strategy, select, *xs))
        (rows,) = reducer.all_gather(strategy, [out[0]])
        local = out[1:]

        def decompress(rows):
            # Every replica's row at once: one scatter into [R, d] per
            # variable (the (row, index) pairs are distinct, so no two values
            # meet in the scatter), then the rows added in replica order.
            n = rows.shape[0]
            row_ids = tf.range(n)[:, None]
            agg, start = [], 0
            for k, shape in zip(ks, shapes):
                d = int(shape.num_elements())
                values = tf.bitcast(rows[:, start : start + k], tf.float32)
                idx = rows[:, start + k : start + 2 * k]
                start += 2 * k
                where = tf.stack([tf.broadcast_to(row_ids, [n, k]), idx], axis=-1)
                dense = tf.scatter_nd(where, values, [n, d])
                agg.append(tf.reshape(tf.add_n(tf.unstack(dense)), shape))
            return agg

        aggregate = _as_list(dist.map_per_replica(strategy, decompress, rows))
        return aggregate, local, []

    def get_config(self):
        return {**super().get_config(), "fraction": self.fraction}


def _magnitude(flat):
    """`|flat|`, with NaN ranked first (as +Inf).

    `top_k` leaves a NaN unselected (it compares false), so a NaN share would
    stay behind in the residual while the aggregate looked finite: the step
    would be applied, `skip_nonfinite` would not see it, and the residual
    would be NaN for good. Selected, it reaches every replica, which then
    skips the step (or applies the NaN, as without compression).
    """
    magnitude = tf.abs(flat)
    return tf.where(
        tf.math.is_nan(magnitude), tf.constant(float("inf"), flat.dtype), magnitude
    )


def _scatter(idx, values, d):
    """A dense `[d]` tensor with `values` at the (distinct) `idx`, zeros elsewhere."""
    return tf.scatter_nd(tf.expand_dims(idx, 1), values, [d])


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]
