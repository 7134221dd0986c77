"""The moving average of the variables (`use_ema`), beyond the shared tables.

The NumPy table (`numpy_reference.CONFIGS`, `test_optimizers.CONFIGS`) and
the Keras parity table already carry configurations with `use_ema`; these
tests check what a table cannot: the update of the average itself at a tight
tolerance, skips, replicas, sparse rows, `finalize_variable_values`, and
the sync modes it refuses.
"""

import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_replicas_identical, local_copies, mirrored

import distopt
from distopt import optimizers

M2 = mirrored(2)
W0 = np.array([[1.0, -2.0, 0.5], [0.25, 3.0, -1.0]], np.float32)
GRADS = [
    np.array([[0.5, 0.1, -0.3], [1.0, -0.2, 0.4]], np.float32) * (t + 1)
    for t in range(4)
]


def _numpy_averages(values, momentum):
    """The average after each update, from the variable's values after each."""
    out, ema = [], None
    for p in values:
        ema = p.copy() if ema is None else momentum * ema + (1 - momentum) * p
        out.append(ema)
    return out


def test_the_average_is_exact_on_the_update_with_gd():
    # Compared as `ema - w0`, the size of a few steps, not as `ema`: an
    # average momentum off by 0.1% moves it by about 1e-4 of that.
    var = tf.Variable(W0)
    opt = optimizers.GradientDescent(0.1, use_ema=True, ema_momentum=0.9)
    got = []
    for g in GRADS:
        opt.apply_gradients([tf.constant(g)], [var])
        got.append(opt.slots(var)["ema"].numpy() - W0)
    values = np.cumsum([-0.1 * g.astype(np.float64) for g in GRADS], axis=0) + W0
    for t, (a, want) in enumerate(zip(got, _numpy_averages(list(values), 0.9))):
        np.testing.assert_allclose(a, want - W0, rtol=1e-5, atol=1e-7, err_msg=t)
    # Without an overwrite the variable follows plain GD.
    np.testing.assert_allclose(var.numpy(), values[-1], rtol=1e-6)


