"""PowerSGD: low-rank gradient compression that still all-reduces.

Vogels, Karimireddy & Jaggi (NeurIPS 2019), "PowerSGD: Practical Low-Rank
Gradient Compression for Distributed Optimization", arXiv 1905.13727,
Algorithms 1 and 2. Each variable is viewed as a matrix M: the product of
its leading dimensions by its last. That is the paper's view of a
convolution (output channels against the rest) in TensorFlow's layout, a
kernel (kh, kw, in, out) as the (kh*kw*in) x out matrix that multiplies the
image patches; a dense kernel (in, out) is itself. The paper and PyTorch's
hook take the first dimension, PyTorch's kernels being (out, in, kh, kw);
here the first dimension, the kernel's height, left every 3x3 kernel at 3
rows, uncompressed at rank 2. With error feedback x_r = s_r + e_r on
replica r:

    Q  <- orthonormalise(Q)            Q from the last step (warm start), or
                                       fresh N(0, 1) values the first time
                                       (or every time, warm_start=False);
                                       a zero column is drawn afresh (a zero
                                       gradient left it so; kept, it would
                                       stay zero for good)
    P  <- sum_r x_r Q                  all-reduce (one fused buffer, with the
                                       tensors that stay uncompressed)
    P^ <- orthonormalise(P)            Gram-Schmidt over its columns
    Q  <- sum_r x_r^T P^               all-reduce
    aggregate = P^ Q^T                 = sum_r P^ (x_r^T P^)^T
    e_r <- x_r - P^ (x_r^T P^)^T       replica r's own decompressed part

The residual is the paper's (Algorithm 2: the local error of the local
compression). PyTorch's DDP hook keeps `x_r - aggregate / R` instead; both
have the same sum over replicas, hence the same updates, but PyTorch's
per-replica residuals also accumulate each replica's gradient's difference
from the mean, a random walk that never shrinks.

A matrix is compressed only if `(rows + cols) * rank * min_compression_rate
< rows * cols` (PyTorch's rule); vectors, scalars and matrices not worth it
travel uncompressed in the first all-reduce, with no residual. Q and P are
float32. Orthonormalisation divides each column by `norm + epsilon` with
`divide_no_nan`: an all-zero column (a zero gradient) stays zero, never
NaN, even with `epsilon=0` (PyTorch's default, which gives NaN there).
A column of P in the span of the earlier ones (a gradient of rank below
`rank`: a small batch, dead units) is zeroed, not normalised rounding, so
`P^ P^T` stays a projection and such a gradient travels exactly (normalised,
the rounding sent a rank-1 gradient at twice its size at rank 12).
The random values come from `tf.random.stateless_normal` with a seed
identical on every replica, so every replica draws the same Q.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from distopt import distribute as dist
from distopt.checks import check_bool, check_int, check_number, owned_by
from distopt.compression.base import Compressor


class PowerSGD(Compressor):
    """Rank-`rank` PowerSGD with error feedback and warm start.

    Args:
        rank: The approximation's rank r (PyTorch's
            `matrix_approximation_rank`), >= 1.
        start_step: Plain all-reduces for the first reductions (PyTorch's
            `start_powerSGD_iter`).
        min_compression_rate: Compress a matrix only if it shrinks by more
            than this factor, > 0.
        warm_start: Start each step's power iteration from the last step's
            Q (the paper's reuse); False draws a fresh Q every step.
        epsilon: Added to each column's norm in orthonormalisation, >= 0.
        error_feedback: Keep and send the residuals (default).
        seed: The seed of the random Q.
        name: The module's name.
        error_feedback_decay: The residual's decay (see `Compressor`).
    """

    name = "powersgd"
    propagates_nonfinite = True  # (see Compressor)

    def __init__(
        self,
        rank=1,
        start_step=0,
        min_compression_rate=2.0,
        warm_start=True,
        epsilon=0.0,
        error_feedback=True,
        seed=0,
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
            self.rank = check_int("rank", rank, minimum=1)
            self.min_compression_rate = _positive(
                "min_compression_rate", min_compression_rate
            )
            self.epsilon = _non_negative("epsilon", epsilon)
            self.warm_start = check_bool("warm_start", warm_start)
            # An int64 of the stateless random seed.
            self.seed = check_int("seed", seed, minimum=0)

    def compresses(self, shape):
        if shape.rank is None or shape.rank < 2:
            return False
        n, m = matrix_shape(shape)
        r = min(n, m, self.rank)
        return (n + m) * r * self.min_compression_rate < n * m

    def build_state(self, strategy, variables, compressed):
        del strategy
        self.q = {}
        for i, v in enumerate(variables):
            if not compressed[i]:
                continue
            n, m = matrix_shape(v.shape)
            shape = [m, min(n, m, self.rank)]
            self.q[str(i)] = tf.Variable(
                lambda shape=shape, i=i: self._random_q(shape, i, 0),
                trainable=False,
                name=f"q_{i}",
            )

    def extra_state(self, indices):
        return [self.q[str(i)] for i in indices if str(i) in self.q]

    def scaled_state(self):
        # Q = sum_r x_r^T P^ has the gradient's units. Orthonormalised before
        # use, its size matters only through `epsilon` (see "Loss scaling" in
        # distopt.compression.base).
        return list(self.q.values())

    def exchange(self, reducer, strategy, xs, indices):
        comp = [j for j, i in enumerate(indices) if str(i) in self.q]
        plain = [j for j, i in enumerate(indices) if str(i) not in self.q]
        shapes = [self._shapes[i] for i in indices]
        q0 = [self._start_q(indices[j]) for j in comp]

        def left(*xs_):
            return [_matrix(xs_[j]) @ q for j, q in zip(comp, q0)]

        ps = _as_list(dist.map_per_replica(strategy, left, *xs))
        # One fused all-reduce: the uncompressed tensors and every P.
        summed = reducer.all_reduce(strategy, [xs[j] for j in plain] + ps)
        flat_sum, p_sum = summed[: len(plain)], summed[len(plain) :]

        def right(*args):
            ps_, xs_ = args[: len(comp)], args[len(comp) :]
            p_hat = [orthonormalise(p, self.epsilon) for p in ps_]
            return p_hat + [
                tf.transpose(_matrix(xs_[j])) @ p for j, p in zip(comp, p_hat)
            ]

        both = _as_list(dist.map_per_replica(strategy, right, *p_sum, *xs))
        p_hat, q_local = both[: len(comp)], both[len(comp) :]
        q_sum = reducer.all_reduce(strategy, q_local)

        def decompress(*args):
            k = len(comp)
            p_, qs_, ql_ = args[:k], args[k : 2 * k], args[2 * k :]
            agg = [
                tf.reshape(p @ tf.transpose(q), shapes[j])
                for j, p, q in zip(comp, p_, qs_)
            ]
            own = [
                tf.reshape(p @ tf.transpose(q), shapes[j])
                for j, p, q in zip(comp, p_, ql_)
            ]
            return agg + own

        out = _as_list(
            dist.map_per_replica(strategy, decompress, *p_hat, *q_sum, *q_local)
        )
        agg, own = out[: len(comp)], out[len(comp) :]
        aggregate, local = [None] * len(xs), [None] * len(xs)
        for j, a, o in zip(comp, agg, own):
            aggregate[j], local[j] = a, o
        for j, s in zip(plain, flat_sum):
            aggregate[j] = s
        return aggregate, local, list(q_sum)

    def get_config(self):
        return {
            **super().get_config(),
            "rank": self.rank,
            "min_compression_rate": self.min_compression_rate,
            "warm_start": self.warm_start,
            "epsilon": self.epsilon,
            "seed": self.seed,
        }

    # --- Internals ---------------------------------------------------------------

    def _random_q(self, shape, index, step):
        seed = tf.stack(
            [
                tf.constant(self.seed, tf.int64) * 1_000_003 + index,
                tf.cast(step, tf.int64),
            ]
        )
        return tf.random.stateless_normal(shape, seed=seed, dtype=tf.float32)

    def _start_q(self, index):
        """This step's orthonormal Q for variable `index` (identical everywhere)."""
        q = self.q[str(index)]
        fresh = self._random_q(q.shape, index, self.steps.variable + 1)
        if self.warm_start:
            # A zero column of Q stays zero for good: P = M Q has a zero
            # column for every M, so its Q = M^T P^ column is zero again. A
            # zero gradient makes every column zero (a layer with no
            # gradient yet, a variable absent from an `Accumulate` window),
            # and training would go on with a zero aggregate, all of it
            # piling up in the residuals. Such columns (and non-finite ones)
            # start afresh, from the same draw on every replica.
            start = tf.convert_to_tensor(q)
            alive = tf.logical_and(
                tf.reduce_any(tf.not_equal(start, 0), axis=0, keepdims=True),
                tf.reduce_all(tf.math.is_finite(start), axis=0, keepdims=True),
            )
            start = tf.where(alive, start, fresh)
        else:
            start = fresh
        return orthonormalise(start, self.epsilon)


def orthonormalise(matrix, epsilon=0.0):
    """Gram-Schmidt over the columns of `matrix` (rows x rank), in order.

    Each column has the earlier ones projected out (twice), then is divided by its
    norm plus `epsilon` (`divide_no_nan`: a zero column stays zero). A column
    left with under sqrt(machine epsilon) of its norm lay in the span of the
    earlier ones: what is left is rounding, so it is zeroed. Normalised, that
    rounding was a unit column at an arbitrary angle, and `P^ P^T` no longer
    a projection: a gradient of rank below `rank` (a small batch, dead
    units) came back up to twice its size at full rank. Its Q column is
    then zero, and the next step draws it afresh.
    """
    cols = tf.unstack(matrix, axis=1)
    tolerance = math.sqrt(np.finfo(matrix.dtype.as_numpy_dtype).eps)
    out = []
    for c in cols:
        before = tf.norm(c)
        # Twice (Parlett's "twice is enough"): once, a column left with a
        # small part of its norm is orthogonal only to about eps over that
        # part, 1e-4 in float32, and P^ P^T M misses M by as much.
        for _ in range(2):
            for prev in out:
                c = c - tf.reduce_sum(prev * c) * prev
        norm = tf.norm(c)
        c = tf.where(norm > tolerance * before, c, tf.zeros_like(c))
        out.append(tf.math.divide_no_nan(c, norm + epsilon))
    return tf.stack(out, axis=1)


def matrix_shape(shape) -> tuple[int, int]:
    """`(rows, cols)` of a variable viewed as a matrix: the rest x the last dim."""
    dims = tf.TensorShape(shape).as_list()
    return int(math.prod(dims[:-1])), dims[-1]


def _matrix(x):
    return tf.reshape(x, [-1, x.shape[-1]])


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _positive(name, value) -> float:
    v = check_number(name, value)
    if not v > 0:
        raise ValueError(f"{name}: must be > 0, got {value!r}.")
    return v


def _non_negative(name, value) -> float:
    v = check_number(name, value)
    if not v >= 0:
        raise ValueError(f"{name}: must be >= 0, got {value!r}.")
    return v
