"""`distopt.keras.wrap` inside `keras.Model.fit` (issue 14).

Each claim is checked against an independent reference: Keras's own
optimizer on the same batches, a single-device run, or a NumPy simulation.
Models are one or two Dense layers on a slice of the bundled MNIST; the
distopt optimizers run without XLA (`jit_compile=False`) except in the
parity test, which checks the default path, because compiling a kernel per
variable and device costs more here than the few steps it runs.
"""

import json
import os
import re
import subprocess

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, local_copies, mirrored, run_python, start_python

import distopt
from distopt import data, sync
from distopt import keras as dk

# --- Set-up --------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist():
    images, labels = data.load_mnist_idx("test")
    x = (images[:2000].reshape(-1, 784) / 255.0).astype(np.float32)
    return x, labels[:2000]


@pytest.fixture(scope="module")
def two():
    return mirrored(2)


def _model(strategy, optimizer_fn, hidden=16, seed=0, **compile_args):
    """A Dense model (784 -> hidden -> 10, or 784 -> 10) compiled in scope."""
    with strategy.scope():
        keras.utils.set_random_seed(seed)
        layers = [keras.Input((784,))]
        if hidden:
            layers.append(keras.layers.Dense(hidden, activation="relu"))
        layers.append(keras.layers.Dense(10))
        model = keras.Sequential(layers)
        model.compile(
            optimizer=optimizer_fn(),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            **compile_args,
        )
    return model


def _weights(model):
    return [np.asarray(w) for w in model.trainable_weights]


def _max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def _replica_weights(strategy, model):
    """replica -> list of that replica's copy of each trainable weight."""
    per_var = [local_copies(strategy, w.value) for w in model.trainable_weights]
    return [list(ws) for ws in zip(*per_var)]


# --- Parity with Keras ---------------------------------------------------------

