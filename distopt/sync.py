"""When replicas talk: every step, every k steps, or by periodic averaging.

A sync mode receives each step's per-replica payload (the gradients, already
multiplied by the replica weight for `WeightedMean`, and the weight) in
cross-replica context, and decides what to communicate. Every decision is a
function of counters that every replica and worker holds identically, taken
in cross-replica context: conditional communication never hangs and never
meets a `merge_call` inside a `tf.cond` (tensorflow#27716).

| mode            | communication                  | replicas' weights          |
| --------------- | ------------------------------ | -------------------------- |
| `EveryStep`     | gradients, every step          | identical                  |
| `Accumulate(k)` | gradients, every k-th step     | identical                  |
| `LocalSGD(k)`   | weights, every k steps         | diverge, averaged every k  |
| `DiLoCo(k)`     | weights, every k steps         | diverge; outer step every k|
| `Hierarchical(k)` | grads among a worker's devices every step, weights across workers every k | identical within a worker |

All state (accumulators, anchors, outer momentum, position in the period) is
held in variables tracked by `tf.train.Checkpoint`, so a resumed run goes on
exactly as an uninterrupted one. A checkpoint holds one copy of a mirrored
variable, so the divergent modes need one call before a save and one after a
restore (`Optimizer.snapshot_replicas` / `restore_replicas`), or an average
before the save (`Optimizer.synchronize`); see `PeriodicAverage`.
"""

from __future__ import annotations

import contextlib

import tensorflow as tf
from absl import logging

from distopt import distribute as dist


class Sync(tf.Module):
    """Base class of sync modes."""

    name = "sync"
    #: Whether gradients must come from inside `strategy.run`.
    needs_replica_context = False

    def __init__(self):
        super().__init__(name=self.name)

    def build(self, optimizer, variables, strategy) -> None:
        """Creates the mode's state, in cross-replica context."""

    def apply(self, optimizer, strategy, grads, weight, variables) -> None:
        raise NotImplementedError

    def synchronize(self, optimizer, strategy, variables) -> None:
        """Makes replicas identical (a no-op where they always are)."""

    def snapshot_replicas(self, optimizer, strategy, variables) -> None:
        """Stores every replica's own state for a checkpoint (where it differs)."""

    def restore_replicas(self, optimizer, strategy, variables) -> None:
        """Gives every replica its own state back after a restore."""

    def get_config(self) -> dict:
        return {"name": self.name}


class EveryStep(Sync):
    """One all-reduce of the gradients per step (the default)."""

    name = "every_step"

    def apply(self, optimizer, strategy, grads, weight, variables):
        optimizer._reduce_and_apply(strategy, grads, weight, variables)


class Accumulate(Sync):
    """Local accumulation over k micro-steps, then one all-reduce and one update.

    Equal to one step on a k-times-larger batch (Horovod's
    `backward_passes_per_step`, Optax's `MultiSteps`). Accumulators are
    on-read-synchronised variables, so each replica keeps its own and a
    checkpoint saves their sum, which restores exactly on any replica count.
    Schedules see `optimizer.iterations`, which advances once per k
    micro-steps; `micro_step` counts calls.

    Args:
        k: Micro-steps per update, >= 1.
    """

    name = "accumulate"
    needs_replica_context = True

    def __init__(self, k: int):
        super().__init__()
        self.k = _check_period("k", k)

    def build(self, optimizer, variables, strategy):
        with tf.name_scope(self.name):
            self.micro_step = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="micro_step"
            )
            self.accumulators = [_per_replica_zeros(v, strategy) for v in variables]
            self.weight_sum = _per_replica_zeros(tf.constant(0.0), strategy)

    def apply(self, optimizer, strategy, grads, weight, variables):
        # Accumulators follow variables, not positions: a call may leave out
        # variables whose gradient is None.
        accs = [self.accumulators[optimizer._slot_index[v.ref()]] for v in variables]
        accs.append(self.weight_sum)
        payload = grads + [weight]
        totals = dist.map_per_replica(
            strategy,
            lambda *xs: [a + p for a, p in zip(xs[: len(accs)], xs[len(accs) :])],
            *accs,
            *payload,
        )
        is_last = tf.equal((self.micro_step + 1) % self.k, 0)

        def flush():
            optimizer._reduce_and_apply(strategy, totals[:-1], totals[-1], variables)
            for a in accs:
                dist.update(strategy, a, lambda a: a.assign(tf.zeros_like(a)))

        def accumulate():
            for a, t in zip(accs, totals):
                dist.update(strategy, a, lambda a, t: a.assign(t), t)

        dist.cond(is_last, flush, accumulate)
        self.micro_step.assign_add(1)

    def get_config(self):
        return {"name": self.name, "k": self.k}


