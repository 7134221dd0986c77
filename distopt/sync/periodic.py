"""Periodic averaging: local SGD, DiLoCo/SlowMo and hierarchical sync."""

from __future__ import annotations

import tensorflow as tf
from absl import logging

from distopt import compression as compression_lib
from distopt import distribute as dist
from distopt import ownership
from distopt import reduce as reduce_lib
from distopt.checks import check_bool, check_int
from distopt.sync.base import Sync, check_period
from distopt.sync.snapshots import ReplicaSnapshots


class PeriodicAverage(Sync):
    """Local steps, with the weights averaged across replicas every k steps.

    Each replica (or replica group) applies its own gradient to its own copy,
    so the copies diverge by design; every k steps they are all-reduced.
    Without an outer optimizer the average replaces every copy (local SGD,
    Lin et al. 2018). With one, the pseudo-gradient `anchor - average`
    updates the anchor, and every replica restarts from it (DiLoCo, Douillard
    et al. 2023; SlowMo, Wang et al. 2019): local SGD is the outer
    `GradientDescent(1.0)` case.

    Replica groups (`group_size`): the replicas of a group average their
    gradients every step (one reduction per group) and stay identical; all
    groups average every k steps. `group_size=None` (hierarchical's default)
    makes each worker's devices one group; groups never span workers.

    Checkpoints. A checkpoint saves one copy of each mirrored variable, so a
    save between averages would keep replica 0's weights and slots only.
    Either call `optimizer.synchronize(vars)` before the save (it ends the
    period early), or `optimizer.snapshot_replicas(vars)` before the save and
    `optimizer.restore_replicas(vars)` after the restore: the resumed run then
    equals an uninterrupted one bit for bit (see `distopt.sync.snapshots`).

    Not available under `TPUStrategy`: its replicas are one replicated
    program with one copy of each variable, so they cannot hold different
    weights. Use `Accumulate(k)` there to communicate every k steps.

    Args:
        k: Local steps per average, >= 1.
        warmup_steps: Fully synchronous steps first (post-local SGD).
        average_slots: Also average the optimizer's slots at each period.
        outer_optimizer: A distopt optimizer for the anchor, or None.
        group_size: 1 (each replica alone), None (the devices of one worker)
            or G, dividing each worker's device count.
    """

    name = "periodic_average"
    needs_replica_context = True
    diverges = True

    def __init__(
        self,
        k,
        warmup_steps=0,
        average_slots=False,
        outer_optimizer=None,
        group_size=1,
    ):
        super().__init__()
        self.k = check_period("k", k)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.average_slots = check_bool("average_slots", average_slots)
        self.outer_optimizer = _check_outer_optimizer(outer_optimizer)
        #: Whether the mode steps an outer optimizer (DiLoCo): its default is
        #: made at build.
        self.has_outer = outer_optimizer is not None
        if group_size is not None:
            check_period("group_size", group_size)
        self.group_size = group_size
        # Last: a constructor that raised claimed nothing.
        ownership.claim(outer_optimizer, "outer_optimizer", "sync mode DiLoCo")

    def build(self, optimizer, variables, strategy):
        if dist.is_tpu(strategy):
            raise ValueError(
                f"sync: {self.name} needs replicas that hold different weights, "
                "which TPUStrategy does not have (one replicated program, one "
                "copy of each variable). Use sync=Accumulate(k) to communicate "
                "every k steps."
            )
        self._local_group = (
            self.group_size
            if self.group_size is not None
            else dist.local_device_count(strategy)
        )
        if dist.is_distributed(strategy):
            # Fails now, with the argument named, rather than at the first step.
            dist.check_group_size(strategy, self._local_group)
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
            self.replica_state = ReplicaSnapshots(
                [_state_of(optimizer, v) for v in variables], strategy
            )
            self.anchors = []
            if self.has_outer and self.outer_optimizer is None:
                self.outer_optimizer = default_outer_optimizer()
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
            # The outer gradient is compressed like the inner ones, with
            # residuals of its own (a copy of the inner compressor).
            self.outer_compression = None
            if self.outer_optimizer is not None and optimizer.compression is not None:
                # Its own class, not the registered one of its name: a user's
                # subclass of TopK is named "topk" too.
                inner = optimizer.compression
                self.outer_compression = compression_lib.from_config(
                    inner.spec(), classes=[type(inner)]
                )
                self.outer_compression.build(strategy, self.anchors)
                _warn_if_error_feedback_meets_momentum(
                    self.outer_compression, self.outer_optimizer
                )

    @property
    def sends_gradients(self) -> bool:
        """DiLoCo sends an outer gradient (compressible); local SGD weights."""
        return self.has_outer

    # The snapshot's names, as tests and users know them.
    @property
    def snapshot_step(self) -> tf.Variable:
        return self.replica_state.step

    @property
    def snapshots(self) -> list:
        return self.replica_state.rows

    def apply(self, optimizer, strategy, grads, weight, variables):
        checked = dist.cond(
            tf.equal(self.snapshot_step, self.step),
            lambda: self._check_and_free_snapshot(optimizer, strategy),
            lambda: None,
        )
        # A failed check must leave every variable as it was, the counters
        # too (the message asks for restore_replicas, then the step again).
        with tf.control_dependencies([] if checked is None else [checked]):
            self._step(optimizer, strategy, grads, weight, variables)

    def _step(self, optimizer, strategy, grads, weight, variables):
        """The step proper: synchronous in the warm-up, local after it."""
        ends_period = tf.equal(self.since_average + 1, self.k)
        starts_local = tf.equal(self.step, self.warmup_steps)
        reducer = optimizer.reducer

        def synchronous():
            g, scale, ok = reducer.reduce(strategy, grads, weight, variables=variables)
            optimizer.apply_update(strategy, g, variables, scale=scale, ok=ok)

        every = optimizer.built_variables()
        anchors = self._anchors_for(optimizer, every)

        def local():
            if anchors:
                dist.cond(
                    starts_local,
                    lambda: _copy(strategy, every, anchors),
                    lambda: None,
                )
            g, scale, ok = reducer.reduce(
                strategy, grads, weight, group_size=self._local_group
            )
            optimizer.apply_update(strategy, g, variables, scale=scale, ok=ok)
            self.since_average.assign_add(1)
            self.replicas_identical.assign(0)
            dist.cond(
                ends_period,
                lambda: self._average(optimizer, strategy),
                lambda: None,
            )

        if self.warmup_steps:
            dist.cond(self.step < self.warmup_steps, synchronous, local)
        else:
            # No warm-up: `step < 0` never holds. Tracing the local branch
            # alone makes the step's graph a fifth smaller (local SGD on 2
            # replicas: 627 ops, not 785), and its tracing as much faster.
            local()
        self.step.assign_add(1)

    def synchronize(self, optimizer, strategy, variables):
        # A checkpoint holds one copy per variable. Unless every copy is the
        # same, it would silently keep replica 0's: so end the period (if one
        # is under way) and average the slots, which diverge even at period
        # boundaries when they are not averaged there.
        del variables  # Always every variable: see `_average`.
        dist.cond(
            self.since_average > 0,
            lambda: self._average(optimizer, strategy, slots=True),
            lambda: self._average_slots(optimizer, strategy),
        )
        # A pending snapshot no longer holds the replicas' copies (a save
        # taken since keeps it): the next step would take the averaged
        # copies for a restore that skipped restore_replicas.
        everything = [s for group in self.snapshots for s in group]
        dist.cond(
            self.snapshot_step >= 0,
            lambda: self.replica_state.free(strategy, everything),
            lambda: None,
        )

    def _average_slots(self, optimizer, strategy):
        every = optimizer.built_variables()
        slot_vars = [s for v in every for s in optimizer.slots(v).values()]
        if slot_vars and not self.average_slots:
            local = dist.read_per_replica(strategy, slot_vars)
            dist.assign(strategy, slot_vars, optimizer.reducer.mean(strategy, local))
        self.replicas_identical.assign(1)

    def snapshot_replicas(self, optimizer, strategy, variables):
        def take():
            tensors, rows = self._state_and_rows(optimizer, variables)
            self.replica_state.take(
                strategy,
                tensors,
                rows,
                self.step,
                options=optimizer.communication_options,
            )

        # Identical replicas need nothing: the checkpoint's one copy is theirs.
        dist.cond(tf.equal(self.replicas_identical, 0), take, lambda: None)

    def restore_replicas(self, optimizer, strategy, variables):
        if not tf.executing_eagerly():
            raise RuntimeError("restore_replicas: call it eagerly, after the restore.")
        tensors, rows = self._state_and_rows(optimizer, variables)
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
        if self.replica_state.restore(strategy, tensors, rows):
            self.synchronize(optimizer, strategy, variables)

    def _check_and_free_snapshot(self, optimizer, strategy):
        every = optimizer.built_variables()
        tensors, rows = self._state_and_rows(optimizer, every)
        everything = [s for group in self.snapshots for s in group]
        self.replica_state.check_and_free(strategy, tensors, rows, everything)

    def _state_and_rows(self, optimizer, variables):
        """The weights and slots of every variable, and their snapshot rows.

        `variables` must be every variable the optimizer updates.
        """
        every = optimizer.built_variables()
        given = {v.ref() for v in variables}
        known = {v.ref() for v in every}
        if given != known or len(variables) != len(every):
            raise ValueError(
                f"var_list: pass every variable the optimizer updates ({len(every)}), "
                f"got {len(variables)} of which {len(given & known)} are known."
            )
        tensors = [t for v in every for t in _state_of(optimizer, v)]
        rows = [s for v in every for s in self.snapshots[optimizer.variable_index(v)]]
        return tensors, rows

    def _average(self, optimizer, strategy, slots=False):
        # Every variable, not only those with a gradient this step: a
        # variable left out now may have moved in earlier local steps.
        variables = optimizer.built_variables()
        slot_vars = []
        if self.average_slots or slots:
            slot_vars = [s for v in variables for s in optimizer.slots(v).values()]
        n = len(variables)
        if self.outer_optimizer is None:
            local = dist.read_per_replica(strategy, variables + slot_vars)
            averaged = optimizer.reducer.mean(strategy, local)
            dist.assign(strategy, variables, averaged[:n])
        else:
            anchors = self._anchors_for(optimizer, variables)
            local = dist.read_per_replica(strategy, anchors + variables + slot_vars)
            pseudo = self._outer_gradient(
                optimizer, strategy, local[:n], local[n : 2 * n]
            )
            averaged = [None] * n + optimizer.reducer.mean(strategy, local[2 * n :])
            self.outer_optimizer.apply_update(strategy, list(pseudo), anchors)
            _copy(strategy, anchors, variables)
        dist.assign(strategy, slot_vars, averaged[n:])
        self.since_average.assign(0)
        has_slots = any(optimizer.slots(v) for v in variables)
        self.replicas_identical.assign(int(bool(slot_vars) or not has_slots))

    def _outer_gradient(self, optimizer, strategy, anchors, weights):
        """`anchor - mean_r(w_r)`, on every replica.

        With compression, each replica sends its own share `(anchor - w_r)
        / R` through the outer compressor (Streaming DiLoCo compresses its
        outer gradients too, arXiv 2501.18512), with residuals of its own,
        in float32 (16-bit weights are widened first, as the Reducer widens
        16-bit gradients); float64 weights travel as without compression,
        in one all-reduce of the weights.
        """
        n = len(anchors)
        compressor = self.outer_compression
        comp = []
        if compressor is not None:
            comp = [
                i
                for i, a in enumerate(self.anchors)
                if reduce_lib.payload_dtype(a.dtype) == tf.float32
            ]
        rest = [i for i in range(n) if i not in comp]
        out = [None] * n
        if rest:
            mean = optimizer.reducer.mean(strategy, [weights[i] for i in rest])
            diffs = dist.map_per_replica(
                strategy,
                lambda *xs: [a - m for a, m in zip(xs[: len(rest)], xs[len(rest) :])],
                *[anchors[i] for i in rest],
                *mean,
            )
            for i, d in zip(rest, _as_list(diffs)):
                out[i] = d
        if comp:
            size = strategy.num_replicas_in_sync

            def share(*xs):
                k = len(comp)
                return [
                    (tf.cast(a, tf.float32) - tf.cast(w, tf.float32)) / size
                    for a, w in zip(xs[:k], xs[k:])
                ]

            shares = dist.map_per_replica(
                strategy,
                share,
                *[anchors[i] for i in comp],
                *[weights[i] for i in comp],
            )
            pseudo = compressor.aggregate(
                optimizer.reducer,
                strategy,
                _as_list(shares),
                [self.anchors[i] for i in comp],
            )
            compressor.commit(strategy, None)
            for i, p in zip(comp, pseudo):
                dtype = self.anchors[i].dtype
                out[i] = dist.map_per_replica(
                    strategy, lambda x, dtype=dtype: tf.cast(x, dtype), p
                )
        return out

    def _anchors_for(self, optimizer, variables):
        return (
            [self.anchors[optimizer.variable_index(v)] for v in variables]
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
            "group_size": self.group_size,
            "outer_optimizer": None if outer is None else outer.spec(),
        }


