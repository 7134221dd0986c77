"""The update path on real inputs: narrow wires, extreme weights, mixed
precision, missing gradients, replica groups, the fused kernel.

Each test checks the *update* `w - w0` (not `w`, which hides a small relative
error in a small step) against NumPy, with plain gradient descent wherever a
scale matters (Adam is invariant to a constant factor on the gradient).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_replicas_identical, local_copies, mirrored
from numpy_reference import CONFIGS
from sync_harness import initial_params, make_data, numpy_grads, optimizer, train

import distopt
from distopt import distribute as dist
from distopt import optimizers

DEFAULT = tf.distribute.get_strategy()
M2, M4 = mirrored(2), mirrored(4)


def _per_replica(strategy, fn):
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: fn(ctx.replica_id_in_sync_group)
    )


def _one_weighted_step(strategy, weights, grads, lr=1.0, var_dtype=tf.float32, **kw):
    """One weighted-mean GD step from w0 = 1; returns every replica's w - w0."""
    with strategy.scope():
        var = tf.Variable(tf.ones([len(grads[0])], var_dtype))
        opt = optimizers.GradientDescent(lr, aggregation="weighted_mean", **kw)

    @tf.function
    def step(g, w):
        strategy.run(lambda g, w: opt.apply_gradients([g], [var], weight=w), (g, w))

    step(
        _per_replica(strategy, lambda r: tf.constant(grads[r], var_dtype)),
        _per_replica(strategy, lambda r: tf.constant(weights[r], tf.float32)),
    )
    return [c.astype(np.float64) - 1.0 for c in local_copies(strategy, var)], opt


# --- Weighted mean: the normaliser, the edges, narrow wires -------------------


GRADS4 = np.array(
    [[0.5, -1.0, 2.0], [1.5, 0.25, -0.5], [-1.0, 2.0, 1.0], [0.75, -0.75, 0.5]],
    np.float32,
)


def _weighted_update(weights, grads=GRADS4, lr=1.0):
    w = np.asarray(weights, np.float64)
    return -lr * (w[:, None] * grads.astype(np.float64)).sum(0) / w.sum()


def test_weighted_mean_normaliser_is_exact_with_gradient_descent():
    # A 0.1% error in the normaliser moves this update by 1e-3 relative.
    weights = [1.0, 2.0, 3.0, 10.0]
    updates, _ = _one_weighted_step(M4, weights, GRADS4)
    for u in updates:
        np.testing.assert_allclose(u, _weighted_update(weights), rtol=1e-5)


@pytest.mark.parametrize("wire", [None, "float16", "bfloat16"])
@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e5, 1e30])
def test_weights_from_1e_minus_6_to_1e30_on_every_wire(wire, scale):
    weights = [scale * w for w in (1.0, 2.0, 3.0, 4.0)]
    updates, opt = _one_weighted_step(M4, weights, GRADS4, wire_dtype=wire)
    want = _weighted_update(weights)
    # One rounding of each normalised gradient to the wire, then a sum of 4.
    tol = {None: 1e-6, "float16": 2.0**-11 * 8, "bfloat16": 2.0**-8 * 8}[wire]
    for u in updates:
        assert np.all(np.isfinite(u))
        np.testing.assert_allclose(u, want, rtol=0, atol=tol * np.abs(want).max())
    assert int(opt.skipped_steps.numpy()) == 0
    # A narrow wire pays a second, scalar all-reduce for the weights first.
    assert int(opt.allreduce_calls.numpy()) == (1 if wire is None else 2)


def test_float16_variables_with_weight_7e4_stay_finite():
    weights = [7e4, 7e4, 1.0, 3.0]
    updates, opt = _one_weighted_step(M4, weights, GRADS4, lr=0.5, var_dtype=tf.float16)
    for u in updates:
        assert np.all(np.isfinite(u))
        np.testing.assert_allclose(u, _weighted_update(weights, lr=0.5), atol=2e-3)
    assert int(opt.skipped_steps.numpy()) == 0


def test_mean_on_a_float16_wire_does_not_grow_with_the_replica_count():
    # 4 gradients near float16's top: their raw sum would overflow.
    big = np.full((4, 3), 30000.0, np.float32)
    with M4.scope():
        var = tf.Variable(tf.zeros([3]))
        opt = optimizers.GradientDescent(1e-4, wire_dtype="float16")

    @tf.function
    def step(g):
        M4.run(lambda g: opt.apply_gradients([g], [var]), (g,))

    step(_per_replica(M4, lambda r: tf.constant(big[r])))
    for c in local_copies(M4, var):
        np.testing.assert_allclose(c, -1e-4 * 30000.0, rtol=1e-3)