PARITY = {
    "adam": (
        lambda: keras.optimizers.Adam(1e-3),
        lambda: distopt.optimizers.Adam(1e-3),
    ),
    # The moving average: `fit` ends with `finalize_variable_values`, which
    # puts it in the weights compared.
    "adam_ema": (
        lambda: keras.optimizers.Adam(1e-3, use_ema=True, ema_momentum=0.9),
        lambda: distopt.optimizers.Adam(1e-3, use_ema=True, ema_momentum=0.9),
    ),
    # A Keras schedule as the learning rate: it must see the same step.
    "momentum_schedule": (
        lambda: keras.optimizers.SGD(
            keras.optimizers.schedules.ExponentialDecay(0.05, 10, 0.5), momentum=0.9
        ),
        lambda: distopt.optimizers.Momentum(
            keras.optimizers.schedules.ExponentialDecay(0.05, 10, 0.5), momentum=0.9
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(PARITY))
def test_fit_matches_keras_optimizer(mnist, two, name):
    """50 steps of fit: the wrapper's weights equal Keras's within 1e-6."""
    x, y = mnist
    keras_fn, ours_fn = PARITY[name]
    for strategy in (tf.distribute.get_strategy(), two):
        runs = []
        for fn in (keras_fn, lambda: dk.wrap(ours_fn())):
            model = _model(strategy, fn)
            init = _weights(model)
            model.fit(x, y, batch_size=32, steps_per_epoch=50, shuffle=False, verbose=0)
            runs.append(_weights(model))
            assert int(model.optimizer.iterations.numpy()) == 50
        assert _max_diff(runs[0], init) > 1e-2  # it trained
        assert _max_diff(runs[0], runs[1]) <= 1e-6, strategy


def test_compile_jit_compile_on_the_default_strategy_matches_keras(mnist):
    """On the default strategy Keras builds the optimizer inside its train
    function, here an XLA one: slots made there captured their initial
    values, which XLA cannot lift out over 128 elements ("We failed to lift
    variable creations"; 784 x 16 here). They are made eagerly now."""
    x, y = mnist
    keras_fn, ours_fn = PARITY["adam"]
    runs = []
    for fn in (keras_fn, lambda: dk.wrap(ours_fn())):
        model = _model(tf.distribute.get_strategy(), fn, jit_compile=True)
        init = _weights(model)
        model.fit(x, y, batch_size=32, steps_per_epoch=20, shuffle=False, verbose=0)
        runs.append(_weights(model))
        assert int(model.optimizer.iterations.numpy()) == 20
    assert _max_diff(runs[0], init) > 1e-2  # it trained
    assert _max_diff(runs[0], runs[1]) <= 1e-6


# --- Weighted mean with a partial last batch ------------------------------------


@pytest.mark.parametrize("examples", [1001, 897])
def test_weighted_mean_partial_batch_equals_single_device(mnist, two, examples):
    """At batch 128 on 2 replicas, tf.distribute splits the last batch of 1001
    examples (105) 53/52, and that of 897 (1) 1/0: one replica gets nothing.

    (The last batch of 1,000 examples, 104, splits evenly, 52/52.) With
    weighted_mean the update is the single-device mean over the whole batch;
    Keras's own optimizer averages the two replicas' means instead.
    """
    x, y = mnist[0][:examples], mnist[1][:examples]

    def ours():
        return dk.wrap(
            distopt.optimizers.GradientDescent(
                0.5, aggregation="weighted_mean", jit_compile=False
            )
        )

    def theirs():
        return keras.optimizers.SGD(0.5)

    results = {}
    for key, strategy, fn in [
        ("single", tf.distribute.get_strategy(), theirs),
        ("ours", two, ours),
        ("keras", two, theirs),
    ]:
        model = _model(strategy, fn, hidden=0)
        model.fit(x, y, batch_size=128, epochs=1, shuffle=False, verbose=0)
        results[key] = _weights(model)
    assert _max_diff(results["ours"], results["single"]) <= 1e-6
    # The partial batch matters: Keras's mean of means is measurably off.
    assert _max_diff(results["keras"], results["single"]) > 1e-4


# --- Accumulate ------------------------------------------------------------------


def test_accumulate_equals_larger_batch(mnist, two):
    """Accumulate(4) at batch 32 equals Keras's Adam at batch 128, same examples."""
    x, y = mnist[0][:512], mnist[1][:512]
    big = _model(two, lambda: keras.optimizers.Adam(1e-2))
    big.fit(x, y, batch_size=128, epochs=1, shuffle=False, verbose=0)
    acc = _model(
        two,
        lambda: dk.wrap(
            distopt.optimizers.Adam(1e-2, sync=sync.Accumulate(4), jit_compile=False)
        ),
    )
    acc.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    assert int(acc.optimizer.iterations.numpy()) == 4  # updates, not batches
    assert _max_diff(_weights(acc), _weights(big)) <= 1e-6


# --- Local SGD and DiLoCo against NumPy -------------------------------------------

K = 4
LR = 0.5
BATCH = 64  # global: 32 per replica


def _softmax_ce(w, b, x, y):
    """Mean cross-entropy of logits x @ w + b, and its gradients (NumPy, float64)."""
    logits = x @ w + b
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    loss = -np.mean(np.log(p[np.arange(len(y)), y]))
    d = p.copy()
    d[np.arange(len(y)), y] -= 1.0
    d /= len(y)
    return loss, x.T @ d, d.sum(axis=0)


def _simulate(mode, init, x, y, steps):
    """Per-replica weights after each step: local SGD or DiLoCo, 2 replicas.

    Replica r takes rows [32 r, 32 r + 32) of each global batch of 64, as
    tf.distribute splits it. DiLoCo's outer step is Keras's SGD with Nesterov
    momentum 0.9 and rate 0.7 on the pseudo-gradient anchor - average.
    """
    replicas = [[p.astype(np.float64) for p in init] for _ in range(2)]
    anchor = [p.astype(np.float64) for p in init]
    momentum = [np.zeros_like(p) for p in anchor]
    history = []
    for t in range(steps):
        for r, (w, b) in enumerate(replicas):
            rows = slice(t * BATCH + 32 * r, t * BATCH + 32 * (r + 1))
            _, gw, gb = _softmax_ce(w, b, x[rows], y[rows])
            replicas[r] = [w - LR * gw, b - LR * gb]
        if (t + 1) % K == 0:
            average = [(a + c) / 2 for a, c in zip(*replicas)]
            if mode == "diloco":
                for i, (a, m) in enumerate(zip(anchor, average)):
                    g = a - m
                    momentum[i] = 0.9 * momentum[i] - 0.7 * g
                    anchor[i] = a + 0.9 * momentum[i] - 0.7 * g
                average = anchor
            replicas = [[p.copy() for p in average] for _ in range(2)]
        history.append([[p.copy() for p in rep] for rep in replicas])
    return history


class _RecordReplicas(keras.callbacks.Callback):
    def __init__(self, strategy):
        super().__init__()
        self.strategy, self.history = strategy, []

    def on_train_batch_end(self, batch, logs=None):
        self.history.append(_replica_weights(self.strategy, self.model))


@pytest.mark.parametrize("mode", ["local_sgd", "diloco"])
def test_periodic_sync_matches_numpy_and_evaluates_average(mnist, two, mode):
    x, y = mnist
    steps = 2 * K + 2  # two period ends, then two local steps
    sync_mode = sync.LocalSGD(K) if mode == "local_sgd" else sync.DiLoCo(K)
    model = _model(
        two,
        lambda: dk.wrap(
            distopt.optimizers.GradientDescent(LR, sync=sync_mode, jit_compile=False)
        ),
        hidden=0,
    )
    init = _weights(model)
    recorder = _RecordReplicas(two)
    model.fit(
        x[: steps * BATCH],
        y[: steps * BATCH],
        batch_size=BATCH,
        shuffle=False,
        verbose=0,
        callbacks=[recorder],
    )
    want = _simulate(mode, init, x.astype(np.float64), y, steps)
    for t in range(steps):
        for r in range(2):
            got = recorder.history[t][r]
            assert _max_diff(got, want[t][r]) <= 2e-5, (t, r)
    # Mid-period the replicas differ; evaluate reports their average.
    replicas = want[-1]
    assert _max_diff(replicas[0], replicas[1]) > 1e-3
    xe, ye = x[1000:1512].astype(np.float64), y[1000:1512]
    average = [(a + b) / 2 for a, b in zip(*replicas)]
    loss = model.evaluate(
        x[1000:1512], ye, batch_size=64, verbose=0, callbacks=[dk.SyncCallback()]
    )
    np.testing.assert_allclose(loss, _softmax_ce(*average, xe, ye)[0], rtol=1e-5)
    assert abs(loss - _softmax_ce(*replicas[0], xe, ye)[0]) > 1e-4
    # ... and hands every replica its own copy back.
    after = _replica_weights(two, model)
    for r in range(2):
        np.testing.assert_array_equal(after[r][0], recorder.history[-1][r][0])


# --- Saving and resuming ----------------------------------------------------------


class _Interrupt(keras.callbacks.Callback):
    def __init__(self, epoch, batch):
        super().__init__()
        self.at = (epoch, batch)
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise RuntimeError("interrupted")


def _adam(sync_mode=None):
    return lambda: dk.wrap(
        distopt.optimizers.Adam(1e-2, sync=sync_mode, jit_compile=False)
    )


SAVE_X = slice(0, 384)  # 6 steps of 64 per epoch: epoch ends are mid-period for k=4


def _fit3(model, x, y, epochs=3, callbacks=()):
    model.fit(
        x[SAVE_X],
        y[SAVE_X],
        batch_size=64,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=list(callbacks),
    )


def _assert_same_replicas(strategy, want_model, got_model):
    want = _replica_weights(strategy, want_model)
    got = _replica_weights(strategy, got_model)
    for r in range(len(want)):
        for a, b in zip(want[r], got[r]):
            np.testing.assert_array_equal(a, b)


def _adam_for(mode):
    return _adam(sync.LocalSGD(4) if mode == "local_sgd" else None)


class _SaveFirstEpoch(keras.callbacks.ModelCheckpoint):
    """ModelCheckpoint (model.save) at the end of epoch 1 only (6 steps,
    mid-period for LocalSGD(4)); keeps each replica's weights at the save."""

    def __init__(self, strategy, path):
        super().__init__(path)
        self.strategy, self.replicas = strategy, None

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            super().on_epoch_end(epoch, logs)
            self.replicas = _replica_weights(self.strategy, self.model)


@pytest.fixture(scope="module")
def straight(mnist, two, tmp_path_factory):
    """mode -> a model trained 3 epochs (18 steps) without a stop.

    The LocalSGD run also saves itself (ModelCheckpoint) at the end of epoch
    1, for test_save_load_model_continues_exactly: the model it saved is the
    first epoch of this run, which that test would otherwise train again
    (see `saved_mid_period`).
    """
    cache = {}

    def get(mode):
        if mode not in cache:
            model = _model(two, _adam_for(mode))
            callbacks = []
            if mode == "local_sgd":
                path = str(tmp_path_factory.mktemp("straight") / "model.keras")
                callbacks.append(_SaveFirstEpoch(two, path))
            _fit3(model, *mnist, callbacks=callbacks)
            cache[mode] = model, callbacks
        return cache[mode][0]

    def saved_mid_period():
        get("local_sgd")
        (saver,) = cache["local_sgd"][1]
        return saver.filepath, saver.replicas

    get.saved_mid_period = saved_mid_period
    return get


@pytest.mark.slow  # multi-epoch
@pytest.mark.parametrize("mode", ["every_step", "local_sgd"])
def test_backup_and_restore_resumes_exactly(mnist, two, tmp_path, straight, mode):
    """Interrupted in epoch 2 and resumed from the end of epoch 1 (6 steps,
    mid-period for LocalSGD(4)): equal to a run that never stopped."""
    backup = keras.callbacks.BackupAndRestore(str(tmp_path), delete_checkpoint=False)
    broken = _model(two, _adam_for(mode))
    with pytest.raises(RuntimeError, match="interrupted"):
        _fit3(broken, *mnist, callbacks=[backup, _Interrupt(epoch=1, batch=2)])
    resumed = _model(two, _adam_for(mode), seed=1)  # other initial weights
    _fit3(resumed, *mnist, callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path))])
    assert int(resumed.optimizer.iterations.numpy()) == 18
    if mode == "local_sgd":
        want = _replica_weights(two, straight(mode))
        assert _max_diff(want[0], want[1]) > 1e-4  # it ends mid-period
    _assert_same_replicas(two, straight(mode), resumed)


