"""A tiny least-squares workload for aggregation and sync tests.

Shared by the in-process tests and the multi-worker subprocesses, so that a
2-worker run and a 2-replica MirroredStrategy run execute the same program.
Each replica gets a padded batch with a mask, so per-replica batch sizes can
differ without retracing.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

import distopt

DIM_IN, DIM_OUT = 3, 2


def make_data(num_steps, num_replicas, max_batch=6, seed=0, uneven=False):
    """x, y of shape [steps, replicas, max_batch, .], and counts [steps, replicas]."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_steps, num_replicas, max_batch, DIM_IN))
    w_true = rng.normal(size=(DIM_IN, DIM_OUT))
    y = x @ w_true + 0.1 * rng.normal(
        size=(num_steps, num_replicas, max_batch, DIM_OUT)
    )
    if uneven:
        n = rng.integers(1, max_batch + 1, size=(num_steps, num_replicas))
    else:
        n = np.full((num_steps, num_replicas), max_batch)
    return x.astype(np.float32), y.astype(np.float32), n.astype(np.int32)


def initial_params(seed=1):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(DIM_IN, DIM_OUT)).astype(np.float32),
        rng.normal(size=(DIM_OUT,)).astype(np.float32),
    )


def local_loss(w, b, x, y, n):
    """Mean over the first n rows of 0.5 * ||x w + b - y||^2."""
    mask = tf.cast(tf.range(tf.shape(x)[0]) < n, x.dtype)
    err = tf.matmul(x, w) + b - y
    return 0.5 * tf.reduce_sum(mask[:, None] * err**2) / tf.cast(n, x.dtype)


def train(
    strategy,
    make_optimizer,
    x,
    y,
    n,
    weighted=False,
    function=True,
    state=None,
    build=True,
    step=None,
):
    """Runs len(x) steps; returns (params, optimizer, step_fn).

    x[s, r] is replica r's batch at step s. `state` (params, optimizer) lets a
    caller continue an earlier run; `step`, the step_fn that run returned,
    continues it with the same (already traced) function, as a trainer does
    after a save, instead of tracing a new one (`x`, `y`, `n` must keep their
    shapes, and `weighted` its value). `build`: build the optimizer before the
    first step, as the trainer does; False: it builds inside the first step
    (in the `tf.function`, which TensorFlow then traces twice, behind a
    condition: about 3 times the CPU). One test per sync mode in
    test_sync.py and the 2-worker runs build lazily; the others build first.
    """
    num_replicas = strategy.num_replicas_in_sync
    if state is None:
        w0, b0 = initial_params()
        with strategy.scope():
            params = [tf.Variable(w0, name="w"), tf.Variable(b0, name="b")]
            opt = make_optimizer()
            if build:
                opt.build(params)
    else:
        params, opt = state
    if step is not None:
        if state is None:
            raise ValueError("step: continues a run; pass its state too")
        return _run_steps(step, x, y, n, params, opt)

    def replica_fn(xs, ys, ns):
        ctx = tf.distribute.get_replica_context()
        rid = ctx.replica_id_in_sync_group if num_replicas > 1 else 0
        xr, yr, nr = xs[rid], ys[rid], ns[rid]
        with tf.GradientTape() as tape:
            loss = local_loss(params[0], params[1], xr, yr, nr)
        grads = tape.gradient(loss, params)
        opt.apply_gradients(grads, params, weight=nr if weighted else None)

    def step(xs, ys, ns):
        strategy.run(replica_fn, args=(xs, ys, ns))

    if function:
        step = tf.function(step)
    return _run_steps(step, x, y, n, params, opt)


def _run_steps(step, x, y, n, params, opt):
    """Calls `step` on each step's batches; returns `train`'s triple."""
    for s in range(len(x)):
        step(tf.constant(x[s]), tf.constant(y[s]), tf.constant(n[s]))
    return params, opt, step


def numpy_grads(w, b, x, y, n):
    """Gradient of `local_loss` in NumPy."""
    x, y = x[:n], y[:n]
    err = x @ w + b - y
    return x.T @ err / n, err.mean(axis=0)


def optimizer(name="gradient_descent", **kwargs):
    kwargs.setdefault("learning_rate", 0.1)
    return distopt.optimizers.get(name, **kwargs)