def test_some_weights_zero_contribute_nothing_even_with_nan_gradients():
    grads = GRADS4.copy()
    grads[1] = np.nan  # replica 1 had an empty batch: its mean gradient is NaN
    weights = [2.0, 0.0, 1.0, 0.0]
    updates, opt = _one_weighted_step(M4, weights, grads)
    want = _weighted_update([2.0, 1.0], GRADS4[[0, 2]])
    for u in updates:
        np.testing.assert_allclose(u, want, rtol=1e-6)
    assert int(opt.skipped_steps.numpy()) == 0


def _gd_updates_of_grads4(**kwargs):
    """Each replica's update `w - w0` after one GD step (lr 1) on GRADS4."""
    with M4.scope():
        var = tf.Variable(tf.ones([3]))
        opt = optimizers.GradientDescent(1.0, **kwargs)

    @tf.function
    def step(g):
        M4.run(lambda g: opt.apply_gradients([g], [var]), (g,))

    step(_per_replica(M4, lambda r: tf.constant(GRADS4[r])))
    return [c - 1.0 for c in local_copies(M4, var)]


def test_global_norm_clipping_is_exact_on_the_update():
    # A clip 1% loose moves this update by 1% (the weights alone would hide it).
    clip = 0.25
    mean = GRADS4.astype(np.float64).mean(0)
    norm = np.linalg.norm(mean)
    assert norm > 2 * clip
    for update in _gd_updates_of_grads4(global_clipnorm=clip):
        np.testing.assert_allclose(update, -mean * clip / norm, rtol=1e-5)


def test_value_clipping_is_exact_on_the_update():
    # Elementwise, after the mean: a clip 1% loose moves the clipped elements
    # of this update by 1%, and the others not at all.
    clip = 0.3
    mean = GRADS4.astype(np.float64).mean(0)
    assert np.any(np.abs(mean) > 1.5 * clip) and np.any(np.abs(mean) < clip)
    for update in _gd_updates_of_grads4(clipvalue=clip):
        np.testing.assert_allclose(update, -np.clip(mean, -clip, clip), rtol=1e-5)


def test_per_variable_norm_clipping_is_exact_on_the_update():
    # After the mean, each variable by its own norm: `a`'s mean gradient
    # [3, 4] (norm 5) is clipped to norm 1, `b`'s [0.3] is not. Clipping
    # before the mean would give [0.3, 0.4]; one global norm would shrink
    # `b` too; a clip 1% loose moves `a`'s update by 1%.
    with M2.scope():
        a, b = tf.Variable([0.0, 0.0]), tf.Variable([0.0])
        opt = optimizers.GradientDescent(1.0, clipnorm=1.0)

    @tf.function
    def step(ga, gb):
        M2.run(lambda ga, gb: opt.apply_gradients([ga, gb], [a, b]), (ga, gb))

    ga = _per_replica(M2, lambda r: tf.constant([[6.0, 8.0], [0.0, 0.0]][r]))
    gb = _per_replica(M2, lambda r: tf.constant([[0.6], [0.0]][r]))
    step(ga, gb)
    for copy in local_copies(M2, a):
        np.testing.assert_allclose(copy, [-0.6, -0.8], rtol=1e-6)
    for copy in local_copies(M2, b):
        np.testing.assert_allclose(copy, [-0.3], rtol=1e-6)


@pytest.mark.parametrize("skipper", ["skip_nonfinite", "loss_scale"])
def test_one_nonfinite_variable_on_one_replica_skips_every_variable(skipper):
    # Overflow usually hits some layers only: one NaN anywhere skips the whole
    # step, on every replica, for the finite variables too. Under a loss
    # scale of 4 (halved to 2 by the skip) the gradients are unscaled by 2.
    from distopt.transforms import LossScale

    kwargs = (
        {"skip_nonfinite": True}
        if skipper == "skip_nonfinite"
        else {"loss_scale": LossScale(4.0)}
    )
    with M2.scope():
        a, b = tf.Variable([1.0, 2.0]), tf.Variable([3.0])
        opt = optimizers.GradientDescent(0.5, **kwargs)

    @tf.function
    def step(poison):
        def replica(poison):
            rid = tf.distribute.get_replica_context().replica_id_in_sync_group
            bad = tf.logical_and(poison, tf.equal(rid, 1))
            ga = tf.where(bad, tf.constant([np.nan, 1.0]), tf.constant([1.0, 1.0]))
            opt.apply_gradients([ga, tf.constant([2.0])], [a, b])

        M2.run(replica, (poison,))

    step(tf.constant(True))
    for v, want in ((a, [1.0, 2.0]), (b, [3.0])):
        for c in local_copies(M2, v):
            np.testing.assert_array_equal(c, want)
    assert (int(opt.skipped_steps), int(opt.iterations)) == (1, 0)
    step(tf.constant(False))
    unscale = 1.0 if skipper == "skip_nonfinite" else 2.0
    for v, g0, g in ((a, [1.0, 2.0], 1.0), (b, [3.0], 2.0)):
        for c in local_copies(M2, v):
            np.testing.assert_array_equal(c, np.array(g0) - 0.5 * g / unscale)
    assert (int(opt.skipped_steps), int(opt.iterations)) == (1, 1)


