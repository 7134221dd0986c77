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
exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib

import tensorflow as tf

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


def LocalSGD(k, warmup_steps=0, average_slots=False):  # noqa: N802 (a mode's name)
    """Local SGD: average the weights every k local steps."""
    mode = PeriodicAverage(k, warmup_steps, average_slots)
    mode.name = "local_sgd"
    return mode


def DiLoCo(k, outer_optimizer=None, warmup_steps=0, average_slots=False):  # noqa: N802
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


def Hierarchical(k, warmup_steps=0, average_slots=False):  # noqa: N802
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