class PeriodicAverage(Sync):
    """Local steps, with the weights averaged across replicas every k steps.

    Each replica applies its own gradient to its own copy, so the copies
    diverge by design; every k steps they are all-reduced. Without an outer
    optimizer the average replaces every copy (local SGD, Lin et al. 2018).
    With one, the pseudo-gradient `anchor - average` updates the anchor, and
    every replica restarts from it (DiLoCo, Douillard et al. 2023; SlowMo,
    Wang et al. 2019): local SGD is the outer `GradientDescent(1.0)` case.

    Checkpoints. A checkpoint saves one copy of each mirrored variable, so a
    save between averages would keep replica 0's weights and slots only.
    Either call `optimizer.synchronize(vars)` before the save (it ends the
    period early: exact only against a run that does the same), or
    `optimizer.snapshot_replicas(vars)` before the save and
    `optimizer.restore_replicas(vars)` after the restore: the resumed run then
    equals an uninterrupted one bit for bit. The snapshot holds
    `num_replicas` copies of the variables and slots on every device until
    the next step frees it. If the restore forgot `restore_replicas`, the next
    step fails instead of training on replica 0's copy; on a different number
    of replicas, `restore_replicas` starts every replica from the average of
    the saved ones, as `synchronize()` at the save would have.

    Args:
        k: Local steps per average, >= 1.
        warmup_steps: Fully synchronous steps first (post-local SGD).
        average_slots: Also average the optimizer's slots at each period.
        outer_optimizer: A distopt optimizer for the anchor, or None.
        local_group: "replica" (each replica alone) or "worker" (the devices of
            one worker average their gradients every step: hierarchical).
    """

    name = "periodic_average"
    needs_replica_context = True

    def __init__(
        self,
        k,
        warmup_steps=0,
        average_slots=False,
        outer_optimizer=None,
        local_group="replica",
    ):
        super().__init__()
        self.k = _check_period("k", k)
        self.warmup_steps = int(warmup_steps)
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {warmup_steps}.")
        self.average_slots = bool(average_slots)
        self.outer_optimizer = outer_optimizer
        if local_group not in ("replica", "worker"):
            raise ValueError(
                f"local_group: must be 'replica' or 'worker', got {local_group!r}."
            )
        self.local_group = local_group

    def build(self, optimizer, variables, strategy):
        with tf.name_scope(self.name):
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            # Local steps since the last average: the position in the period,
            # and zero exactly when every replica holds the same weights.
            self.since_average = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="since_average"
            )
            # 1 while every replica holds the same weights and slots.
            self.replicas_identical = tf.Variable(
                1, dtype=tf.int64, trainable=False, name="replicas_identical"
            )
            # The step at which `snapshots` were taken, or -1 when empty.
            self.snapshot_step = tf.Variable(
                -1, dtype=tf.int64, trainable=False, name="snapshot_step"
            )
            self.snapshots = [
                [_empty_stack(t, strategy) for t in _state_of(optimizer, v)]
                for v in variables
            ]
            self.anchors = []
            if self.outer_optimizer is not None:
                for v in variables:
                    with strategy.extended.colocate_vars_with(v):
                        # Zeros, not v's value: under MultiWorkerMirroredStrategy an
                        # initial value read from another variable inside a trace
                        # breaks the broadcast; apply() copies v in when local
                        # steps start.
                        self.anchors.append(
                            tf.Variable(
                                lambda v=v: tf.zeros(v.shape, v.dtype),
                                trainable=False,
                                name="anchor",
                            )
                        )
                self.outer_optimizer.build(self.anchors)

    def apply(self, optimizer, strategy, grads, weight, variables):
        dist.cond(
            tf.equal(self.snapshot_step, self.step),
            lambda: self._check_and_free_snapshot(optimizer, strategy, variables),
            lambda: None,
        )
        in_warmup = self.step < self.warmup_steps
        ends_period = tf.equal(self.since_average + 1, self.k)
        starts_local = tf.equal(self.step, self.warmup_steps)

        def synchronous():
            optimizer._reduce_and_apply(strategy, grads, weight, variables)

        anchors = self._anchors_for(optimizer, variables)

        def local():
            if anchors:
                dist.cond(
                    starts_local,
                    lambda: _copy(strategy, variables, anchors),
                    lambda: None,
                )
            if self.local_group == "worker":
                g, w, size = _worker_sum(strategy, grads, weight)
            else:
                g, w, size = grads, weight, 1
            optimizer._local_apply(strategy, g, w, variables, size)
            self.since_average.assign_add(1)
            self.replicas_identical.assign(0)
            dist.cond(
                ends_period,
                lambda: self._average(optimizer, strategy, variables),
                lambda: None,
            )

        dist.cond(in_warmup, synchronous, local)
        self.step.assign_add(1)

    def synchronize(self, optimizer, strategy, variables):
        # A checkpoint holds one copy per variable. Unless every copy is the
        # same, it would silently keep replica 0's: so end the period (if one
        # is under way) and average the slots, which diverge even at period
        # boundaries when they are not averaged there.
        dist.cond(
            self.since_average > 0,
            lambda: self._average(optimizer, strategy, variables, slots=True),
            lambda: self._average_slots(optimizer, strategy, variables),
        )

    def _average_slots(self, optimizer, strategy, variables):
        slot_vars = [s for v in variables for s in optimizer.slots(v).values()]
        if slot_vars and not self.average_slots:
            local = dist.read_per_replica(strategy, slot_vars)
            _assign(
                strategy, slot_vars, optimizer._all_reduce(strategy, local, dist.MEAN)
            )
        self.replicas_identical.assign(1)

    def snapshot_replicas(self, optimizer, strategy, variables):
        def take():
            tensors, snaps = self._state_and_snapshots(optimizer, variables)
            stacked = dist.gather_replicas(
                strategy, tensors, options=optimizer.communication_options
            )
            _assign(strategy, snaps, stacked)
            self.snapshot_step.assign(self.step)

        # Identical replicas need nothing: the checkpoint's one copy is theirs.
        dist.cond(tf.equal(self.replicas_identical, 0), take, lambda: None)

    def restore_replicas(self, optimizer, strategy, variables):
        if not tf.executing_eagerly():
            raise RuntimeError("restore_replicas: call it eagerly, after the restore.")
        tensors, snaps = self._state_and_snapshots(optimizer, variables)
        if int(self.snapshot_step.numpy()) < 0:
            if not int(self.replicas_identical.numpy()):
                raise ValueError(
                    "restore_replicas: this checkpoint was saved while the replicas "
                    "differed (local steps since the last average) without "
                    "snapshot_replicas() or synchronize() before the save, so it "
                    "holds replica 0's weights and slots only. Resume from them "
                    "by not calling restore_replicas(), or save with "
                    "snapshot_replicas() to resume exactly."
                )
            return
        saved = int(tf.shape(dist.local_values(strategy, snaps[0])[0])[0])
        num_replicas = strategy.num_replicas_in_sync
        if saved == num_replicas:
            _assign(strategy, tensors, dist.replica_rows(strategy, snaps))
            self._free_snapshots(strategy, snaps)
            return
        logging.warning(
            "restore_replicas: the checkpoint holds the state of %d replicas and "
            "this run has %d; every replica starts from their average, as if "
            "synchronize() had been called before the save.",
            saved,
            num_replicas,
        )
        means = [tf.reduce_mean(dist.first_local(strategy, s), axis=0) for s in snaps]
        _assign(strategy, tensors, means)
        self._free_snapshots(strategy, snaps)
        self.synchronize(optimizer, strategy, variables)

    def _check_and_free_snapshot(self, optimizer, strategy, variables):
        """Fails the step if a snapshot was restored without `restore_replicas`.

        Right after a save, every replica's state still equals its row of the
        snapshot; after a restore that skipped `restore_replicas`, every
        replica holds replica 0's copy, and some row differs.
        """
        tensors, snaps = self._state_and_snapshots(optimizer, variables, every=False)
        everything = [s for group in self.snapshots for s in group]
        n = strategy.num_replicas_in_sync
        t_locals = [dist.local_values(strategy, t) for t in tensors]
        s_locals = [dist.local_values(strategy, s) for s in snaps]

        def mismatches(r, i):
            count = tf.constant(0.0)
            for t, s in zip(t_locals, s_locals):
                snap = tf.convert_to_tensor(s[i])
                count += tf.cond(
                    tf.equal(tf.shape(snap)[0], n),
                    lambda snap=snap, t=t: tf.cast(
                        tf.reduce_any(tf.not_equal(snap[r], t[i])), tf.float32
                    ),
                    lambda: tf.constant(1.0),
                )
            return count

        if dist.is_distributed(strategy):
            local = dist.by_replica(strategy, mismatches)
            total = dist.first_local(
                strategy, dist.reduce(strategy, dist.SUM, local, local)
            )
        else:
            total = mismatches(0, 0)
        tf.debugging.assert_equal(
            total,
            0.0,
            message=(
                "The optimizer's state holds a per-replica snapshot from a "
                "checkpoint that the replicas' copies do not match: call "
                "optimizer.restore_replicas(var_list) after restoring."
            ),
        )
        self._free_snapshots(strategy, everything)

    def _free_snapshots(self, strategy, snaps):
        for s in snaps:
            empty = tf.zeros([0, *s.shape[1:]], s.dtype)
            dist.update(strategy, s, lambda s, x: s.assign(x), empty)
        self.snapshot_step.assign(-1)

    def _snapshots_of(self, optimizer, var):
        return self.snapshots[optimizer._slot_index[var.ref()]]

    def _state_and_snapshots(self, optimizer, variables, every=True):
        """The weights and slots of `variables`, and their snapshots.

        With `every`, `variables` must be all those the optimizer updates.
        """
        known = len(optimizer._slot_index)
        given = {v.ref() for v in variables if v.ref() in optimizer._slot_index}
        if every and (len(given) != known or len(variables) != known):
            raise ValueError(
                f"var_list: pass every variable the optimizer updates ({known}), "
                f"got {len(variables)} of which {len(given)} are known."
            )
        tensors = [t for v in variables for t in _state_of(optimizer, v)]
        snaps = [s for v in variables for s in self._snapshots_of(optimizer, v)]
        return tensors, snaps

    def _average(self, optimizer, strategy, variables, slots=False):
        tensors = list(variables)
        slot_vars = []
        if self.average_slots or slots:
            slot_vars = [s for v in variables for s in optimizer.slots(v).values()]
        local = dist.read_per_replica(strategy, tensors + slot_vars)
        averaged = optimizer._all_reduce(strategy, local, op=dist.MEAN)
        n = len(variables)
        if self.outer_optimizer is None:
            _assign(strategy, variables, averaged[:n])
        else:
            anchors = self._anchors_for(optimizer, variables)
            pseudo = dist.map_per_replica(
                strategy,
                lambda *xs: [a - m for a, m in zip(xs[:n], xs[n:])],
                *anchors,
                *averaged[:n],
            )
            self.outer_optimizer._apply_update(strategy, pseudo, anchors)
            _copy(strategy, anchors, variables)
        _assign(strategy, slot_vars, averaged[n:])
        self.since_average.assign(0)
        has_slots = any(optimizer.slots(v) for v in variables)
        self.replicas_identical.assign(int(bool(slot_vars) or not has_slots))

    def _anchors_for(self, optimizer, variables):
        """The anchors of `variables` (a call may leave some variables out)."""
        return (
            [self.anchors[optimizer._slot_index[v.ref()]] for v in variables]
            if self.anchors
            else []
        )

    def get_config(self):
        outer = self.outer_optimizer
        return {
            "name": self.name,
            "k": self.k,
            "warmup_steps": self.warmup_steps,
            "average_slots": self.average_slots,
            "local_group": self.local_group,
            "outer_optimizer": None
            if outer is None
            else {"class": type(outer).__name__, "config": outer.get_config()},
        }


