"""The compiled loops: ``steps_per_loop`` training steps, or evaluation batches.

Python runs once per loop call, not per step. Each replica computes its
local mean loss and gradients and hands them to the optimizer with its
example count (which ``weighted_mean`` needs to stay exact when a partial
batch splits unevenly); metrics go into per-replica running :class:`Sums`.
"""

from __future__ import annotations

import tensorflow as tf

from distopt import data as data_lib
from distopt import distribute
from distopt.trainer.strategy import resolve_jit_compile


class Sums(tf.Module):
    """Per-replica running sums (loss, correct, count) of one metric stream.

    On-read-synchronised variables: each replica adds to its own copy with no
    communication; reading in cross-replica context sums over replicas (and
    workers). Not checkpointed.
    """

    def __init__(self, name):
        super().__init__(name=name)
        self.vars = {
            key: tf.Variable(
                0.0,
                trainable=False,
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.SUM,
                name=key,
            )
            for key in ("loss", "correct", "count")
        }

    def add(self, loss, correct, count):
        self.vars["loss"].assign_add(loss)
        self.vars["correct"].assign_add(correct)
        self.vars["count"].assign_add(count)

    def result(self) -> dict[str, float]:
        """Reads and resets; returns mean loss, accuracy and example count."""
        values = {k: float(v.read_value()) for k, v in self.vars.items()}
        for v in self.vars.values():
            v.assign(0.0)
        n = max(values["count"], 1.0)
        return {
            "loss": values["loss"] / n,
            "accuracy": values["correct"] / n,
            "examples": values["count"],
        }


def loss_and_metrics(model, images, labels, mask=None, training=False):
    """Summed loss, summed hits and the example count of one batch."""
    logits = model(images, training=training)
    per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
    hits = tf.cast(
        tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32
    )
    if mask is None:
        count = tf.cast(tf.shape(labels)[0], tf.float32)
    else:
        per_example, hits, count = per_example * mask, hits * mask, tf.reduce_sum(mask)
    return tf.reduce_sum(per_example), tf.reduce_sum(hits), count


def _gradient_step(model, optimizer, sums, guard, compile_part):
    """A replica's step through ``apply_gradients``."""
    variables = model.trainable_variables

    def grads_and_metrics(images, labels):
        with tf.GradientTape() as tape:
            loss_sum, correct, count = loss_and_metrics(
                model, images, labels, training=True
            )
            # The local mean: aggregation across replicas is the optimizer's job.
            loss = loss_sum / tf.maximum(count, 1.0)
            # Loss scaling (float16); the optimizer divides it out again.
            scaled = optimizer.scale_loss(loss)
        return tape.gradient(scaled, variables), loss_sum, correct, count

    if compile_part:
        grads_and_metrics = tf.function(grads_and_metrics, jit_compile=True)

    def step_fn(images, labels):
        grads, loss_sum, correct, count = grads_and_metrics(images, labels)
        optimizer.apply_gradients(grads, variables, weight=count)
        sums.add(loss_sum, correct, count)
        if guard is not None:
            guard.watch_loss(loss_sum)

    return step_fn


def _minimize_step(model, optimizer, sums, guard, compile_part):
    """A replica's step through ``minimize`` (SAM, Heun: ``needs_loss``).

    They call ``loss_fn`` more than once per step; the metrics are those of
    the first call, at the parameters the step starts from, as with
    ``apply_gradients``. Under a multi-replica strategy the forward pass is
    the XLA program (the optimizer differentiates it).
    """
    variables = model.trainable_variables

    def forward(images, labels):
        return loss_and_metrics(model, images, labels, training=True)

    if compile_part:
        forward = tf.function(forward, jit_compile=True)

    def step_fn(images, labels):
        first = []

        def loss_fn():
            loss_sum, correct, count = forward(images, labels)
            if not first:
                first.append((loss_sum, correct, count))
            return loss_sum / tf.maximum(count, 1.0)

        count = tf.cast(tf.shape(labels)[0], tf.float32)
        optimizer.minimize(loss_fn, variables, weight=count)
        sums.add(*first[0])
        if guard is not None:
            guard.watch_loss(first[0][0])

    return step_fn