def LocalSGD(k, warmup_steps=0, average_slots=False):
    """Local SGD: average the weights every k local steps."""
    mode = PeriodicAverage(k, warmup_steps, average_slots)
    mode.name = "local_sgd"
    return mode


def DiLoCo(k, outer_optimizer=None, warmup_steps=0, average_slots=False):
    """DiLoCo/SlowMo: an outer optimizer steps the anchor every k local steps.

    The default outer optimizer is Nesterov momentum, lr 0.7, momentum 0.9
    (Douillard et al. 2023), made when the mode is built (`outer_optimizer`
    is None until then), by the factory `distopt.optimizers` registers.
    """
    mode = PeriodicAverage(k, warmup_steps, average_slots, outer_optimizer)
    mode.name = "diloco"
    mode.has_outer = True
    return mode


def _warn_if_error_feedback_meets_momentum(compressor, outer) -> None:
    """Warns of error feedback behind the outer optimizer's momentum.

    Together they trained worse than either alone (README, "DiLoCo: error
    feedback or outer momentum, not both": TopK 94.73% and PowerSGD rank 1
    73.62% against 97.16 uncompressed under the default Nesterov, MLP,
    2026-12-06): two accumulators of what is owed, the residual undamped.
    Not refused: it trains, and a decayed residual is the user's tuning.
    """
    momentum = outer.get_config().get("momentum") or 0.0
    if not compressor.error_feedback or compressor.error_feedback_decay < 1.0:
        return
    if momentum <= 0.0:
        return
    logging.warning(
        "DiLoCo with compression %r: error feedback behind the outer "
        "optimizer's momentum (%g) trained worse than either alone (README, "
        "'DiLoCo: error feedback or outer momentum, not both'). Step the anchor "
        "without momentum (outer_optimizer=GradientDescent(1.0); trainer: "
        "--sync_args=outer_momentum=0.0,outer_learning_rate=1.0), or pass "
        "error_feedback=False (--compression_args=error_feedback=false) or "
        "error_feedback_decay < 1.",
        compressor.name,
        momentum,
    )