# --- Mixed precision ------------------------------------------------------------


class _StepProbe(optimizers.Optimizer):
    """Records the step the update rule sees, in its slot."""

    def slot_initializers(self, var):
        return {"seen": tf.zeros(var.shape, var.dtype)}

    def update_step(self, grad, var, slots, lr, step):
        return var, {"seen": tf.fill(tf.shape(var), step)}


def test_bfloat16_variables_see_an_exact_step_over_1000_steps():
    var = tf.Variable(tf.zeros([2], tf.bfloat16))
    opt = _StepProbe(0.1)

    @tf.function
    def run(n):
        for _ in tf.range(n):
            opt.apply_gradients([tf.ones([2], tf.bfloat16)], [var])

    run(tf.constant(1001))
    # bfloat16 holds 8 significant bits: 1001 would round to 1000.
    assert opt.slots(var)["seen"].dtype == tf.float32
    np.testing.assert_array_equal(opt.slots(var)["seen"].numpy(), [1001.0, 1001.0])
    assert int(opt.iterations.numpy()) == 1001


def test_adam_on_bfloat16_variables_keeps_float32_moments():
    p0 = np.array([0.5, -1.0, 2.0], np.float32)
    var = tf.Variable(tf.constant(p0, tf.bfloat16))
    opt = optimizers.Adam(0.01)
    g = np.array([0.1, -0.2, 0.3], np.float32)
    for _ in range(3):
        opt.apply_gradients([tf.constant(g, tf.bfloat16)], [var])
    assert opt.slots(var)["m"].dtype == tf.float32
    # NumPy Adam on the bfloat16-rounded gradient, in float64.
    gb = tf.cast(tf.constant(g, tf.bfloat16), tf.float64).numpy()
    m = v = 0.0
    p = tf.cast(tf.constant(p0, tf.bfloat16), tf.float64).numpy()
    for t in range(1, 4):
        m = 0.9 * m + 0.1 * gb
        v = 0.999 * v + 0.001 * gb**2
        alpha = 0.01 * np.sqrt(1 - 0.999**t) / (1 - 0.9**t)
        p = p - alpha * m / (np.sqrt(v) + 1e-7)
        p = tf.cast(tf.constant(p, tf.bfloat16), tf.float64).numpy()
    np.testing.assert_allclose(opt.slots(var)["m"].numpy(), m, rtol=1e-6)
    np.testing.assert_allclose(tf.cast(var, tf.float64).numpy(), p, rtol=2.0**-7)


# --- Missing gradients on the flush / average step ------------------------------


def _two_variable_run(strategy, opt, present):
    """Steps where `present[s]` says whether variable b gets a gradient."""
    with strategy.scope():
        a = tf.Variable([1.0, 2.0], name="a")
        b = tf.Variable([3.0], name="b")
    steps = []
    for has_b in present:

        def replica(has_b=has_b):
            r = tf.cast(
                tf.distribute.get_replica_context().replica_id_in_sync_group, tf.float32
            )
            ga = tf.stack([1.0 + r, -1.0])
            gb = tf.reshape(2.0 * (r + 1.0), [1]) if has_b else None
            opt.apply_gradients([ga, gb], [a, b])

        steps.append(tf.function(lambda replica=replica: strategy.run(replica)))
    with strategy.scope():
        opt.build([a, b])
    for s in steps:
        s()
    return a, b


def test_accumulate_applies_a_buffer_whose_gradient_is_none_at_the_flush():
    k, lr = 3, 0.5
    opt = optimizer(
        "gradient_descent", learning_rate=lr, sync=distopt.sync.Accumulate(k)
    )
    # b has gradients in micro-steps 1 and 2 only; the flush (3) has None.
    a, b = _two_variable_run(M2, opt, [True, True, False, False, False, False])
    # Mean over 2 replicas x 3 micro-steps: b's buffer (2 steps of 2 and 4).
    want_b = 3.0 - lr * (2 * (2.0 + 4.0)) / (2 * k)
    for c in local_copies(M2, b):
        np.testing.assert_allclose(c, [want_b], rtol=1e-6)
    # The second window gave b nothing: it is left as it is, and its buffer
    # was zeroed by the first flush (not applied twice).
    want_a = np.array([1.0, 2.0]) - 2 * lr * np.array([1.5, -1.0])
    for c in local_copies(M2, a):
        np.testing.assert_allclose(c, want_a, rtol=1e-6)
    for acc in opt.sync.accumulators:
        np.testing.assert_array_equal(np.asarray(acc.read_value()), 0.0)
    assert int(opt.iterations.numpy()) == 2


