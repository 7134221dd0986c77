"""distopt inside Keras 3 `model.fit` (TensorFlow backend).

`wrap(optimizer)` turns a distopt optimizer into a `keras.optimizers.Optimizer`
that `model.compile` accepts. `fit` then trains with distopt's aggregation
(`mean`, `sum`, `weighted_mean`), its transforms (clipping after the reduce,
consistent non-finite skips) and its sync modes (`Accumulate`, `LocalSGD`,
`DiLoCo`, ...), under the default strategy, `MirroredStrategy` and
`MultiWorkerMirroredStrategy`.

How Keras's conventions are kept:

* **The same update as Keras's own optimizer.** Under a strategy with R
  replicas, Keras divides each replica's loss by R and *sums* the gradients
  across replicas. Keras's `train_step` passes the loss through
  `optimizer.scale_loss` before taking gradients; the wrapper multiplies it
  back by R there (for `mean` and `weighted_mean`), so each replica's
  gradient is that of its own mean loss and distopt's mean over replicas is
  exactly Keras's sum of the scaled gradients. With `aggregation="sum"` the
  loss is left as Keras scaled it, so the sum is again Keras's. A custom
  `train_step` must call `self.optimizer.scale_loss(loss)` as Keras's own does
  (its `loss_scale_factor` needs that too).
* **Weighted mean with no argument.** With `aggregation="weighted_mean"`,
  `scale_loss` also records this replica's number of examples (the leading
  dimension of the batch that Keras's `train_step` received) and
  `apply_gradients` passes it as the replica's weight. Keras splits a last,
  partial batch unevenly across replicas (even leaving a replica empty); the
  update is then the mean over all the batch's examples, as on one device,
  where Keras's own optimizer averages the replicas' means. A custom
  `train_step` may pass `apply_gradients(..., weight=n)` itself.
* **Loss scaling.** `scale_loss` also applies the distopt optimizer's own
  `loss_scale`, whose transform divides it out of the aggregated gradient
  (one finite verdict for every replica). Keras's `LossScaleOptimizer`
  (what `compile` puts around an optimizer under a `mixed_float16` policy)
  does not call the wrapper's `scale_loss`; `apply_gradients` refuses a
  loss that skipped it wherever that gives a wrong update, naming
  `compile(auto_scale_loss=False)` with `loss_scale="dynamic"`.
* **Learning rate and step.** `learning_rate` is Keras's: a variable that
  `ReduceLROnPlateau` and `LearningRateScheduler` can read and set, or a
  `keras.optimizers.schedules.LearningRateSchedule` (or a distopt schedule),
  called with `iterations`. `iterations` is the distopt optimizer's own
  counter of applied updates: with `Accumulate(k)` it advances once per k
  batches, and skipped non-finite steps do not count.
* **Saving.** `model.save`, `save_weights`, `ModelCheckpoint` and
  `BackupAndRestore` store the learning rate and every state variable of the
  distopt optimizer (slots, counters, accumulators, anchors, outer momentum).
  For the modes whose replicas diverge by design (local SGD, DiLoCo,
  hierarchical) every save first calls `snapshot_replicas`, and every load
  ends with `restore_replicas`: a resumed run equals one that never stopped,
  and saving does not change the run (no early average). The model weights
  in such a file are replica 0's; the optimizer state holds every replica's.
  Loaded on a different number of replicas (one, for inference), every
  replica starts from the saved replicas' average. For Sequential and
  functional models Keras loads the layers before the optimizer, which
  `restore_replicas` needs.
* **Evaluation under local SGD and DiLoCo.** Add `SyncCallback()` to `fit`'s
  (and `evaluate`'s, `predict`'s) callbacks: before evaluation it sets every
  replica's weights to the replicas' average, and after it gives every
  replica its own weights back. Evaluation thus reports the averaged model,
  and training goes on exactly as without evaluation. Averaging in place
  (`synchronize`) would instead end the period early and change the run.
  An evaluation that raised keeps the average; once training went on from
  it, the next evaluation drops the stale copy with a WARNING.
* **MultiWorkerMirroredStrategy.** The wrapper works there, but Keras 3.15's
  `fit` does not, whatever the optimizer (tensorflow#72388); see
  tests/keras_mw_worker.py for the two workarounds its test uses.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from distopt import compression as compression_lib
from distopt import distribute as dist
from distopt import optimizers as optimizers_lib
from distopt import ownership
from distopt.optimizers import schedules as schedules_lib

# Sync modes whose replicas hold different weights between averages.

# Each replica of MirroredStrategy traces its step in its own thread, so what
# `scale_loss` learns about this replica's batch for `apply_gradients` is
# kept per thread.
_replica_local = threading.local()


@keras.saving.register_keras_serializable(package="distopt")
class DistoptSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A distopt schedule (a callable of the step) as a Keras schedule.

    Args:
        schedule: A `distopt.optimizers.schedules.Schedule`, its serialized
            form, or any callable of the int64 step (not serializable then).
    """

    def __init__(self, schedule):
        self.schedule = schedules_lib.deserialize(schedule)
        if not callable(self.schedule):
            raise ValueError(  # noqa: TRY004 (every bad argument is a ValueError)
                f"schedule: must be callable, got {schedule!r}."
            )

    def __call__(self, step):
        return self.schedule(step)

    def get_config(self):
        config = schedules_lib.serialize(self.schedule)
        if callable(config):
            raise ValueError(  # noqa: TRY004
                f"schedule: {self.schedule!r} is not a distopt schedule and "
                "cannot be saved; use one of distopt.optimizers.schedules or a "
                "keras.optimizers.schedules.LearningRateSchedule."
            )
        return {"schedule": config}


