"""The Reducer: per-replica payloads in, one normalised gradient per replica out.

Every path that combines gradients across replicas goes through a `Reducer`:
the optimizer's update under every sync mode, the local steps of the
periodic modes (a group of one replica, or a replica group), SAM's
aggregated perturbation and Heun's trial point. So every option (aggregation,
wire dtype, transforms, communication options) and every counter holds on
each of them.

One step, in cross-replica context, for each replica r:

    payload P_r = w_r * g_r  (Mean, Sum: w_r = 1; summed over micro-steps)
    weight  W_r = w_r        (NaN when w_r is not finite and >= 0: see below)
    N = aggregation.normalizer(sum_r W_r, R)
    g = sum_r P_r / N        then the transforms (clip, finite check)
    ok = N finite and > 0 (weighted mean only), and the transforms' verdict

The wire. With the payload's own dtype on the wire, the gradients and the
weight travel in one fused all-reduce per dtype (one buffer, the weight last),
and the division comes after. With a narrower wire (`wire_dtype`, or float16 /
bfloat16 variables), a sum of raw payloads could overflow (w * g with w = 1e5
is out of float16's range, and so is a sum of R gradients near its top):
then the weights go first, in float32, in a scalar all-reduce (counted in
`allreduce_calls` like any other), and each replica sends `P_r / N`, which
has the magnitude of a gradient. Only that path pays the second all-reduce.

Sparse gradients. A `tf.IndexedSlices` gradient (from `tf.gather` or an
embedding lookup) stays sparse on the wire: its indices and values travel in
an all-gather (`all_reduce_sparse`), so the bytes grow with the rows touched,
not with the table. The gathered rows of equal index are then summed
(`sum_duplicates`), once per worker and copied to its replicas, so every
replica holds bit-identical rows. The result equals the dense path's: the
weight still travels in the dense all-reduce (alone, if every gradient is
sparse); weighted mean multiplies the values by `w_r`, and normalises them
like a dense gradient; a narrow wire carries the normalised values. The
transforms see a sparse gradient's values after the duplicates are summed
(the untouched rows are zero, and every transform maps zero to zero): the
global norm is the norm of the touched rows, clipping by value and the
finite check act on them. `allreduce_calls` counts one call per sparse
gradient (TensorFlow may split it into collectives of the row count, the
indices and the values), and `allreduce_bytes` the bytes of the gathered
rows of all replicas (indices and values; more than one replica's share, the
measure of a dense all-reduce), counted at run time since the number of rows
may vary between steps.

Invalid weights. A negative, NaN or Inf weight cannot be caught by an
assertion under XLA (compiled asserts are dropped), so it is carried in the
data instead: that replica sends a zero payload and a NaN weight. The summed
weight is then NaN on every replica, so every replica skips the step, and
`invalid_weight_steps` counts it (as does `skipped_steps`), once per step:
SAM's aggregated perturbation and Heun's trial point reduce the same weights
before the update does, and do not count (`reduce(..., count_invalid=False)`).
Eager calls also raise a `ValueError` before anything is sent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import tensorflow as tf

from distopt import aggregation as aggregation_lib
from distopt import compression as compression_lib
from distopt import counter as counter_lib
from distopt import distribute as dist
from distopt import transforms as transforms_lib


def _share(x: tf.Tensor, share: float) -> tf.Tensor:
    return x if share == 1.0 else x * tf.cast(share, x.dtype)


def payload_dtype(dtype: tf.DType) -> tf.DType:
    """The dtype gradients are summed in: float32 at least (see `Reducer`)."""
    dtype = tf.as_dtype(dtype)
    return tf.float32 if dtype.size < 4 else dtype


class Reducer(tf.Module):
    """Aggregates per-replica gradients, with one fused all-reduce per dtype.

    Args:
        aggregation: A `distopt.aggregation` instance or name (default mean).
        wire_dtype: Cast gradients to this dtype (bfloat16, float16) for the
            all-reduce only; None sends each variable's own dtype.
        transforms: `distopt.transforms` applied to the aggregated gradient.
        communication_options: For every all-reduce (e.g. a timeout).
        name: The module name.

    Attributes:
        allreduce_calls, allreduce_bytes: int64 counters of the all-reduces
            (and replica-group reductions, and all-gathers of sparse
            gradients) issued, and of their payload bytes.
        allgather_calls, allgather_bytes: int64 counters of the all-gathers
            of compressed payloads and sharded parameters, and of the bytes
            gathered (every replica's share, what each replica receives).
        bytes_sent: int64 count of the bytes this replica put into all of
            them: an all-reduce's whole buffer, its own share of an
            all-gather. The compression ratio is the ratio of two runs'
            `bytes_sent` (a ring all-reduce moves about twice its buffer
            per replica, a ring all-gather the gathered bytes; see
            BUILD_NOTES.md).
        invalid_weight_steps: int64 count of steps skipped because some
            replica passed a negative, NaN or Inf weight.
        group_reductions: int64 count of replica-group reductions (this
            worker's groups, one per group per step; no collective).
    """

    def __init__(
        self,
        aggregation=None,
        *,
        wire_dtype=None,
        transforms: Sequence[transforms_lib.GradientTransform] = (),
        communication_options=None,
        compression=None,
        name="reducer",
    ):
        super().__init__(name=name)
        self.aggregation = aggregation_lib.get(aggregation)
        self.compression = compression_lib.get(compression)
        self.wire_dtype = transforms_lib.check_wire_dtype(wire_dtype)
        self.transforms = list(transforms)
        self.communication_options = communication_options
        with tf.name_scope(name):
            self.allreduce_calls = counter_lib.Counter("allreduce_calls")
            self.allreduce_bytes = counter_lib.Counter("allreduce_bytes")
            self.allgather_calls = counter_lib.Counter("allgather_calls")
            self.allgather_bytes = counter_lib.Counter("allgather_bytes")
            self.bytes_sent = counter_lib.Counter("bytes_sent")
            self.invalid_weight_steps = counter_lib.Counter("invalid_weight_steps")
            self.group_reductions = counter_lib.Counter("group_reductions")
        self._given_aggregate = False
        # Collectives traced (all_reduce, all_gather): a compressor's
        # exchange that made none is refused (`Compressor.aggregate`).
        self.collectives_traced = 0

    @contextlib.contextmanager
    def given_aggregate(self, aggregate: bool = True):
        """Within it (at trace time), `reduce` does not compress.

        For a gradient passed outside `strategy.run`: it is already the
        aggregate, so compressing it would only add error (and residuals)
        to a gradient that is meant to be applied as given.
        """
        before, self._given_aggregate = self._given_aggregate, aggregate
        try:
            yield
        finally:
            self._given_aggregate = before

    # --- Replica context -------------------------------------------------------

    def payload(self, grads: Sequence[tf.Tensor], weight=None):
        """This replica's payload `(P_r, W_r)`; call it in replica context.

        Gradients are cast to `payload_dtype` (float32 for 16-bit variables,
        so that `w * g` cannot overflow before normalisation), and multiplied
        by the weight for `WeightedMean` (the values of an `IndexedSlices`,
        which stays sparse). A replica with weight 0 sends exact
        zeros even if its gradient is NaN (an empty batch's mean).
        """
        w, valid = self.aggregation.replica_weight(weight)
        share = 1.0
        if not dist.in_replica_context():  # An aggregate, outside strategy.run.
            num_replicas = dist.current_strategy().num_replicas_in_sync
            share = self.aggregation.aggregate_share(num_replicas)
        grads = [
            map_values(g, lambda x: _share(tf.cast(x, payload_dtype(x.dtype)), share))
            for g in grads
        ]
        if self.aggregation.weighted:
            wz = tf.where(valid, w, 0.0)
            grads = [
                map_values(
                    g, lambda x: tf.math.multiply_no_nan(x, tf.cast(wz, x.dtype))
                )
                for g in grads
            ]
            w = tf.where(valid, w, float("nan"))
        return grads, w

    def reduce_in_replica_context(self, grads, weight=None) -> list:
        """The aggregated gradients, on every replica, from inside `strategy.run`.

        For optimizers that need an aggregated gradient before their update
        (SAM's perturbation, Heun's trial point). The same path as the
        update's: aggregation, wire dtype, transforms, communication options
        and counters all apply; under the default strategy the gradients are
        normalised the same way, with no communication. A `tf.IndexedSlices`
        gradient stays sparse and comes back with each index once. Never
        compressed: compression and its residuals belong to the update.

        An invalid weight is not counted in `invalid_weight_steps` here: the
        caller's update reduces the same weight in the same step and counts
        it there, so a step counts once.
        """
        payload, w = self.payload(grads, weight)

        def merge_fn(strategy, payload, w):
            reduced, scale, _ = self.reduce(
                strategy, list(payload), w, count_invalid=False, compress=False
            )
            if scale is None:
                return list(reduced)
            return list(
                dist.map_per_replica(
                    strategy,
                    lambda s, *gs: [
                        map_values(g, lambda x: x * tf.cast(s, x.dtype)) for g in gs
                    ],
                    scale,
                    *reduced,
                )
            )

        reduced = dist.merge(merge_fn, tuple(payload), w)
        return [tf.cast(r, g.dtype) for r, g in zip(reduced, grads)]

    # --- Cross-replica context -------------------------------------------------

    def reduce(
        self,
        strategy,
        payload,
        weight,
        *,
        group_size=None,
        count_invalid=True,
        compress=True,
        variables=None,
        keep=None,
    ):
        """The aggregated, transformed gradient on every replica.

        Args:
            strategy: The strategy in scope (from `merge_call`).
            payload: Per-replica payloads `P_r` (see `payload`), possibly
                summed over micro-steps.
            weight: The per-replica `W_r`, summed likewise.
            group_size: None to reduce over all replicas (one all-reduce per
                dtype); 1 to use each replica's own payload (no
                communication); G to reduce within groups of G consecutive
                replicas of one worker (`distopt.distribute.group_sum`).
            compress: Whether `compression` (if any) applies; False for
                SAM's perturbation and Heun's trial point (and, through
                `given_aggregate`, for a gradient given outside
                `strategy.run`).
            variables: The variables of `payload`, in order: compression
                keeps its state per variable, so it applies only when they
                are given (the sync modes give them).
            count_invalid: Whether an invalid weight counts in
                `invalid_weight_steps`. False for a reduction whose weights
                the same step reduces again (SAM's aggregated perturbation,
                Heun's trial point): the update's reduction counts the step,
                once.
            keep: None, or `{variable.ref(): scalar bool}` (identical on every
                replica): where False, compression keeps that variable's
                state as it was (`Compressor.commit`).

        Sparse payloads (`tf.IndexedSlices`) come back as `IndexedSlices`
        with each index once (see the module docstring).

        Returns:
            `(grads, scale, ok)`: per-replica gradients in the payload dtype;
            a per-replica scalar that the update must still multiply them by,
            or None; and a scalar bool (False: skip the step everywhere), or
            None when no step can be skipped.
        """
        if compress and group_size is None and self.compresses(strategy, variables):
            grads, scale, ok, invalid = self._reduce_compressed(
                strategy, payload, weight, list(variables), keep
            )
        else:
            grads, scale, ok, invalid = self._reduce(
                strategy, payload, weight, group_size
            )
        if invalid is not None and count_invalid:
            self.invalid_weight_steps.assign_add(
                tf.cast(dist.first_local(strategy, invalid), tf.int64)
            )
        return grads, scale, ok

    def compresses(self, strategy, variables) -> bool:
        """Whether `reduce(..., variables=variables)` compresses (see its `compress`)."""
        return (
            not self._given_aggregate
            and variables is not None
            and self.compression is not None
            and dist.is_distributed(strategy)
        )

    def _reduce(self, strategy, payload, weight, group_size):
        """`reduce`, and whether some weight was invalid (None: cannot be)."""
        payload = list(payload)
        distributed = dist.is_distributed(strategy)
        if group_size is None:
            size = strategy.num_replicas_in_sync
        else:
            size = group_size
        if not distributed or size == 1:
            grads = (
                list(payload)
                if distributed
                else [dist.first_local(strategy, p) for p in payload]
            )
            total = weight if distributed else dist.first_local(strategy, weight)
            grads = self._sum_duplicates(strategy, grads, 1)
            return self._finish(strategy, grads, total, 1)
        if group_size is not None:
            *grads, total = dist.group_sum(strategy, payload + [weight], group_size)
            grads = self._sum_duplicates(strategy, grads, group_size)
            # One reduction per group on this worker; no collective.
            self.group_reductions.assign_add(
                dist.local_device_count(strategy) // group_size
            )
            return self._finish(strategy, grads, total, size)
        if self._narrow_wire(strategy, payload):
            return self._reduce_normalised_first(strategy, payload, weight, size)
        sparse = [dist.is_sparse(strategy, p) for p in payload]
        if not any(sparse):
            *grads, total = self.all_reduce(strategy, payload + [weight])
            return self._finish(strategy, grads, total, size)
        # The weight travels with the dense gradients (alone if there are none).
        *dense, total = self.all_reduce(
            strategy, [p for p, s in zip(payload, sparse) if not s] + [weight]
        )
        rows = self.all_reduce_sparse(
            strategy, [p for p, s in zip(payload, sparse) if s]
        )
        grads = _interleave(sparse, dense, rows)
        return self._finish(strategy, grads, total, size)

    def all_reduce(self, strategy, tensors, op=dist.SUM, wire_dtype=None):
        """One all-reduce per dtype of per-replica `tensors`, packed; counted.

        Packing makes the number of collectives independent of the number of
        variables (Horovod's tensor fusion). Returns per-replica values,
        identical on every replica.
        """
        tensors = list(tensors)
        if not dist.is_distributed(strategy):
            return [dist.first_local(strategy, t) for t in tensors]
        specs = [dist.local_values(strategy, t)[0] for t in tensors]
        groups: dict[tuple, list[int]] = {}
        for i, t in enumerate(specs):
            wire = wire_dtype if wire_dtype is not None else t.dtype
            groups.setdefault((t.dtype, wire), []).append(i)
        out = [None] * len(tensors)
        for (dtype, wire), idx in groups.items():
            sizes = [int(specs[i].shape.num_elements()) for i in idx]
            shapes = [specs[i].shape for i in idx]

            def pack(*ts, wire=wire):
                return tf.cast(tf.concat([tf.reshape(t, [-1]) for t in ts], 0), wire)

            packed = dist.map_per_replica(strategy, pack, *[tensors[i] for i in idx])
            self.collectives_traced += 1
            reduced = dist.reduce(
                strategy, op, packed, packed, options=self.communication_options
            )
            self._count(1, sum(sizes) * wire.size)

            def unpack(buf, dtype=dtype, sizes=sizes, shapes=shapes):
                parts = tf.split(tf.cast(buf, dtype), sizes)
                return [tf.reshape(p, s) for p, s in zip(parts, shapes)]

            for i, part in zip(idx, dist.map_per_replica(strategy, unpack, reduced)):
                out[i] = part
        return out

    def all_reduce_sparse(self, strategy, slices, wire_dtype=None):
        """The sum over replicas of per-replica `IndexedSlices`, kept sparse; counted.

        One all-gather of each gradient's indices and values (the values
        cast to `wire_dtype` for it, if given), then the rows of equal index
        summed, once per worker (`sum_duplicates`). Returns per-replica
        `IndexedSlices` with each index once, in the values' own dtype,
        identical on every replica.
        """
        slices = list(slices)
        if not slices:
            return []
        if not dist.is_distributed(strategy):
            return [sum_duplicates(dist.first_local(strategy, s)) for s in slices]
        specs = [dist.local_values(strategy, s)[0] for s in slices]

        def to_wire(*ss):
            # Also makes plain values (a cross-replica call) per-replica ones.
            return [
                map_values(x, lambda v: tf.cast(v, wire_dtype or v.dtype)) for x in ss
            ]

        sent = dist.map_per_replica(strategy, to_wire, *slices)
        sent = sent if isinstance(sent, (list, tuple)) else [sent]
        gathered = dist.all_gather_slices(
            strategy, sent, options=self.communication_options
        )
        num_bytes = tf.constant(0, tf.int64)
        for g in gathered:
            g0 = dist.first_local(strategy, g)
            num_rows = tf.shape(g0.indices, out_type=tf.int64)[0]
            row = tf.reduce_prod(tf.shape(g0.values, out_type=tf.int64)[1:])
            num_bytes += num_rows * (g0.indices.dtype.size + row * g0.values.dtype.size)
        # Gathered rows of every replica; a replica sent its own (on average
        # a 1/R share).
        self._count(len(slices), num_bytes, num_bytes // strategy.num_replicas_in_sync)
        out = []
        for g, spec in zip(gathered, specs):
            summed = self._sum_duplicates(strategy, [g], None)[0]
            out.append(
                dist.map_per_replica(
                    strategy,
                    lambda x, dt=spec.dtype: map_values(x, lambda v: tf.cast(v, dt)),
                    summed,
                )
            )
        return out

    def all_gather(self, strategy, tensors):
        """Every replica's 1-D `tensors` as `[R, n]` rows on every replica; counted.

        For payloads that do not add up (top-k entries, packed signs,
        parameter shards). Each call is one all-gather per tensor.
        """
        tensors = list(tensors)
        rows = dist.all_gather_rows(
            strategy, tensors, options=self.communication_options
        )
        self.collectives_traced += 1
        n = strategy.num_replicas_in_sync
        out = []
        for t, r in zip(tensors, rows):
            spec = dist.local_values(strategy, t)[0]
            size = int(spec.shape.num_elements())
            own = size * spec.dtype.size
            self.allgather_calls.assign_add(1)
            self.allgather_bytes.assign_add(own * n)
            self.bytes_sent.assign_add(own)
            # Across workers the rows come back from an all-gather of
            # slices, of unknown static length; the decompressors index
            # them by replica, so the shape is restored here.
            out.append(
                dist.map_per_replica(
                    strategy, lambda x, size=size: tf.ensure_shape(x, [n, size]), r
                )
            )
        return out

    def build(self, strategy, variables) -> None:
        """Creates the compression state for `variables` (a no-op without one)."""
        if self.compression is not None:
            # Eagerly, even when a tf.function builds the optimizer lazily: a
            # checkpoint restored before the first step (deferred restoration)
            # assigns the residuals as they are created, which inside a trace
            # read a variable with no value yet.
            with tf.init_scope(), strategy.scope():
                self.compression.build(strategy, variables)

    def _reduce_compressed(self, strategy, payload, weight, variables, keep=None):
        """`_reduce` with each replica's normalised share compressed.

        As on a narrow wire, each replica sends `P_r / N`, the magnitude of a
        gradient: the compressor's residuals are then in the units of the
        aggregated gradient, whatever the weights (times the loss scale, if
        any: the optimizer rescales them when it changes). The weighted mean
        first sums the weights (float32, one scalar all-reduce); the mean and the
        sum know `N` from the replica count and the local weight (the
        micro-steps, equal on every replica), without communication. Sparse
        and float64 gradients travel as without compression. The compressor's
        new state is written once the step's verdict is known: a skipped
        step leaves it untouched.
        """
        size = strategy.num_replicas_in_sync
        if self.aggregation.weighted:
            (total,) = self.all_reduce(strategy, [weight])
        else:
            total = dist.map_per_replica(
                strategy, lambda w: w * tf.cast(size, w.dtype), weight
            )

        def share(total, *ps):
            inv, _ = self._normaliser(total, size)
            return [map_values(p, lambda x: x * tf.cast(inv, x.dtype)) for p in ps]

        shares = _as_list(dist.map_per_replica(strategy, share, total, *payload))
        kinds = [self._kind(strategy, s, v) for s, v in zip(shares, variables)]
        out = [None] * len(shares)
        comp = [i for i, k in enumerate(kinds) if k == "compress"]
        if comp:
            agg = self.compression.aggregate(
                self, strategy, [shares[i] for i in comp], [variables[i] for i in comp]
            )
            for i, a in zip(comp, agg):
                out[i] = a
        sparse = [i for i, k in enumerate(kinds) if k == "sparse"]
        for i, r in zip(
            sparse, self.all_reduce_sparse(strategy, [shares[i] for i in sparse])
        ):
            out[i] = r
        dense = [i for i, k in enumerate(kinds) if k == "dense"]
        for i, r in zip(dense, self.all_reduce(strategy, [shares[i] for i in dense])):
            out[i] = r
        grads, scale, ok, invalid = self._finish(
            strategy, out, total, size, normalised=True
        )
        if comp:
            self.compression.commit(strategy, ok, keep)
        return grads, scale, ok, invalid

    def _kind(self, strategy, share, var):
        """How a share travels: "compress", "sparse" or "dense" (uncompressed)."""
        spec = dist.local_values(strategy, share)[0]
        if isinstance(spec, tf.IndexedSlices):
            return "sparse"
        if spec.dtype == tf.float32 and self.compression.knows(var):
            return "compress"
        return "dense"

    def mean(self, strategy, tensors):
        """The mean over replicas of per-replica `tensors` (weights, slots)."""
        return self.all_reduce(strategy, tensors, op=dist.MEAN)

    # --- Internals ---------------------------------------------------------------

    def _narrow_wire(self, strategy, payload):
        """Whether some gradient travels in a dtype narrower than its payload."""
        for p in payload:
            spec = dist.local_values(strategy, p)[0]
            if self._wire_of(spec.dtype) != spec.dtype:
                return True
        return False

    def _wire_of(self, dtype):
        if self.wire_dtype is not None and self.wire_dtype.size < dtype.size:
            return self.wire_dtype
        return dtype

    def _normaliser(self, total, size):
        """`(1 / N, ok)` from the summed weight, guarded so it is never Inf."""
        norm = self.aggregation.normalizer(total, size)
        positive = tf.logical_and(tf.math.is_finite(norm), norm > 0)
        inv = 1.0 / tf.where(positive, norm, 1.0)
        # A denormal total (weights near 1e-38) has no finite inverse.
        ok = tf.logical_and(positive, tf.math.is_finite(inv))
        return tf.where(ok, inv, 0.0), ok

    def _reduce_normalised_first(self, strategy, payload, weight, size):
        """Weights first (float32, exact), then `P_r / N` on the narrow wire."""
        (total,) = self.all_reduce(strategy, [weight])
        specs = [dist.local_values(strategy, p)[0] for p in payload]

        def scale(total, *ps):
            inv, _ = self._normaliser(total, size)
            return [
                map_values(
                    p, lambda x: tf.math.multiply_no_nan(x, tf.cast(inv, x.dtype))
                )
                for p in ps
            ]

        scaled = dist.map_per_replica(strategy, scale, total, *payload)
        scaled = scaled if isinstance(scaled, (list, tuple)) else [scaled]
        # One all-reduce per (payload dtype, wire dtype) group; an all-gather
        # per sparse gradient.
        by_wire: dict[tuple, list[int]] = {}
        for i, s in enumerate(specs):
            key = (self._wire_of(s.dtype), isinstance(s, tf.IndexedSlices))
            by_wire.setdefault(key, []).append(i)
        grads = [None] * len(payload)
        for (wire, sparse), idx in by_wire.items():
            reduce_fn = self.all_reduce_sparse if sparse else self.all_reduce
            reduced = reduce_fn(strategy, [scaled[i] for i in idx], wire_dtype=wire)
            for i, r in zip(idx, reduced):
                grads[i] = r
        return self._finish(strategy, grads, total, size, normalised=True)

    def _finish(self, strategy, grads, total, size, normalised=False):
        """Divides by N (unless done), runs the transforms; see `_reduce`."""
        weighted = self.aggregation.weighted
        has = {}

        def finish(total, *gs):
            inv, ok_w = self._normaliser(total, size)
            scale = None if normalised else inv
            if self.transforms and scale is not None:
                gs = [map_values(g, lambda x: x * tf.cast(scale, x.dtype)) for g in gs]
                scale = None
            # A sparse gradient's transforms act on its (duplicate-free) rows.
            flat = [g.values if isinstance(g, tf.IndexedSlices) else g for g in gs]
            flat, ok = transforms_lib.apply(self.transforms, flat)
            gs = [
                tf.IndexedSlices(f, g.indices, g.dense_shape)
                if isinstance(g, tf.IndexedSlices)
                else f
                for f, g in zip(flat, gs)
            ]
            # Only a step that can be skipped carries `ok` to the update: the
            # select costs an XLA Adam step up to half its throughput on CPU.
            # Unweighted, the summed weight is a positive count.
            if weighted:
                ok = ok_w if ok is None else tf.logical_and(ok, ok_w)
                invalid = tf.logical_not(tf.math.is_finite(total))
            else:
                invalid = None
            has["scale"], has["ok"], has["invalid"] = (
                scale is not None,
                ok is not None,
                invalid is not None,
            )
            extra = [x for x in (scale, ok, invalid) if x is not None]
            return extra + list(gs)

        out = list(dist.map_per_replica(strategy, finish, total, *grads))
        scale = out.pop(0) if has["scale"] else None
        ok = out.pop(0) if has["ok"] else None
        invalid = out.pop(0) if has["invalid"] else None
        return out, scale, ok, invalid

    def _sum_duplicates(self, strategy, grads, group_size):
        """`sum_duplicates` of the sparse `grads`, once per replica group.

        `group_size`: how many consecutive local replicas hold the same value
        (None: all of them), so that they get bit-identical sums.
        """
        if group_size is None:
            group_size = dist.local_device_count(strategy)
        return [
            dist.once_per_group(strategy, sum_duplicates, g, group_size)
            if dist.is_sparse(strategy, g)
            else g
            for g in grads
        ]

    def _count(self, calls, num_bytes, sent=None):
        self.allreduce_calls.assign_add(calls)
        self.allreduce_bytes.assign_add(num_bytes)
        self.bytes_sent.assign_add(num_bytes if sent is None else sent)

    def counters(self) -> dict[str, int]:
        """Every communication counter by name, as Python ints (read eagerly)."""
        names = (
            "allreduce_calls",
            "allreduce_bytes",
            "allgather_calls",
            "allgather_bytes",
            "bytes_sent",
            "group_reductions",
        )
        return {n: int(getattr(self, n)) for n in names}

    def get_config(self) -> dict:
        return {
            "aggregation": self.aggregation.name,
            "compression": (
                self.compression.get_config() if self.compression else None
            ),
            "wire_dtype": self.wire_dtype.name if self.wire_dtype else None,
        }


def sum_duplicates(slices: tf.IndexedSlices) -> tf.IndexedSlices:
    """`slices` with each index once, the rows of equal index summed.

    The same dense value (an `IndexedSlices` means the sum of its rows); the
    indices in order of first occurrence.
    """
    unique, position = tf.unique(slices.indices)
    values = tf.math.unsorted_segment_sum(slices.values, position, tf.shape(unique)[0])
    return tf.IndexedSlices(values, unique, slices.dense_shape)


def map_values(g, fn):
    """`fn(g)`, or for `IndexedSlices` the same slices with `fn` of the values."""
    if isinstance(g, tf.IndexedSlices):
        return tf.IndexedSlices(fn(g.values), g.indices, g.dense_shape)
    return fn(g)


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _interleave(is_second, first, second):
    """Merges two lists back into one; `is_second[i]` says which list item i is from."""
    first, second = iter(first), iter(second)
    return [next(second) if s else next(first) for s in is_second]