#: Makes DiLoCo's default outer optimizer. Registered by `distopt.optimizers`
#: (`set_default_outer_optimizer`): the sync modes sit below the optimizers,
#: so this module must not import them.
_default_outer_factory = None


def set_default_outer_optimizer(factory) -> None:
    """Registers the callable that makes DiLoCo's default outer optimizer."""
    global _default_outer_factory
    _default_outer_factory = factory


#: The outer optimizer's options (its config's values when unset) that
#: DiLoCo's outer step never reads: it hands the averaged outer gradient to
#: the rule (`apply_update`), past the outer optimizer's own reduction, sync
#: mode, gradient transforms, loss scale and compressor (a copy of the inner
#: compressor compresses the outer gradient); its EMA would average the
#: anchors, which nothing reads. Set, they were ignored in silence.
_OUTER_UNUSED = {
    "aggregation": "mean",
    "sync": {"name": "every_step"},
    "global_clipnorm": None,
    "clipvalue": None,
    "clipnorm": None,
    "skip_nonfinite": False,
    "wire_dtype": None,
    "loss_scale": None,
    "use_ema": False,
    "compression": None,
}


def _check_outer_optimizer(outer):
    """`outer` if it is a distopt optimizer (or None), else a ValueError.

    By what DiLoCo calls on it, as this module cannot import the optimizers
    (they import the sync modes): a Keras optimizer or a string used to pass
    here and fail at the first outer step. An option the outer step does not
    use (`_OUTER_UNUSED`) is refused too, naming it.
    """
    if outer is None:
        return outer
    if isinstance(outer, type) or not all(  # The class, not an instance of it.
        callable(getattr(outer, m, None)) for m in ("build", "apply_update")
    ):
        raise ValueError(
            "outer_optimizer: must be a distopt optimizer, such as "
            "distopt.optimizers.Momentum(0.7, 0.9, nesterov=True) or "
            f"GradientDescent(1.0), got {outer!r}."
        )
    config = outer.get_config()
    unused = [k for k, unset in _OUTER_UNUSED.items() if config.get(k, unset) != unset]
    if unused:
        raise ValueError(
            f"outer_optimizer: DiLoCo's outer step applies the averaged outer "
            f"gradient with the outer optimizer's rule alone, so its "
            f"{', '.join(unused)} would do nothing; leave "
            f"{'it' if len(unused) == 1 else 'them'} out (the inner optimizer's "
            "act on the local steps)."
        )
    return outer


def default_outer_optimizer():
    """A new default outer optimizer (Nesterov momentum, lr 0.7, momentum 0.9).

    Called at build, when the inner optimizer exists, so `distopt.optimizers`
    has been imported and has registered the factory.
    """
    return _default_outer_factory()


def Hierarchical(k, warmup_steps=0, average_slots=False, group_size=None):
    """Replica groups average every step, and all groups every k steps.

    Args:
        k: Steps between averages across groups.
        warmup_steps: Fully synchronous steps first.
        average_slots: Also average the slots at each period.
        group_size: Replicas per group; None: the devices of one worker (for
            example one host's GPUs). Must divide every worker's device count.
    """
    mode = PeriodicAverage(k, warmup_steps, average_slots, group_size=group_size)
    mode.name = "hierarchical"
    return mode


def _state_of(optimizer, var):
    """A variable and its slots: what differs between replicas in local steps."""
    return [var, *optimizer.slots(var).values()]


def _copy(strategy, sources, targets):
    dist.assign(strategy, targets, dist.read_per_replica(strategy, sources))


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]
