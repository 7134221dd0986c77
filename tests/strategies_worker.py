"""distopt's eager paths after another strategy ran collectives in this process.

Run by tests/test_many_strategies.py in a fresh process: TensorFlow gives
every strategy of a process the same collective keys, so once a
MirroredStrategy with its default cross-device ops (RING collectives between
virtual CPUs) has trained with Keras `fit` and run an eager all-reduce, the
process is "dirty" for the rest of its life; the test suite's own processes
must not become so. Each scenario then creates its own new default-ops
strategy and uses one of distopt's eager, cross-replica paths. Every
scenario runs even if an earlier one failed; the results (values read back,
or the error) go to the JSON file named by argv[1]. The test compares them
with NumPy references.

    python tests/strategies_worker.py OUT.json [scenario ...]
"""

import json
import logging
import os
import sys
import tempfile
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import sharded_harness
import tensorflow as tf

import distopt
from distopt import hardware_check as hc
from distopt import keras as dk

TWO = ["/cpu:0", "/cpu:1"]
THREE = [*TWO, "/cpu:2"]
LR = 0.1
X = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
Y = (X.sum(axis=1) > 0).astype(np.int32)


def default_ops(devices=TWO):
    """A MirroredStrategy with its default cross-device ops (not distopt's)."""
    return tf.distribute.MirroredStrategy(devices)


def copies(strategy, v):
    return [np.asarray(c).tolist() for c in strategy.experimental_local_results(v)]


def dirty_the_process():
    """Keras `fit` and an eager all-reduce on a default-ops MirroredStrategy."""
    strategy = default_ops()
    with strategy.scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)])
        model.compile(optimizer="sgd", loss="mse")
    model.fit(X, np.zeros((64, 4), np.float32), batch_size=16, verbose=0)
    # Not `strategy.run` eagerly: its warning would count against the 5 that
    # TensorFlow prints (see `callback_warning`).
    ones = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.ones([5])
    )
    strategy.extended.batch_reduce_to(tf.distribute.ReduceOp.SUM, [(ones, ones)])


class _Warnings(logging.Handler):
    """Collects TensorFlow's warning messages while installed."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("tensorflow").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("tensorflow").removeHandler(self)


def sync_callback(strategy=None):
    """`evaluate` with SyncCallback after `fit` with DiLoCo, mid-period."""
    strategy = strategy or default_ops()
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        opt = distopt.optimizers.GradientDescent(
            LR, sync=distopt.sync.DiLoCo(3), jit_compile=False
        )
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        model.compile(optimizer=dk.wrap(opt), loss=loss, jit_compile=False)
    # 4 steps of 16: an average at step 3, then one local step.
    model.fit(X, Y, batch_size=16, shuffle=False, verbose=0)
    before = [copies(strategy, w.value) for w in model.trainable_weights]
    with _Warnings() as warned:
        for _ in range(2):
            evaluated = model.evaluate(
                X, Y, batch_size=64, verbose=0, callbacks=[dk.SyncCallback()]
            )
    after = [copies(strategy, w.value) for w in model.trainable_weights]
    return {
        "before": before,
        "after": after,
        "loss": float(evaluated),
        "warnings": warned.messages,
    }


def callback_warning():
    """`sync_callback` on a keyless strategy: only its warnings matter here."""
    keyless = tf.distribute.MirroredStrategy(
        TWO, cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
    return {"warnings": sync_callback(keyless)["warnings"]}


def local_sgd_run(strategy, steps):
    """GradientDescent + LocalSGD(3) on one variable; replica r's gradient is r + 1."""
    with strategy.scope():
        var = tf.Variable(tf.zeros([3]))
        opt = distopt.optimizers.GradientDescent(
            LR, sync=distopt.sync.LocalSGD(3), jit_compile=False
        )
        opt.build([var])

    @tf.function
    def step():
        def replica_fn():
            ctx = tf.distribute.get_replica_context()
            r = tf.cast(ctx.replica_id_in_sync_group, tf.float32)
            opt.apply_gradients([tf.ones([3]) * (r + 1.0)], [var])

        strategy.run(replica_fn)

    for _ in range(steps):
        step()
    return var, opt


def snapshot():
    """`snapshot_replicas` after 2 local steps of LocalSGD(3)."""
    strategy = default_ops()
    var, opt = local_sgd_run(strategy, steps=2)
    own = copies(strategy, var)
    opt.snapshot_replicas([var])
    return {
        "own": own,
        "snapshot_step": int(opt.sync.snapshot_step.numpy()),
        "rows": copies(strategy, opt.sync.snapshots[0][0]),
    }


def restore():
    """`restore_replicas` of a 3-replica snapshot on 3, then on 2 replicas.

    The snapshot is taken under a keyless strategy, so that this scenario
    tests the restore alone.
    """
    saver = tf.distribute.MirroredStrategy(
        THREE, cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
    var, opt = local_sgd_run(saver, steps=2)
    out = {"own": copies(saver, var)}
    opt.snapshot_replicas([var])
    with tempfile.TemporaryDirectory() as tmp:
        path = tf.train.Checkpoint(v=var, opt=opt).save(os.path.join(tmp, "c"))
        for name, devices in (("same", THREE), ("two", TWO)):
            strategy = default_ops(devices)
            fresh, fresh_opt = local_sgd_run(strategy, steps=0)
            tf.train.Checkpoint(v=fresh, opt=fresh_opt).restore(path)
            try:
                fresh_opt.restore_replicas([fresh])
                out[name] = copies(strategy, fresh)
            except Exception:  # noqa: BLE001  Reported; the next one still runs.
                out[name] = {"error": traceback.format_exc(limit=2)}
    return out


def hardware_checks():
    """Every check of `distopt.hardware_check` on 2 virtual CPUs."""
    platform = hc.make_platform(cpu_devices=2)
    with open(os.devnull, "w") as quiet:
        rows = hc.run_checks(platform, out=quiet)
    return [{"key": r.key, "passed": r.passed, "detail": r.detail} for r in rows]


def sharded():
    """Sharded optimizer state, eagerly (tests/sharded_harness.py)."""
    with tempfile.TemporaryDirectory() as tmp:
        return sharded_harness.eager_scenario(default_ops(), tmp)


SCENARIOS = {
    "callback_warning": callback_warning,
    "sync_callback": sync_callback,
    "snapshot": snapshot,
    "restore": restore,
    "hardware_checks": hardware_checks,
    "sharded": sharded,
}


def main(out_path, names):
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * 3,
    )
    dirty_the_process()
    results = {}
    for name in names or SCENARIOS:
        try:
            results[name] = SCENARIOS[name]()
        except Exception:  # noqa: BLE001  Reported; the next scenario still runs.
            results[name] = {"error": traceback.format_exc(limit=3)}
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