def LocalSGD(k, warmup_steps=0, average_slots=False):
    """Local SGD: average the weights every k local steps."""
    mode = PeriodicAverage(k, warmup_steps, average_slots)
    mode.name = "local_sgd"
    return mode


def DiLoCo(k, outer_optimizer=None, warmup_steps=0, average_slots=False):
    """DiLoCo/SlowMo: an outer optimizer steps the anchor every k local steps.

    The default outer optimizer is Nesterov momentum, lr 0.7, momentum 0.9.
    """
    if outer_optimizer is None:
        from distopt.optimizers import Momentum

        outer_optimizer = Momentum(
            learning_rate=0.7, momentum=0.9, nesterov=True, name="outer_momentum"
        )
    mode = PeriodicAverage(k, warmup_steps, average_slots, outer_optimizer)
    mode.name = "diloco"
    return mode


def Hierarchical(k, warmup_steps=0, average_slots=False):
    """Sync a worker's devices every step, and all workers every k steps."""
    mode = PeriodicAverage(k, warmup_steps, average_slots, local_group="worker")
    mode.name = "hierarchical"
    return mode


_FACTORIES = {
    "every_step": lambda k=1, **kw: EveryStep(**kw),
    "accumulate": lambda k=8, **kw: Accumulate(k, **kw),
    "local_sgd": lambda k=8, **kw: LocalSGD(k, **kw),
    "diloco": lambda k=8, **kw: DiLoCo(k, **kw),
    "hierarchical": lambda k=8, **kw: Hierarchical(k, **kw),
}