def test_local_sgd_averages_a_variable_whose_gradient_is_none_at_the_average():
    opt = optimizer(
        "gradient_descent", learning_rate=0.5, sync=distopt.sync.LocalSGD(2)
    )
    a, b = _two_variable_run(M2, opt, [True, False])
    # Step 1: replica r moves b by -0.5 * 2 (r + 1); step 2 (None) averages.
    for c in local_copies(M2, b):
        np.testing.assert_allclose(c, [3.0 - 0.5 * 3.0], rtol=1e-6)
    assert_replicas_identical(M2, [a, b])


# --- Replica groups ------------------------------------------------------------


def numpy_groups(x, y, n, k, lr, group):
    """GD in groups of `group` replicas: mean inside each group every step,
    then the mean over all replicas every k steps."""
    steps, replicas = n.shape
    w0, b0 = initial_params()
    ws = [w0.astype(np.float64)] * replicas
    bs = [b0.astype(np.float64)] * replicas
    for s in range(steps):
        grads = [
            numpy_grads(ws[r], bs[r], x[s, r], y[s, r], n[s, r])
            for r in range(replicas)
        ]
        for g0 in range(0, replicas, group):
            members = range(g0, g0 + group)
            gw = np.mean([grads[r][0] for r in members], axis=0)
            gb = np.mean([grads[r][1] for r in members], axis=0)
            for r in members:
                ws[r], bs[r] = ws[r] - lr * gw, bs[r] - lr * gb
        if (s + 1) % k == 0:
            ws = [np.mean(ws, axis=0)] * replicas
            bs = [np.mean(bs, axis=0)] * replicas
    return ws, bs