@pytest.mark.slow  # multi-epoch
def test_save_load_model_continues_exactly(mnist, two, straight):
    """ModelCheckpoint (model.save) mid-period under LocalSGD(4), load_model,
    train on: as never saved.

    The model saved is the straight LocalSGD run's at the end of epoch 1
    (the `straight` fixture saves it there): the same model, weights and
    optimizer as a 1-epoch fit saved by ModelCheckpoint, without training
    that epoch a second time.
    """
    model = straight("local_sgd")
    path, saved = straight.saved_mid_period()
    with two.scope():
        loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, dk.KerasOptimizer)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    assert int(loaded.optimizer.iterations.numpy()) == 6
    # Each replica got its own back.
    got = _replica_weights(two, loaded)
    for r in range(len(saved)):
        for a, b in zip(saved[r], got[r]):
            np.testing.assert_array_equal(a, b)
    # On one device (for inference, say) the model is the replicas' average.
    single = keras.models.load_model(path)
    average = [(a + b) / 2 for a, b in zip(*saved)]
    assert _max_diff(saved[0], saved[1]) > 1e-4
    assert _max_diff(_weights(single), average) <= 1e-6
    _fit3(loaded, *mnist, epochs=2)
    _assert_same_replicas(two, model, loaded)


@pytest.mark.parametrize("where", ["default", "mirrored2"])
def test_a_model_saved_before_its_first_fit_loads_and_fits_as_never_saved(
    mnist, two, tmp_path, where
):
    """A compiled, untrained model saved (an initial checkpoint) loads, with
    the optimizer's initial state, and fits as the model never saved. The
    load raised "store: holds 0 state variables for optimizer ..."."""
    strategy = two if where == "mirrored2" else tf.distribute.get_strategy()
    x, y = mnist
    model = _model(
        strategy,
        lambda: dk.wrap(distopt.optimizers.GradientDescent(0.1, jit_compile=False)),
    )
    path = str(tmp_path / "untrained.keras")
    model.save(path)
    with strategy.scope():
        loaded = keras.models.load_model(path)
    assert int(loaded.optimizer.iterations.numpy()) == 0
    for m in (model, loaded):
        m.fit(x[:256], y[:256], batch_size=64, epochs=1, shuffle=False, verbose=0)
    assert int(loaded.optimizer.iterations.numpy()) == 4
    for a, b in zip(_weights(model), _weights(loaded), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # multi-epoch
def test_validation_with_sync_callback_and_saves_leave_the_run_unchanged(
    mnist, two, tmp_path, straight
):
    """fit's validation keeps the average in place through the epoch's end
    (for EarlyStopping and ModelCheckpoint): the run still equals one with
    neither, and a save there still holds every replica's own weights."""
    x, y = mnist
    path = str(tmp_path / "model.keras")
    saver = _SaveFirstEpoch(two, path)
    model = _model(two, _adam_for("local_sgd"))
    model.fit(
        x[SAVE_X],
        y[SAVE_X],
        batch_size=64,
        epochs=3,
        shuffle=False,
        verbose=0,
        validation_data=(x[1000:1128], y[1000:1128]),
        callbacks=[dk.SyncCallback(), saver],
    )
    _assert_same_replicas(two, straight("local_sgd"), model)
    # At the save the replicas held the average (what was scored) ...
    assert _max_diff(saver.replicas[0], saver.replicas[1]) == 0.0
    # ... and the file gives each its own weights of that step back.
    _, own = straight.saved_mid_period()
    with two.scope():
        loaded = keras.models.load_model(path)
    got = _replica_weights(two, loaded)
    for r in range(len(own)):
        for a, b in zip(own[r], got[r]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("sync_first", [True, False], ids=["sync_first", "sync_last"])
def test_early_stopping_restores_the_scored_average(two, sync_first, tmp_path):
    """EarlyStopping(restore_best_weights) under LocalSGD with SyncCallback
    restored replica 0's weights of the best epoch: the validation had
    scored their average, and the callbacks read the weights after
    SyncCallback had given each replica its own back. With a save each
    epoch, the next fit failed: the save's snapshot did not match the
    restored weights."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(160, 20)).astype(np.float32), rng.integers(0, 5, 160)
    xv, yv = rng.normal(size=(64, 20)).astype(np.float32), rng.integers(0, 5, 64)
    with two.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((20,)),
                keras.layers.Dense(8, activation="tanh"),
                keras.layers.Dense(5),
            ]
        )
        adam = distopt.optimizers.Adam(0.3, sync=sync.LocalSGD(4), jit_compile=False)
        model.compile(
            optimizer=dk.wrap(adam),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    stop = keras.callbacks.EarlyStopping(patience=1, restore_best_weights=True)
    callbacks = [dk.SyncCallback(), stop] if sync_first else [stop, dk.SyncCallback()]
    callbacks.append(keras.callbacks.ModelCheckpoint(str(tmp_path / "m.keras")))
    history = model.fit(
        x,
        y,
        batch_size=32,
        epochs=8,
        shuffle=False,
        verbose=0,
        validation_data=(xv, yv),
        callbacks=callbacks,
    )
    losses = history.history["val_loss"]
    # It stopped after an epoch (5 steps: mid-period) worse than an earlier one.
    assert stop.stopped_epoch > 0 and int(np.argmin(losses)) < len(losses) - 1
    replicas = _replica_weights(two, model)
    assert _max_diff(replicas[0], replicas[1]) == 0.0
    assert model.evaluate(xv, yv, verbose=0) == pytest.approx(min(losses), rel=1e-6)
    before = int(model.optimizer.iterations)
    again = [c for c in callbacks if c is not stop]
    model.fit(x, y, batch_size=32, shuffle=False, verbose=0, callbacks=again)
    assert int(model.optimizer.iterations) == before + 5


def test_an_evaluation_after_a_fit_that_raised_gives_the_replicas_back(two):
    """The same SyncCallback in a fit that raised mid-epoch, then in an
    evaluate: the evaluate left the average in place (the callback still
    thought fit's validation was running)."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(160, 20)).astype(np.float32), rng.integers(0, 5, 160)
    with two.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(5)])
        adam = distopt.optimizers.Adam(0.1, sync=sync.LocalSGD(4), jit_compile=False)
        model.compile(
            optimizer=dk.wrap(adam),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    callback = dk.SyncCallback()
    with pytest.raises(RuntimeError, match="interrupted"):
        model.fit(
            x,
            y,
            batch_size=32,
            epochs=2,
            shuffle=False,
            verbose=0,
            validation_data=(x[:64], y[:64]),
            callbacks=[callback, _Interrupt(epoch=1, batch=1)],
        )
    assert int(model.optimizer.iterations) == 7  # mid-period: the replicas differ
    own = _replica_weights(two, model)
    assert _max_diff(own[0], own[1]) > 1e-4
    model.evaluate(x[:64], y[:64], verbose=0, callbacks=[callback])
    after = _replica_weights(two, model)
    for r in range(2):
        for a, b in zip(own[r], after[r]):
            np.testing.assert_array_equal(a, b)


# --- Compression -------------------------------------------------------------------


def _compression_state(strategy, model):
    """Every replica's weights and residual rows, and PowerSGD's Q, as NumPy."""
    comp = model.optimizer.distopt_optimizer.compression
    keys = [str(i) for i in range(len(model.trainable_weights))]
    # The public accessor, given the Keras variables (rows [R, ...] or None).
    residuals = [comp.residual(v) for v in model.trainable_weights]
    return {
        "weights": _replica_weights(strategy, model),
        "residual": [None if r is None else r.numpy() for r in residuals],
        "q": [local_copies(strategy, comp.q[k]) if k in comp.q else None for k in keys],
    }


def test_compression_inside_fit_matches_numpy_and_resumes_exactly(mnist, two, tmp_path):
    """PowerSGD (rank 2) with error feedback through `wrap` into `fit` (issue 25).

    Each step against the paper's algorithm in NumPy (`ef_sgd`), from the
    run's own state before it: each replica's gradient of its 32 rows, its
    share g_r / 2, the residual rows, Q and the update (plain GD: the scale
    shows). Then `model.save` and `load_model` carry the residuals and Q,
    and the loaded model trains on exactly as the saved one.
    """
    import numpy_reference as ref

    x, y = mnist
    steps = 5

    def make(seed=0):
        return _model(
            two,
            lambda: dk.wrap(
                distopt.optimizers.GradientDescent(
                    LR,
                    compression=distopt.compression.PowerSGD(rank=2),
                    jit_compile=False,
                )
            ),
            hidden=0,
            seed=seed,
        )

    model = make()
    with two.scope():
        model.optimizer.build(model.trainable_variables)  # to read the first Q
    history = [_compression_state(two, model)]

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            history.append(_compression_state(two, model))

    model.fit(
        x[: steps * BATCH],
        y[: steps * BATCH],
        batch_size=BATCH,
        shuffle=False,
        verbose=0,
        callbacks=[Record()],
    )
    x64 = x.astype(np.float64)
    for t in range(steps):
        before, after = history[t], history[t + 1]
        w, b = (np.float64(p) for p in before["weights"][0])
        shares = []
        for r in range(2):
            rows = slice(t * BATCH + 32 * r, t * BATCH + 32 * (r + 1))
            _, gw, gb = _softmax_ce(w, b, x64[rows], y[rows])
            shares.append([gw / 2, gb / 2])
        (want,) = ref.ef_sgd(
            "powersgd",
            [shares],
            q0=[np.float64(before["q"][0][0]), None],
            residual0=[np.float64(before["residual"][0]), None],
            rank=2,
        )
        assert after["residual"][1] is None and after["q"][1] is None  # the bias
        for r in range(2):
            for i in range(2):
                np.testing.assert_allclose(
                    after["weights"][r][i] - before["weights"][r][i],
                    -LR * want["aggregate"][i],
                    rtol=1e-4,
                    atol=1e-6,
                    err_msg=f"step {t}, replica {r}, update {i}",
                )
            np.testing.assert_allclose(
                after["residual"][0][r], want["residual"][0][r], rtol=1e-4, atol=1e-6
            )
            np.testing.assert_array_equal(after["q"][0][r], after["q"][0][0])
            np.testing.assert_array_equal(
                after["weights"][r][0], after["weights"][0][0]
            )
        np.testing.assert_allclose(after["q"][0][0], want["q"][0], rtol=1e-4, atol=1e-6)
    assert np.abs(history[-1]["residual"][0]).max() > 1e-4  # there is state to keep
    # Each replica sends P (784 x 2) with the bias (10) and then Q (10 x 2).
    counters = model.optimizer.distopt_optimizer.reducer.counters()
    assert counters["bytes_sent"] == steps * 4 * (784 * 2 + 10 + 10 * 2)

    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    with two.scope():
        loaded = keras.models.load_model(path)
    saved, got = _compression_state(two, model), _compression_state(two, loaded)
    for key in ("residual", "q"):
        np.testing.assert_array_equal(got[key][0], saved[key][0], err_msg=key)
    more = slice(steps * BATCH, (steps + 2) * BATCH)
    for m in (model, loaded):
        m.fit(x[more], y[more], batch_size=BATCH, shuffle=False, verbose=0)
    _assert_same_replicas(two, model, loaded)
    np.testing.assert_array_equal(
        _compression_state(two, loaded)["residual"][0],
        _compression_state(two, model)["residual"][0],
    )


# --- Learning rate callbacks and string identifiers -------------------------------


def test_reduce_lr_on_plateau_sets_the_rate_used(mnist):
    """On the default strategy: the rate Keras's callbacks set is the one applied."""
    x, y = mnist[0][:256], mnist[1][:256]
    model = _model(tf.distribute.get_strategy(), _adam(), hidden=0)
    # min_delta so large that every epoch after the first (which sets the
    # best) is a plateau: 1e-2 is halved once in two epochs.
    plateau = keras.callbacks.ReduceLROnPlateau(
        monitor="loss", factor=0.5, patience=0, min_delta=1e9, min_lr=0
    )
    model.fit(x, y, batch_size=64, epochs=2, verbose=0, callbacks=[plateau])
    np.testing.assert_allclose(float(model.optimizer.learning_rate), 5e-3)
    inner = model.optimizer.distopt_optimizer
    np.testing.assert_allclose(float(inner.learning_rate_value()), 5e-3)
    # A rate of zero set by LearningRateScheduler freezes the weights.
    before = _weights(model)
    model.fit(
        x,
        y,
        batch_size=64,
        verbose=0,
        callbacks=[keras.callbacks.LearningRateScheduler(lambda e, lr: 0.0)],
    )
    assert int(model.optimizer.iterations.numpy()) == 12
    assert _max_diff(_weights(model), before) == 0.0


def test_string_identifier_and_config_round_trip():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="distopt.adam", loss="mse")
    opt = model.optimizer
    assert isinstance(opt, dk.KerasOptimizer)
    assert isinstance(opt.distopt_optimizer, distopt.optimizers.Adam)
    config = keras.optimizers.serialize(
        dk.wrap(distopt.optimizers.Lion(3e-4, sync=sync.Accumulate(2)))
    )
    again = keras.optimizers.deserialize(config)
    assert again.get_config() == config["config"]
    assert float(again.learning_rate) == pytest.approx(3e-4)
    # A Keras schedule given to the distopt optimizer saves as Keras's.
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, 10, 0.5)
    config = keras.optimizers.serialize(dk.wrap(distopt.optimizers.Momentum(schedule)))
    again = keras.optimizers.deserialize(json.loads(json.dumps(config)))
    assert again.get_config() == config["config"]
    assert float(again.learning_rate) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="optimizer"):
        dk.wrap(keras.optimizers.Adam())
    with pytest.raises(ValueError, match="clipnorm"):
        dk.KerasOptimizer(distopt.optimizers.Adam(), clipnorm=1.0)