@keras.saving.register_keras_serializable(package="distopt")
class KerasOptimizer(keras.optimizers.Optimizer):
    """A distopt optimizer as a Keras 3 optimizer; build it with `wrap`.

    Args:
        optimizer: A `distopt.optimizers.Optimizer`, or its spec
            `{"class": ..., "config": ...}` (as in `get_config`). Create it in
            the strategy's scope, like the model.
        learning_rate: Overrides the distopt optimizer's learning rate: a
            float or a Keras schedule (used by `from_config`).
        name: The optimizer's name; the distopt optimizer's by default.
    """

    def __init__(self, optimizer, learning_rate=None, name=None, **kwargs):
        # Keras's generic config keys, at their defaults, come back through
        # `from_config`; anything else would silently do nothing here.
        unsupported = {k: v for k, v in kwargs.items() if v not in (None, False)}
        if unsupported:
            raise ValueError(
                f"{', '.join(sorted(unsupported))}: not supported by "
                "distopt.keras.wrap; set clipping, weight decay, the moving "
                "average and accumulation on the distopt optimizer."
            )
        if isinstance(optimizer, dict):
            optimizer = _from_spec(optimizer)
        if not isinstance(optimizer, optimizers_lib.Optimizer):
            raise ValueError(  # noqa: TRY004
                "optimizer: expected a distopt.optimizers.Optimizer, got "
                f"{type(optimizer).__name__}."
            )
        if getattr(optimizer, "_built", False):
            raise ValueError("optimizer: wrap it before it is built or used.")
        if getattr(optimizer, "needs_loss", False):
            raise ValueError(
                f"optimizer: {type(optimizer).__name__} needs the loss, not "
                "gradients, which Keras's fit does not give an optimizer; call "
                "its minimize(loss_fn, variables) in a custom training loop."
            )
        # A second wrap (a notebook's compile cell run again) would read the
        # first wrapper's learning rate as a schedule: setting the rate and
        # model.save failed.
        ownership.check_free([(optimizer, "optimizer")])
        # Captured before the learning rate is replaced by a reader of
        # Keras's (which is not serializable).
        spec = optimizer.spec()
        lr = optimizer.learning_rate if learning_rate is None else learning_rate
        if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
            # Keras serializes it with this optimizer's `learning_rate`, which
            # overrides the distopt config's on `from_config`.
            spec["config"]["learning_rate"] = 0.0
        elif callable(lr):
            lr = DistoptSchedule(lr)
        elif isinstance(lr, tf.Variable):
            # Keras keeps a variable of its own; assigning the user's would
            # silently change nothing.
            raise ValueError(  # noqa: TRY004 (every bad argument is a ValueError)
                "learning_rate: a tf.Variable is not followed inside Keras; "
                "pass a float (then set model.optimizer.learning_rate, as "
                "Keras's callbacks do) or a schedule."
            )
        else:
            lr = float(lr)
        super().__init__(learning_rate=lr, name=name or optimizer.name)
        self._spec = spec
        self._aggregation = spec["config"].get("aggregation") or "mean"
        self._inner = optimizer
        # distopt reads its learning rate at every update through this, so
        # Keras's variable (set by callbacks) or schedule is the one in use.
        optimizer.learning_rate = self._learning_rate_at
        self._model_vars = _Holder([])
        ownership.claim(optimizer, "optimizer", f"Keras optimizer {self.name!r}")

    # --- What Keras calls -----------------------------------------------------

    @property
    def distopt_optimizer(self) -> optimizers_lib.Optimizer:
        """The wrapped distopt optimizer."""
        return self._inner

    @property
    def iterations(self):
        """Updates applied (distopt's counter; not batches seen)."""
        return self._inner.iterations

    def _learning_rate_at(self, step):
        lr = self._learning_rate
        if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
            return lr(step)
        if isinstance(lr, keras.Variable):
            return lr.value
        return lr() if callable(lr) else lr

    def _get_current_learning_rate(self):
        # Keras's base evaluates schedules at its own counter, which this
        # class does not advance.
        if isinstance(self._learning_rate, keras.Variable):
            return self._learning_rate
        return self._learning_rate_at(self.iterations)

    def build(self, variables):
        """Creates the distopt optimizer's state for `variables`, once."""
        if self.built:
            return
        if (
            tf.distribute.has_strategy()
            and tf.distribute.get_strategy() is not self._distribution_strategy
        ):
            # Made outside the model's scope: its state would live outside the
            # replicas (Keras's learning rate on one device, which an XLA
            # update on another cannot read), and entering its own scope
            # inside fit's is TensorFlow's "Must not nest" error.
            raise ValueError(
                "optimizer: made outside the strategy scope the model trains "
                "in; create it (and wrap it) inside `with strategy.scope():`, "
                "like the model. Nothing was built."
            )
        self._build_keras_side(variables)
        with self._distribution_strategy.scope():
            self._inner.build(self._model_vars.items)

    def _build_keras_side(self, variables):
        super().build(variables)
        self._model_vars.items = [_tf_variable(v) for v in variables]

    def scale_loss(self, loss):
        """Undoes Keras's division of the loss by the replica count (see module doc).

        Also records, for `weighted_mean`, this replica's number of examples.
        """
        loss = super().scale_loss(loss)
        # Kept with its graph, for this replica's next `apply_gradients`: a
        # later trace must not pick up a tensor of an earlier one.
        examples = None
        if self._aggregation == "weighted_mean":
            examples = _examples_in_train_step()
        _replica_local.scaled = (_current_graph(), examples)
        if self._aggregation != "sum":
            replicas = dist.current_strategy().num_replicas_in_sync
            if replicas > 1:
                loss = loss * tf.cast(replicas, loss.dtype)
        # The distopt optimizer's own loss_scale, which its first transform
        # divides out of the aggregated gradient.
        return self._inner.scale_loss(loss)

    def apply_gradients(self, grads_and_vars, weight=None):
        """Applies one step through the distopt optimizer; inside `strategy.run`.

        Args:
            grads_and_vars: `(gradient, variable)` pairs of the model's
                variables.
            weight: This replica's weight for `weighted_mean`; by default the
                number of examples Keras's `train_step` gave this replica.

        Returns:
            `iterations`.
        """
        pairs = list(grads_and_vars)
        variables = [v for _, v in pairs]
        if not self.built:
            # Keras's fit builds before the first step. Elsewhere the first
            # call may come from inside strategy.run, where `build` cannot
            # run; the distopt optimizer then builds itself in its merge_call.
            self._build_keras_side(variables)
        tf_vars = self._tf_variables(variables, "grads_and_vars")
        weight = self._check_scaled(weight)
        self._inner.apply_gradients(
            [(g, v) for (g, _), v in zip(pairs, tf_vars)], weight=weight
        )
        return self.iterations

    def _check_scaled(self, weight):
        """`weight`, or this replica's examples from `scale_loss`.

        Raises ValueError where `scale_loss` did not run and the update would
        be wrong: 1/R of Keras's with R replicas, or without its loss scale.
        Keras's `LossScaleOptimizer` (which `compile` puts around this one
        under a `mixed_float16` policy) does not call it.
        """
        graph, examples = getattr(_replica_local, "scaled", None) or (None, None)
        _replica_local.scaled = None
        if graph is _current_graph():
            return examples if weight is None else weight
        replicas = dist.current_strategy().num_replicas_in_sync
        if (
            (self._aggregation != "sum" and replicas > 1)
            or self._inner.loss_scale is not None
            or (self._aggregation == "weighted_mean" and weight is None)
        ):
            raise ValueError(
                "grads_and_vars: from a loss that did not go through "
                "scale_loss. Call self.optimizer.scale_loss(loss) in a custom "
                "train_step, as Keras's does (with weighted_mean, or pass "
                "apply_gradients(..., weight=examples)). Under a mixed_float16 "
                "policy, compile(..., auto_scale_loss=False) and give the "
                "distopt optimizer loss_scale='dynamic': Keras's "
                "LossScaleOptimizer does not call it."
            )
        return weight

    def finalize_variable_values(self, var_list):
        """What `fit` calls at its end: the moving average into the variables.

        See the distopt optimizer's `use_ema`; a no-op without it.
        """
        if not self.built:
            return
        self._inner.finalize_variable_values(self._tf_variables(var_list, "var_list"))

    def _tf_variables(self, variables, argument):
        """The distopt optimizer's `tf.Variable` behind each Keras variable."""
        index = self._trainable_variables_indices
        unknown = [v.path for v in variables if self._var_key(v) not in index]
        if unknown:
            # One optimizer per model, built once (Keras's rule too): another
            # model, or a layer unfrozen after the build, needs a new one.
            raise ValueError(
                f"{argument}: {unknown[:4]}{' ...' if len(unknown) > 4 else ''} "
                "not among the variables this optimizer was built with; compile "
                "with a new optimizer for another model or another set of "
                "trainable weights."
            )
        return [self._model_vars.items[index[self._var_key(v)]] for v in variables]

    def apply(self, grads, trainable_variables=None):
        """Keras's `apply(grads, vars)`: the same as `apply_gradients`."""
        if trainable_variables is None:
            trainable_variables = self._trainable_variables
        return self.apply_gradients(zip(grads, trainable_variables))

    # --- Saving ---------------------------------------------------------------

    def _state(self):
        """The distopt optimizer's variables, in a fixed order (not the model's)."""
        return self._inner.state_variables()

    def save_own_variables(self, store):
        """Writes the learning rate and the distopt state (see module doc)."""
        if isinstance(self._learning_rate, keras.Variable):
            store["learning_rate"] = self._learning_rate.numpy()
        if not self.built:
            return
        variables = self._model_vars.items
        # Every replica's own weights and slots go into the optimizer's
        # state, so that a mid-period save resumes exactly; those kept while
        # the average is in place (after fit's validation) too.
        with self._own_weights_in_place():
            self._inner.snapshot_replicas(variables)
            for i, v in enumerate(self._state()):
                store[f"state_{i}"] = v.numpy()
            # Written, the rows are freed (the values stay): weights that a
            # callback sets later (EarlyStopping's best) failed the next
            # step's check for a forgotten restore_replicas, which
            # load_own_variables never forgets.
            self._inner.restore_replicas(variables)

    @contextlib.contextmanager
    def _own_weights_in_place(self):
        """The replicas' own weights in place, if the average stands in."""
        own = getattr(self, "_own_weights", None)
        if own is None:
            yield
            return
        strategy, variables = self._distribution_strategy, self._model_vars.items
        with strategy.scope():
            dist.assign(strategy, variables, own.items)
        try:
            yield
        finally:  # A save that failed leaves the average in place, as it was.
            with strategy.scope():
                dist.assign(strategy, variables, self._average.items)

    def load_own_variables(self, store):
        """Reads what `save_own_variables` wrote; gives each replica its own back."""
        # Keras's H5 store has keys() but is not iterable.
        keys = [k for k in store.keys() if k.startswith("state_")]  # noqa: SIM118
        if not self.built:
            if keys:
                warnings.warn(
                    f"Skipping the state of optimizer {self.name!r}: it is not "
                    "built yet (call optimizer.build(model.trainable_variables)).",
                    stacklevel=2,
                )
            return
        # No state saved: it was not built yet (a compiled model saved before
        # its first fit), so its state was the initial one, which this holds.
        state = self._state() if keys else []
        if keys and len(keys) != len(state):
            raise ValueError(
                f"store: holds {len(keys)} state variables for optimizer "
                f"{self.name!r}, which has {len(state)}; was it saved with "
                "another optimizer, sync mode or model?"
            )
        with self._distribution_strategy.scope():
            if "learning_rate" in store and isinstance(
                self._learning_rate, keras.Variable
            ):
                self._learning_rate.assign(np.asarray(store["learning_rate"]))
            for i, v in enumerate(state):
                v.assign(np.asarray(store[f"state_{i}"]))
        self._inner.restore_replicas(self._model_vars.items)

    def get_config(self):
        config = super().get_config()
        return {
            "name": config["name"],
            "learning_rate": config["learning_rate"],
            "optimizer": self._spec,
        }

    # --- Evaluation under divergent sync modes --------------------------------

    def _replicas_may_differ(self):
        return (
            self.built
            and self._inner.sync.diverges
            and self._distribution_strategy.num_replicas_in_sync > 1
        )

    def average_replicas_begin(self):
        """Sets every replica's weights to their average, keeping each one's own.

        `SyncCallback` calls this before evaluation; `average_replicas_end`
        puts every replica's own weights back. Optimizer state is untouched.
        """
        if not self._replicas_may_differ() or self._kept_own_weights():
            return
        strategy = self._distribution_strategy
        variables = self._model_vars.items
        with strategy.scope():
            own = dist.read_per_replica(strategy, variables)
            # The reducer's own mean (counted like every all-reduce); eagerly
            # it needs no collective keys and no eager `strategy.run`.
            mean = self._inner.reducer.mean(strategy, own)
            dist.assign(strategy, variables, mean)
        self._own_weights = _Holder(own)
        self._own_weights_at = int(self.iterations.numpy())
        # The average, put back after a save's snapshot of the own weights,
        # and to tell whether a callback replaced it (EarlyStopping's
        # set_weights) before the own come back.
        self._average = _Holder(mean)

    def _kept_own_weights(self) -> bool:
        """Whether the replicas' own weights are kept from an earlier begin.

        An evaluation that raised (Ctrl-C) never reaches `on_test_end`: its
        copy is kept for the next evaluation, unless training went on from
        the average since; writing it back then would undo those steps.
        """
        if getattr(self, "_own_weights", None) is None:
            return False
        if self._own_weights_at == int(self.iterations.numpy()):
            return True
        logging.warning(
            "%s: an evaluation ended without restoring each replica's own "
            "weights (interrupted?); training went on from their average at "
            "step %d.",
            self.name,
            self._own_weights_at,
        )
        self._own_weights = None
        return False

    def average_replicas_end(self, unless_replaced=False):
        """Gives every replica its own weights back after `average_replicas_begin`.

        Args:
            unless_replaced: Only if the average is still in place; weights a
                callback set since (the same on every replica) stay, and the
                replicas' own copies are dropped.
        """
        own = getattr(self, "_own_weights", None)
        if own is None:
            return
        variables = self._model_vars.items
        self._own_weights = None
        if unless_replaced and not self._average_in_place():
            return
        strategy = self._distribution_strategy
        with strategy.scope():
            dist.assign(strategy, variables, own.items)

    def _average_in_place(self) -> bool:
        """Whether replica 0 still holds the average, bit for bit, on its device."""
        strategy = self._distribution_strategy
        with strategy.scope():
            return all(
                bool(tf.reduce_all(tf.equal(dist.first_local(strategy, v), a)))
                for v, a in zip(
                    self._model_vars.items,
                    (dist.first_local(strategy, m) for m in self._average.items),
                )
            )