def test_hierarchical_groups_of_2_on_4_replicas_match_numpy():
    k, steps = 3, 5
    x, y, n = make_data(steps, 4, seed=4)
    make = lambda: optimizer(sync=distopt.sync.Hierarchical(k, group_size=2))
    params, opt, _ = train(M4, make, x, y, n)
    ws, bs = numpy_groups(x, y, n, k, 0.1, group=2)
    copies_w, copies_b = local_copies(M4, params[0]), local_copies(M4, params[1])
    for r in range(4):
        np.testing.assert_allclose(copies_w[r], ws[r], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(copies_b[r], bs[r], rtol=1e-5, atol=1e-6)
    # 2 steps after the average: the groups differ, each group is identical.
    assert not np.allclose(copies_w[0], copies_w[2])
    np.testing.assert_array_equal(copies_w[0], copies_w[1])
    np.testing.assert_array_equal(copies_w[2], copies_w[3])
    # One reduction per group per step (2 groups x 5 steps), and one
    # all-reduce of the weights per period.
    assert int(opt.reducer.group_reductions.numpy()) == 2 * steps
    assert int(opt.allreduce_calls.numpy()) == steps // k


def test_group_size_that_does_not_divide_the_devices_is_named():
    with M4.scope():
        var = tf.Variable([1.0])
        opt = optimizer(sync=distopt.sync.Hierarchical(2, group_size=3))
        with pytest.raises(ValueError, match="group_size: must divide the 4 devices"):
            opt.build([var])


# --- The fused update -------------------------------------------------------------


def _apply_all_step(strategy, opts, var_sets):
    @tf.function
    def step(g):
        def replica(g):
            for opt, vs in zip(opts, var_sets):
                opt.apply_gradients([tf.cast(x, v.dtype) for x, v in zip(g, vs)], vs)

        strategy.run(replica, (g,))

    return step


#: One configuration of each optimizer family.
FAMILIES = list({name: (name, config) for name, config in CONFIGS}.values())


def test_fused_update_equals_the_per_variable_update():
    # Mirrored(2), float32 and bfloat16 variables in one step function (one
    # trace per path). The default strategy runs the same per-device kernel,
    # checked against NumPy for every configuration in test_strategies.py.
    strategy = M2
    rng = np.random.default_rng(0)
    shapes = [(2, 2, 3), (4,)]
    dtypes = [tf.float32, tf.bfloat16]
    p0 = [rng.normal(size=s).astype(np.float32) for s in shapes]
    grads = [
        [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(2)]
        for _ in range(3)
    ]
    cases = [(family, dtype) for family in FAMILIES for dtype in dtypes]
    results = {}
    for fused in (True, False):
        with strategy.scope():
            opts = [
                optimizers.get(name, fused=fused, **config)
                for (name, config), _ in cases
            ]
            var_sets = [
                [tf.Variable(tf.constant(p, dtype)) for p in p0] for _, dtype in cases
            ]
            # Built first, as the trainer does: built inside the step, the
            # function is traced twice (the lazy build of every optimizer
            # under Mirrored is test_strategies.py's).
            for opt, vs in zip(opts, var_sets):
                opt.build(vs)
        step = _apply_all_step(strategy, opts, var_sets)
        for gs in grads:
            step(
                _per_replica(strategy, lambda r, gs=gs: [tf.constant(x) for x in gs[r]])
            )
        results[fused] = [
            [local_copies(strategy, v) for v in vs]
            + [local_copies(strategy, s) for v in vs for s in o.slots(v).values()]
            for o, vs in zip(opts, var_sets)
        ]
    for ((name, _), dtype), fused, unfused in zip(cases, results[True], results[False]):
        # Within a few float32 ulps (XLA contracts multiply-adds); a bfloat16
        # variable may round its last bit the other way.
        tol = 2.0**-7 if dtype == tf.bfloat16 else 1e-6
        for f, u in zip(fused, unfused):
            for fc, uc in zip(f, u):
                np.testing.assert_allclose(
                    np.asarray(fc, np.float32),
                    np.asarray(uc, np.float32),
                    rtol=tol if fc.dtype != np.float32 else 1e-6,
                    atol=1e-6,
                    err_msg=f"{name} {dtype.name}",
                )


def _xla_calls(graph):
    """Calls of XLA-compiled functions in `graph` (the update kernels)."""
    count = 0
    for op in graph.get_operations():
        try:
            count += bool(op.get_attr("_XlaMustCompile"))
        except ValueError:
            pass
    return count


@pytest.mark.parametrize("strategy", [None, M2], ids=["default", "mirrored2"])
@pytest.mark.parametrize("name,config", FAMILIES, ids=[n for n, _ in FAMILIES])
def test_the_fused_update_is_one_kernel_per_device(name, config, strategy):
    # Layer-wise rules (Lamb, Lars) included: their norms are taken per
    # variable inside the one kernel. The per-variable path is the contrast.
    strategy = strategy or tf.distribute.get_strategy()
    shapes = [(3, 4), (5,), (2, 2, 3), (5,)]
    kernels = {}
    for fused in (True, False):
        with strategy.scope():
            variables = [tf.Variable(tf.ones(s)) for s in shapes]
            opt = optimizers.get(name, fused=fused, **config)
            opt.build(variables)

        @tf.function
        def step(grads, opt=opt, variables=variables):
            strategy.run(lambda g: opt.apply_gradients(g, variables), (grads,))

        spec = [tf.TensorSpec(s) for s in shapes]
        kernels[fused] = _xla_calls(step.get_concrete_function(spec).graph)
    devices = strategy.num_replicas_in_sync
    assert kernels == {True: devices, False: devices * len(shapes)}, name


def test_counters_read_naturally_in_python_under_mirrored():
    x, y, n = make_data(2, 2)
    _, opt, _ = train(M2, lambda: optimizer(), x, y, n)
    assert int(opt.iterations) == 2 and float(opt.iterations) == 2.0
    assert f"{opt.iterations:d} {opt.skipped_steps:03d}" == "2 000"
    assert int(opt.allreduce_calls) == 2
    assert [int(c) for c in local_copies(M2, opt.iterations.variable)] == [2, 2]
    # Still a tensor wherever one is expected.
    assert int(tf.cast(opt.iterations, tf.int32) + 1) == 3
    # What Keras's code does with `model.optimizer.iterations` (its
    # TensorBoard callback asks for float32; convert_to_numpy is asarray):
    # each failed, though Keras's own counter allows it.
    for got in (np.asarray(opt.iterations), keras.ops.convert_to_numpy(opt.iterations)):
        assert isinstance(got, np.ndarray) and got.dtype == np.int64 and got == 2
    assert np.asarray(opt.iterations, np.float32).dtype == np.float32
    as_float = keras.ops.convert_to_tensor(opt.iterations, "float32")
    assert as_float.dtype == tf.float32 and float(as_float) == 2.0
    assert tf.convert_to_tensor(opt.iterations).dtype == tf.int64


# --- Misuse -------------------------------------------------------------------------


def test_a_variable_created_outside_the_scope_is_named():
    var = tf.Variable([1.0], name="outside")
    with M2.scope():
        opt = optimizer()
    with pytest.raises(ValueError, match=r"'outside:0' was created outside .*scope"):
        M2.run(lambda: opt.apply_gradients([tf.constant([1.0])], [var]))
    with (
        pytest.raises(ValueError, match=r"create it under `strategy.scope\(\)`"),
        M2.scope(),
    ):
        opt.build([var])
    np.testing.assert_array_equal(var.numpy(), [1.0])


def test_a_strategys_variable_outside_its_scope_is_refused():
    """Built there, its one slot was updated once per copy: the copies diverged.

    Applied there after a build in the scope, it was a TypeError that said
    nothing of the scope.
    """
    with M2.scope():
        var = tf.Variable([1.0, 2.0])
        opt = optimizers.Momentum(0.5, momentum=0.9)
    grad = tf.constant([1.0, -1.0])
    with pytest.raises(ValueError, match=r"'Variable:0' .*no strategy is in scope"):
        opt.build([var])
    with pytest.raises(ValueError, match="no strategy is in scope"):
        opt.apply_gradients([grad], [var])
    assert opt.built_variables() == []
    with M2.scope():
        opt.build([var])
    with pytest.raises(ValueError, match="no strategy is in scope"):
        opt.apply_gradients([grad], [var])
    for copy in local_copies(M2, var):
        np.testing.assert_array_equal(copy, [1.0, 2.0])
    # One device's variables are plain variables: outside its scope they train.
    one = dist.make_strategy("one_device")
    with one.scope():
        plain = tf.Variable([1.0, 2.0])
    opt = optimizers.GradientDescent(0.5)
    opt.apply_gradients([grad], [plain])
    np.testing.assert_allclose(plain.numpy() - [1.0, 2.0], [-0.5, 0.5])


def test_a_variable_learning_rate_is_read_at_every_traced_step(caplog):
    """Assigning the variable changes the next update of the same trace.

    It was converted to a float at construction. A float reassigned after
    the trace stays the traced constant, and a WARNING says so.
    """
    rate = tf.Variable(0.1)
    with M2.scope():
        var, fixed_var = tf.Variable([0.0, 0.0]), tf.Variable([0.0, 0.0])
        opt = optimizers.GradientDescent(learning_rate=rate)
        fixed = optimizers.GradientDescent(learning_rate=0.1)
    grads = [[1.0, 3.0], [3.0, 5.0]]  # the mean: [2, 4]

    @tf.function
    def step(o, v):
        g = _per_replica(M2, lambda r: tf.constant(grads[r]))
        M2.run(lambda g: o.apply_gradients([g], [v]), (g,))

    def update(o, v):
        before = local_copies(M2, v)
        step(o, v)
        after = local_copies(M2, v)
        np.testing.assert_array_equal(after[0], after[1])
        return (after[0] - before[0]).astype(np.float64)

    mean = np.array([2.0, 4.0])
    np.testing.assert_allclose(update(opt, var), -0.1 * mean, rtol=1e-6)
    rate.assign(0.5)
    np.testing.assert_allclose(update(opt, var), -0.5 * mean, rtol=1e-6)
    assert step.experimental_get_tracing_count() == 1
    assert opt.get_config()["learning_rate"] == 0.5

    np.testing.assert_allclose(update(fixed, fixed_var), -0.1 * mean, rtol=1e-6)
    with caplog.at_level("WARNING"):
        fixed.learning_rate = 0.5
    assert "traced the update with 0.1" in caplog.text
    np.testing.assert_allclose(update(fixed, fixed_var), -0.1 * mean, rtol=1e-6)
    with pytest.raises(ValueError, match="learning_rate: a tf.Variable must be"):
        optimizers.GradientDescent(learning_rate=tf.Variable([0.1, 0.2]))


def _gd_update(opt, traced):
    """`w - w0` of one plain gradient-descent step on gradient [1, 3]."""
    var = tf.Variable([1.0, 2.0])
    grad = tf.constant([1.0, 3.0])
    step = lambda: opt.apply_gradients([grad], [var])
    if traced:
        step = tf.function(step)

    def update():
        before = var.numpy()
        step()
        return (var.numpy() - before).astype(np.float64)

    return update


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
def test_a_float_set_on_a_variable_learning_rate_is_assigned_into_it(traced, caplog):
    """As Keras: the variable stays the rate, so the traced step sees the float.

    The float replaced the variable, which the trace kept reading, in silence.
    """
    rate = tf.Variable(0.1)
    opt = optimizers.GradientDescent(learning_rate=rate, jit_compile=False)
    update = _gd_update(opt, traced)
    np.testing.assert_allclose(update(), [-0.1, -0.3], rtol=1e-6)
    with caplog.at_level("WARNING"):
        opt.learning_rate = 0.5
    assert "learning_rate" not in caplog.text
    assert opt.learning_rate is rate
    assert rate.numpy() == 0.5
    np.testing.assert_allclose(update(), [-0.5, -1.5], rtol=1e-6)
    assert opt.get_config()["learning_rate"] == 0.5
    with pytest.raises(ValueError, match="learning_rate: must be finite"):
        opt.learning_rate = -1.0
    assert rate.numpy() == 0.5


def _rate(kind, value):
    """A learning rate of `kind` ("float", "variable", "schedule") worth `value`."""
    if kind == "variable":
        return tf.Variable(value)
    if kind == "schedule":
        return lambda step: value
    return value


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("schedule", "float"),
        ("schedule", "schedule"),
        ("variable", "variable"),
        ("variable", "schedule"),
        ("schedule", "variable"),
    ],
)
def test_a_learning_rate_replaced_after_a_trace_warns(old, new, caplog):
    """The traced step keeps the object it read; a WARNING says so.

    Only a float replacing a traced float warned: a schedule or variable
    replaced after the trace went on in silence.
    """
    rate = _rate(old, 0.25)
    opt = optimizers.GradientDescent(learning_rate=rate, jit_compile=False)
    update = _gd_update(opt, traced=True)
    np.testing.assert_allclose(update(), [-0.25, -0.75], rtol=1e-6)
    with caplog.at_level("WARNING"):
        opt.learning_rate = rate  # the same object: nothing to say
    assert "learning_rate" not in caplog.text
    replacement = _rate(new, 0.5)
    with caplog.at_level("WARNING"):
        opt.learning_rate = replacement
    assert "after a tf.function traced the update with" in caplog.text
    assert "until they are retraced" in caplog.text
    assert opt.learning_rate is replacement
    # The honest part: the traced step still uses the old rate.
    np.testing.assert_allclose(update(), [-0.25, -0.75], rtol=1e-6)


