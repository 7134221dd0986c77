"""`Accumulate(k)`: local accumulation, one all-reduce and one update every k."""

from __future__ import annotations

import tensorflow as tf

from distopt import distribute as dist
from distopt.sync.base import Sync, check_period


class Accumulate(Sync):
    """Local accumulation over k micro-steps, then one all-reduce and one update.

    Equal to one step on a k-times-larger batch (Horovod's
    `backward_passes_per_step`, Optax's `MultiSteps`). Each replica keeps
    its own accumulators (`distribute.ReplicaRows`), and a checkpoint keeps
    every replica's: a run resumed mid-window on as many replicas is the
    uninterrupted run bit for bit, compressed or not (a compressor sees each
    replica's own buffer). On another number of replicas they are shared out
    so that the flush sends what the finished micro-steps owe (see
    `build`): the window then equals one on the new count that began with
    the same micro-step batches. They are kept in the payload dtype (float32
    for 16-bit variables).
    Schedules see `optimizer.iterations`, which advances once per k
    micro-steps; `micro_step` counts calls.

    A variable whose gradient is None in some micro-steps accumulates only
    the others. At the flush, a variable with no gradient in the flush call
    is still applied (and its buffer zeroed) when its buffer holds anything;
    a variable with no gradient in the whole window is left as it is, as a
    None gradient leaves it in every other mode.

    Sparse gradients (`tf.IndexedSlices`) are scatter-added into the dense
    accumulator in place (each micro-step writes its rows only), so under
    this mode they travel dense at the flush (the accumulated rows of k
    micro-steps are no longer few).

    Args:
        k: Micro-steps per update, >= 1.
    """

    name = "accumulate"
    needs_replica_context = True

    def __init__(self, k: int):
        super().__init__()
        self.k = check_period("k", k)

    def build(self, optimizer, variables, strategy):
        # Resumed mid-window on another replica count, the rows are shared
        # out so that the flush still sends what the finished micro-steps
        # owe: under weighted_mean `sum(acc) / sum(w)` (keep both sums);
        # under sum (each replica's loss pre-scaled) `sum(acc)`, over the
        # micro-steps counted in each replica's weight (keep the sum, and the
        # weight's mean); under mean the replicas' mean of each (keep both
        # means). Sums everywhere gave the mean R_old / R_new times the owed
        # micro-steps (2x from 4 replicas to 2).
        aggregation = optimizer.aggregation.name
        acc_share = "mean" if aggregation == "mean" else "sum"
        weight_share = "sum" if aggregation == "weighted_mean" else "mean"
        with tf.name_scope(self.name):
            self.micro_step = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="micro_step"
            )
            self.accumulators = [
                dist.ReplicaRows(
                    strategy,
                    v.shape,
                    optimizer.slot_dtype(v),
                    f"accumulator_{i}",
                    share=acc_share,
                )
                for i, v in enumerate(variables)
            ]
            self.weight_sum = dist.ReplicaRows(
                strategy, [], tf.float32, "weight_sum", share=weight_share
            )

    def scaled_state(self):
        # Not built (the optimizer asks at build, after this mode's): none.
        return [a.storage for a in getattr(self, "accumulators", [])]

    def apply(self, optimizer, strategy, grads, weight, variables):
        every = optimizer.built_variables()
        given = {optimizer.variable_index(v): g for g, v in zip(grads, variables)}
        # Added in place: a sparse gradient then costs its rows, not a copy
        # of the whole buffer (`acc + g` on the value read would be one).
        buffers = [a.storage for a in self.accumulators]
        weight_sum = self.weight_sum.storage
        for i, g in given.items():
            dist.update(strategy, buffers[i], _add_into, g)
        dist.update(strategy, weight_sum, _add_into, weight)
        is_last = tf.equal((self.micro_step + 1) % self.k, 0)

        def flush():
            local = dist.read_per_replica(strategy, buffers)
            (total,) = dist.read_per_replica(strategy, [weight_sum])
            held = _held(optimizer, strategy, local, every, given)
            reduced, scale, ok = optimizer.reducer.reduce(
                strategy,
                list(local),
                total,
                variables=every,
                keep={every[i].ref(): h for i, h in held.items()},
            )
            # A variable absent from this call is applied only if its buffer
            # holds something (identical on every replica): without
            # compression, the reduced buffer says so.
            var_ok = [
                None
                if i in given
                else held[i]
                if i in held
                else tf.reduce_any(
                    tf.not_equal(dist.first_local(strategy, reduced[i]), 0)
                )
                for i in range(len(every))
            ]
            optimizer.apply_update(
                strategy, reduced, every, scale=scale, ok=ok, var_ok=var_ok
            )
            for a in [*buffers, weight_sum]:
                dist.update(strategy, a, lambda a: a.assign(tf.zeros_like(a)))

        dist.cond(is_last, flush, lambda: None)
        self.micro_step.assign_add(1)

    def get_config(self):
        return {"name": self.name, "k": self.k}


def _held(optimizer, strategy, buffers, variables, given):
    """`{i: whether some replica's buffer holds anything}` for the variables
    absent from the flush call, where compression will send them.

    Their reduced buffer cannot say: the compressor adds each replica's
    residual, so a variable with no gradient in the whole window moved by
    its compressed residual, which was then spent. One small all-reduce of a
    flag per such variable decides it everywhere alike (an empty buffer on
    one replica, as a sparse gradient leaves it, must not decide alone).
    """
    absent = [i for i in range(len(variables)) if i not in given]
    reducer = optimizer.reducer
    if not absent or not reducer.compresses(strategy, variables):
        return {}

    def flags(*bufs):
        return tf.stack(
            [tf.cast(tf.reduce_any(tf.not_equal(b, 0)), tf.float32) for b in bufs]
        )

    local = dist.map_per_replica(strategy, flags, *[buffers[i] for i in absent])
    (total,) = reducer.all_reduce(strategy, [local])
    total = dist.first_local(strategy, total)
    return {i: total[j] > 0 for j, i in enumerate(absent)}


def _add_into(acc, g):
    """`acc += g`; `IndexedSlices` add their rows in place (duplicates summed).

    A dense gradient writes a new buffer instead (`acc + g`, then assign):
    `assign_add` measured about 15% slower per micro-step on a 1M x 16
    table here (BUILD_NOTES.md, session 6).
    """
    if isinstance(g, tf.IndexedSlices):
        acc.scatter_add(tf.IndexedSlices(tf.cast(g.values, acc.dtype), g.indices))
    else:
        acc.assign(tf.convert_to_tensor(acc) + tf.cast(g, acc.dtype))