class SyncCallback(keras.callbacks.Callback):
    """Evaluation and prediction see the replicas' average (local SGD, DiLoCo).

    Before `evaluate` (also `fit`'s validation) and `predict`, every replica's
    weights are set to the replicas' average; afterwards every replica gets
    its own weights back, so training continues exactly as without the
    evaluation. A no-op for sync modes whose replicas never differ. The
    average is the optimizer's own mean over replicas (counted in
    `allreduce_calls`); eagerly on one host it uses no collective keys, so
    it works after other strategies in the process and without TensorFlow's
    warning about eager `strategy.run`.

    In `fit`, the average stays in place from the validation through the
    epoch's end, whatever the callbacks' order: `EarlyStopping`'s
    `restore_best_weights` and `ModelCheckpoint` see the model that was
    scored (a save still keeps every replica's own weights). The own come
    back before the next epoch, or at the end of `fit`, unless a callback
    replaced the weights meanwhile.
    """

    _fitting = False

    def set_model(self, model):
        # Each fit, evaluate and predict wraps its callbacks anew (fit's
        # validation reuses fit's list): a fit that raised has ended.
        super().set_model(model)
        self._fitting = False

    def _optimizer(self):
        opt = getattr(self.model, "optimizer", None)
        return opt if isinstance(opt, KerasOptimizer) else None

    def _own_back(self, unless_replaced=True):
        if opt := self._optimizer():
            opt.average_replicas_end(unless_replaced=unless_replaced)

    def on_train_begin(self, logs=None):
        self._fitting = True
        self._own_back()

    def on_epoch_begin(self, epoch, logs=None):
        self._own_back()

    def on_train_end(self, logs=None):
        self._fitting = False
        self._own_back()

    def on_test_begin(self, logs=None):
        if opt := self._optimizer():
            opt.average_replicas_begin()

    def on_test_end(self, logs=None):
        if not self._fitting:
            self._own_back(unless_replaced=False)

    def on_predict_begin(self, logs=None):
        self.on_test_begin(logs)

    def on_predict_end(self, logs=None):
        self._own_back(unless_replaced=False)


