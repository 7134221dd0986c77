"""The optimizer base class: state, validation, and the path of one update.

A subclass only says which slots it needs and gives its math as a pure
function of tensors (`update_step`). This class owns everything else:

* `build(var_list)` creates the slots once, colocated with their variable,
  in cross-replica context (creating them inside `strategy.run` is what hurts
  Keras users, tensorflow#43974).
* `apply_gradients` validates everything before touching any variable, forms
  this replica's payload (`Reducer.payload`), then hands it to the sync mode
  (`distopt.sync`) through one `merge_call`. The sync mode decides when to
  communicate, through the optimizer's public `reducer` (`distopt.reduce`),
  and calls `apply_update`, which writes every device's copy of every
  variable and slot through `strategy.extended.update`.
* The update is one XLA kernel per device for all variables together
  (`fused=True`, the default; a multi-tensor update like PyTorch's fused
  Adam), even inside a user's plain `tf.function`: a step over hundreds of
  small variables is then bound by bytes, not by per-variable dispatch.
  `fused=False` runs one kernel per variable; both compute the same thing.
* Sparse gradients (`tf.IndexedSlices`, from `tf.gather` or an embedding
  lookup) stay sparse through the reduce (`distopt.reduce`); then either
  the touched rows are updated, outside the fused kernel, or the gradient
  is densified, per the optimizer's `sparse_rows`. A step without sparse
  gradients runs exactly as before.
* `use_ema`: a moving average of each variable is one more slot ("ema"),
  updated by the same kernel after the rule and kept by the same skip
  select, so the fused and per-variable paths, under every strategy and
  sync mode, carry it with no code of their own. The sparse-row path adds
  one dense pass: the average moves on rows the gradient did not touch.
* Mixed precision: for float16 and bfloat16 variables the slots are float32,
  and the rule runs in float32 (gradient, weight, step and learning rate)
  before the new value is rounded once to the variable's dtype. A bfloat16
  step count would stop being exact past 256.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from typing import Any

import tensorflow as tf
from absl import logging

from distopt import compression as compression_lib
from distopt import counter as counter_lib
from distopt import distribute as dist
from distopt import ownership, specs
from distopt import reduce as reduce_lib
from distopt import sync as sync_lib
from distopt import transforms as transforms_lib
from distopt.checks import check_bool, check_int
from distopt.optimizers import schedules
from distopt.optimizers import sharded as sharded_lib

#: The slot that holds a variable's moving average (`use_ema`).
EMA = "ema"

#: Variables below this many elements share the fused update's flat buffer.
FLAT_MAX_ELEMENTS = 1 << 16


class Optimizer(tf.Module):
    """Base class of distopt optimizers.

    A subclass whose `update_step` is not elementwise (it reduces over a
    variable, as Lamb's trust ratio does) sets `elementwise = False`. If its
    only reductions are L2 norms over the variable, taken through the `norm`
    argument its `update_step` then accepts, it also sets `layerwise = True`,
    and the fused update still takes all variables in one kernel. `build`
    checks a subclass's rule against these flags, traced once on a small
    flat input: an element-wise or layer-wise rule has slots shaped like
    their variable and no reduction outside `norm`; sharded, no `norm` of a
    value made with another `norm`. `shard_state` needs one of the two.

    Args:
        learning_rate: A non-negative float; a schedule: a callable of the
            int64 step (`optimizer.iterations`) returning a scalar; or a
            scalar float `tf.Variable`, read at every update (assign it to
            change the rate, as Keras callbacks do). It may be reassigned
            after construction: a number set on a variable rate is assigned
            into the variable, as in Keras, so traced steps see it; any other
            replacement (a float for a float, another variable or schedule)
            is not seen by the functions already traced until they retrace
            (a WARNING says so): to change the rate between calls of a
            traced step, pass a variable or a schedule.
        weight_decay: Decoupled weight decay applied before each update, as in
            Keras: `p <- p - learning_rate * weight_decay * p`.
        aggregation: How per-replica gradients are combined: "mean"
            (default), "sum", "weighted_mean", or a `distopt.aggregation`
            instance.
        sync: When replicas communicate: a `distopt.sync` instance or name
            ("every_step", the default; "accumulate", "local_sgd", "diloco",
            "hierarchical").
        global_clipnorm: Clip the aggregated gradient to this global norm.
        clipvalue: Clip the aggregated gradient elementwise to this value.
        clipnorm: Clip each variable's aggregated gradient to this L2 norm
            (Keras's `clipnorm`). With several clips: value, then each
            variable's norm, then the global norm.
        skip_nonfinite: Skip the step on every replica if the aggregated
            gradient has a NaN or Inf; `skipped_steps` counts such steps.
        wire_dtype: Cast gradients to "bfloat16" or "float16" for the
            all-reduce only.
        communication_options: `tf.distribute.experimental.CommunicationOptions`
            for every all-reduce, e.g. a `timeout_seconds` so that a dead
            peer fails the step instead of hanging it. TensorFlow parks a
            thread per collective for the whole timeout: keep it short.
        loss_scale: None, "dynamic" or a fixed number: loss scaling for
            float16 training (`distopt.transforms.LossScale`). Multiply the
            loss by `scale_loss(loss)` before differentiating (`minimize`
            does); a non-finite step is skipped on every replica. Needs a
            synchronous sync mode (every step or accumulate).
        use_ema: Keep an exponential moving average of every variable, in
            a slot named "ema" (float32 for 16-bit variables), updated after
            each applied update of that variable: `ema <- p` after the first
            one, then `ema <- m * ema + (1 - m) * p`. A skipped step leaves
            it as it is. `finalize_variable_values(var_list)` copies it into
            the variables. As in Keras; needs a synchronous sync mode.
        ema_momentum: `m` above, in [0, 1).
        ema_overwrite_frequency: None, or every this many updates (counted by
            `iterations`) the variables take their average's value, as in
            Keras.
        compression: Compress the gradients each replica sends, with error
            feedback: a `distopt.compression` compressor or its name
            ("powersgd", "topk", "onebit"). Applies to every reduction of
            gradients (every step, an `Accumulate` flush, DiLoCo's outer
            gradient); not with `LocalSGD` or `Hierarchical`, which send
            weights.
        shard_state: Keep 1/N of every slot on each of the N replicas
            (ZeRO stage 1, `distopt.optimizers.sharded`); each replica
            updates its shard and the parameters are gathered. A no-op with
            one replica.
        jit_compile: Run the update as XLA kernels.
        fused: One update kernel per device for all variables (default), or
            one per variable.
        name: Name of the module (its variables' name scope).
    """

    #: How a sparse gradient (`tf.IndexedSlices`) is applied, after the
    #: sparse reduce. False: densified, then the dense rule (Keras 3's
    #: semantics for every optimizer: its TF backend adds the slices to dense
    #: slots, so every row's slots decay). True: `update_step` runs on the
    #: touched rows of the variable and its slots only, and the other rows
    #: keep their values (decoupled weight decay still shrinks every row).
    #: Only for rules that act row by row.
    sparse_rows = False

    def __init__(
        self,
        learning_rate,
        *,
        weight_decay=None,
        aggregation=None,
        sync=None,
        global_clipnorm=None,
        clipvalue=None,
        clipnorm=None,
        skip_nonfinite=False,
        wire_dtype=None,
        communication_options=None,
        loss_scale=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        compression=None,
        shard_state=False,
        jit_compile=True,
        fused=True,
        name=None,
    ):
        super().__init__(name=name or _snake_case(type(self).__name__))
        #: The learning rate (float, schedule or variable) the last traced
        #: update read, for the setter; None before any trace.
        self._traced_rate = None
        self.learning_rate = learning_rate
        self.weight_decay = (
            schedules.check_rate("weight_decay", weight_decay) if weight_decay else None
        )
        self.sync = sync_lib.get(sync)
        self.global_clipnorm = global_clipnorm
        self.clipvalue = clipvalue
        self.clipnorm = clipnorm
        self.skip_nonfinite = check_bool("skip_nonfinite", skip_nonfinite)
        self.shard_state = _check_shard_state(self, shard_state)
        self.use_ema = check_bool("use_ema", use_ema)
        self.ema_momentum = schedules.check_unit("ema_momentum", ema_momentum)
        self.ema_overwrite_frequency = _check_frequency(ema_overwrite_frequency)
        # Created in the optimizer's name scope below; first in the chain,
        # so that clipping sees unscaled gradients.
        loss_scale = transforms_lib.get_loss_scale(loss_scale)
        # Checked before any variable exists: a bad compression builds nothing.
        compression = _check_compression(compression, wire_dtype)
        self._check_sync_mode(loss_scale, compression)
        transforms = _transforms(clipvalue, clipnorm, global_clipnorm, skip_nonfinite)
        self.jit_compile = check_bool("jit_compile", jit_compile)
        self.fused = check_bool("fused", fused)
        # Created here, like Keras, so that they exist (and restore) before
        # the first step, in the scope the optimizer is created in.
        with tf.name_scope(self.name):
            self.iterations = counter_lib.Counter("iterations")
            self.skipped_steps = counter_lib.Counter("skipped_steps")
            self.loss_scale = loss_scale
            if loss_scale is not None:
                transforms.insert(0, loss_scale)
            self.reducer = reduce_lib.Reducer(
                aggregation,
                wire_dtype=wire_dtype,
                transforms=transforms,
                communication_options=communication_options,
                compression=compression,
            )
        self._init_unbuilt()
        # Refused now if another optimizer has them, but claimed at build:
        # a constructor that raises (here or in a subclass's checks) must
        # leave them free for the corrected call. Untracked: a tracked list
        # would add checkpoint edges and `state_variables` paths.
        self._owned = dist.Untracked(
            ((self.sync, "sync"), (compression, "compression"))
        )
        ownership.check_free(self._owned.value)

    def _init_unbuilt(self) -> None:
        """The state `build` fills in, and the compiled update kernels."""
        self._slots = []
        self._slot_index = {}
        self._sharded_slots = None
        # References, not the variables: a tracked list would give the model's
        # variables a second checkpoint path under the optimizer.
        self._variable_refs = []
        self._built = False
        self._strategy = None
        # The loss scale the state in the gradient's units is in (see
        # `_follow_loss_scale`); a variable once built, where there is some.
        self.state_scale = None
        compile_ = lambda f: (
            tf.function(f, jit_compile=True, autograph=False) if self.jit_compile else f
        )
        self._kernel = compile_(self._update_variable)
        self._flat_kernel = compile_(self._rule)
        self._norm_partials = compile_(self._partial_norms)

    def _check_sync_mode(self, loss_scale, compression) -> None:
        """Raises ValueError for an option the sync mode cannot honour."""
        diverges, name = self.sync.diverges, self.sync.name
        # Each needs replicas holding the same weights: a shared loss scale;
        # one slot shard per replica; an average that is the same everywhere
        # (else `finalize_variable_values` would make the copies differ).
        for option, given, what in (
            (
                "loss_scale",
                loss_scale is not None,
                "replicas would disagree on the scale",
            ),
            (
                "shard_state",
                self.shard_state,
                "each replica holds its own weights and slots",
            ),
            ("use_ema", self.use_ema, "each replica would average its own copy"),
        ):
            if given and diverges:
                raise ValueError(
                    f"{option}: needs a synchronous sync mode (every_step or "
                    f"accumulate); under {name} {what}."
                )
        if compression is not None and not self.sync.sends_gradients:
            raise ValueError(
                f"compression: not available with sync={name}, whose replicas "
                "send weights, not gradients (DiLoCo compresses its outer "
                "gradient: use sync=DiLoCo(k, outer_optimizer="
                "GradientDescent(1.0)) for local SGD with compression)."
            )

    @property
    def aggregation(self):
        """The `distopt.aggregation` instance (the reducer's)."""
        return self.reducer.aggregation

    @property
    def compression(self):
        """The `distopt.compression` compressor (the reducer's), or None."""
        return self.reducer.compression

    @property
    def wire_dtype(self):
        return self.reducer.wire_dtype

    @property
    def communication_options(self):
        return self.reducer.communication_options

    @property
    def allreduce_calls(self) -> tf.Variable:
        """All-reduces issued at run time (int64), all paths included."""
        return self.reducer.allreduce_calls

    @property
    def allreduce_bytes(self) -> tf.Variable:
        """Payload bytes of those all-reduces (int64)."""
        return self.reducer.allreduce_bytes

    @property
    def invalid_weight_steps(self) -> tf.Variable:
        """Steps skipped because a replica's weight was negative, NaN or Inf."""
        return self.reducer.invalid_weight_steps

    #: Whether `update_step` acts element by element (then the fused update
    #: may run it once over all variables concatenated).
    elementwise = True
    #: Whether `update_step(..., norm=)` reduces over the variable only
    #: through `norm(x)`: the L2 norm of `x` over the variable, a scalar, or
    #: in the fused update each element's own variable's norm (`run_norms`).
    layerwise = False

    # --- What a subclass provides -------------------------------------------

    def slot_initializers(self, var) -> dict[str, Any]:
        """Slot name -> initial value (a tensor or a callable) for `var`."""
        del var
        return {}

    def update_step(self, grad, var, slots: dict, lr, step):
        """The pure update rule: returns `(new_var, {slot: new_value})`.

        Args:
            grad: The aggregated gradient, in the variable's dtype.
            var: The variable's current value (after weight decay).
            slots: The slots' current values.
            lr: The learning rate, in the variable's dtype.
            step: The 1-based index of this update, in the variable's dtype.
        """
        raise NotImplementedError

    def get_config(self) -> dict:
        """The constructor arguments, JSON-able; see `from_config`."""
        return {
            "learning_rate": schedules.serialize(self.learning_rate),
            "weight_decay": self.weight_decay,
            "aggregation": self.aggregation.name,
            "sync": self.sync.get_config(),
            "global_clipnorm": self.global_clipnorm,
            "clipvalue": self.clipvalue,
            "clipnorm": self.clipnorm,
            "skip_nonfinite": self.skip_nonfinite,
            "wire_dtype": self.wire_dtype.name if self.wire_dtype else None,
            "loss_scale": (
                self.loss_scale.get_config()["loss_scale"] if self.loss_scale else None
            ),
            "use_ema": self.use_ema,
            "ema_momentum": self.ema_momentum,
            "ema_overwrite_frequency": self.ema_overwrite_frequency,
            "compression": self.compression.spec() if self.compression else None,
            "shard_state": self.shard_state,
            "jit_compile": self.jit_compile,
            "fused": self.fused,
            "name": self.name,
        }

    def spec(self) -> dict:
        """`{"class", "module", "config"}`: what `optimizers.from_config` reads.

        Raises:
            NotImplementedError: the config lacks an argument of a subclass's
                own `__init__` (see `distopt.specs.spec`).
        """
        return specs.spec(self, Optimizer, "optimizer")

    @classmethod
    def from_config(cls, config: dict) -> Optimizer:
        config = dict(config)
        config["learning_rate"] = schedules.deserialize(config["learning_rate"])
        sync = config.get("sync")
        outer = (sync or {}).get("outer_optimizer")
        if outer is not None:
            # The registry lives in this package's __init__, which imports
            # this module: hence the import here, inside the package.
            from distopt import optimizers as registry

            outer = registry.from_config(outer)
        config["sync"] = sync_lib.from_config(sync, outer_optimizer=outer)
        config["compression"] = compression_lib.from_config(config.get("compression"))
        return cls(**config)

    # --- Public API -----------------------------------------------------------

    def build(self, var_list: Sequence[tf.Variable]) -> None:
        """Creates the slots of `var_list` once. Call in cross-replica context."""
        if self._built:
            return
        dist.require_cross_replica_context(
            "build", "apply_gradients builds lazily by itself."
        )
        var_list = list(var_list)
        _check_variables(var_list)
        strategy = dist.current_strategy()
        dist.check_created_in_scope(strategy, var_list)
        # Remembered so that synchronize() works outside strategy.scope().
        self._strategy = strategy
        sharded = self._shards_over(strategy)
        if sharded:
            _check_shard_state(self, True)
        # Eager values even when a tf.function builds lazily: the sharded
        # state assigns them piece by piece, outside the trace. Checked
        # before anything is claimed or made, so a refused rule leaves the
        # compressor and sync mode free for the next optimizer.
        with tf.init_scope():
            inits = [self._slot_inits(var) for var in var_list]
            if self.elementwise or self.layerwise:
                inits = [
                    self._resolved_inits(var, x) for var, x in zip(var_list, inits)
                ]
                _check_rule(self, inits, sharded)
        ownership.claim_all(self._owned.value, f"optimizer {self.name!r}")
        with tf.name_scope(self.name):
            if sharded:
                self._sharded_slots = sharded_lib.ShardedSlots(
                    strategy, var_list, inits
                )
            for i, var in enumerate(var_list):
                if sharded:
                    slots = self._sharded_slots.views[i]
                else:
                    # Eagerly, as the sharded slots and the reducer's state: a
                    # slot made in an XLA function's trace (Keras's lazy build
                    # in `compile(jit_compile=True)`) captured its initial
                    # value, which XLA cannot lift out (over 128 elements).
                    with (
                        tf.init_scope(),
                        strategy.scope(),
                        strategy.extended.colocate_vars_with(var),
                    ):
                        slots = {
                            name: tf.Variable(
                                _cast_init(init, dtype),
                                trainable=False,
                                name=f"{name}_{i}",
                            )
                            for name, (init, dtype) in inits[i].items()
                        }
                self._slots.append(slots)
                self._slot_index[var.ref()] = i
                self._variable_refs.append(var.ref())
            self.reducer.build(strategy, var_list)
            # Eagerly, as the reducer's state: a checkpoint restored before a
            # lazy build in a tf.function assigns the sync state as it is made.
            with tf.init_scope(), strategy.scope():
                self.sync.build(self, var_list, strategy)
                if self._keeps_scaled_state():
                    # 0: not recorded (a checkpoint from before this record).
                    self.state_scale = tf.Variable(
                        0.0, trainable=False, name="state_scale"
                    )
        self._built = True

    def _keeps_scaled_state(self) -> bool:
        """Whether some state is kept in the loss-scaled gradient's units.

        The compressor's residuals (and PowerSGD's Q) and `Accumulate`'s
        buffers; not under a diverging sync mode, which has no loss scale.
        """
        if self.sync.diverges:
            return False
        return self.compression is not None or bool(self.sync.scaled_state())

    def _slot_inits(self, var) -> dict:
        """`{slot name: (initial value, dtype)}` of `var`, the moving average included."""
        dtype = reduce_lib.payload_dtype(var.dtype)
        inits = dict(self.slot_initializers(var))
        if self.use_ema:
            if EMA in inits:
                raise ValueError(
                    f"use_ema: {type(self).__name__} has a slot named {EMA!r} already."
                )
            inits[EMA] = tf.zeros(var.shape, dtype)
        return {name: (init, dtype) for name, init in inits.items()}

    def _resolved_inits(self, var, inits: dict) -> dict:
        """`inits` with callables called, each slot checked to be `var`'s shape.

        An element-wise or layer-wise rule runs on variables end to end (the
        fused and the sharded update), where a slot of another shape fails
        with a broadcast error, or is cut short, depending on the sizes.
        """
        out = {}
        for name, (init, dtype) in inits.items():
            value = init() if callable(init) else init
            shape = tf.TensorShape(
                value.shape if hasattr(value, "shape") else tf.constant(value).shape
            )
            if shape != var.shape:
                raise ValueError(
                    f"{type(self).__name__}.slot_initializers: slot {name!r} of "
                    f"variable {var.name!r} has shape {shape}, the variable "
                    f"{var.shape}; an element-wise or layer-wise rule needs slots "
                    "shaped like their variable (set elementwise=False for a "
                    "rule that keeps other shapes)."
                )
            out[name] = (value, dtype)
        return out

    def _shards_over(self, strategy) -> bool:
        """Whether the state is sharded: `shard_state` and several replicas."""
        if not self.shard_state or strategy.num_replicas_in_sync == 1:
            return False
        if dist.is_tpu(strategy):
            raise ValueError(
                "shard_state: not available under TPUStrategy (one replicated "
                "program holds one copy of each slot)."
            )
        return True

    # The library branches with explicit tf.cond only; autograph must not
    # rewrite its Python (some of which it cannot parse).
    @tf.autograph.experimental.do_not_convert
    def apply_gradients(self, grads_and_vars, var_list=None, *, weight=None):
        """Applies one step of gradients.

        Call it inside `strategy.run` with this replica's gradients: they are
        aggregated across replicas (per `aggregation` and `sync`) before any
        variable changes, and every replica's copy changes identically. Called
        outside `strategy.run`, the gradients are taken as already aggregated
        (and are not compressed).

        Args:
            grads_and_vars: A list of gradients (then `var_list` is the list of
                variables), or a list of `(gradient, variable)` pairs. A
                gradient may be `tf.IndexedSlices`: it stays sparse on the
                wire (see `sparse_rows`).
            var_list: The variables, when the first argument is gradients.
            weight: This replica's weight for `WeightedMean` aggregation,
                typically its number of valid examples.

        Raises:
            ValueError: naming the bad argument; no variable has changed then.
        """
        grads, variables, all_variables = _split_arguments(grads_and_vars, var_list)
        _check_variables(all_variables)
        if all_variables and not variables:
            # As in Keras: a loss that reaches no variable is a bug, and a
            # step that changes nothing would still count an update.
            names = [v.name for v in all_variables]
            raise ValueError(
                f"grads: every gradient is None (variables {names[:8]}"
                f"{' ...' if len(names) > 8 else ''}): the loss does not depend "
                "on them. Nothing was changed."
            )
        dist.check_created_in_scope(dist.current_strategy(), all_variables)
        grads = _check_gradients(grads, variables)
        if self._built:
            unknown = [v.name for v in variables if v.ref() not in self._slot_index]
            if unknown:
                raise ValueError(
                    f"var_list: {unknown} were not among the variables this optimizer "
                    "was built with."
                )
        grads, w = self.reducer.payload(grads, weight)
        given_aggregate = not dist.in_replica_context()
        if given_aggregate and self.sync.needs_replica_context:
            raise ValueError(
                f"sync: {self.sync.name} needs per-replica gradients; call "
                "apply_gradients inside strategy.run."
            )

        def merge_fn(strategy, grads, w):
            # Like Keras, build for every variable passed, including those
            # without a gradient this time.
            self._ensure_built(all_variables)
            self._follow_loss_scale(strategy)
            with self.reducer.given_aggregate(given_aggregate):
                self.sync.apply(self, strategy, list(grads), w, variables)

        dist.merge(merge_fn, tuple(grads), w)
        return self.iterations

    def scale_loss(self, loss):
        """`loss` times the loss scale (unchanged without `loss_scale`)."""
        if self.loss_scale is None:
            return loss
        return loss * tf.cast(tf.convert_to_tensor(self.loss_scale.scale), loss.dtype)

    def minimize(self, loss_fn, var_list, *, weight=None):
        """Computes the gradients of `loss_fn()` and applies them; returns the loss."""
        with tf.GradientTape() as tape:
            loss = loss_fn()
            scaled = self.scale_loss(loss)
        grads = tape.gradient(scaled, var_list)
        self.apply_gradients(grads, var_list, weight=weight)
        return loss

    @tf.autograph.experimental.do_not_convert
    def synchronize(self, var_list: Sequence[tf.Variable]) -> None:
        """Makes every replica's copy identical; call before saving a checkpoint.

        A no-op except for sync modes whose replicas diverge by design (local
        SGD, DiLoCo, hierarchical), where it ends the current period early.
        Call it in cross-replica context.
        """
        self._cross_replica_call("synchronize", var_list)

    @tf.autograph.experimental.do_not_convert
    def snapshot_replicas(self, var_list: Sequence[tf.Variable]) -> None:
        """Keeps every replica's own state for the next checkpoint save.

        For sync modes whose replicas diverge by design (local SGD, DiLoCo,
        hierarchical): a checkpoint saves one copy of each variable, so call
        this right before `checkpoint.save`, and `restore_replicas` right
        after `checkpoint.restore`; the resumed run then equals an
        uninterrupted one exactly. Unlike `synchronize`, the run itself is
        not changed. A no-op when the replicas are identical. Call it in
        cross-replica context.

        Args:
            var_list: Every variable this optimizer updates.
        """
        self._cross_replica_call("snapshot_replicas", var_list)

    def restore_replicas(self, var_list: Sequence[tf.Variable]) -> None:
        """Gives every replica its own state back after `checkpoint.restore`.

        The counterpart of `snapshot_replicas`; a no-op when the checkpoint
        holds no snapshot. On a different number of replicas than at the
        save, every replica starts from the average of the saved replicas,
        as if `synchronize` had been called before the save (logged). Call
        it eagerly.

        Args:
            var_list: Every variable this optimizer updates.

        Raises:
            ValueError: if the checkpoint was saved while the replicas
                differed, with neither `snapshot_replicas` nor `synchronize`
                before the save: it holds replica 0's copy only.
        """
        self._cross_replica_call("restore_replicas", var_list)

    def _cross_replica_call(self, method, var_list):
        dist.require_cross_replica_context(method)
        var_list = list(var_list)
        # A fresh optimizer after `checkpoint.restore`: its state is restored
        # as it is created (deferred restoration), so build it now rather than
        # skip the call and fail the first step for want of this very call.
        self.build(var_list)
        with self._strategy.scope():
            getattr(self.sync, method)(self, self._strategy, var_list)

    def finalize_variable_values(self, var_list: Sequence[tf.Variable]) -> None:
        """Copies each variable's moving average into it (`use_ema`); else nothing.

        Keras's name: `model.fit` calls it at the end of training. Call it in
        cross-replica context; every copy of a variable gets the same value.
        """
        if not self.use_ema or not self._built:
            return
        dist.require_cross_replica_context("finalize_variable_values")
        var_list = list(var_list)
        # Every average found before any variable is written.
        unknown = [v.name for v in var_list if v.ref() not in self._slot_index]
        if unknown:
            raise ValueError(
                f"var_list: {unknown} are not variables this optimizer was "
                "built with; nothing was changed."
            )
        averages = [self.slots(v)[EMA] for v in var_list]
        if self._sharded_slots is not None:
            # Each average is in pieces on the replicas: the whole of it.
            averages = [a.logical_value() for a in averages]
        with self._strategy.scope():
            for var, ema in zip(var_list, averages):
                dist.update(
                    self._strategy,
                    var,
                    lambda v, e: v.assign(tf.cast(e, v.dtype), read_value=False),
                    ema,
                )

    @property
    def learning_rate(self):
        """The float, schedule or `tf.Variable` the updates read; see `__init__`."""
        return self._learning_rate

    @learning_rate.setter
    def learning_rate(self, value):
        value = schedules.check_learning_rate(value)
        current = getattr(self, "_learning_rate", None)
        if isinstance(current, tf.Variable) and not (
            callable(value) or isinstance(value, tf.Variable)
        ):
            # As Keras: a number set on a variable rate is assigned into the
            # variable, which every traced update reads.
            current.assign(tf.cast(value, current.dtype), read_value=False)
            value = current
        traced = self._traced_rate
        if traced is not None and not _same_rate(value, traced):
            # Traced functions captured the old object (a float as a
            # constant): only a retrace sees the new one. Not wrong (a
            # function traced later uses it), but a user who expected the
            # running step to change must hear it.
            logging.warning(
                "learning_rate: set to %r after a tf.function traced the update "
                "with %r, which the traced functions keep using until they are "
                "retraced. To change the rate between calls of a traced step, "
                "pass learning_rate=a tf.Variable and assign it (or set a float, "
                "which is assigned into it), or a schedule.",
                value,
                traced,
            )
        # Not tracked again under this name (tf.Module tracks the attribute
        # `learning_rate` already, as before this was a property).
        object.__setattr__(self, "_learning_rate", value)

    def learning_rate_value(self) -> tf.Tensor:
        """The learning rate the next update will use, as float32."""
        lr = self.learning_rate
        if not tf.executing_eagerly():
            # This trace keeps reading `lr`: the setter warns if it is replaced.
            self._traced_rate = lr
        if callable(lr):
            return tf.cast(lr(self.iterations), tf.float32)
        if isinstance(lr, tf.Variable):
            return tf.cast(tf.convert_to_tensor(lr), tf.float32)
        return tf.constant(lr, tf.float32)

    def slots(self, var) -> dict[str, tf.Variable]:
        """The slot variables of `var`, by name."""
        return self._slots[self._slot_index[var.ref()]]

    # --- The update path (public: distopt.sync calls these) ------------------

    def built_variables(self) -> list[tf.Variable]:
        """Every variable the optimizer was built with, in build order."""
        return [r.deref() for r in self._variable_refs]

    def state_variables(self) -> list:
        """Every variable of the optimizer's own state, in a stable order.

        Counters, slots, the sync mode's, the compressor's and the loss
        scale's state; not the model's variables. Sharded slots and
        compression residuals are `distribute.LogicalState` views, which read
        (`numpy()`) and write (`assign()`) their whole logical value like a
        variable. The order is `tf.Module`'s (by attribute path), views and
        variables together, so it is the same for every optimizer built
        alike, sharded or not: a view stands where an unsharded optimizer
        keeps that slot's variable (`keras.wrap` saves the state by
        position, and restores it on any number of replicas).
        """
        model = set(self._variable_refs)

        def is_state(x):
            if isinstance(x, dist.LogicalState):
                return True
            return isinstance(x, tf.Variable) and x.ref() not in model

        # As `tf.Module.variables` flattens, with the views in their place.
        return list(self._flatten(predicate=is_state, expand_composites=True))

    def state_bytes_per_device(self) -> dict[str, int]:
        """Bytes of optimizer state held on each device, read from the variables.

        Slots (whole or sharded), moving averages, compression residuals,
        sync state, snapshots and counters; not the model's variables. Each
        variable's copies are counted on the devices they live on, at their
        current size.

        Returns:
            `{device name: bytes}`.
        """
        model = set(self._variable_refs)
        held = [v for v in self.variables if v.ref() not in model]
        for m in self.submodules:
            if isinstance(m, dist.LogicalState):
                held += m.storage_variables()
        if self._sharded_slots is not None:
            held += self._sharded_slots.storage_variables()
        strategy = self._strategy or dist.current_strategy()
        out: dict[str, int] = {}
        seen = set()
        with strategy.scope():
            for v in held:
                if v.ref() in seen:
                    continue
                seen.add(v.ref())
                for copy in dist.local_values(strategy, v):
                    size = int(tf.size(copy)) * copy.dtype.size
                    out[copy.device] = out.get(copy.device, 0) + size
        return out

    def slot_dtype(self, var) -> tf.DType:
        """The dtype of `var`'s slots and update math: float32 for 16-bit vars."""
        return reduce_lib.payload_dtype(var.dtype)

    def variable_index(self, var) -> int:
        """The position of `var` among `built_variables()`."""
        return self._slot_index[var.ref()]

    def apply_update(
        self, strategy, grads, variables, *, scale=None, ok=None, var_ok=None
    ):
        """Applies aggregated gradients: every copy of every variable and slot.

        Call it in cross-replica context with the per-replica output of
        `reducer.reduce` (or gradients already identical on every replica).
        Advances `iterations`, or counts a skip in `skipped_steps`.

        Args:
            strategy: The strategy in scope.
            grads: Per-replica gradients, one per variable.
            variables: The variables to update.
            scale: A scalar to multiply the gradients by, or None.
            ok: A scalar bool, identical on every replica: False keeps every
                variable and slot as it was. None: the step cannot be skipped.
            var_ok: None, or a list with a scalar bool or None per variable,
                to keep single variables as they were.
        """
        lr = self.learning_rate_value()
        step = self.iterations + 1
        var_ok = list(var_ok) if var_ok is not None else [None] * len(variables)
        grads, variables = list(grads), list(variables)
        sparse = [dist.is_sparse(strategy, g) for g in grads]
        if any(sparse) and (self._sharded_slots is not None or not self.sparse_rows):
            # Densified as Keras 3 does; the sharded update always is.
            grads = [
                dist.densify(strategy, g) if s else g for g, s in zip(grads, sparse)
            ]
            sparse = [False] * len(grads)
        if self._sharded_slots is not None:
            sharded_lib.apply(
                self,
                self._sharded_slots,
                strategy,
                grads,
                variables,
                lr,
                step,
                scale,
                ok,
                var_ok,
            )
        else:
            self._update_rows_of(
                strategy, grads, variables, sparse, lr, step, scale, ok, var_ok
            )
            dense = [i for i, s in enumerate(sparse) if not s]
            self._update_dense(
                strategy,
                [grads[i] for i in dense],
                [variables[i] for i in dense],
                lr,
                step,
                scale,
                ok,
                [var_ok[i] for i in dense],
            )
        self._count_step(strategy, ok)

    def _update_rows_of(
        self, strategy, grads, variables, sparse, lr, step, scale, ok, var_ok
    ):
        """The sparse-row updates (`sparse_rows`): each variable's touched rows."""
        rows_kernel = self._kernel_on_device(strategy, self._update_rows)
        for i in (i for i, s in enumerate(sparse) if s):
            dist.update(
                strategy,
                variables[i],
                rows_kernel,
                grads[i],
                dict(self.slots(variables[i])),
                lr,
                step,
                scale,
                ok,
                var_ok[i],
            )

    def _update_dense(self, strategy, grads, variables, lr, step, scale, ok, var_ok):
        """Every copy of `variables` and their slots: one kernel, or one each."""
        if not variables:
            return
        slots = self._slot_lists(variables)
        if self.fused:
            dist.update_together(
                strategy,
                variables,
                self._update_all,
                grads,
                slots,
                lr,
                step,
                scale,
                ok,
                var_ok,
            )
            return
        kernel = self._kernel_on_device(strategy)
        for g, v, s, vok in zip(grads, variables, slots, var_ok):
            dist.update(strategy, v, kernel, g, s, lr, step, scale, ok, vok)

    def _count_step(self, strategy, ok):
        """Advances `iterations`, or counts a skip (and tells the loss scale)."""
        if ok is None:
            self.iterations.assign_add(1)
            return
        verdict = dist.first_local(strategy, ok)
        applied = tf.cast(verdict, tf.int64)
        self.iterations.assign_add(applied)
        self.skipped_steps.assign_add(1 - applied)
        if self.loss_scale is not None and self.loss_scale.update(verdict) is not None:
            # The residuals were written in this step's loss-scaled units (or
            # kept, on a skip): the next step adds them to shares in the new
            # scale's units.
            self._follow_loss_scale(strategy)

    def _follow_loss_scale(self, strategy) -> None:
        """Puts the state kept in loss-scaled units into the current scale's.

        The residuals, PowerSGD's Q and `Accumulate`'s buffers are in the
        units of the loss scale `state_scale` records. They move with a
        dynamic scale (`_count_step`, in the step that changes it), and at
        the first step after a checkpoint of another scale is restored: a
        float16 run resumed without a loss scale read them 2^15 times too
        large. The compressors and the sum commute with a positive factor
        (see `distopt.compression.base`). Cross-replica context.
        """
        if self.state_scale is None:
            return
        now = (
            tf.constant(1.0)
            if self.loss_scale is None
            else tf.convert_to_tensor(self.loss_scale.scale)
        )
        was = tf.convert_to_tensor(self.state_scale)
        # Not recorded: in the units of the scale restored with them.
        factor = tf.where(was > 0.0, now / was, 1.0)
        if self.compression is not None:
            self.compression.rescale(strategy, factor)
        dist.scale_unless_one(strategy, self.sync.scaled_state(), factor)
        self.state_scale.assign(now)

    def _ensure_built(self, variables):
        if not self._built:
            self.build(variables)

    def _slot_lists(self, variables):
        return [dict(self.slots(v)) for v in variables]

    def _kernel_on_device(self, strategy, update=None):
        """`update` (`self._kernel`), called with this device's copies of the slots."""
        update = update or self._kernel

        def kernel(var, grad, slots, *args):
            slots = {
                n: dist.component_on(strategy, s, var.device) for n, s in slots.items()
            }
            return update(var, grad, slots, *args)

        return kernel

    def _update_all(self, variables, grads, slots, lr, step, scale, ok, var_ok):
        """Every variable's update on one device (a multi-tensor update).

        Small variables are where per-variable kernels lose: a step over
        hundreds of them is bound by dispatches, not bytes (apex's
        multi_tensor_apply, PyTorch's fused Adam). So variables below
        `FLAT_MAX_ELEMENTS` of one dtype are concatenated into one flat
        buffer (with their gradients and slots), updated by one compiled
        kernel, and split back. The kernel's inputs are plain tensors, so it
        compiles once per buffer size, in about the time of one small kernel;
        a kernel that assigned every variable itself would compile in time
        growing faster than the number of variables. Large variables keep
        their own kernel (shared by every variable of the same shape), where
        a concatenation would only add memory traffic. Layer-wise rules (Lamb,
        Lars) join the flat buffer too, their norms taken per variable by
        `run_norms`; other rules that reduce over a variable
        (`elementwise = False`) and per-variable skips go variable by
        variable.
        """
        flat: dict[tuple, list[int]] = {}
        for i, v in enumerate(variables):
            # Op by op (no XLA), a bigger buffer may round differently in
            # vectorised kernels: keep Keras's per-variable arithmetic there.
            if (
                self.jit_compile
                and (self.elementwise or self.layerwise)
                and var_ok[i] is None
                and v.shape.num_elements() < FLAT_MAX_ELEMENTS
            ):
                flat.setdefault((v.dtype, tuple(sorted(slots[i]))), []).append(i)
            else:
                self._kernel(v, grads[i], slots[i], lr, step, scale, ok, var_ok[i])
        for idx in flat.values():
            if len(idx) == 1:
                i = idx[0]
                self._kernel(variables[i], grads[i], slots[i], lr, step, scale, ok)
                continue
            # Equal sizes side by side: a layer-wise rule's norms are then
            # one row reduction per run of them (`run_norms`).
            idx = sorted(idx, key=lambda i: variables[i].shape.num_elements())
            sizes = [int(variables[i].shape.num_elements()) for i in idx]
            runs = tuple(
                (size, len(list(group))) for size, group in itertools.groupby(sizes)
            )

            def concat(tensors):
                return tf.concat([_flat(t) for t in tensors], 0)

            old = {n: concat([slots[i][n] for i in idx]) for n in slots[idx[0]]}
            new_p, new_slots = self._flat_kernel(
                concat([variables[i] for i in idx]),
                concat([grads[i] for i in idx]),
                old,
                lr,
                step,
                scale,
                ok,
                ("runs", runs) if self.layerwise else None,
            )
            # Every reshape is an op to dispatch: 1-D variables skip them.
            for i, part in zip(idx, tf.split(new_p, sizes)):
                variables[i].assign(_shaped(part, variables[i].shape), read_value=False)
            for n, value in new_slots.items():
                for i, part in zip(idx, tf.split(value, sizes)):
                    slots[i][n].assign(
                        _shaped(part, variables[i].shape), read_value=False
                    )

    def _update_variable(self, var, grad, slots, lr, step, scale, ok, var_ok=None):
        """One variable's update on one device: decay, rule, then assign."""
        old = {n: tf.convert_to_tensor(s) for n, s in slots.items()}
        oks = [x for x in (ok, var_ok) if x is not None]
        ok = tf.reduce_all(tf.stack(oks)) if oks else None
        new_p, new_slots = self._rule(
            tf.convert_to_tensor(var), grad, old, lr, step, scale, ok
        )
        var.assign(new_p, read_value=False)
        for n, s in slots.items():
            s.assign(new_slots[n], read_value=False)

    def _rule(self, p0, grad, old, lr, step, scale, ok, layout=None, totals=None):
        """Weight decay, the update rule and the skip select, on tensors.

        16-bit variables compute in float32 (their slots are float32) and
        round once at the end. `ok` may be a scalar or one bool per element.

        Args:
            layout: For a layer-wise rule, what `p0` holds: None (one
                variable), `("runs", runs)` (the fused flat buffer; see
                `run_norms`) or `("segments", segments, n)` (a shard of the
                sharded update, with `totals`; see `segment_norms`).
            totals: A shard's all-reduced sums of squares per variable.
        """
        g, lr, p = self._inputs(p0, grad, lr, scale, decay=True)
        norm = {"norm": _norm_fn(layout, totals)} if self.layerwise else {}
        rule_old = {n: v for n, v in old.items() if n != EMA}
        new_p, new_slots = self.update_step(
            g, p, rule_old, lr, tf.cast(step, g.dtype), **norm
        )
        new_p = tf.cast(new_p, p0.dtype)
        if self.use_ema:
            new_p, new_slots[EMA] = self._average(new_p, old[EMA], step)
        return _select(ok, p0, new_p, old, new_slots)

    def _partial_norms(self, p0, grad, old, lr, step, scale, layout):
        """A shard's sums of squares per variable, of each `norm` argument.

        The first pass of a layer-wise rule on a shard (`layout` as in
        `_rule`): the rule runs with a `norm` that records the partial sums
        of its argument and returns ones; the rule is pure, so the second
        pass, with the all-reduced sums, sees the same arguments. Returns
        `[calls, n]`.
        """
        g, lr, p = self._inputs(p0, grad, lr, scale, decay=True)
        _, segments, n = layout
        records = []

        def record(x):
            records.append(_segment_sums(tf.square(x), segments, n))
            return tf.ones_like(x)

        rule_old = {k: v for k, v in old.items() if k != EMA}
        self.update_step(g, p, rule_old, lr, tf.cast(step, g.dtype), norm=record)
        return tf.stack(records)

    def _inputs(self, p0, grad, lr, scale, decay):
        """The rule's inputs in the payload dtype: `(g, lr, p)`, `p` decayed."""
        dtype = reduce_lib.payload_dtype(p0.dtype)
        g = tf.cast(grad, dtype)
        if scale is not None:
            g = g * tf.cast(scale, dtype)
        lr = tf.cast(lr, dtype)
        p = tf.cast(p0, dtype)
        if decay and self.weight_decay:
            p = p - lr * self.weight_decay * p
        return g, lr, p

    def _average(self, new_p, ema, step):
        """The moving average after an update to `new_p`; the overwrite.

        Keras's arithmetic: the average of the value stored (rounded to a
        16-bit variable's dtype), with momentum 0 at the first update.

        Returns:
            (new_p, new_ema): `new_p` is the average on an overwrite step.
        """
        m = tf.cast(step > 1, ema.dtype) * self.ema_momentum
        new_ema = m * ema + (1 - m) * tf.cast(new_p, ema.dtype)
        if self.ema_overwrite_frequency:
            overwrite = tf.equal(step % self.ema_overwrite_frequency, 0)
            new_p = tf.where(overwrite, tf.cast(new_ema, new_p.dtype), new_p)
        return new_p, new_ema

    def _update_rows(self, var, grad, slots, lr, step, scale, ok, var_ok=None):
        """A sparse gradient's update, on the rows it touches (`sparse_rows`).

        Gathers those rows of the variable and its slots, runs `update_step`
        on them and scatters them back. Not compiled: the number of rows
        changes from step to step, and XLA would compile anew for each.
        `grad` holds each index once (as `reducer.reduce` returns it), so
        each row is written once. The arithmetic is `_update_variable`'s.
        """
        index = grad.indices
        p0 = tf.convert_to_tensor(var)
        # The values' dtype and scale as a dense gradient's; no decay yet.
        g, lr, _ = self._inputs(p0, grad.values, lr, scale, decay=False)
        keep_ok = [x for x in (ok, var_ok) if x is not None]
        ok = tf.reduce_all(tf.stack(keep_ok)) if keep_ok else None
        if self.weight_decay:
            # Decoupled decay shrinks every row, touched or not, as in Keras.
            _, _, p = self._inputs(p0, grad.values, lr, None, decay=True)
            decayed, _ = _select(ok, p0, tf.cast(p, var.dtype), {}, {})
            var.assign(decayed)
            rows0, rows = tf.gather(p0, index), tf.gather(p, index)
        else:
            rows0 = tf.gather(p0, index)
            rows = tf.cast(rows0, g.dtype)
        rule_slots = {n: s for n, s in slots.items() if n != EMA}
        old = {n: tf.gather(s, index) for n, s in rule_slots.items()}
        new_rows, new_slots = self.update_step(g, rows, old, lr, tf.cast(step, g.dtype))
        new_rows, new_slots = _select(
            ok, rows0, tf.cast(new_rows, var.dtype), old, new_slots
        )
        var.scatter_update(tf.IndexedSlices(new_rows, index))
        for n, s in rule_slots.items():
            s.scatter_update(tf.IndexedSlices(new_slots[n], index))
        if self.use_ema:
            # Every row: the average moves towards untouched rows too.
            p1 = tf.convert_to_tensor(var)
            ema0 = tf.convert_to_tensor(slots[EMA])
            new_p, new_ema = self._average(p1, ema0, step)
            new_p, kept = _select(ok, p1, new_p, {EMA: ema0}, {EMA: new_ema})
            new_ema = kept[EMA]
            slots[EMA].assign(new_ema, read_value=False)
            if self.ema_overwrite_frequency:
                var.assign(new_p, read_value=False)


# --- Argument handling --------------------------------------------------------


def _split_arguments(grads_and_vars, var_list):
    items = list(grads_and_vars)
    if var_list is None:
        if items and not all(
            isinstance(p, (tuple, list)) and len(p) == 2 for p in items
        ):
            raise ValueError(
                "grads_and_vars: pass (gradient, variable) pairs, or gradients "
                "with var_list."
            )
        grads = [g for g, _ in items]
        variables = [v for _, v in items]
    else:
        grads, variables = items, list(var_list)
        if len(grads) != len(variables):
            raise ValueError(
                f"var_list: got {len(grads)} gradients but {len(variables)} variables."
            )
    pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
    return [g for g, _ in pairs], [v for _, v in pairs], variables


#: Ops that mix elements: in an element-wise rule (outside `norm`) they
#: would mix the variables the fused and sharded updates put end to end.
_MIXING_OPS = frozenset(
    [
        "Sum",
        "Mean",
        "Max",
        "Min",
        "Prod",
        "All",
        "Any",
        "ArgMax",
        "ArgMin",
        "EuclideanNorm",
        "Cumsum",
        "Cumprod",
        "MatMul",
        "BatchMatMulV2",
        "BatchMatMulV3",
        "Einsum",
        "TopKV2",
        "Softmax",
        "LogSoftmax",
        "Reverse",
        "ReverseV2",
        "Roll",
    ]
)


def _check_shard_state(optimizer, shard_state) -> bool:
    """`shard_state`, checked: a bool, and a rule the sharded update can run.

    The sharded update runs the rule on a slice of the variables end to end:
    a rule that reduces over a variable some other way than through `norm`
    would reduce over the slice. Checked at construction and again at
    `build` (the flags may be set on the instance in between).
    """
    shard_state = check_bool("shard_state", shard_state)
    if shard_state and not (optimizer.elementwise or optimizer.layerwise):
        raise ValueError(
            f"shard_state: needs an element-wise or layer-wise update rule; "
            f"{type(optimizer).__name__} sets elementwise=False and "
            "layerwise=False (its update_step reduces over each variable)."
        )
    return shard_state


def _check_rule(optimizer, inits, sharded):
    """Raises ValueError where a subclass's rule breaks what its flags promise.

    Traced once on a small flat input, as the fused and sharded updates run
    it (distopt's own rules are tested instead): an element-wise or
    layer-wise rule may reduce only through `norm`; sharded, a `norm`'s
    argument may not depend on another `norm`'s value (every norm comes
    from one pass, `Optimizer._partial_norms`). Either silently gave wrong
    numbers, on some paths only.
    """
    cls = type(optimizer)
    # `__module__` is None for a class made by `exec` without a `__name__`.
    module = getattr(cls.update_step, "__module__", None) or ""
    if module.startswith("distopt.") or not inits:
        return
    names = [n for n in inits[0] if n != EMA]
    dtype = reduce_lib.payload_dtype(inits[0][names[0]][1] if names else tf.float32)
    marks, nested = [], []

    def norm(x):
        x = tf.convert_to_tensor(x)
        if not nested and _reaches(x, marks):
            nested.append(len(marks))
        ones = tf.ones_like(x)
        marks.append(ones.op)
        return ones

    def probe(g, p, slots, lr, step):
        kwargs = {"norm": norm} if optimizer.layerwise else {}
        optimizer.update_step(g, p, slots, lr, step, **kwargs)

    vec, scalar = tf.TensorSpec([6], dtype), tf.TensorSpec([], dtype)
    try:
        graph = (
            tf.function(probe, autograph=False)
            .get_concrete_function(vec, vec, {n: vec for n in names}, scalar, scalar)
            .graph
        )
    except Exception:  # noqa: BLE001
        # A rule that cannot be traced this way (Python control flow on a
        # tensor runs eagerly only) is left to fail, or not, where it runs:
        # the check must not refuse what it cannot see.
        return
    mixing = sorted({op.type for op in graph.get_operations()} & _MIXING_OPS)
    if mixing:
        raise ValueError(
            f"{cls.__name__}: update_step mixes elements ({', '.join(mixing)}) but "
            f"the class sets elementwise={cls.elementwise}, "
            f"layerwise={cls.layerwise}: the fused and sharded updates run it on "
            "variables end to end. Set elementwise=False, or take L2 norms over "
            "the variable through norm= and set layerwise=True."
        )
    if sharded and nested:
        raise ValueError(
            f"shard_state: {cls.__name__}.update_step takes norm() of a value that "
            f"depends on an earlier norm() (call {nested[0] + 1}); the sharded "
            "update takes every norm from one pass over the shard. Use "
            "shard_state=False."
        )


def _reaches(x, ops) -> bool:
    """Whether graph tensor `x` depends on any of `ops`."""
    targets, seen, stack = set(ops), set(), [x.op]
    while stack:
        op = stack.pop()
        if op in targets:
            return True
        if op not in seen:
            seen.add(op)
            stack.extend(t.op for t in op.inputs)
    return False


def _check_variables(variables):
    seen = set()
    for v in variables:
        if not isinstance(v, tf.Variable):
            # ValueError, not TypeError: every bad argument to an optimizer
            # raises ValueError (the contract tests/test_errors.py checks).
            raise ValueError(  # noqa: TRY004
                f"var_list: expected tf.Variable, got {type(v).__name__}."
            )
        if not v.dtype.is_floating:
            raise ValueError(
                f"var_list: variable {v.name!r} has dtype {v.dtype.name}; only "
                "floating-point variables can be optimized."
            )
        if v.ref() in seen:
            raise ValueError(f"var_list: variable {v.name!r} appears twice.")
        seen.add(v.ref())


def _check_gradients(grads, variables):
    out = []
    for i, (g, v) in enumerate(zip(grads, variables)):
        if isinstance(g, tf.IndexedSlices) and v.shape.rank:
            out.append(_check_sparse_gradient(i, g, v))
            continue
        g = tf.convert_to_tensor(g)
        if not g.shape.is_compatible_with(v.shape):
            raise ValueError(
                f"grads: gradient {i} has shape {g.shape} but variable {v.name!r} "
                f"has shape {v.shape}."
            )
        if not (g.dtype.is_floating):
            raise ValueError(f"grads: gradient {i} has non-float dtype {g.dtype.name}.")
        out.append(tf.cast(g, v.dtype) if g.dtype != v.dtype else g)
    return out


def l2_norm(x):
    """The L2 norm of `x` over all its elements (one layer-wise norm)."""
    return tf.sqrt(tf.reduce_sum(tf.square(x)))


def run_norms(runs):
    """The `norm` of a flat buffer of variables: each element gets its own.

    Args:
        runs: `((size, count), ...)`: the buffer holds `count` variables of
            `size` elements each, one run after another.

    Returns:
        A function of a flat tensor laid out like that, returning for every
        element the L2 norm of the variable it belongs to. Each run is a
        `[count, size]` matrix whose row norms are one reduction: a segment
        sum without `unsorted_segment_sum`'s scatter, which XLA runs about
        5x slower on CPU (0.76M elements in 320 segments: 4.1 ms against
        0.85 ms, BUILD_NOTES.md).
    """

    def norm(x):
        parts, start = [], 0
        for size, count in runs:
            rows = tf.reshape(x[start : start + size * count], [count, size])
            n = tf.sqrt(tf.reduce_sum(tf.square(rows), axis=1, keepdims=True))
            parts.append(tf.reshape(tf.broadcast_to(n, [count, size]), [-1]))
            start += size * count
        return parts[0] if len(parts) == 1 else tf.concat(parts, 0)

    return norm


def segment_norms(segments, totals):
    """The `norm` of a shard: each element gets its variable's whole norm.

    Args:
        segments: `((segment, length), ...)`: the shard's pieces in order.
        totals: `[calls, n]`: for each call of `norm` in the rule, every
            variable's sum of squares over all shards (all-reduced).
    """
    calls = iter(range(totals.shape[0]))

    def norm(x):
        del x
        t = tf.sqrt(totals[next(calls)])
        return tf.concat([tf.fill([length], t[k]) for k, length in segments], 0)

    return norm


def _segment_sums(x, segments, n):
    """`[n]`: each segment's sum of the flat `x` (zero for those not in it).

    A `reduce_sum` per piece, with static bounds: pairwise (tree) sums, as
    unsharded Lamb's `l2_norm` takes. `unsorted_segment_sum` added element
    after element in float32 (sharded Lamb was 1.7e-5 off after 2 steps of
    a 784x700 layer, against 6e-8 unsharded), and its ids, a `tf.repeat`
    under XLA, were sized segments x the longest one (it failed on a
    784x700 layer).
    """
    sums, start = [], 0
    for _, length in segments:
        sums.append(tf.reduce_sum(x[start : start + length]))
        start += length
    return tf.tensor_scatter_nd_add(
        tf.zeros([n], x.dtype), [[k] for k, _ in segments], tf.stack(sums)
    )


def _norm_fn(layout, totals):
    """The `norm` a layer-wise rule gets for `layout` (see `Optimizer._rule`)."""
    if layout is None:
        return l2_norm
    if layout[0] == "runs":
        return run_norms(layout[1])
    return segment_norms(layout[1], totals)


def _select(ok, p0, new_p, old, new_slots):
    """Keeps the old values where `ok` is False (a select, not a tf.cond).

    Branch-free, so it fuses under XLA. `ok`: None (nothing to keep), a
    scalar, or one bool per element.
    """
    if ok is None:
        return new_p, new_slots
    keep = tf.logical_not(ok)
    new_p = tf.where(keep, p0, new_p)
    return new_p, {n: tf.where(keep, old[n], new_slots[n]) for n in old}


def _flat(t):
    if t.shape.rank == 1:
        return tf.convert_to_tensor(t)
    return tf.reshape(t, [-1])


def _shaped(t, shape):
    return t if shape.rank == 1 else tf.reshape(t, shape)


def _check_sparse_gradient(i, g, v):
    """An `IndexedSlices` gradient, checked and cast; it stays sparse."""
    row_shape = v.shape[1:]
    if not g.values.shape[1:].is_compatible_with(row_shape) or (
        g.values.shape.rank is not None and g.values.shape.rank != v.shape.rank
    ):
        raise ValueError(
            f"grads: gradient {i} has rows of shape {g.values.shape[1:]} but "
            f"variable {v.name!r} has rows of shape {row_shape}."
        )
    if g.indices.dtype not in (tf.int32, tf.int64):
        raise ValueError(
            f"grads: gradient {i} has indices of dtype {g.indices.dtype.name}; "
            "expected int32 or int64."
        )
    if not g.values.dtype.is_floating:
        raise ValueError(
            f"grads: gradient {i} has non-float dtype {g.values.dtype.name}."
        )
    if g.values.dtype != v.dtype:
        g = tf.IndexedSlices(tf.cast(g.values, v.dtype), g.indices, g.dense_shape)
    return g


def _transforms(clipvalue, clipnorm, global_clipnorm, skip_nonfinite) -> list:
    """The transforms after the reduce, in order: value, norm, global norm, finite."""
    transforms = []
    if clipvalue is not None:
        transforms.append(transforms_lib.ClipByValue(clipvalue))
    if clipnorm is not None:
        transforms.append(transforms_lib.ClipByNorm(clipnorm))
    if global_clipnorm is not None:
        transforms.append(transforms_lib.ClipByGlobalNorm(global_clipnorm))
    if skip_nonfinite:
        transforms.append(transforms_lib.SkipNonFinite())
    return transforms


def _check_compression(compression, wire_dtype):
    """The compressor `compression` names (or None), refusing a `wire_dtype` too."""
    compression = compression_lib.get(compression)
    if compression is not None and wire_dtype is not None:
        # It was ignored in silence: compressors send their own payloads.
        raise ValueError(
            "wire_dtype: does not apply with compression, which sends its "
            "own payload (float32 factors, values and indices, or signs); "
            "use one or the other."
        )
    return compression


def _same_rate(a, b) -> bool:
    """Whether learning rate `a` is `b`, as a traced update reads it.

    Numbers compare by value; variables by identity (`==` on one gives a
    tensor); schedules by identity or `==` (a bound method is a new object
    at every access but equal to the last).
    """
    if isinstance(a, tf.Variable) or isinstance(b, tf.Variable):
        return a is b
    if callable(a) and callable(b):
        return a is b or bool(a == b)
    if callable(a) or callable(b):
        return False
    return a == b


def _check_frequency(value):
    """None, or a positive int naming `ema_overwrite_frequency` if not."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"ema_overwrite_frequency: must be None or a positive integer, "
            f"got {value!r}."
        )
    return check_int("ema_overwrite_frequency", value, minimum=1)


def _cast_init(init, dtype):
    """A slot's initial value (a tensor or a callable) in the slot's dtype."""
    if callable(init):
        return lambda: tf.cast(init(), dtype)
    return tf.cast(init, dtype)


def _snake_case(name: str) -> str:
    return (
        re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower().replace("adam_w", "adamw")
    )