def _replica_step(strategy, model, optimizer, sums, guard, jit_compile):
    """One replica's step, with the part XLA compiles chosen by strategy.

    With ``jit_compile`` the forward and backward pass is one XLA program (the
    optimizer's update kernels are XLA already); under a single-replica
    strategy the whole step, update included, is. Under a multi-replica
    strategy the optimizer's cross-replica ``merge_call`` stays outside XLA.
    On TPU, ``strategy.run`` compiles everything anyway.
    """
    tpu = distribute.is_tpu(strategy)
    # Not for a single-worker multi_worker cluster (an elastic resume on one
    # worker): its optimizer still merge_calls, which cannot run inside the
    # nested compiled function.
    whole = (
        jit_compile
        and strategy.num_replicas_in_sync == 1
        and not tpu
        and not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    )
    build = (
        _minimize_step if getattr(optimizer, "needs_loss", False) else _gradient_step
    )
    step_fn = build(
        model,
        optimizer,
        sums,
        guard,
        compile_part=jit_compile and not whole and not tpu,
    )
    return tf.function(step_fn, jit_compile=True) if whole else step_fn


def make_train_loop(
    strategy, model, optimizer, sums, step, *, jit_compile=None, guard=None, feed=None
):
    """The compiled training loop: ``loop(inputs, num_steps)``.

    Runs ``num_steps`` steps in one ``tf.function`` (a ``tf.range`` loop).
    ``feed`` says where each step's batch comes from (``data.InMemoryFeed``
    or ``data.DatasetFeed``; None: ``inputs`` is a distributed iterator);
    ``inputs`` is ``feed.inputs()``. ``jit_compile=None`` decides by device
    type (:func:`resolve_jit_compile`). Optimizers that evaluate the loss
    themselves (``needs_loss``: SAM, Heun) get ``optimizer.minimize``.
    """
    jit_compile = resolve_jit_compile(jit_compile, strategy, _compute_dtype(model))
    step_fn = _replica_step(strategy, model, optimizer, sums, guard, jit_compile)
    feed = feed or data_lib.DatasetFeed(None)
    variables = model.trainable_variables
    counting_skips = guard is not None and guard.policy == "skip"

    def replica_step(*args):
        step_fn(*feed.replica_batch(*args))

    @tf.function
    def loop(inputs, num_steps):
        skipped = tf.constant(0, tf.int64)  # Autograph: defined before the loop.
        first = tf.identity(step)
        state = feed.start(first)
        for i in tf.range(num_steps):
            if counting_skips:
                skipped = optimizer.skipped_steps.read_value()
            args, state = feed.next(inputs, state, first + i)
            strategy.run(replica_step, args=args)
            if counting_skips:
                guard.count_skips(skipped)
        if guard is not None:
            strategy.run(guard.watch_weights, args=(variables,))
        step.assign_add(tf.cast(num_steps, tf.int64))

    return loop


def make_eval_loop(strategy, model, sums, *, jit_compile=None):
    """The compiled evaluation: ``evaluate(iterator, num_steps)`` fills ``sums``.

    The test set comes padded to whole batches with a 0/1 mask (static shapes
    for XLA and TPUs); summing masked losses and hits over replicas gives the
    exact test metrics however the last batch falls.
    """

    def metrics(images, labels, mask):
        return loss_and_metrics(model, images, labels, mask)

    jit = resolve_jit_compile(jit_compile, strategy, _compute_dtype(model))
    if jit and not distribute.is_tpu(strategy):
        metrics = tf.function(metrics, jit_compile=True)

    def replica_step(batch):
        sums.add(*metrics(*batch))

    @tf.function
    def evaluate(iterator, num_steps):
        for _ in tf.range(num_steps):
            strategy.run(replica_step, args=(next(iterator),))

    return evaluate


def _compute_dtype(model):
    """The model's compute dtype (float32 for a model that does not say)."""
    return getattr(model, "compute_dtype", tf.float32)