def names() -> list[str]:
    """The names `get` accepts."""
    return sorted(_FACTORIES)


def get(identifier=None, **kwargs) -> Sync:
    """A sync mode from a name (with `k=` etc.), an instance, or None (every step)."""
    if identifier is None:
        return EveryStep()
    if isinstance(identifier, Sync):
        return identifier
    if isinstance(identifier, str) and identifier in _FACTORIES:
        return _FACTORIES[identifier](**kwargs)
    raise ValueError(
        f"sync: unknown {identifier!r}; valid names: {', '.join(names())}."
    )


def from_config(config) -> Sync:
    """Inverse of `Sync.get_config` (None gives the default)."""
    if config is None:
        return EveryStep()
    config = dict(config)
    name = config.pop("name")
    outer = config.pop("outer_optimizer", None)
    config.pop("local_group", None)
    if outer is not None:
        from distopt import optimizers

        config["outer_optimizer"] = optimizers.from_config(outer)
    return get(name, **config)


# --- Helpers -------------------------------------------------------------------


def _check_period(name, k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{name}: must be an integer >= 1, got {k!r}.")
    return k


def _per_replica_zeros(like, strategy):
    """A variable each replica writes alone; saved as the sum over replicas."""
    with (
        strategy.extended.colocate_vars_with(like)
        if isinstance(like, tf.Variable)
        else contextlib.nullcontext()
    ):
        return tf.Variable(
            lambda: tf.zeros(like.shape, like.dtype),
            trainable=False,
            synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=tf.VariableAggregation.SUM,
            name="accumulator",
        )


def _state_of(optimizer, var):
    """A variable and its slots: what differs between replicas in local steps."""
    return [var, *optimizer.slots(var).values()]


def _empty_stack(like, strategy):
    """A variable for `[num_replicas, *like.shape]` rows, created empty."""
    with strategy.extended.colocate_vars_with(like):
        return tf.Variable(
            lambda: tf.zeros([0, *like.shape], like.dtype),
            shape=tf.TensorShape([None, *like.shape]),
            trainable=False,
            name="replica_snapshot",
        )


def _assign(strategy, variables, values):
    for v, x in zip(variables, values):
        dist.update(strategy, v, lambda v, x: v.assign(x), x)


def _copy(strategy, sources, targets):
    _assign(strategy, targets, dist.read_per_replica(strategy, sources))


def _worker_sum(strategy, grads, weight):
    """Sums a worker's local payloads onto each local device (no collective)."""
    if not tf.distribute.has_strategy():
        return grads, weight, 1
    payload = list(grads) + [weight]
    locals_ = [dist.local_values(strategy, p) for p in payload]
    summed = dist.map_per_replica(
        strategy, lambda *_: [tf.add_n(list(x)) for x in locals_], *payload
    )
    return summed[:-1], summed[-1], len(locals_[0])