def wrap(optimizer) -> KerasOptimizer:
    """A distopt optimizer as a Keras 3 optimizer for `model.compile`.

    Create both in the strategy's scope, with the model:

        with strategy.scope():
            model = keras.Sequential([...])
            model.compile(
                optimizer=distopt.keras.wrap(distopt.optimizers.Adam(1e-3)),
                loss="sparse_categorical_crossentropy",
            )

    Args:
        optimizer: A `distopt.optimizers.Optimizer`, not yet used.

    Returns:
        A `KerasOptimizer`; see this module's docstring for the conventions.
    """
    return KerasOptimizer(optimizer)


# --- String identifiers: compile(optimizer="distopt.adam") -------------------


def _from_spec(spec: dict):
    """The optimizer a saved spec names, and its compressor.

    A class passed in `load_model(custom_objects=...)` (or registered with
    Keras) serves as well as distopt's registries.
    """
    config = spec["config"]
    saved = config.get("compression")
    if isinstance(saved, dict) and "class" in saved:
        found = keras.saving.get_registered_object(saved["class"])
        compression = compression_lib.from_config(saved, classes=[found])
        spec = {**spec, "config": {**config, "compression": compression}}
    return optimizers_lib.from_config(
        spec, classes=[keras.saving.get_registered_object(spec["class"])]
    )