# --- Loss scaling -----------------------------------------------------------------


def numpy_loss_scale(finite, initial=2.0**15, growth=3):
    """Keras's dynamic schedule: halve on a bad step, double after `growth` good."""
    scale, good, out = initial, 0, []
    for ok in finite:
        if ok:
            good += 1
            if good >= growth:
                scale, good = scale * 2, 0
        else:
            scale, good = max(scale / 2, 1.0), 0
        out.append(scale)
    return out


def test_dynamic_loss_scaling_on_2_replicas_follows_the_schedule():
    from distopt.transforms import LossScale

    finite = [True, True, False, True, True, True, True, False, True]
    with M2.scope():
        var = tf.Variable(tf.constant([1.0, -2.0], tf.float16))
        opt = optimizers.GradientDescent(0.5, loss_scale=LossScale(8.0, growth_steps=3))

    @tf.function
    def step(bad):
        def replica(bad):
            rid = tf.distribute.get_replica_context().replica_id_in_sync_group
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.cast(var, tf.float32) ** 2) / 2
                scaled = opt.scale_loss(loss)
            (g,) = tape.gradient(scaled, [var])
            # Only replica 1 overflows: every replica must still skip.
            poison = tf.logical_and(bad, tf.equal(rid, 1))
            g = tf.where(poison, tf.constant(float("inf"), g.dtype), g)
            opt.apply_gradients([g], [var])

        M2.run(replica, (bad,))

    p = np.array([1.0, -2.0])
    scales = []
    for ok in finite:
        step(tf.constant(not ok))
        if ok:
            p = p - 0.5 * p
        scales.append(float(local_copies(M2, opt.loss_scale.scale)[0]))
        for c in local_copies(M2, var):
            np.testing.assert_allclose(c.astype(np.float64), p, rtol=1e-3)
    assert scales == numpy_loss_scale(finite, initial=8.0, growth=3)
    assert int(opt.skipped_steps) == finite.count(False)
    assert_replicas_identical(M2, [var, opt.loss_scale.scale])


