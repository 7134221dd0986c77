"""The one module of distopt that talks to `tf.distribute`.

Everything else in the library is written against these few verbs, so the
rules that keep replicas consistent live here and nowhere else:

* Per-replica values only travel into cross-replica context through
  `merge_call` (`merge`), never through assignments in replica context: a
  `MirroredVariable` assigned in a replica context silently diverges.
* Variables change only through `strategy.extended.update` (`update`), which
  writes each device's copy from that device's value.
* Work that must run once per replica while in cross-replica context
  (unpacking a reduced buffer, clipping it) goes through `map_per_replica`.
* Conditions that gate communication are decided in cross-replica context on
  values that every replica holds identically (`cond`), because a `tf.cond`
  around a `merge_call` in replica context breaks (tensorflow#27716).

It is also the one place that makes strategies (`make_strategy`, with
`logical_cpu_devices`).

Only public TensorFlow APIs are used, with two exceptions, each wrapped once:
`in_xla_compiled_function` and `_with_own_collective_keys` (see there for
why).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

SUM = tf.distribute.ReduceOp.SUM
MEAN = tf.distribute.ReduceOp.MEAN


def current_strategy() -> tf.distribute.Strategy:
    """The strategy in scope, or the default (no-op) strategy."""
    return tf.distribute.get_strategy()


def in_replica_context() -> bool:
    """True inside `strategy.run` (and always under the default strategy)."""
    return tf.distribute.get_replica_context() is not None


def require_cross_replica_context(method: str, hint: str = "") -> None:
    """Raises RuntimeError naming `method` when called inside `strategy.run`."""
    if in_replica_context() and tf.distribute.has_strategy():
        raise RuntimeError(
            f"{method}: call it in cross-replica context (outside strategy.run)."
            + (f" {hint}" if hint else "")
        )


def is_distributed(strategy: tf.distribute.Strategy) -> bool:
    """True when values may differ between replicas or workers."""
    return strategy.num_replicas_in_sync > 1


def is_tpu(strategy: tf.distribute.Strategy) -> bool:
    """True under `TPUStrategy` (one replicated program, single-trace values)."""
    return isinstance(strategy, tf.distribute.TPUStrategy)


def is_default(strategy: tf.distribute.Strategy) -> bool:
    """True for the default (no-op) strategy."""
    with strategy.scope():
        return not tf.distribute.has_strategy()


def is_single_host(strategy: tf.distribute.Strategy) -> bool:
    """True for the default, `OneDeviceStrategy` and `MirroredStrategy`.

    Their replicas are all devices of this process, so a value can be copied
    to each of them (`copy_to_replicas`) with no collective.
    """
    return is_default(strategy) or isinstance(
        strategy, (tf.distribute.OneDeviceStrategy, tf.distribute.MirroredStrategy)
    )


def copy_to_replicas(strategy: tf.distribute.Strategy, value: tf.Tensor):
    """A copy of `value` on each local replica's device, made once, eagerly.

    Under one replica, a tensor on its device (the default device under the
    default strategy); otherwise a per-replica value, which `strategy.run`
    hands to each replica as its own device's copy. Single-host strategies
    only (`is_single_host`).
    """
    if is_default(strategy):
        return tf.identity(value)
    if strategy.num_replicas_in_sync == 1:
        with tf.device(strategy.extended.worker_devices[0]):
            return tf.identity(value)
    return by_replica(strategy, lambda r, i: tf.identity(value))


def local_device_count(strategy: tf.distribute.Strategy) -> int:
    """The number of replicas (devices) on this worker."""
    if not tf.distribute.has_strategy():
        return 1
    return len(strategy.extended.worker_devices)


def group_size_fits(group_size: int, n_local: int) -> bool:
    """Whether replica groups of `group_size` tile `n_local` local devices.

    The rule of :func:`check_group_size`, apart so that a caller who knows
    the device count before any strategy exists (the trainer's flag checks)
    applies the same one.
    """
    return group_size >= 1 and n_local % group_size == 0


def check_group_size(strategy: tf.distribute.Strategy, group_size: int) -> None:
    """Raises ValueError unless `group_size` divides this worker's devices."""
    n_local = local_device_count(strategy)
    if not group_size_fits(group_size, n_local):
        raise ValueError(
            f"group_size: must divide the {n_local} devices of this worker, got "
            f"{group_size}; replica groups cannot span workers."
        )


def check_created_in_scope(strategy: tf.distribute.Strategy, variables) -> None:
    """Raises ValueError naming the first variable not created under `strategy`.

    With no strategy in scope, only a variable with a copy per replica is
    refused: updated there as one plain variable, once per copy, the copies
    would diverge (or fail with an error that does not say why).
    """
    for v in variables:
        if not tf.distribute.has_strategy():
            if isinstance(v, tf.distribute.DistributedValues):
                raise ValueError(
                    f"var_list: variable {v.name!r} belongs to a distribution "
                    "strategy, but no strategy is in scope: call this under "
                    "`with strategy.scope():` (or inside `strategy.run`)."
                )
        elif not strategy.extended.variable_created_in_scope(v):
            raise ValueError(
                f"var_list: variable {v.name!r} was created outside "
                f"{type(strategy).__name__}.scope(); create it under "
                "`strategy.scope()` (with the model and the optimizer), so that "
                "every replica holds a copy."
            )


def in_xla_compiled_function() -> bool:
    """Whether the code being traced will be compiled by XLA as a whole.

    True while tracing a `tf.function(jit_compile=True)`, or any function or
    replica function traced inside one; False eagerly and in a plain
    `tf.function`.
    """
    if tf.executing_eagerly():
        return False
    # No public API tells whether the function being traced is XLA-compiled.
    # `tf.function(jit_compile=True)` enters an `XLAControlFlowContext` on its
    # FuncGraph while it traces (`OptionalXlaContext` in TensorFlow's
    # polymorphic_function.py), and MirroredStrategy's replica threads trace
    # into that same graph. `tf.__internal__.get_enclosing_xla_context` finds
    # it from the default graph through the outer graphs; it is exported for
    # TensorFlow's own libraries (the losses use it to pick XLA-friendly
    # code), not part of the stable API. Should a release drop it, the check
    # it serves (`check_not_compiled_around_replicas`) is skipped and users
    # get TensorFlow's own error instead: nothing else depends on it.
    find = getattr(tf.__internal__, "get_enclosing_xla_context", None)
    return find is not None and find() is not None


def _determinism_switch():
    """`(is_enabled, disable)` from TensorFlow's config module, or None.

    TensorFlow's public API turns op determinism on
    (`tf.config.experimental.enable_op_determinism`) and never off, so one
    `--deterministic` run in a sweep left every later run of the process
    deterministic: slower, and in the last bit not what a fresh process
    gives. `tensorflow.python.framework.config` holds the switch's two other
    halves, `is_op_determinism_enabled` and `disable_op_determinism` (used by
    TensorFlow's own tests; not exported). Should a release drop them, the
    trainer leaves determinism on after such a run and says so.
    """
    try:
        from tensorflow.python.framework import config as tf_config
    except ImportError:
        return None
    is_enabled = getattr(tf_config, "is_op_determinism_enabled", None)
    disable = getattr(tf_config, "disable_op_determinism", None)
    if is_enabled is None or disable is None:
        return None
    return is_enabled, disable


@contextlib.contextmanager
def op_determinism(enabled: bool):
    """TensorFlow's op determinism inside the block when `enabled`, as before after.

    Off is left as it is: determinism a user turned on stays on.
    """
    if not enabled:
        yield
        return
    switch = _determinism_switch()
    was_on = switch[0]() if switch else None
    tf.config.experimental.enable_op_determinism()
    try:
        yield
    finally:
        if switch is None:
            logging.warning(
                "op determinism stays on in this process: this TensorFlow has "
                "no way to turn it off again."
            )
        elif not was_on:
            switch[1]()


def check_not_compiled_around_replicas(strategy: tf.distribute.Strategy) -> None:
    """Raises RuntimeError inside an XLA-compiled step over several replicas.

    `tf.function(jit_compile=True)` around `strategy.run` of a strategy with
    more than one replica asks XLA to compile one program for several
    devices. XLA compiles for one device, so TensorFlow fails at run time
    with an error about a resource on another device that does not say
    why. TPUStrategy is the exception: its step is one replicated XLA
    program by design.
    """
    if strategy.num_replicas_in_sync <= 1 or is_tpu(strategy):
        return
    if not in_xla_compiled_function():
        return
    raise RuntimeError(
        f"A tf.function(jit_compile=True) wraps strategy.run of "
        f"{type(strategy).__name__} with {strategy.num_replicas_in_sync} replicas: "
        "XLA compiles a program for one device and cannot compile a step that "
        "spans several (TensorFlow would fail with an error about a resource on "
        "another device). Keep the outer function a plain @tf.function and "
        "compile the per-replica computation instead: inside strategy.run, "
        "compute the loss and gradients in a tf.function(jit_compile=True) and "
        "call apply_gradients after it, outside the compiled function (for SAM "
        "and Heun, compile the loss_fn given to minimize). The optimizer "
        "compiles its own update with XLA (its jit_compile=True, the default). "
        "With Keras, model.compile(..., jit_compile=False). Only TPUStrategy "
        "compiles the whole step."
    )


def merge(fn: Callable[..., Any], *args: Any) -> Any:
    """Calls `fn(strategy, *args)` once, in cross-replica context.

    From replica context the per-replica `args` arrive as `PerReplica`
    values; from cross-replica context they are passed through unchanged.

    Raises:
        RuntimeError: from replica context of a multi-replica strategy inside
            a `tf.function(jit_compile=True)` (see
            `check_not_compiled_around_replicas`).
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None:
        return fn(current_strategy(), *args)
    # Every step of distopt passes here (apply_gradients, SAM, Heun), at
    # trace time: the place to name an XLA-compiled multi-replica step.
    check_not_compiled_around_replicas(ctx.strategy)
    return ctx.merge_call(fn, args=args)


def local_values(strategy: tf.distribute.Strategy, value: Any) -> tuple:
    """This worker's per-device components of a distributed value."""
    if not tf.distribute.has_strategy():
        return (value,)
    return tuple(strategy.experimental_local_results(value))


def map_per_replica(strategy: tf.distribute.Strategy, fn: Callable, *args: Any):
    """Runs `fn` on each local replica's component of `args`, on its device.

    The result is a per-replica value (or a structure of them), usable as an
    argument of `update` and `reduce`. Plain tensors in `args` are shared.
    """
    if not tf.distribute.has_strategy() or strategy.num_replicas_in_sync == 1:
        return fn(*[_single(strategy, a) for a in args])
    if is_tpu(strategy):
        # Single-trace values: one call computes every replica's component.
        return fn(*args)
    locals_ = [
        local_values(strategy, a) if _is_distributed_value(a) else None for a in args
    ]
    return by_replica(
        strategy,
        lambda r, i: fn(*[a if l is None else l[i] for a, l in zip(args, locals_)]),
    )


def local_replica_ids(strategy: tf.distribute.Strategy) -> list[int]:
    """The replica ids (in the whole sync group) of this worker's devices, in order."""
    if not is_distributed(strategy):
        return [0]
    ids = by_replica(strategy, lambda r, i: tf.constant(r))
    return [int(tf.get_static_value(x)) for x in local_values(strategy, ids)]


def by_replica(strategy: tf.distribute.Strategy, fn: Callable[[int, int], Any]):
    """A per-replica value whose component on replica `r` is `fn(r, i)`.

    `r` is the replica's id in the whole sync group (across workers) and `i`
    its index among this worker's devices; `fn` runs on that device. Under
    the default strategy (no devices of its own): `fn(0, 0)`, a tensor.
    """
    if is_default(strategy):
        return fn(0, 0)
    devices = strategy.extended.worker_devices

    def value_fn(ctx):
        r = ctx.replica_id_in_sync_group
        # Multi-worker replica ids run worker by worker.
        i = r % len(devices)
        with tf.device(devices[i]):
            return fn(r, i)

    return strategy.experimental_distribute_values_from_function(value_fn)


def gather_replicas(
    strategy: tf.distribute.Strategy,
    values: Sequence,
    options: tf.distribute.experimental.CommunicationOptions | None = None,
) -> list:
    """Every replica's own copy of each value, stacked `[num_replicas, ...]`.

    The result is mirrored: every replica, on every worker, receives all rows.
    One batched all-reduce sums tensors that are zero outside each replica's
    own row, so the rows arrive exactly (keyless when eager on one host: see
    `_keyless_ops`).
    """
    n = strategy.num_replicas_in_sync
    if not tf.distribute.has_strategy() or n == 1:
        return [tf.expand_dims(first_local(strategy, v), 0) for v in values]
    locals_ = [local_values(strategy, v) for v in values]

    def own_row(r, i):
        return [
            tf.pad(
                tf.expand_dims(l[i], 0), [[r, n - 1 - r]] + [[0, 0]] * l[i].shape.rank
            )
            for l in locals_
        ]

    rows = by_replica(strategy, own_row)
    return _batch_reduce(strategy, SUM, [(x, x) for x in rows], options)


def replica_rows(strategy: tf.distribute.Strategy, stacked: Sequence) -> list:
    """The inverse of `gather_replicas`: replica `r` gets row `r` of each value."""
    if not tf.distribute.has_strategy() or strategy.num_replicas_in_sync == 1:
        return [first_local(strategy, s)[0] for s in stacked]
    locals_ = [local_values(strategy, s) for s in stacked]
    return by_replica(strategy, lambda r, i: [tf.identity(l[i])[r] for l in locals_])


def once_per_group(
    strategy: tf.distribute.Strategy, fn: Callable, value: Any, group_size: int
):
    """`fn` of a value that groups of `group_size` local replicas share.

    `fn` runs once per group, on the group's first device, and its result is
    copied to the group's other replicas: they receive bit-identical values
    even where `fn` itself is not deterministic (a GPU segment sum adds with
    atomics, in no fixed order). A group of 1 is each replica alone; a group
    of all local devices suits a value that every replica holds identically.
    """
    if not tf.distribute.has_strategy() or strategy.num_replicas_in_sync == 1:
        return fn(first_local(strategy, value))
    n_local = local_device_count(strategy)
    if _is_distributed_value(value):
        locals_ = local_values(strategy, value)
    else:
        locals_ = [value] * n_local
    results = {}
    for g0 in range(0, n_local, group_size):
        with tf.device(strategy.extended.worker_devices[g0]):
            results[g0] = fn(locals_[g0])
    return by_replica(
        strategy,
        lambda r, i: tf.nest.map_structure(
            tf.identity, results[i - i % group_size], expand_composites=True
        ),
    )


def group_sum(strategy: tf.distribute.Strategy, values: Sequence, group_size: int):
    """Sums per-replica `values` within groups of `group_size` local replicas.

    Replicas `[g * G, (g + 1) * G)` of this worker form group g. Each group's
    sum is formed once, on its first device, and copied to the others: one
    reduction per group, not G * (G - 1) copies. Replica groups never span
    workers, so this needs no collective. For the sync modes whose replicas
    diverge by design (hierarchical); it indexes per-device values. The "sum"
    of `IndexedSlices` concatenates their rows, duplicates included (see
    `all_gather_slices`).

    Raises:
        ValueError: if `group_size` does not divide this worker's devices.
    """
    check_group_size(strategy, group_size)
    locals_ = [local_values(strategy, v) for v in values]
    n_local = len(locals_[0])
    devices = [v.device for v in locals_[0]]
    sums = []
    for g0 in range(0, n_local, group_size):
        with tf.device(devices[g0]):
            sums.append([_add_n(list(l[g0 : g0 + group_size])) for l in locals_])
    return list(
        by_replica(
            strategy, lambda r, i: [tf.identity(s) for s in sums[i // group_size]]
        )
    )


def component_on(strategy: tf.distribute.Strategy, value: Any, device: str):
    """The copy of a distributed variable on `device`; other values as they are.

    `strategy.extended.update` hands its function each device's copy of the
    variable it updates but leaves other distributed variables in its
    arguments whole; a compiled function would then capture them instead of
    taking them as inputs.
    """
    if not isinstance(value, tf.distribute.DistributedValues):
        return value
    for copy in strategy.experimental_local_results(value):
        if copy.device == device:
            return copy
    raise RuntimeError(f"{value.name}: no copy on {device}.")


def update_together(
    strategy: tf.distribute.Strategy, variables: Sequence, fn: Callable, *args
):
    """Runs `fn(copies, *args_copy)` once per device, for all `variables` at once.

    `copies` is the list of that device's copies of `variables`; distributed
    values in `args` (nested lists too) arrive as that device's components.
    This is what lets one compiled kernel per device update every variable
    (a multi-tensor update). All `variables` must live on the same devices,
    as every variable created under one strategy's scope does.
    """
    first = variables[0]

    def per_device(anchor, *args):
        device = anchor.device
        pick = lambda x: component_on(strategy, x, device)
        copies = [pick(v) for v in variables]
        return fn(copies, *tf.nest.map_structure(pick, args))

    return strategy.extended.update(first, per_device, args=args, group=True)


def per_replica_zeros(
    strategy: tf.distribute.Strategy, like, dtype, *, shape=None, name="accumulator"
):
    """A zero variable each replica writes alone; saved as the sum over replicas.

    Args:
        strategy: The strategy in scope.
        like: A variable to take the shape from and colocate with, or None
            (then `shape`, default a scalar).
        dtype: The variable's dtype.
        shape: The shape when `like` is None.
        name: The variable's name.
    """
    if like is not None:
        shape = like.shape
    shape = [] if shape is None else shape
    with (
        strategy.extended.colocate_vars_with(like)
        if like is not None
        else contextlib.nullcontext()
    ):
        return tf.Variable(
            lambda: tf.zeros(shape, dtype),
            trainable=False,
            synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=tf.VariableAggregation.SUM,
            name=name,
        )


def assign_components(strategy: tf.distribute.Strategy, variable, values) -> None:
    """Writes replica r's own value into its copy of a `per_replica_zeros`.

    Args:
        strategy: The strategy in scope.
        variable: A variable each replica writes alone.
        values: A per-replica value (or, with one replica, a tensor).
    """
    update(strategy, variable, lambda v, x: v.assign(x, read_value=False), values)


class LogicalState(tf.Module):
    """State stored piecewise on the devices, checkpointed as one logical tensor.

    A subclass says how the pieces make the logical tensor
    (`logical_value`) and how a logical tensor is cut into pieces again
    (`assign_logical`). The checkpoint then holds the logical tensor under
    the same key a `tf.Variable` at the same path would use, so a checkpoint
    restores on any number of replicas, and into a plain variable (or from
    one): sharded optimizer state (`distopt.optimizers.sharded`) and the
    per-replica residuals of compression (`distopt.compression`) use it.

    The private part, wrapped here once: `tf.train.Checkpoint` asks a
    trackable for its tensors through `_serialize_to_tensors` and gives them
    back through `_restore_from_tensors`. Those are underscore names of
    TensorFlow's `Trackable` (the hooks its own `DenseHashTable` and
    `ShardedVariable` implement); there is no public way to make a checkpoint
    hold a value other than a variable's own. Without it, a sharded slot
    could only be saved after an explicit consolidation call (PyTorch's
    `consolidate_state_dict()`), which is what this avoids.
    `tests/test_sharded.py` fails if TensorFlow stops calling them.
    """

    def logical_value(self) -> tf.Tensor:
        """The logical tensor, assembled from every replica's piece."""
        raise NotImplementedError

    def assign_logical(self, value) -> None:
        """Writes each local replica's piece of the logical `value`."""
        raise NotImplementedError

    def storage_variables(self) -> list:
        """The variables that hold the pieces (not tracked: see `Untracked`)."""
        raise NotImplementedError

    # --- Variable-like reads and writes (keras.wrap saves through these) ----

    def numpy(self):
        return self.logical_value().numpy()

    def __array__(self, dtype=None, copy=None):
        # Without it `np.asarray(view)` was a 0-d object array, in silence.
        del copy
        return np.asarray(self.numpy(), dtype=dtype)

    def assign(self, value, read_value=False):
        del read_value
        self.assign_logical(tf.convert_to_tensor(value, self.dtype))

    # --- TensorFlow's checkpoint hooks ---------------------------------------

    def _serialize_to_tensors(self):
        return {"VARIABLE_VALUE": self.logical_value()}

    def _restore_from_tensors(self, restored_tensors):
        value = restored_tensors["VARIABLE_VALUE"]
        if tf.is_symbolic_tensor(value):
            # A restore traced into a function (TensorFlow restores in one
            # when a checkpoint spans tasks): the value exists only in that
            # graph, which `tf.init_scope` would leave, so the pieces are
            # assigned there, when the function runs.
            self.assign_logical(value)
        else:
            # A value read eagerly is assigned eagerly, even inside a trace:
            # a deferred restoration that lands in a lazy build in a
            # tf.function assigns now, not in the function.
            with tf.init_scope():
                self.assign_logical(value)
        return tf.no_op()

    # --- SavedModel: saved and loaded as one plain variable -----------------
    # As TensorFlow's own ShardedVariable: `tf.saved_model.save` treats the
    # view as a resource variable, so it neither traces the hooks above into
    # functions (they would capture the pieces' variables, which no
    # SavedModel object holds, and, loaded, would read them before the
    # restore that sets them) nor writes the object as a `tf.Module`. The
    # SavedModel holds the logical tensor at the view's path, under the key
    # a checkpoint uses, and `tf.saved_model.load` gives a plain variable.

    def _should_act_as_resource_variable(self):
        return True

    @property
    def _shared_name(self):
        # The name-based "full name" a checkpoint records for a variable;
        # empty, as for any other trackable, so checkpoints are unchanged.
        return ""

    def _write_object_proto(self, proto, options):
        del options
        proto.variable.SetInParent()
        proto.variable.name = self.name
        proto.variable.trainable = False
        proto.variable.dtype = self.dtype.as_datatype_enum
        proto.variable.shape.CopyFrom(self.shape.as_proto())

    def _export_to_saved_model_graph(self, object_map, tensor_map, options, **kwargs):
        # The SavedModel's graph saver (MetaGraphDef.saver_def, which TF1 and
        # C++ loaders run) saves a plain variable of the logical shape.
        del tensor_map, options, kwargs
        object_map[self] = tf.Variable(
            tf.zeros(self.shape, self.dtype), trainable=False, name=self.name
        )
        return []


def _logical_to_tensor(value, dtype=None, name=None, as_ref=False):
    """`tf.convert_to_tensor(view)`: its logical value, as a variable reads."""
    del as_ref
    tensor = value.logical_value()
    if dtype is not None and tf.as_dtype(dtype) != tensor.dtype:
        # As for a variable, a conversion never casts (NotImplemented would
        # let TensorFlow fall back to `__array__` and cast).
        raise ValueError(
            f"Incompatible type conversion requested to type {tf.as_dtype(dtype).name} "
            f"for a {type(value).__name__} of type {tensor.dtype.name}."
        )
    return tf.identity(tensor, name=name) if name else tensor


# Any TensorFlow op takes a view where it takes a variable (`tf.norm(slot)`).
tf.register_tensor_conversion_function(LogicalState, _logical_to_tensor)


class Untracked:
    """A holder whose contents `tf.Module` neither tracks nor lists.

    For variables whose checkpoint value is a `LogicalState` view: tracked
    directly, they would be saved twice (and as one replica's piece).
    """

    def __init__(self, value):
        self.value = value


class ReplicaRows(LogicalState):
    """A per-replica tensor (each replica writes its own), saved as `[R, ...]`.

    The checkpoint holds every replica's row. Restored on the same number of
    replicas, replica r gets row r back. On another number, every replica
    gets the rows' sum / R (`share="sum"`: their sum is kept) or their mean
    (`share="mean"`), whichever keeps what its owner computes from them
    (see `Accumulate.build`; a compressor's residuals owe their sum).
    `on_mismatch(saved, current)`, if given, is then called (the compressor
    logs one line for all its residuals). A checkpoint of a plain on-read
    variable (the sum itself, as `Accumulate` saved before it kept rows)
    gives every replica sum / R (the replica count it came from is unknown).
    """

    def __init__(self, strategy, shape, dtype, name, on_mismatch=None, share="sum"):
        super().__init__(name=name)
        if share not in ("sum", "mean"):
            raise ValueError(f"share: must be 'sum' or 'mean', got {share!r}.")
        self._strategy = strategy
        self._on_mismatch = on_mismatch
        self._share = share
        self._shape = tf.TensorShape(shape)
        self._dtype = tf.as_dtype(dtype)
        self._storage = Untracked(
            per_replica_zeros(strategy, None, dtype, shape=self._shape, name=name)
        )

    @property
    def storage(self) -> tf.Variable:
        """The variable each replica writes alone (read: the sum)."""
        return self._storage.value

    def read_value(self) -> tf.Tensor:
        """The replicas' sum, as the on-read variable it wraps reads."""
        return self.storage.read_value()

    def storage_variables(self) -> list:
        return [self.storage]

    @property
    def dtype(self):
        return self._dtype

    @property
    def shape(self):
        return tf.TensorShape([self._strategy.num_replicas_in_sync]).concatenate(
            self._shape
        )

    def logical_value(self):
        with self._strategy.scope():
            flat = map_per_replica(
                self._strategy,
                lambda v: tf.reshape(tf.convert_to_tensor(v), [-1]),
                self.storage,
            )
            rows = all_gather_rows(self._strategy, [flat])[0]
            return tf.reshape(first_local(self._strategy, rows), self.shape)

    def assign_logical(self, value):
        with self._strategy.scope():
            self._assign_rows(tf.convert_to_tensor(value, self._dtype))

    def _assign_rows(self, value):
        n = self._strategy.num_replicas_in_sync
        if value.shape.rank == self._shape.rank + 1 and value.shape[0] == n:
            rows = by_replica(self._strategy, lambda r, i: tf.identity(value[r]))
        else:
            # Rows of another replica count, or (same rank) the sum itself.
            whole = value.shape.rank == self._shape.rank
            if self._on_mismatch is not None and not whole:
                self._on_mismatch(value.shape[0], n)
            if whole:
                share = value / tf.cast(n, value.dtype)
            elif self._share == "mean":
                share = tf.reduce_mean(value, axis=0)
            else:
                share = tf.reduce_sum(value, axis=0) / tf.cast(n, value.dtype)
            rows = by_replica(self._strategy, lambda r, i: tf.identity(share))
        assign_components(self._strategy, self.storage, rows)


def all_gather_rows(
    strategy: tf.distribute.Strategy,
    values: Sequence,
    options: tf.distribute.experimental.CommunicationOptions | None = None,
) -> list:
    """Every replica's 1-D tensor, stacked `[num_replicas, n]`, on every replica.

    Each of `values` is per-replica, of the same length on every replica.
    The rows arrive bit for bit (no arithmetic touches them), whatever their
    dtype, so packed bits and bitcast floats travel safely. On one host the
    rows are copied from device to device; across workers they travel in
    `tf.distribute`'s all-gather of `IndexedSlices` (a SUM of slices is a
    concatenation), one row per replica, put back in replica order.
    """
    n = strategy.num_replicas_in_sync
    if not is_distributed(strategy):
        return [first_local(strategy, v)[None] for v in values]
    locals_ = [local_values(strategy, v) for v in values]
    if is_single_host(strategy):
        return list(
            by_replica(
                strategy,
                lambda r, i: [tf.stack([tf.identity(c) for c in l]) for l in locals_],
            )
        )
    rows = by_replica(
        strategy,
        lambda r, i: [
            tf.IndexedSlices(
                tf.identity(l[i])[None],
                tf.constant([r], tf.int64),
                tf.constant([n, l[i].shape[0]], tf.int64),
            )
            for l in locals_
        ],
    )
    gathered = all_gather_slices(strategy, list(rows), options=options)
    return [
        map_per_replica(
            strategy,
            lambda g: tf.gather(g.values, tf.argsort(g.indices)),
            x,
        )
        for x in gathered
    ]


def cond_per_replica(strategy, pred, true_fn, false_fn):
    """`tf.cond` in cross-replica context whose branches return per-replica lists.

    Both branches return lists of equal length of per-replica values (or
    tensors); `pred` must be identical on every replica and worker. The
    branches' local components travel through the cond as plain tensors,
    and come out as per-replica values again.
    """
    if tf.executing_eagerly():
        return true_fn() if bool(pred) else false_fn()
    n_local = local_device_count(strategy)
    counts = {}

    def flat(fn):
        def g():
            out = list(fn())
            counts["n"] = len(out)
            parts = [local_values(strategy, x) for x in out]
            return [tf.identity(c) for p in parts for c in _pad_locals(p, n_local)]

        return g

    comps = tf.cond(pred, flat(true_fn), flat(false_fn))
    k = counts["n"]
    if not is_distributed(strategy):
        return list(comps)
    return list(
        by_replica(
            strategy,
            lambda r, i: [tf.identity(comps[j * n_local + i]) for j in range(k)],
        )
    )


def _pad_locals(parts, n_local):
    """Local components of a value; a plain tensor counts for every device."""
    return list(parts) * n_local if len(parts) == 1 and n_local > 1 else list(parts)


def assign(strategy: tf.distribute.Strategy, variables: Sequence, values) -> None:
    """Writes each device's component of `values` into its copy of `variables`."""
    for v, x in zip(variables, values):
        update(strategy, v, lambda v, x: v.assign(x), x)


def read_per_replica(strategy: tf.distribute.Strategy, variables: Sequence):
    """Each replica's own copy of each variable, as per-replica values."""
    return map_per_replica(
        strategy, lambda *vs: [tf.identity(v) for v in vs], *variables
    )


def reduce(
    strategy: tf.distribute.Strategy,
    op: tf.distribute.ReduceOp,
    value: Any,
    destination: Any,
    options: tf.distribute.experimental.CommunicationOptions | None = None,
):
    """One all-reduce of a per-replica tensor, mirrored onto `destination`.

    Eagerly on a single-host strategy, without collective keys (see
    `_keyless_ops`); otherwise with the strategy's own cross-device ops.
    """
    if not is_distributed(strategy):
        return value
    keyless = _keyless_ops(strategy)
    if keyless is not None:
        return keyless.reduce(op, value, destination, options=options)
    return strategy.extended.reduce_to(
        op, value, destinations=destination, options=options
    )


def _keyless_ops(strategy: tf.distribute.Strategy):
    """A `ReductionToOneDevice` for an eager reduction on one host, else None.

    TensorFlow gives every strategy of a process the same collective keys
    (group keys from 1, instance keys from 100; tensorflow#61314, #62790).
    Once one strategy with collective cross-device ops (MirroredStrategy's
    default on several CPUs or logical GPUs) has run an eager collective, or
    Keras `fit`, the next strategy's eager collective meets that cached
    instance and fails: "Shape mismatch in the collective instance 100". So
    distopt's own eager, cross-replica reductions on a single-host strategy
    (snapshots, restores, evaluation averages) copy to one device, add there
    and copy back, through the public `tf.distribute.ReductionToOneDevice`:
    no collective keys, and the user's strategy is left as it is. Inside a
    `tf.function` (the training step) the strategy's own cross-device ops
    run, NCCL between GPUs; across processes (MultiWorkerMirroredStrategy)
    only collectives can.
    """
    if tf.executing_eagerly() and is_single_host(strategy):
        return tf.distribute.ReductionToOneDevice()
    return None


def _batch_reduce(strategy, op, value_destination_pairs, options):
    """`batch_reduce_to` of the pairs; keyless eagerly on one host (see `reduce`)."""
    keyless = _keyless_ops(strategy)
    if keyless is not None:
        return list(keyless.batch_reduce(op, value_destination_pairs, options=options))
    return list(
        strategy.extended.batch_reduce_to(op, value_destination_pairs, options=options)
    )


def is_sparse(strategy: tf.distribute.Strategy, value: Any) -> bool:
    """Whether `value` (or each replica's component of it) is `tf.IndexedSlices`."""
    return isinstance(local_values(strategy, value)[0], tf.IndexedSlices)


def densify(strategy: tf.distribute.Strategy, value: Any):
    """Each replica's component as a dense tensor (`IndexedSlices` scattered)."""
    return map_per_replica(strategy, tf.convert_to_tensor, value)


def all_gather_slices(
    strategy: tf.distribute.Strategy,
    values: Sequence,
    options: tf.distribute.experimental.CommunicationOptions | None = None,
) -> list:
    """Every replica's rows of per-replica `IndexedSlices`, on every replica.

    A SUM of `IndexedSlices` in `tf.distribute` is an all-gather: the result
    holds every replica's indices and values, concatenated in replica order,
    duplicates not summed (their sum is the dense sum, by the meaning of
    `IndexedSlices`). Under `MirroredStrategy` the rows are concatenated on
    one device and copied to the others; under `MultiWorkerMirroredStrategy`
    they travel in collective all-gathers (of the row counts, the values and
    the indices, padded when the counts differ). Identical on every replica.
    """
    if not is_distributed(strategy):
        return [first_local(strategy, v) for v in values]
    return _batch_reduce(strategy, SUM, [(x, x) for x in values], options)


def update(strategy: tf.distribute.Strategy, var: tf.Variable, fn: Callable, *args):
    """Runs `fn(var_copy, *args_copy)` for every device's copy of `var`."""
    return strategy.extended.update(var, fn, args=args, group=True)


def scale_unless_one(strategy: tf.distribute.Strategy, variables, factor) -> None:
    """Multiplies every device's copy of each of `variables` by `factor`.

    A factor of 1 (most steps) writes nothing (one `cond`). Cross-replica
    context; `factor` is a scalar identical on every replica.
    """
    variables = list(variables)
    if not variables:
        return
    factor = tf.convert_to_tensor(factor, tf.float32)

    def scale():
        for var in variables:
            update(strategy, var, _scale_by, factor)

    cond(tf.not_equal(factor, 1.0), scale, lambda: None)


def _scale_by(var, factor):
    return var.assign(
        tf.convert_to_tensor(var) * tf.cast(factor, var.dtype), read_value=False
    )


def first_local(strategy: tf.distribute.Strategy, value: Any):
    """A plain tensor from a value that is identical on every replica."""
    return local_values(strategy, value)[0] if _is_distributed_value(value) else value


def cond(pred, true_fn: Callable[[], Any], false_fn: Callable[[], Any]):
    """`tf.cond` in cross-replica context; a Python branch when eager.

    Both branches must return nothing or tensors; `pred` must be identical on
    every replica and worker, or collectives inside a branch would hang.
    """
    if tf.executing_eagerly():
        return true_fn() if bool(pred) else false_fn()

    def wrap(f):
        def g():
            f()
            return tf.constant(True)

        return g

    return tf.cond(pred, wrap(true_fn), wrap(false_fn))


def replica_id() -> tf.Tensor:
    """The replica id in sync group, from replica context (0 when not distributed)."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None:
        return tf.constant(0)
    return tf.convert_to_tensor(ctx.replica_id_in_sync_group)


def _add_n(values):
    """`tf.add_n`, or the concatenation of `IndexedSlices` (their sum)."""
    if isinstance(values[0], tf.IndexedSlices):
        return tf.IndexedSlices(
            tf.concat([v.values for v in values], 0),
            tf.concat([v.indices for v in values], 0),
            values[0].dense_shape,
        )
    return tf.add_n(values)


def _single(strategy, a):
    return first_local(strategy, a)


def _is_distributed_value(a: Any) -> bool:
    return isinstance(a, tf.distribute.DistributedValues)


def all_reduce(op: tf.distribute.ReduceOp, tensors: Sequence[tf.Tensor]) -> list:
    """From replica context: the reduction of `tensors` over all replicas.

    Every replica receives the same values. Under the default strategy the
    tensors come back unchanged.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None:
        raise RuntimeError("all_reduce: call it inside strategy.run.")
    check_not_compiled_around_replicas(ctx.strategy)
    return list(ctx.all_reduce(op, list(tensors)))


def add_per_replica(
    variables: Sequence[tf.Variable], deltas: Sequence[tf.Tensor]
) -> None:
    """From replica context: each replica adds its own delta to its own copy.

    With different deltas the copies diverge on purpose: use it for a
    temporary move that is undone with the negated deltas (SAM's
    perturbation), never for a lasting update. A delta may be
    `tf.IndexedSlices` with each index once (a sparse reduced gradient):
    it is added to the rows it names only, which gives the same values as
    adding it densified.
    """

    def add(v, d):
        d = tf.cast(d, v.dtype)
        if isinstance(d, tf.IndexedSlices):
            return v.scatter_add(d)
        return v.assign_add(d)

    def fn(strategy, deltas):
        for v, d in zip(variables, deltas):
            update(strategy, v, add, d)

    merge(fn, tuple(deltas))


def assign_per_replica(variables, values) -> None:
    """From replica context: each replica writes its own value into its own copy.

    Like `add_per_replica`, but an assignment: it restores
    a copy saved with `tf.identity` bit for bit. The write happens in
    cross-replica context (`merge`, then `update` per device), never as an
    assignment to a MirroredVariable in replica context.
    """

    def fn(strategy, values):
        for v, x in zip(variables, values):
            update(strategy, v, lambda v, x: v.assign(tf.cast(x, v.dtype)), x)

    merge(fn, tuple(values))


# --- Making strategies ----------------------------------------------------------

STRATEGY_KINDS = ("default", "one_device", "mirrored", "multi_worker", "tpu")
CROSS_DEVICE_OPS = ("one_device", "default")

# Collective keys: TensorFlow starts every MirroredStrategy's group keys at 1
# and each group's instance keys at 100 (tensorflow#61314, #62790), and the
# collective executor of a process remembers each (group, instance) it ran.
# A second strategy's first eager collective of another shape then fails with
# "Shape mismatch in the collective instance 100". TensorFlow's own tests
# give each strategy another start (`_collective_key_base`, read by
# `MirroredExtended.__init__` from the strategy object being built:
# mirrored_strategy.py, TF 2.21 lines 338 and 374). No public API sets it, so
# `_with_own_collective_keys` sets it on the instance (never on the class, so
# that strategies created elsewhere keep TensorFlow's keys and never meet
# ours). tests/test_strategies.py fails if TensorFlow stops reading it.
_COLLECTIVE_KEY_STEP = 100_000
_collective_key_bases = itertools.count(1)


def _with_own_collective_keys(cls, *args, **kwargs):
    """``cls(*args, **kwargs)`` whose collective keys no other strategy uses.

    The group keys of the strategy start at a multiple of 100,000 taken from
    a process-wide counter: room for 100,000 device groups per strategy and
    over 20,000 strategies per process within 32-bit keys.
    """
    strategy = cls.__new__(cls)
    strategy._collective_key_base = next(_collective_key_bases) * _COLLECTIVE_KEY_STEP
    strategy.__init__(*args, **kwargs)
    return strategy


def logical_cpu_devices(num_devices: int) -> list[str]:
    """The names of ``num_devices`` logical CPU devices, made if still possible.

    Splits the host CPU into ``num_devices`` logical devices. That must happen
    before TensorFlow initialises its devices (the first op, variable or
    strategy); if it already has (a test process, a notebook), or the CPU is
    already split into more, and at least ``num_devices`` logical CPUs exist,
    the first ones are used.

    Raises:
      ValueError: ``num_devices`` < 1, or too few logical CPUs exist and it is
        too late to make more.
    """
    if num_devices < 1:
        raise ValueError(f"num_cpu_devices: must be >= 1, got {num_devices}.")
    cpu = tf.config.list_physical_devices("CPU")[0]
    configured = tf.config.get_logical_device_configuration(cpu) or []
    # A split of at least num_devices (a test process's) is kept, not shrunk.
    if len(configured) < num_devices:
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices
            )
        except RuntimeError:
            pass  # Devices already initialised: check below that enough exist.
    logical = tf.config.list_logical_devices("CPU")
    if len(logical) < num_devices:
        raise ValueError(
            f"num_cpu_devices: {num_devices} logical CPU devices requested, but "
            f"TensorFlow already initialised {len(logical)}; split the CPU before "
            "any TensorFlow op runs, for the most devices the process will use "
            "(distopt.distribute.logical_cpu_devices(N) first: a sweep of 2 and 4 "
            "then runs on the first 2 and all 4), or start a fresh process."
        )
    return [d.name for d in logical[:num_devices]]


def make_strategy(
    kind: str,
    *,
    num_cpu_devices: int | None = None,
    devices: Sequence[str] | None = None,
    cross_device_ops: str = "one_device",
    tpu: str | None = None,
    cluster_resolver=None,
    communication_options: tf.distribute.experimental.CommunicationOptions
    | None = None,
) -> tf.distribute.Strategy:
    """A strategy of ``kind``: the one helper for "N logical CPUs, then kind K".

    Args:
      kind: one of ``STRATEGY_KINDS``. ``default`` is TensorFlow's default
        (no-op) strategy; ``one_device`` the first GPU, else the CPU;
        ``mirrored`` mirrors over ``devices``, else ``num_cpu_devices``
        logical CPUs, else all local GPUs (or the CPU); ``multi_worker`` is
        MultiWorkerMirroredStrategy over ``cluster_resolver`` (None:
        TF_CONFIG); ``tpu`` is TPUStrategy over the TPU named ``tpu``.
      num_cpu_devices: ``mirrored``: split the CPU into this many logical
        devices (see :func:`logical_cpu_devices`) and mirror over them.
      devices: ``mirrored``: mirror over these device names instead.
      cross_device_ops: ``mirrored``: ``one_device`` (``ReductionToOneDevice``:
        copies to one device and back, the fastest on CPUs here) or
        ``default`` (TensorFlow's choice: NCCL between GPUs, RING
        collectives between CPUs or logical GPUs).
      tpu: ``tpu``: a TPU name, a grpc:// address or "local".
      cluster_resolver: ``multi_worker``: the cluster (None: TF_CONFIG).
      communication_options: ``multi_worker``: collective options (timeouts).

    Every MirroredStrategy made here has collective keys of its own, so it
    works next to strategies created before it in the process (by the user,
    by Keras, by an earlier call). MultiWorkerMirroredStrategy keeps
    TensorFlow's keys: they must agree between worker processes, and a
    process holds one such strategy.

    Raises:
      ValueError: an unknown ``kind`` or ``cross_device_ops``, ``tpu``
        without a TPU name, or too few logical CPUs.
    """
    if kind not in STRATEGY_KINDS:
        raise ValueError(f"kind: unknown {kind!r}; valid kinds: {STRATEGY_KINDS}.")
    if cross_device_ops not in CROSS_DEVICE_OPS:
        raise ValueError(
            f"cross_device_ops: unknown {cross_device_ops!r}; valid: "
            f"{CROSS_DEVICE_OPS}."
        )
    if kind == "default":
        return tf.distribute.get_strategy()
    if kind == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if kind == "mirrored":
        return _mirrored(num_cpu_devices, devices, cross_device_ops)
    if kind == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=cluster_resolver,
            communication_options=communication_options,
        )
    return _tpu(tpu)


def _mirrored(num_cpu_devices, devices, cross_device_ops):
    if devices is None and num_cpu_devices:
        devices = logical_cpu_devices(num_cpu_devices)
    ops = (
        tf.distribute.ReductionToOneDevice()
        if cross_device_ops == "one_device"
        else None
    )
    return _with_own_collective_keys(
        tf.distribute.MirroredStrategy,
        devices=list(devices) if devices is not None else None,
        cross_device_ops=ops,
    )


def _tpu(tpu):
    if not tpu:
        raise ValueError("tpu: kind='tpu' needs a TPU name, address or 'local'.")
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)
