"""Per-replica checkpoints for the sync modes whose replicas diverge by design.

A checkpoint saves one copy of each mirrored variable. Between averages,
local SGD / DiLoCo / hierarchical replicas hold different weights and slots,
so a plain save would keep replica 0's. `ReplicaSnapshots` keeps them all:

* `take` (before a save) gathers every replica's weights and slots, exactly,
  into `[R, ...]` variables of unknown leading dimension (created empty, so
  they cost nothing until used). Every worker receives all R rows.
* `restore` (after a restore) gives replica r row r back; on a different
  replica count every replica starts from the rows' average (logged), and
  the caller then synchronises.
* `check_and_free` (the first step after a snapshot) compares every
  replica's state with its row through one scalar all-reduce and fails the
  step if any differs: that is a restore that skipped `restore_replicas`,
  which would otherwise silently train on replica 0's copy. Then it frees
  the rows. `synchronize` frees them too: it changes every copy on purpose.
"""

from __future__ import annotations

import tensorflow as tf
from absl import logging

from distopt import distribute as dist


class ReplicaSnapshots(tf.Module):
    """Every replica's copy of a list of variable groups, for one checkpoint.

    Args:
        groups: For each variable the optimizer updates, the list of state
            variables (the variable and its slots) whose copies may differ.
        strategy: The strategy the variables belong to.
    """

    def __init__(self, groups, strategy):
        super().__init__(name="replica_snapshots")
        with tf.name_scope(self.name):
            # The step at which the rows were taken, or -1 when empty.
            self.step = tf.Variable(-1, dtype=tf.int64, trainable=False, name="step")
            self.rows = [[_empty_stack(t, strategy) for t in g] for g in groups]

    def take(self, strategy, tensors, rows, at_step, options=None):
        """Gathers `tensors` (per-replica state) into `rows`."""
        stacked = dist.gather_replicas(strategy, tensors, options=options)
        dist.assign(strategy, rows, stacked)
        self.step.assign(at_step)

    def restore(self, strategy, tensors, rows) -> bool:
        """Writes row r back into replica r's `tensors`; eager only.

        Returns:
            True if the snapshot came from a different number of replicas
            (every replica then holds the rows' average, and the caller must
            synchronise what averaging leaves out).
        """
        saved = int(tf.shape(dist.local_values(strategy, rows[0])[0])[0])
        num_replicas = strategy.num_replicas_in_sync
        if saved == num_replicas:
            dist.assign(strategy, tensors, dist.replica_rows(strategy, rows))
            self.free(strategy, rows)
            return False
        logging.warning(
            "restore_replicas: the checkpoint holds the state of %d replicas and "
            "this run has %d; every replica starts from their average, as if "
            "synchronize() had been called before the save.",
            saved,
            num_replicas,
        )
        means = [tf.reduce_mean(dist.first_local(strategy, s), axis=0) for s in rows]
        dist.assign(strategy, tensors, means)
        self.free(strategy, rows)
        return True

    def check_and_free(self, strategy, tensors, rows, every_row):
        """Fails the step if a snapshot was restored without `restore_replicas`.

        Right after a save, every replica's state still equals its row;
        after a restore that skipped `restore_replicas`, every replica holds
        replica 0's copy, and some row differs.
        """
        n = strategy.num_replicas_in_sync
        t_locals = [dist.local_values(strategy, t) for t in tensors]
        s_locals = [dist.local_values(strategy, s) for s in rows]

        def mismatches(r, i):
            count = tf.constant(0.0)
            for t, s in zip(t_locals, s_locals):
                snap = tf.convert_to_tensor(s[i])
                rows = tf.shape(snap)[0]
                # Padded so that row r exists even when the snapshot is
                # empty: XLA compiles both branches of the cond and rejects
                # a static out-of-bounds slice in the one not taken.
                padded = tf.concat([snap, tf.zeros_like(t[i])[None]], 0)
                row = padded[tf.minimum(r, rows)]
                count += tf.where(
                    tf.equal(rows, n),
                    tf.cast(tf.reduce_any(tf.not_equal(row, t[i])), tf.float32),
                    1.0,
                )
            return count

        if dist.is_distributed(strategy):
            local = dist.by_replica(strategy, mismatches)
            total = dist.first_local(
                strategy, dist.reduce(strategy, dist.SUM, local, local)
            )
        else:
            total = mismatches(0, 0)
        checked = tf.debugging.assert_equal(
            total,
            0.0,
            message=(
                "The optimizer's state holds a per-replica snapshot from a "
                "checkpoint that the replicas' copies do not match: call "
                "optimizer.restore_replicas(var_list) after restoring (or "
                "snapshot_replicas again after assigning the variables)."
            ),
        )
        # Only once the check passed (eagerly, it raised already): a traced
        # step that failed it freed the rows anyway, so the restore_replicas
        # its message asks for found nothing and training went on from
        # replica 0's copy.
        with tf.control_dependencies([checked] if checked is not None else []):
            self.free(strategy, every_row)

    def free(self, strategy, rows):
        for s in rows:
            empty = tf.zeros([0, *s.shape[1:]], s.dtype)
            dist.update(strategy, s, lambda s, x: s.assign(x), empty)
        self.step.assign(-1)


def _empty_stack(like, strategy):
    """A variable for `[num_replicas, *like.shape]` rows, created empty."""
    with strategy.extended.colocate_vars_with(like):
        return tf.Variable(
            lambda: tf.zeros([0, *like.shape], like.dtype),
            shape=tf.TensorShape([None, *like.shape]),
            trainable=False,
            name="replica_snapshot",
        )