def test_loss_scale_stops_halving_at_1():
    # Below 1 the "scale" would shrink the loss and underflow float16
    # gradients: Keras keeps it at 1 however many steps overflow.
    from distopt.transforms import LossScale

    finite = [False, False, False, True, False]
    var = tf.Variable(tf.constant([1.0, -2.0], tf.float16))
    opt = optimizers.GradientDescent(0.5, loss_scale=LossScale(2.0, growth_steps=3))
    scales, p = [], np.array([1.0, -2.0])
    for ok in finite:
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.cast(var, tf.float32) ** 2) / 2
            scaled = opt.scale_loss(loss)
        (g,) = tape.gradient(scaled, [var])
        if not ok:
            g = tf.fill(tf.shape(g), tf.constant(float("inf"), g.dtype))
        opt.apply_gradients([g], [var])
        if ok:
            p = p - 0.5 * p
        scales.append(float(opt.loss_scale.scale.numpy()))
        np.testing.assert_allclose(var.numpy().astype(np.float64), p, rtol=1e-3)
    assert scales == numpy_loss_scale(finite, initial=2.0, growth=3)
    assert scales == [1.0, 1.0, 1.0, 1.0, 1.0]


def test_loss_scale_update_returns_new_over_old():
    # Its documented return: the factor the scale moved by (the optimizer
    # now reads the scale itself), None when the scale is fixed.
    from distopt.transforms import LossScale

    scale = LossScale(8.0, growth_steps=2)
    got = [scale.update(tf.constant(ok)) for ok in (True, True, False, False)]
    assert [float(f) for f in got] == [1.0, 2.0, 0.5, 0.5]
    assert float(scale.scale.numpy()) == 4.0
    assert LossScale(8.0, dynamic=False).update(tf.constant(False)) is None


