"""Scaled-sign (1-bit) compression with error feedback.

Karimireddy, Rebjock, Stich & Jaggi (ICML 2019), "Error Feedback Fixes
SignSGD and other Gradient Compression Schemes", arXiv 1901.09847: the
compressor `C(x) = (||x||_1 / d) sign(x)`, per variable. On replica r, for
each variable's x_r = s_r + e_r (d elements):

    scale_r = mean(|x_r|)
    bits_r  = x_r >= 0                   one bit per entry (0 and -0 count
                                         as +; their error is fed back)
    D_r     = scale_r * (2 bits_r - 1)
    aggregate = sum_r D_r                every replica's bits and scale,
                                         gathered
    e_r <- x_r - D_r

The bits are packed 32 to an int32 word, so a variable of d float32 entries
costs `4 * ceil(d / 32) + 4` bytes per replica (about 1/32), all variables
in one int32 buffer and one all-gather per step. Signs do not add up across
replicas, so they are gathered (`allgather_bytes` grows with the replica
count), and the sum is taken in replica order on every replica.

Without error feedback this is scaled signSGD, which can fail to converge
(Karimireddy et al., Theorem I); `tests/test_compression.py` shows the
difference on a quadratic.
"""

from __future__ import annotations

import tensorflow as tf

from distopt import distribute as dist
from distopt.compression.base import Compressor

_BITS = 32


class OneBit(Compressor):
    """Each replica sends the signs of its entries, 1 bit each, and one scale.

    Args:
        error_feedback: Keep and send the residuals (default).
        error_feedback_decay: The residual's decay (see `Compressor`).
        start_step: Plain all-reduces for the first reductions.
        name: The module's name.
    """

    name = "onebit"
    propagates_nonfinite = True  # (see Compressor)

    def exchange(self, reducer, strategy, xs, indices):
        shapes = [self._shapes[i] for i in indices]
        sizes = [int(s.num_elements()) for s in shapes]

        def encode(*xs_):
            payload, own = [], []
            for x, shape in zip(xs_, shapes):
                flat = tf.reshape(x, [-1])
                scale = tf.reduce_mean(tf.abs(flat))
                positive = flat >= 0
                payload += [pack_bits(positive), tf.bitcast(scale[None], tf.int32)]
                own.append(tf.reshape(_decode(positive, scale), shape))
            return [tf.concat(payload, 0)] + own

        out = _as_list(dist.map_per_replica(strategy, encode, *xs))
        (rows,) = reducer.all_gather(strategy, [out[0]])

        def decompress(rows):
            # Every replica's row at once (a few ops per variable, not per
            # variable and replica: the graph stays small at many replicas).
            agg, start = [], 0
            for d, shape in zip(sizes, shapes):
                words = -(-d // _BITS)
                positive = unpack_bits(rows[:, start : start + words], d)
                scales = tf.bitcast(rows[:, start + words], tf.float32)[:, None]
                start += words + 1
                parts = tf.unstack(_decode(positive, scales))
                agg.append(tf.reshape(tf.add_n(parts), shape))
            return agg

        aggregate = _as_list(dist.map_per_replica(strategy, decompress, rows))
        return aggregate, out[1:], []


def pack_bits(bits):
    """A bool vector as int32 words, 32 bits each (bit j of word w: entry 32w + j)."""
    d = int(bits.shape[0])
    words = -(-d // _BITS)
    padded = tf.pad(tf.cast(bits, tf.int64), [[0, words * _BITS - d]])
    weights = tf.bitwise.left_shift(
        tf.ones([_BITS], tf.int64), tf.range(_BITS, dtype=tf.int64)
    )
    packed = tf.reduce_sum(tf.reshape(padded, [words, _BITS]) * weights, axis=1)
    # 0 .. 2^32 - 1 as an unsigned 32-bit word, reinterpreted as int32.
    return tf.bitcast(tf.cast(packed, tf.uint32), tf.int32)


def unpack_bits(words, d):
    """The inverse of `pack_bits`: the first `d` bits as a bool vector.

    `words` may also be `[R, n]`, rows of words: then `[R, d]` bits.
    """
    w = tf.cast(tf.bitcast(words, tf.uint32), tf.int64)
    shifts = tf.range(_BITS, dtype=tf.int64)
    bits = tf.bitwise.bitwise_and(tf.bitwise.right_shift(w[..., None], shifts), 1)
    shape = tf.concat([tf.shape(words)[:-1], [-1]], 0)
    return tf.cast(tf.reshape(bits, shape)[..., :d], tf.bool)


def _decode(positive, scale):
    return tf.where(positive, scale, -scale)


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]