class _ByName:
    """Lets Keras deserialize "distopt.<name>" into a wrapped optimizer."""

    def __init__(self, name):
        self.name = name

    def from_config(self, config):
        return wrap(optimizers_lib.get(self.name, **(config or {})))


def _register_names():
    custom = keras.saving.get_custom_objects()
    for name in optimizers_lib.names():
        if name not in ("sam", "heun"):  # they need the loss, not gradients
            custom[f"distopt.{name}"] = _ByName(name)


_register_names()


# --- Helpers -----------------------------------------------------------------


class _Holder:
    """Keeps a list away from Keras's and TensorFlow's attribute tracking."""

    def __init__(self, items):
        self.items = items


def _tf_variable(v):
    """The `tf.Variable` (or distributed variable) behind a Keras variable."""
    return v.value if isinstance(v, keras.Variable) else v


def _current_graph():
    return tf.compat.v1.get_default_graph()


def _examples_in_train_step():
    """This replica's batch size, from the `data` of Keras's `train_step`.

    Keras hands the optimizer the gradients only; the batch is a local of
    `Model.train_step(self, data)` (also under autograph), whose frame is
    a caller of `scale_loss`.
    """
    frame = sys._getframe(2)
    while frame is not None:
        local = frame.f_locals
        if "data" in local and isinstance(local.get("self"), keras.Model):
            x, _, _ = keras.utils.unpack_x_y_sample_weight(local["data"])
            first = next(t for t in tf.nest.flatten(x) if t is not None)
            return tf.shape(first)[0]
        frame = frame.f_back
    return None