def test_a_skipped_step_changes_nothing_and_the_first_applied_update_restarts():
    # Under Mirrored(2), NaN on one replica's gradient at the first call: every
    # replica skips. The next call is the first *applied* update, so the
    # average becomes the variable, not 1% of it.
    with M2.scope():
        var = tf.Variable(W0)
        opt = optimizers.Adam(0.1, use_ema=True, ema_momentum=0.99, skip_nonfinite=True)

    @tf.function
    def step(grads):
        M2.run(lambda g: opt.apply_gradients([g], [var]), (grads,))

    bad = np.full_like(W0, np.nan)
    values = M2.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(bad if ctx.replica_id_in_sync_group == 0 else GRADS[0])
    )
    step(values)
    assert int(opt.skipped_steps) == 1 and int(opt.iterations) == 0
    for copy in local_copies(M2, var):
        np.testing.assert_array_equal(copy, W0)
    for copy in local_copies(M2, opt.slots(var)["ema"]):
        np.testing.assert_array_equal(copy, np.zeros_like(W0))
    after = []
    for g in GRADS[1:]:
        step(
            M2.experimental_distribute_values_from_function(
                lambda _, g=g: tf.constant(g)
            )
        )
        after.append(local_copies(M2, var)[0])
    assert_replicas_identical(M2, [var, *opt.slots(var).values()])
    want = _numpy_averages(after, 0.99)[-1]
    np.testing.assert_allclose(
        local_copies(M2, opt.slots(var)["ema"])[0], want, rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("use_ema", [True, False])
def test_finalize_puts_the_average_in_every_replica(use_ema):
    with M2.scope():
        var = tf.Variable(W0)
        opt = optimizers.Adam(0.1, use_ema=use_ema, ema_momentum=0.5)

    @tf.function
    def step(grads):
        M2.run(lambda g: opt.apply_gradients([g], [var]), (grads,))

    for g in GRADS:
        # Different gradients per replica: the mean is what is applied.
        step(
            M2.experimental_distribute_values_from_function(
                lambda ctx, g=g: tf.constant(g * (1.0 + ctx.replica_id_in_sync_group))
            )
        )
    before = local_copies(M2, var)[0]
    opt.finalize_variable_values([var])
    if not use_ema:
        for copy in local_copies(M2, var):
            np.testing.assert_array_equal(copy, before)
        return
    ema = local_copies(M2, opt.slots(var)["ema"])[0]
    assert np.max(np.abs(ema - before)) > 1e-2  # the average lags the variable
    for copy in local_copies(M2, var):
        np.testing.assert_array_equal(copy, ema)


def test_a_sparse_update_averages_every_row():
    # Momentum updates a sparse gradient's rows only (`sparse_rows`). Its
    # average still moves on every row: after the first update the untouched
    # row's average is the row, not zero.
    var = tf.Variable(W0)
    opt = optimizers.Momentum(0.1, use_ema=True, ema_momentum=0.9)
    values = []
    for g in GRADS[:3]:
        rows = tf.IndexedSlices(
            tf.constant(g[:1]), tf.constant([0]), tf.constant(W0.shape)
        )
        opt.apply_gradients([rows], [var])
        values.append(var.numpy())
    np.testing.assert_array_equal(values[-1][1], W0[1])  # untouched row kept
    assert np.max(np.abs(values[-1][0] - W0[0])) > 1e-2
    want = _numpy_averages(values, 0.9)[-1]
    np.testing.assert_allclose(
        opt.slots(var)["ema"].numpy(), want, rtol=1e-6, atol=1e-7
    )


def test_an_overwrite_on_the_sparse_path_sets_the_variable_to_its_average():
    var = tf.Variable(W0)
    opt = optimizers.GradientDescent(0.1, use_ema=True, ema_overwrite_frequency=2)
    for g in GRADS[:2]:
        rows = tf.IndexedSlices(
            tf.constant(g[1:]), tf.constant([1]), tf.constant(W0.shape)
        )
        opt.apply_gradients([rows], [var])
    np.testing.assert_array_equal(var.numpy(), opt.slots(var)["ema"].numpy())
    assert np.max(np.abs(var.numpy()[1] - W0[1])) > 1e-2


@pytest.mark.parametrize("sync", ["local_sgd", "diloco", "hierarchical"])
def test_refused_where_replicas_diverge(sync):
    with pytest.raises(ValueError, match=r"^use_ema: needs a synchronous sync mode"):
        optimizers.get("momentum", use_ema=True, sync=sync)


def test_config_round_trip_keeps_the_average():
    opt = optimizers.Adam(
        0.1, use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=5
    )
    again = optimizers.from_config({"class": "Adam", "config": opt.get_config()})
    assert (again.use_ema, again.ema_momentum, again.ema_overwrite_frequency) == (
        True,
        0.9,
        5,
    )


def test_under_accumulation_the_average_moves_once_per_applied_update():
    # Accumulate(2): 4 micro-steps are 2 updates of the mean gradient, and
    # the average sees those 2 values of the variable, not 4.
    var = tf.Variable(W0)
    opt = optimizers.GradientDescent(
        0.1, use_ema=True, ema_momentum=0.9, sync=distopt.sync.Accumulate(2)
    )
    for g in GRADS:
        opt.apply_gradients([tf.constant(g)], [var])
    assert int(opt.iterations) == 2
    p1 = W0 - 0.1 * (GRADS[0] + GRADS[1]) / 2
    p2 = p1 - 0.1 * (GRADS[2] + GRADS[3]) / 2
    np.testing.assert_allclose(var.numpy(), p2, rtol=1e-6)
    want = _numpy_averages([p1, p2], 0.9)[-1]
    np.testing.assert_allclose(
        opt.slots(var)["ema"].numpy() - W0, want - W0, rtol=1e-5, atol=1e-7
    )


def test_sam_keeps_the_average_of_its_base_optimizer():
    # SAM's update is its base optimizer's: so is the average, and
    # `finalize_variable_values` reaches it through SAM.
    var = tf.Variable(W0)
    sam = optimizers.SAM("gradient_descent", rho=0.05, learning_rate=0.1, use_ema=True)
    values = []
    for g in GRADS[:3]:
        target = tf.constant(g)
        sam.minimize(lambda t=target: tf.reduce_sum(var * t + 0.5 * var**2), [var])
        values.append(var.numpy())
    assert sam.use_ema
    want = _numpy_averages(values, 0.99)[-1]
    np.testing.assert_allclose(sam.slots(var)["ema"].numpy(), want, rtol=1e-6)
    sam.finalize_variable_values([var])
    np.testing.assert_array_equal(var.numpy(), sam.slots(var)["ema"].numpy())


def test_a_bfloat16_variable_has_a_float32_average():
    # The average of the stored (rounded) values, kept in float32: in
    # bfloat16, (1 - 0.99) * p would mostly round away.
    var = tf.Variable(tf.constant(W0, tf.bfloat16))
    opt = optimizers.GradientDescent(0.1, use_ema=True, ema_momentum=0.99)
    values = []
    for g in GRADS:
        opt.apply_gradients([tf.constant(g, tf.bfloat16)], [var])
        values.append(tf.cast(var, tf.float64).numpy())
    ema = opt.slots(var)["ema"]
    assert ema.dtype == tf.float32
    want = _numpy_averages(values, 0.99)[-1]
    np.testing.assert_allclose(ema.numpy(), want, rtol=1e-6)
    # Not representable in bfloat16: the average holds more than 8 bits.
    assert not np.array_equal(
        ema.numpy(), tf.cast(tf.cast(ema, tf.bfloat16), tf.float32).numpy()
    )


def test_finalize_with_a_foreign_variable_changes_nothing():
    known, other = tf.Variable(W0), tf.Variable(W0[0])
    opt = optimizers.GradientDescent(0.1, use_ema=True, ema_momentum=0.5)
    for g in GRADS[:2]:
        opt.apply_gradients([tf.constant(g)], [known])
    before = known.numpy()
    with pytest.raises(ValueError, match=r"^var_list: .* nothing was changed"):
        opt.finalize_variable_values([known, other])
    np.testing.assert_array_equal(known.numpy(), before)