def test_loss_scale_is_rejected_under_diverging_sync_modes():
    with pytest.raises(ValueError, match="loss_scale: needs a synchronous sync"):
        optimizer(loss_scale="dynamic", sync=distopt.sync.LocalSGD(2))


def test_checkpoint_paths_of_the_model_are_not_taken_by_the_optimizer(tmp_path):
    model = tf.Module()
    model.w = tf.Variable([1.0])
    opt = optimizers.Adam(0.1)
    opt.apply_gradients([tf.constant([1.0])], [model.w])
    path = tf.train.Checkpoint(model=model, optimizer=opt).save(str(tmp_path / "c"))
    names = [n for n, _ in tf.train.list_variables(path)]
    assert "model/w/.ATTRIBUTES/VARIABLE_VALUE" in names, names


# --- Invalid weights checked by XLA on 2 replicas -----------------------------------

XLA_COEF = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]], np.float32)


@pytest.mark.parametrize("bad", [-2.0, float("nan"), float("inf")])
def test_invalid_weight_checked_by_xla_on_2_replicas_skips_everywhere_and_counts(bad):
    """Replica 0's weight is invalid at run time, checked inside XLA.

    What XLA compiles: on each replica, one `tf.function(jit_compile=True)`
    called inside `strategy.run` computes the loss, its gradient and the
    payload (`opt.reducer.payload`): the weight check of `weighted_mean`
    (finite and >= 0), the zero payload and the NaN weight an invalid
    weight becomes. The weight enters that function as a run-time tensor
    (an argument of the outer function), so the check cannot be folded at
    trace time. Then, on each device, the optimizer's own update kernel
    (`jit_compile=True`, the default) with the select that skips the step.
    Not compiled: the outer function (a plain `tf.function`; XLA cannot
    compile a step over 2 devices, see test_errors.py), the all-reduce, and
    the reducer's verdict on the summed weight between them. The compiled
    payload goes to the reduce and the update through `reducer.reduce` and
    `apply_update`, the public names the sync modes call; `apply_gradients`
    would form the payload again, outside XLA.
    """
    with M2.scope():
        var = tf.Variable(tf.ones([3]))
        opt = optimizers.GradientDescent(0.5, aggregation="weighted_mean")
        opt.build([var])
    coef = tf.constant(XLA_COEF)

    @tf.function(jit_compile=True)
    def replica_payload(c, weight):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(c * var) + 0.25 * tf.reduce_sum(var**2)
        return opt.reducer.payload(tape.gradient(loss, [var]), weight)

    def apply(strategy, payload, weight):
        grads, scale, ok = opt.reducer.reduce(strategy, list(payload), weight)
        opt.apply_update(strategy, grads, [var], scale=scale, ok=ok)

    @tf.function
    def step(w0):
        def replica_step():
            r = tf.distribute.get_replica_context().replica_id_in_sync_group
            # Replica 1 always passes a good weight.
            weight = tf.where(tf.equal(r, 0), w0, 3.0)
            payload, w = replica_payload(tf.gather(coef, r), weight)
            dist.merge(apply, tuple(payload), w)

        M2.run(replica_step)

    # XLA compiles the weight check: its HLO tests the weight for finiteness.
    hlo = replica_payload.experimental_get_compiler_ir(coef[0], tf.constant(bad))(
        stage="hlo"
    )
    assert "is-finite" in hlo
    step(tf.constant(bad))
    for copy in local_copies(M2, var):
        np.testing.assert_array_equal(copy - 1.0, 0.0)
    assert int(opt.iterations) == 0
    assert int(opt.skipped_steps) == 1
    assert int(opt.invalid_weight_steps) == 1
    # A valid weight afterwards trains normally: nothing was left poisoned.
    step(tf.constant(2.0))
    w = np.array([2.0, 3.0])
    grads = XLA_COEF.astype(np.float64) + 0.5  # c_r + 0.5 * w0, at w0 = 1
    want = -0.5 * (w[:, None] * grads).sum(0) / w.sum()
    for copy in local_copies(M2, var):
        np.testing.assert_allclose(copy.astype(np.float64) - 1.0, want, rtol=1e-6)
    assert_replicas_identical(M2, [var])
    assert int(opt.iterations) == 1
    assert int(opt.skipped_steps) == 1
    assert int(opt.invalid_weight_steps) == 1
