"""The optimizer base class: state, validation, and the path of one update.

A subclass only says which slots it needs and gives its math as a pure
function of tensors (`update_step`). This class owns everything else:

* `build(var_list)` creates the slots once, colocated with their variable,
  in cross-replica context (creating them inside `strategy.run` is what hurts
  Keras users, tensorflow#43974).
* `apply_gradients` validates everything before touching any variable, then
  hands the per-replica gradients to the sync mode (`distopt.sync`) through
  one `merge_call`. The sync mode decides when to all-reduce; this class
  packs and reduces (`_reduce`), and writes every device's copy of every
  variable and slot through `strategy.extended.update` (`_apply_update`).
* The per-variable update runs as one XLA kernel (`jit_compile=True`, the
  default) even inside a user's plain `tf.function`: an Adam step then moves
  each byte of parameters and slots once, near the memory-bandwidth floor.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from distopt import aggregation as aggregation_lib
from distopt import distribute as dist
from distopt import sync as sync_lib
from distopt import transforms as transforms_lib
from distopt.optimizers import schedules


class Optimizer(tf.Module):
    """Base class of distopt optimizers.

    Args:
        learning_rate: A non-negative float, or a schedule: a callable of the
            int64 step (`optimizer.iterations`) returning a scalar.
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
        skip_nonfinite: Skip the step on every replica if the aggregated
            gradient has a NaN or Inf; `skipped_steps` counts such steps.
        wire_dtype: Cast gradients to "bfloat16" or "float16" for the
            all-reduce only.
        communication_options: `tf.distribute.experimental.CommunicationOptions`
            for every all-reduce, e.g. a `timeout_seconds` so that a dead
            peer fails the step instead of hanging it.
        jit_compile: Run each per-variable update as an XLA kernel.
        name: Name of the module (its variables' name scope).
    """

    def __init__(
        self,
        learning_rate,
        *,
        weight_decay=None,
        aggregation=None,
        sync=None,
        global_clipnorm=None,
        clipvalue=None,
        skip_nonfinite=False,
        wire_dtype=None,
        communication_options=None,
        jit_compile=True,
        name=None,
    ):
        super().__init__(name=name or _snake_case(type(self).__name__))
        self.learning_rate = schedules.check_learning_rate(learning_rate)
        self.weight_decay = (
            schedules.check_rate("weight_decay", weight_decay) if weight_decay else None
        )
        self.aggregation = aggregation_lib.get(aggregation)
        self.sync = sync_lib.get(sync)
        self.global_clipnorm = global_clipnorm
        self.clipvalue = clipvalue
        self.skip_nonfinite = bool(skip_nonfinite)
        self._transforms = []
        if clipvalue is not None:
            self._transforms.append(transforms_lib.ClipByValue(clipvalue))
        if global_clipnorm is not None:
            self._transforms.append(transforms_lib.ClipByGlobalNorm(global_clipnorm))
        if skip_nonfinite:
            self._transforms.append(transforms_lib.SkipNonFinite())
        self.wire_dtype = transforms_lib.check_wire_dtype(wire_dtype)
        self.communication_options = communication_options
        self.jit_compile = bool(jit_compile)
        # Created here, like Keras, so that they exist (and restore) before
        # the first step, in the scope the optimizer is created in.
        with tf.name_scope(self.name):
            self.iterations = _counter("iterations")
            self.skipped_steps = _counter("skipped_steps")
            # Counted at run time, next to every all-reduce this library issues.
            self.allreduce_calls = _counter("allreduce_calls")
            self.allreduce_bytes = _counter("allreduce_bytes")
        self._slots = []
        self._slot_index = {}
        self._built = False
        self._kernel = (
            tf.function(self._update_variable, jit_compile=True, autograph=False)
            if self.jit_compile
            else self._update_variable
        )

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
            "skip_nonfinite": self.skip_nonfinite,
            "wire_dtype": self.wire_dtype.name if self.wire_dtype else None,
            "jit_compile": self.jit_compile,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config: dict) -> Optimizer:
        config = dict(config)
        config["learning_rate"] = schedules.deserialize(config["learning_rate"])
        config["sync"] = sync_lib.from_config(config.get("sync"))
        return cls(**config)

    # --- Public API -----------------------------------------------------------

    def build(self, var_list: Sequence[tf.Variable]) -> None:
        """Creates the slots of `var_list` once. Call in cross-replica context."""
        if self._built:
            return
        if dist.in_replica_context() and tf.distribute.has_strategy():
            raise RuntimeError(
                "build: call it in cross-replica context (outside strategy.run); "
                "apply_gradients builds lazily by itself."
            )
        var_list = list(var_list)
        _check_variables(var_list)
        strategy = dist.current_strategy()
        # Remembered so that synchronize() works outside strategy.scope().
        self._strategy = strategy
        with tf.name_scope(self.name):
            for i, var in enumerate(var_list):
                with strategy.extended.colocate_vars_with(var):
                    slots = {
                        name: tf.Variable(init, trainable=False, name=f"{name}_{i}")
                        for name, init in self.slot_initializers(var).items()
                    }
                self._slots.append(slots)
                self._slot_index[var.ref()] = i
            self.sync.build(self, var_list, strategy)
        self._built = True

    # The library branches with explicit tf.cond only; autograph must not
    # rewrite its Python (some of which it cannot parse).
    @tf.autograph.experimental.do_not_convert
    def apply_gradients(self, grads_and_vars, var_list=None, *, weight=None):
        """Applies one step of gradients.

        Call it inside `strategy.run` with this replica's gradients: they are
        aggregated across replicas (per `aggregation` and `sync`) before any
        variable changes, and every replica's copy changes identically. Called
        outside `strategy.run`, the gradients are taken as already aggregated.

        Args:
            grads_and_vars: A list of gradients (then `var_list` is the list of
                variables), or a list of `(gradient, variable)` pairs.
            var_list: The variables, when the first argument is gradients.
            weight: This replica's weight for `WeightedMean` aggregation,
                typically its number of valid examples.

        Raises:
            ValueError: naming the bad argument; no variable has changed then.
        """
        grads, variables, all_variables = _split_arguments(grads_and_vars, var_list)
        _check_variables(all_variables)
        grads = _check_gradients(grads, variables)
        if self._built:
            unknown = [v.name for v in variables if v.ref() not in self._slot_index]
            if unknown:
                raise ValueError(
                    f"var_list: {unknown} were not among the variables this optimizer "
                    "was built with."
                )
        w = self.aggregation.replica_weight(weight)
        if self.aggregation.weighted:
            # A replica with no examples has a NaN mean gradient; its zero
            # weight must still contribute exactly zero to the sum.
            grads = [tf.math.multiply_no_nan(g, tf.cast(w, g.dtype)) for g in grads]
        if not dist.in_replica_context() and self.sync.needs_replica_context:
            raise ValueError(
                f"sync: {self.sync.name} needs per-replica gradients; call "
                "apply_gradients inside strategy.run."
            )

        def merge_fn(strategy, grads, w):
            # Like Keras, build for every variable passed, including those
            # without a gradient this time.
            self._ensure_built(all_variables)
            self.sync.apply(self, strategy, list(grads), w, variables)

        dist.merge(merge_fn, tuple(grads), w)
        return self.iterations

    def minimize(self, loss_fn, var_list, *, weight=None):
        """Computes the gradients of `loss_fn()` and applies them; returns the loss."""
        with tf.GradientTape() as tape:
            loss = loss_fn()
        grads = tape.gradient(loss, var_list)
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
        if dist.in_replica_context() and tf.distribute.has_strategy():
            raise RuntimeError(f"{method}: call it outside strategy.run.")
        if self._built:
            with self._strategy.scope():
                getattr(self.sync, method)(self, self._strategy, list(var_list))

    def learning_rate_value(self) -> tf.Tensor:
        """The learning rate the next update will use, as float32."""
        if callable(self.learning_rate):
            return tf.cast(self.learning_rate(self.iterations), tf.float32)
        return tf.constant(self.learning_rate, tf.float32)

    def slots(self, var) -> dict[str, tf.Variable]:
        """The slot variables of `var`, by name."""
        return self._slots[self._slot_index[var.ref()]]

    # --- The update path (used by distopt.sync) ------------------------------

    def _ensure_built(self, variables):
        if not self._built:
            self.build(variables)

    def _slot_lists(self, variables):
        return [dict(self.slots(v)) for v in variables]

    def _all_reduce(self, strategy, tensors, op=dist.SUM, wire_dtype=None):
        """Reduces per-replica `tensors` with one all-reduce per dtype.

        Packing into one buffer makes the count of collectives independent of
        the number of variables (Horovod's tensor fusion). Returns per-replica
        values, identical on every replica.
        """
        if not dist.is_distributed(strategy):
            return [dist.first_local(strategy, t) for t in tensors]
        specs = [dist.local_values(strategy, t)[0] for t in tensors]
        groups: dict[tuple, list[int]] = {}
        for i, t in enumerate(specs):
            # The scalar weight stays exact: only gradients travel compressed.
            compress = wire_dtype is not None and t.dtype.is_floating and t.shape.rank
            groups.setdefault(
                (t.dtype, wire_dtype if compress else t.dtype), []
            ).append(i)
        out = [None] * len(tensors)
        for (dtype, wire), idx in groups.items():
            sizes = [int(specs[i].shape.num_elements()) for i in idx]
            shapes = [specs[i].shape for i in idx]

            def pack(*ts, wire=wire):
                return tf.cast(tf.concat([tf.reshape(t, [-1]) for t in ts], 0), wire)

            packed = dist.map_per_replica(strategy, pack, *[tensors[i] for i in idx])
            reduced = dist.reduce(
                strategy, op, packed, packed, options=self.communication_options
            )
            self.allreduce_calls.assign_add(1)
            self.allreduce_bytes.assign_add(sum(sizes) * wire.size)

            def unpack(buf, dtype=dtype, sizes=sizes, shapes=shapes):
                parts = tf.split(tf.cast(buf, dtype), sizes)
                return [tf.reshape(p, s) for p, s in zip(parts, shapes)]

            for i, part in zip(idx, dist.map_per_replica(strategy, unpack, reduced)):
                out[i] = part
        return out

    def _reduce_and_apply(self, strategy, grads, weight, variables):
        """All-reduces the payload (grads, weight) and applies one update."""
        *grads, total = self._all_reduce(
            strategy, list(grads) + [weight], wire_dtype=self.wire_dtype
        )
        num_replicas = strategy.num_replicas_in_sync
        self._normalize_and_apply(strategy, grads, total, variables, num_replicas)

    def _local_apply(self, strategy, grads, weight, variables, group_size=1):
        """Applies each replica's own payload to its own copy (no communication).

        `group_size` is the number of replicas whose payloads were summed into
        `grads` (a worker's devices, for hierarchical sync).
        """
        self._normalize_and_apply(strategy, grads, weight, variables, group_size)

    def _normalize_and_apply(self, strategy, grads, total, variables, num_replicas):
        has_ok = False

        def finish(total, *gs):
            nonlocal has_ok
            norm = self.aggregation.normalizer(total, num_replicas)
            nonzero = norm > 0
            scale = 1.0 / tf.where(nonzero, norm, 1.0)
            if self._transforms:
                gs = [g * tf.cast(scale, g.dtype) for g in gs]
                scale = tf.constant(1.0)
            gs, ok = transforms_lib.apply(self._transforms, list(gs))
            # Only a step that can be skipped carries `ok` to the kernel: the
            # select it costs there halves an XLA Adam step's throughput on
            # CPU (benchmarks/adam_step.py). Unweighted, the summed weight is
            # a positive constant, so only a transform can veto the step.
            if self.aggregation.weighted:
                ok = nonzero if ok is None else tf.logical_and(ok, nonzero)
            has_ok = ok is not None  # the same on every replica
            return [scale] + ([ok] if has_ok else []) + list(gs)

        scale, *grads = dist.map_per_replica(strategy, finish, total, *grads)
        ok = grads.pop(0) if has_ok else None
        self._apply_update(strategy, grads, variables, scale=scale, ok=ok)

    def _apply_update(self, strategy, grads, variables, scale=None, ok=None):
        """Writes every copy of every variable and slot; advances the step."""
        lr = self.learning_rate_value()
        step = self.iterations + 1
        kernel = self._kernel_on_device(strategy)
        for g, v, slots in zip(grads, variables, self._slot_lists(variables)):
            dist.update(strategy, v, kernel, g, slots, lr, step, scale, ok)
        if ok is None:
            self.iterations.assign_add(1)
        else:
            applied = tf.cast(dist.first_local(strategy, ok), tf.int64)
            self.iterations.assign_add(applied)
            self.skipped_steps.assign_add(1 - applied)

    def _kernel_on_device(self, strategy):
        """`self._kernel`, called with this device's own copies of the slots."""

        def kernel(var, grad, slots, *args):
            # `strategy.extended.update` hands `kernel` each device's copy of
            # `var` but leaves distributed variables in its args (the slots)
            # whole. The compiled kernel, a tf.function, would capture such a
            # variable instead of taking it as an input, so variables of the
            # same shape, which share one trace, would all update the first
            # one's slots.
            slots = {n: _on_device(strategy, s, var.device) for n, s in slots.items()}
            return self._kernel(var, grad, slots, *args)

        return kernel

    def _update_variable(self, var, grad, slots, lr, step, scale, ok):
        """One variable's update on one device: decay, rule, then assign."""
        dtype = var.dtype
        g = tf.cast(grad, dtype)
        if scale is not None:
            g = g * tf.cast(scale, dtype)
        lr = tf.cast(lr, dtype)
        p = tf.convert_to_tensor(var)
        if self.weight_decay:
            p = p - lr * self.weight_decay * p
        old = {n: tf.convert_to_tensor(s) for n, s in slots.items()}
        new_p, new_slots = self.update_step(g, p, old, lr, tf.cast(step, dtype))
        if ok is not None:
            # A select, not a tf.cond: branch-free, so it fuses under XLA.
            keep = tf.logical_not(ok)
            new_p = tf.where(keep, tf.convert_to_tensor(var), new_p)
            new_slots = {n: tf.where(keep, old[n], new_slots[n]) for n in old}
        var.assign(new_p)
        for n, s in slots.items():
            s.assign(new_slots[n])


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
        if isinstance(g, tf.IndexedSlices):
            g = tf.convert_to_tensor(g)
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


def _on_device(strategy, value, device):
    """The copy of a distributed variable on `device`; other values as they are."""
    if not isinstance(value, tf.distribute.DistributedValues):
        return value
    for copy in strategy.experimental_local_results(value):
        if copy.device == device:
            return copy
    raise RuntimeError(f"{value.name}: no copy on {device}.")


def _counter(name):
    return tf.Variable(0, dtype=tf.int64, trainable=False, name=name)


def _snake_case(name: str) -> str:
    return (
        re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower().replace("adam_w", "adamw")
    )