def test_weighted_mean_in_a_custom_train_step(mnist):
    """Without Keras's train_step the example count cannot be found: a clear
    error naming `weight`; passed explicitly, it is used."""
    x, y = mnist[0][:64], mnist[1][:64]

    class Custom(keras.Sequential):
        weight = None

        def train_step(self, data):
            xb, yb = data
            with tf.GradientTape() as tape:
                loss = self.compute_loss(x=xb, y=yb, y_pred=self(xb, training=True))
            grads = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply_gradients(
                zip(grads, self.trainable_variables), weight=self.weight
            )
            return {"loss": loss}

    def make():
        model = Custom([keras.Input((784,)), keras.layers.Dense(10)])
        model.compile(
            optimizer=dk.wrap(
                distopt.optimizers.GradientDescent(
                    0.1, aggregation="weighted_mean", jit_compile=False
                )
            ),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return model

    with pytest.raises(ValueError, match="weight"):
        make().fit(x, y, batch_size=64, verbose=0)
    model = make()
    model.weight = 64.0
    model.fit(x, y, batch_size=64, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 1


def _one_step_update(strategy, optimizer_fn, x, y, **compile_args):
    model = _model(strategy, optimizer_fn, hidden=0, **compile_args)
    before = _weights(model)
    model.fit(x, y, batch_size=len(x), shuffle=False, verbose=0)
    return [a - b for a, b in zip(_weights(model), before)]


def _gd(**kwargs):
    return lambda: dk.wrap(
        distopt.optimizers.GradientDescent(0.5, jit_compile=False, **kwargs)
    )


def test_loss_scale_in_fit_gives_the_unscaled_update(mnist, two):
    """The distopt optimizer's loss_scale inside fit: the loss was never
    scaled, and the update came out divided by the scale (128x, 32768x)."""
    x, y = mnist[0][:64], mnist[1][:64]
    default = tf.distribute.get_strategy()
    plain = _one_step_update(default, _gd(), x, y)
    for strategy in (default, two):
        for loss_scale in (128.0, "dynamic"):
            got = _one_step_update(strategy, _gd(loss_scale=loss_scale), x, y)
            assert _max_diff(got, plain) <= 1e-6 * _max_abs(plain), (
                strategy,
                loss_scale,
            )


def _max_abs(arrays):
    return max(float(np.max(np.abs(a))) for a in arrays)


def test_mixed_float16_needs_distopts_loss_scale(mnist, two):
    """Under a mixed_float16 policy `compile` puts Keras's LossScaleOptimizer
    around the wrapper; it never calls the wrapper's `scale_loss`, and the
    update on R replicas was 1/R of Keras's. Refused, naming the way that
    works; that way gives the one-device update."""
    x, y = mnist[0][:64], mnist[1][:64]
    default = tf.distribute.get_strategy()
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        with pytest.raises(ValueError, match="auto_scale_loss=False"):
            _one_step_update(two, _gd(), x, y)
        with pytest.raises(ValueError, match="auto_scale_loss=False"):
            _one_step_update(two, _gd(aggregation="weighted_mean"), x, y)
        ours = {"auto_scale_loss": False}
        one = _one_step_update(default, _gd(loss_scale="dynamic"), x, y, **ours)
        # One device under Keras's LossScaleOptimizer: the same update.
        theirs = _one_step_update(default, _gd(), x, y)
        assert _max_diff(theirs, one) <= 1e-6 * _max_abs(one)
        for aggregation in ("mean", "weighted_mean"):
            got = _one_step_update(
                two, _gd(loss_scale="dynamic", aggregation=aggregation), x, y, **ours
            )
            # float16 activations on 32 examples, not 64: rounding only.
            assert _max_diff(got, one) <= 2e-3 * _max_abs(one), aggregation
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def test_sync_callback_after_an_interrupted_evaluation(mnist, two):
    """An evaluation that raised never reached on_test_end; the next one kept
    the stale copy of each replica's weights and wrote it back, undoing the
    training in between."""
    x, y = mnist[0][:128], mnist[1][:128]

    class CtrlC(keras.callbacks.Callback):
        def on_test_batch_end(self, batch, logs=None):
            raise KeyboardInterrupt

    model = _model(two, _gd(sync=sync.LocalSGD(100)), hidden=0)
    model.fit(x, y, batch_size=32, shuffle=False, verbose=0)
    with pytest.raises(KeyboardInterrupt):
        model.evaluate(x, y, verbose=0, callbacks=[dk.SyncCallback(), CtrlC()])
    model.fit(x, y, batch_size=32, shuffle=False, verbose=0)
    trained = _replica_weights(two, model)
    assert _max_diff(trained[0], trained[1]) > 1e-4  # Mid-period: they differ.
    model.evaluate(x, y, verbose=0, callbacks=[dk.SyncCallback()])
    after = _replica_weights(two, model)
    for r in range(2):
        np.testing.assert_array_equal(after[r][0], trained[r][0])


@pytest.mark.parametrize(
    "make,argument",
    [
        # Failed at fit's trace with "Heun needs the loss".
        (lambda: distopt.optimizers.Heun(0.1), "optimizer"),
        # Assigning it changed nothing.
        (lambda: distopt.optimizers.Adam(tf.Variable(0.1)), "learning_rate"),
    ],
)
def test_wrap_refuses_what_fit_cannot_follow(make, argument):
    with pytest.raises(ValueError) as e:
        dk.wrap(make())
    assert str(e.value).startswith(f"{argument}:"), str(e.value)


def test_a_second_wrap_of_one_optimizer_is_refused():
    """A notebook's compile cell run again: the second wrapper read the
    first's learning rate as a schedule; setting the rate and saving failed."""
    opt = distopt.optimizers.Adam(0.1)
    first = dk.wrap(opt)
    with pytest.raises(ValueError, match="^optimizer: this Adam instance"):
        dk.wrap(opt)
    # The first wrapper is untouched: the optimizer still reads its rate.
    assert opt.learning_rate.__self__ is first
    first.learning_rate = 0.05
    assert float(first.learning_rate) == pytest.approx(0.05)


def test_an_optimizer_outside_the_scope_or_of_another_model_is_named(mnist, two):
    """Made outside the model's scope: TensorFlow's "Must not nest" error,
    the wrapper left built, and a rerun of fit an XLA device error. Compiled
    into a second model: an error that named no variable."""
    x, y = mnist[0][:64], mnist[1][:64]
    outside = dk.wrap(distopt.optimizers.GradientDescent(0.1))
    model = _model(two, lambda: outside, hidden=0)
    before = _weights(model)
    for _ in range(2):  # A notebook's cell run again: the same one error.
        with pytest.raises(ValueError, match="^optimizer: made outside the strategy"):
            model.fit(x, y, batch_size=32, epochs=1, verbose=0)
        assert not outside.built and not outside.distopt_optimizer.built_variables()
    assert _max_diff(_weights(model), before) == 0.0

    first = _model(two, lambda: dk.wrap(distopt.optimizers.GradientDescent(0.1)))
    first.fit(x, y, batch_size=32, epochs=1, verbose=0)
    second = _model(two, lambda: first.optimizer, hidden=0, seed=1)
    before = _weights(second)
    with pytest.raises(ValueError) as e:
        second.fit(x, y, batch_size=32, epochs=1, verbose=0)
    kernel = second.trainable_weights[0].path
    assert str(e.value).startswith(f"grads_and_vars: ['{kernel}', "), e.value
    assert "compile with a new optimizer for another model" in str(e.value)
    assert _max_diff(_weights(second), before) == 0.0


# --- The example ---------------------------------------------------------------------


@pytest.mark.slow
def test_example_runs():
    result = run_python(
        os.path.join(REPO, "examples", "keras_lenet_diloco.py"),
        "--steps=3",
        "--epochs=1",
        "--eval_examples=128",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "evaluate" in result.stdout
    # Quiet: distopt imported before TensorFlow (and fit told not to shuffle a
    # dataset, which Keras only warns about).
    assert not re.search(
        r"^(E0000|W0000) |cuda_platform|absl::InitializeLog|UserWarning",
        result.stdout + result.stderr,
        re.MULTILINE,
    ), result.stderr


@pytest.mark.slow
def test_two_workers_match_mirrored(tmp_path, two):
    """fit on 2 MultiWorkerMirroredStrategy workers: worker i's weights are
    replica i's under MirroredStrategy(2) (weighted mean with a partial batch,
    local SGD mid-period, DiLoCo with clipping)."""
    import keras_mw_worker as mw

    from distopt import cluster

    ports = ",".join(map(str, cluster.free_ports(2)))
    script = os.path.join(REPO, "tests", "keras_mw_worker.py")
    procs = [
        start_python([script, str(i), ports, str(tmp_path)], stdout=subprocess.PIPE)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    workers = [np.load(tmp_path / f"worker{i}.npz") for i in range(2)]
    x, y = mw.mnist()
    for name in mw.SCENARIOS:
        for i, copies in enumerate(mw.run(two, name, x, y)):
            for r, worker in enumerate(workers):
                np.testing.assert_allclose(
                    worker[f"{name}/{i}"], copies[r], rtol=0, atol=1e-6, err_msg=name
                )
        if name != "weighted_mean":  # the replicas differ: a real per-replica check
            assert not np.array_equal(workers[0][f"{name}/0"], workers[1][f"{name}/0"])
