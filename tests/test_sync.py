"""Aggregation and sync modes against the single-device runs they must equal."""

import functools

import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_replicas_identical, local_copies, mirrored
from sync_harness import initial_params, make_data, numpy_grads, optimizer, train

import distopt

DEFAULT = tf.distribute.get_strategy()
M2, M4 = mirrored(2), mirrored(4)


def values(params):
    return [np.asarray(p) for p in params]


def single_device_batches(x, y, n, group):
    """Concatenates each step's replica batches (first n rows), `group` steps at a time."""
    steps, replicas = n.shape
    rows = group * replicas * x.shape[2]  # padded, so every step has one shape
    xs, ys, ns = [], [], []
    for s0 in range(0, steps, group):
        rows_x = [
            x[s, r, : n[s, r]] for s in range(s0, s0 + group) for r in range(replicas)
        ]
        rows_y = [
            y[s, r, : n[s, r]] for s in range(s0, s0 + group) for r in range(replicas)
        ]
        bx, by = np.concatenate(rows_x), np.concatenate(rows_y)
        ns.append([len(bx)])
        xs.append(np.pad(bx, ((0, rows - len(bx)), (0, 0)))[None])
        ys.append(np.pad(by, ((0, rows - len(by)), (0, 0)))[None])
    return np.stack(xs), np.stack(ys), np.array(ns, np.int32)


# --- Aggregation --------------------------------------------------------------


def test_weighted_mean_with_equal_weights_equals_mean():
    x, y, n = make_data(4, 4)
    mean, _, _ = train(M4, lambda: optimizer("adam", learning_rate=0.05), x, y, n)
    weighted, _, _ = train(
        M4,
        lambda: optimizer("adam", learning_rate=0.05, aggregation="weighted_mean"),
        x,
        y,
        n,
        weighted=True,
    )
    for a, b in zip(values(mean), values(weighted)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def _adam_with(aggregation):
    return lambda: optimizer("adam", learning_rate=0.05, aggregation=aggregation)


@functools.cache
def _uneven_references():
    """The uneven-batch test's two references, shared by its two modes.

    Both run in a `tf.function` whichever mode the test checks: the
    single-device run on the concatenated batches, and the plain mean over
    Mirrored(4) (the biased answer). Returns their values.
    """
    x, y, n = make_data(4, 4, uneven=True)
    sx, sy, sn = single_device_batches(x, y, n, group=1)
    ref, _, _ = train(DEFAULT, _adam_with("mean"), sx, sy, sn)
    biased, _, _ = train(M4, _adam_with("mean"), x, y, n)
    return values(ref), values(biased)


@pytest.mark.parametrize("function", [True, False], ids=["function", "eager"])
def test_weighted_mean_with_uneven_batches_equals_single_device(function):
    x, y, n = make_data(4, 4, uneven=True)
    assert len(set(n.ravel())) > 1
    make = _adam_with
    # Built inside the first step (`build=False`), as for a user who never
    # calls `build`: here and in one test of each sync mode below.
    params, opt, _ = train(
        M4,
        make("weighted_mean"),
        x,
        y,
        n,
        weighted=True,
        function=function,
        build=False,
    )
    ref, biased = _uneven_references()
    for a, b in zip(values(params), ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert_replicas_identical(
        M4, params + [s for p in params for s in opt.slots(p).values()]
    )
    # The plain mean of uneven replica means is a different (biased) answer.
    assert not np.allclose(biased[0], ref[0], atol=1e-4)


def test_sum_is_replicas_times_mean():
    x, y, n = make_data(1, 4)
    summed, _, _ = train(
        M4, lambda: optimizer(aggregation="sum", learning_rate=0.025), x, y, n
    )
    mean, _, _ = train(
        M4, lambda: optimizer(aggregation="mean", learning_rate=0.1), x, y, n
    )
    for a, b in zip(values(summed), values(mean)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


# --- Gradient accumulation ----------------------------------------------------


@pytest.mark.parametrize("agg", ["mean", "weighted_mean"])
def test_accumulation_equals_k_times_larger_batch(agg):
    k, updates = 3, 2
    x, y, n = make_data(k * updates, 2, uneven=(agg == "weighted_mean"))
    make = lambda: optimizer(
        "adam", learning_rate=0.05, aggregation=agg, sync=distopt.sync.Accumulate(k)
    )
    params, opt, _ = train(
        M2, make, x, y, n, weighted=(agg == "weighted_mean"), build=False
    )
    sx, sy, sn = single_device_batches(x, y, n, group=k)
    ref, _, _ = train(
        DEFAULT, lambda: optimizer("adam", learning_rate=0.05), sx, sy, sn
    )
    for a, b in zip(values(params), values(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(opt.iterations.numpy()) == updates
    assert int(opt.sync.micro_step.numpy()) == k * updates
    assert int(opt.allreduce_calls.numpy()) == updates
    assert_replicas_identical(
        M2, params + [s for p in params for s in opt.slots(p).values()]
    )


# --- Local SGD, DiLoCo, hierarchical ------------------------------------------


@functools.cache
def _synchronous(name):
    """Values after 5 synchronous steps of `name` on Mirrored(4), make_data(5, 4).

    The reference of local SGD with k = 1 and of Hierarchical on one worker.
    """
    sync, _, _ = train(M4, lambda: optimizer(name), *make_data(5, 4))
    return values(sync)


def test_local_sgd_with_k_1_equals_synchronous_training():
    x, y, n = make_data(5, 4)
    for name in ["gradient_descent", "momentum"]:
        local, _, _ = train(
            M4,
            lambda name=name: optimizer(
                name, sync=distopt.sync.LocalSGD(1, average_slots=True)
            ),
            x,
            y,
            n,
        )
        for a, b in zip(_synchronous(name), values(local)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert_replicas_identical(M4, local)


def numpy_periodic(x, y, n, k, lr, warmup=0, outer=None):
    """R replicas of gradient descent in NumPy, averaged (or outer-stepped) every k."""
    steps, replicas = n.shape
    w0, b0 = initial_params()
    ws = [w0.astype(np.float64)] * replicas
    bs = [b0.astype(np.float64)] * replicas
    anchor = (w0.astype(np.float64), b0.astype(np.float64))
    mom = (np.zeros_like(w0, np.float64), np.zeros_like(b0, np.float64))
    for s in range(steps):
        grads = [
            numpy_grads(ws[r], bs[r], x[s, r], y[s, r], n[s, r])
            for r in range(replicas)
        ]
        if s < warmup:
            gw = np.mean([g[0] for g in grads], axis=0)
            gb = np.mean([g[1] for g in grads], axis=0)
            ws = [w - lr * gw for w in ws]
            bs = [b - lr * gb for b in bs]
            anchor = (ws[0], bs[0])
            continue
        ws = [w - lr * g[0] for w, g in zip(ws, grads)]
        bs = [b - lr * g[1] for b, g in zip(bs, grads)]
        if (s + 1 - warmup) % k == 0:
            avg = (np.mean(ws, axis=0), np.mean(bs, axis=0))
            if outer is None:
                new = avg
            else:
                olr, om = outer
                pseudo = [a - m for a, m in zip(anchor, avg)]
                mom = tuple(om * m - olr * g for m, g in zip(mom, pseudo))
                new = tuple(
                    a + om * m - olr * g for a, m, g in zip(anchor, mom, pseudo)
                )
                anchor = new
            ws, bs = [new[0]] * replicas, [new[1]] * replicas
    return ws, bs


@pytest.mark.parametrize("mode", ["local_sgd", "diloco"])
def test_periodic_modes_match_numpy_simulation(mode):
    k, warmup, steps = 3, 2, 8
    x, y, n = make_data(steps, 4, seed=3)
    if mode == "local_sgd":
        make_sync = lambda: distopt.sync.LocalSGD(k, warmup_steps=warmup)
        outer = None
    else:
        make_sync = lambda: distopt.sync.DiLoCo(k, warmup_steps=warmup)
        outer = (0.7, 0.9)
    params, opt, step = train(
        M4, lambda: optimizer(sync=make_sync()), x, y, n, build=False
    )
    ws, bs = numpy_periodic(x, y, n, k, 0.1, warmup, outer)
    for r, (w, b) in enumerate(
        zip(local_copies(M4, params[0]), local_copies(M4, params[1]))
    ):
        np.testing.assert_allclose(w, ws[r], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b, bs[r], rtol=1e-5, atol=1e-5)
    # 8 = 2 warmup + 2 periods of 3: the copies are averaged, so identical;
    # one more local step makes them diverge by design.
    assert_replicas_identical(M4, params)
    x1, y1, n1 = make_data(1, 4, seed=9)
    step(tf.constant(x1[0]), tf.constant(y1[0]), tf.constant(n1[0]))
    copies = local_copies(M4, params[0])
    assert not all(np.array_equal(c, copies[0]) for c in copies[1:])
    opt.synchronize(params)
    assert_replicas_identical(M4, params)


def test_hierarchical_on_one_worker_equals_synchronous():
    # All devices of one worker sync every step, so only the (no-op) cross-
    # worker average is periodic. 5 steps (2 periods of 2, then one step
    # into the next), so that the synchronous reference is local SGD's.
    x, y, n = make_data(5, 4)
    hier, opt, _ = train(
        M4,
        lambda: optimizer("momentum", sync=distopt.sync.Hierarchical(2)),
        x,
        y,
        n,
        build=False,
    )
    for a, b in zip(_synchronous("momentum"), values(hier)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert_replicas_identical(M4, hier)
    assert int(opt.allreduce_calls.numpy()) == 2  # weights, every 2 steps only


# --- Transforms after the reduce ----------------------------------------------


def _poisoned_data():
    x, y, n = make_data(3, 4, seed=5)
    x[1, 2, 0, 0] = np.nan  # replica 2, step 1
    return x, y, n


@functools.cache
def _without_the_poisoned_step():
    """Adam on Mirrored(4) over steps 0 and 2 only: the reference of both modes."""
    keep = [0, 2]
    x, y, n = _poisoned_data()
    ref, _, _ = train(M4, lambda: optimizer("adam"), x[keep], y[keep], n[keep])
    return values(ref)


@pytest.mark.parametrize("function", [True, False], ids=["function", "eager"])
def test_nonfinite_on_one_replica_skips_on_all(function):
    x, y, n = _poisoned_data()
    params, opt, _ = train(
        M4, lambda: optimizer("adam", skip_nonfinite=True), x, y, n, function=function
    )
    assert int(opt.skipped_steps.numpy()) == 1
    assert int(opt.iterations.numpy()) == 2
    for a, b in zip(values(params), _without_the_poisoned_step()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        assert np.all(np.isfinite(a))
    assert_replicas_identical(
        M4, params + [s for p in params for s in opt.slots(p).values()]
    )


@pytest.mark.parametrize("bad", [0, 1])
def test_in_local_steps_each_replica_skips_alone_and_counters_follow_replica_0(bad):
    # Local steps reduce nothing, so replica `bad` alone sees its non-finite
    # gradient and skips; the other steps. The counters are mirrored and take
    # replica 0's verdict (a known limitation, BUILD_NOTES.md).
    x, y, n = make_data(2, 2, seed=5)
    x[0, bad, 0, 0] = np.nan  # replica `bad`, step 0
    params, opt, _ = train(
        M2,
        lambda: optimizer(skip_nonfinite=True, sync=distopt.sync.LocalSGD(3)),
        x,
        y,
        n,
    )
    w0, b0 = initial_params()
    for r in range(2):
        w, b = w0.astype(np.float64), b0.astype(np.float64)
        for s in range(2):
            if (s, r) != (0, bad):
                gw, gb = numpy_grads(w, b, x[s, r], y[s, r], n[s, r])
                w, b = w - 0.1 * gw, b - 0.1 * gb
        np.testing.assert_allclose(local_copies(M2, params[0])[r], w, atol=1e-6)
        np.testing.assert_allclose(local_copies(M2, params[1])[r], b, atol=1e-6)
    for counter, want in (
        (opt.iterations, 2 - (bad == 0)),
        (opt.skipped_steps, int(bad == 0)),
    ):
        assert [int(c) for c in local_copies(M2, counter.variable)] == [want, want]


def test_global_norm_clipping_applies_to_the_aggregated_gradient():
    x, y, n = make_data(1, 4, seed=6)
    params, _, _ = train(M4, lambda: optimizer(global_clipnorm=0.01), x, y, n)
    w0, b0 = initial_params()
    grads = [numpy_grads(w0, b0, x[0, r], y[0, r], n[0, r]) for r in range(4)]
    gw, gb = np.mean([g[0] for g in grads], 0), np.mean([g[1] for g in grads], 0)
    norm = np.sqrt((gw**2).sum() + (gb**2).sum())
    assert norm > 0.01
    np.testing.assert_allclose(
        values(params)[0], w0 - 0.1 * gw * 0.01 / norm, rtol=1e-5
    )
    np.testing.assert_allclose(
        values(params)[1], b0 - 0.1 * gb * 0.01 / norm, rtol=1e-5
    )


@functools.cache
def _float32_wire():
    """Gradient descent's values, float32 on the wire: both wires' reference."""
    exact, _, _ = train(M4, lambda: optimizer(), *make_data(3, 4, seed=7))
    return values(exact)


@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
def test_wire_compression_stays_within_tolerance(wire):
    x, y, n = make_data(3, 4, seed=7)
    exact = _float32_wire()
    packed, opt, _ = train(M4, lambda: optimizer(wire_dtype=wire), x, y, n)
    w0, _ = initial_params()
    # Relative error of one rounding (2^-8 for bfloat16, 2^-11 for float16),
    # a few roundings per sum, on an update of size |w - w0|.
    tol = {"bfloat16": 2.0**-8, "float16": 2.0**-11}[wire] * 8
    change = np.abs(exact[0] - w0).max()
    err = np.abs(values(packed)[0] - exact[0]).max()
    assert 0 < err <= tol * change, (err, tol * change)
    # Gradients travel in 2 bytes; the weight stays float32 in its own reduce.
    params = 3 * 2 + 2
    assert int(opt.allreduce_bytes.numpy()) == 3 * (2 * params + 4)
    assert int(opt.allreduce_calls.numpy()) == 3 * 2


# --- Communication counted ----------------------------------------------------


@pytest.mark.parametrize(
    "mode,k,calls,payload",
    [
        ("every_step", 1, 8, 8 + 1),
        ("accumulate", 4, 2, 8 + 1),
        ("local_sgd", 4, 2, 8),
        ("diloco", 4, 2, 8),
    ],
)
def test_allreduce_calls_and_bytes_are_counted(mode, k, calls, payload):
    x, y, n = make_data(8, 2)
    _, opt, _ = train(M2, lambda: optimizer(sync=distopt.sync.get(mode, k=k)), x, y, n)
    assert int(opt.allreduce_calls.numpy()) == calls
    assert int(opt.allreduce_bytes.numpy()) == calls * payload * 4


# --- Checkpoints ----------------------------------------------------------------


@pytest.mark.parametrize(
    "mode,kwargs,split,compression,build",
    [
        ("accumulate", {"k": 3}, 4, None, True),  # mid-period: 1 micro-step in
        ("diloco", {"k": 2, "warmup_steps": 1}, 5, None, True),  # period boundary
        ("diloco", {"k": 3}, 4, None, True),  # mid-period
        (
            "local_sgd",
            {"k": 2, "warmup_steps": 1, "average_slots": True},
            3,
            None,
            True,
        ),
        ("local_sgd", {"k": 3}, 2, None, True),  # mid-period
        # Restored before the first step builds it, in the traced step: the
        # sync state (accumulators; the outer gradient's residuals) used to
        # be made inside the trace, where a deferred restore cannot assign it.
        ("accumulate", {"k": 3}, 4, None, False),
        ("diloco", {"k": 2, "warmup_steps": 1}, 5, "topk", False),
    ],
)
def test_resume_equals_uninterrupted_run(
    tmp_path, mode, kwargs, split, compression, build
):
    """Save after `split` steps, restore into fresh objects, finish the run.

    The reference is one uninterrupted run that makes the same
    `synchronize()` call before the save point: a no-op for accumulation, and
    for the divergent modes the averaging that keeps a checkpoint from holding
    only replica 0's copy.
    """
    x, y, n = make_data(7, 2, seed=11)
    make = lambda: optimizer(
        "momentum", sync=distopt.sync.get(mode, **kwargs), compression=compression
    )
    head, opt, step = train(M2, make, x[:split], y[:split], n[:split])
    opt.synchronize(head)
    assert_replicas_identical(
        M2, head + [s for p in head for s in opt.slots(p).values()]
    )
    path = tf.train.Checkpoint(params=head, optimizer=opt).save(str(tmp_path / "ckpt"))
    # The same traced step goes on, as in a trainer that saved.
    full, full_opt, _ = train(
        M2, None, x[split:], y[split:], n[split:], state=(head, opt), step=step
    )

    w0, b0 = initial_params()
    with M2.scope():
        params = [tf.Variable(np.zeros_like(w0)), tf.Variable(np.zeros_like(b0))]
        fresh = make()
        if build:
            fresh.build(params)
    status = tf.train.Checkpoint(params=params, optimizer=fresh).restore(path)
    resumed, fresh, _ = train(
        M2, None, x[split:], y[split:], n[split:], state=(params, fresh)
    )
    status.assert_consumed()
    for a, b in zip(
        local_copies(M2, resumed[0]) + local_copies(M2, resumed[1]),
        local_copies(M2, full[0]) + local_copies(M2, full[1]),
    ):
        np.testing.assert_array_equal(a, b)
    assert int(fresh.iterations.numpy()) == int(full_opt.iterations.numpy())


def _fresh(strategy, make, like, build=True):
    with strategy.scope():
        params = [tf.Variable(tf.zeros_like(p)) for p in like]
        opt = make()
        if build:
            opt.build(params)
    return params, opt


def _state(opt, params):
    return params + [s for p in params for s in opt.slots(p).values()]


@pytest.mark.parametrize(
    "mode,kwargs,split,build",
    [
        ("local_sgd", {"k": 3}, 2, True),  # mid-period
        ("local_sgd", {"k": 2, "warmup_steps": 1}, 3, True),  # boundary, slots differ
        ("diloco", {"k": 3, "warmup_steps": 1}, 3, True),  # mid-period
        ("local_sgd", {"k": 2, "average_slots": True}, 4, True),  # boundary: same
        # restore_replicas builds a fresh optimizer (it used to do nothing,
        # and the first step failed asking for the call just made).
        ("diloco", {"k": 3, "warmup_steps": 1}, 3, False),
    ],
)
def test_snapshot_resume_equals_a_run_that_never_stopped(
    tmp_path, mode, kwargs, split, build
):
    """snapshot_replicas before the save, restore_replicas after: bit-exact.

    Unlike synchronize(), the snapshot does not touch the run: the reference
    trains straight through, and so does the run that saved.
    """
    x, y, n = make_data(7, 2, seed=11)
    make = lambda: optimizer("momentum", sync=distopt.sync.get(mode, **kwargs))
    full, full_opt, _ = train(M2, make, x, y, n)

    head, opt, step = train(M2, make, x[:split], y[:split], n[:split])
    copies = [local_copies(M2, t) for t in _state(opt, head)]
    diverged = any((c[0] != c[1]).any() for c in copies)
    assert diverged == (split != 4)  # the test needs replicas that differ
    opt.snapshot_replicas(head)
    assert int(opt.sync.snapshot_step.numpy()) == (split if diverged else -1)
    path = tf.train.Checkpoint(params=head, optimizer=opt).save(str(tmp_path / "c"))
    # The run that saved goes on unchanged (its traced step, as in a
    # trainer), and frees the snapshot.
    went_on, opt, _ = train(
        M2, None, x[split:], y[split:], n[split:], state=(head, opt), step=step
    )
    assert int(opt.sync.snapshot_step.numpy()) == -1
    assert all(
        c.shape[0] == 0 for g in opt.sync.snapshots for c in local_copies(M2, g[0])
    )

    params, fresh = _fresh(M2, make, head, build=build)
    status = tf.train.Checkpoint(params=params, optimizer=fresh).restore(path)
    if build:
        fresh.restore_replicas(params)  # works outside the scope: built in it
    else:
        # Unbuilt, it must build, under the strategy: none in scope is named.
        with pytest.raises(ValueError, match="no strategy is in scope"):
            fresh.restore_replicas(params)
        with M2.scope():
            fresh.restore_replicas(params)
    status.assert_consumed()
    resumed, fresh, _ = train(
        M2, None, x[split:], y[split:], n[split:], state=(params, fresh)
    )
    for run in (went_on, resumed):
        opt_ = opt if run is went_on else fresh
        for a, b in zip(_state(opt_, run), _state(full_opt, full)):
            for ca, cb in zip(local_copies(M2, a), local_copies(M2, b)):
                np.testing.assert_array_equal(ca, cb)
    assert int(fresh.iterations.numpy()) == int(full_opt.iterations.numpy())


def _local_sgd_3():
    return optimizer("momentum", sync=distopt.sync.LocalSGD(3))


@pytest.fixture(scope="module")
def diverged_saves(tmp_path_factory):
    """Local SGD (k = 3) two steps in, replicas diverged, saved twice.

    First without a snapshot, then after `snapshot_replicas`: one run for
    the two tests below. Returns (paths by kind, data, head).
    """
    x, y, n = make_data(4, 2, seed=3)
    head, opt, _ = train(M2, _local_sgd_3, x[:2], y[:2], n[:2])
    copies = local_copies(M2, head[0])
    assert (copies[0] != copies[1]).any()  # a save of replica 0 loses data
    tmp = tmp_path_factory.mktemp("diverged")
    paths = {}
    for kind in ("no_snapshot", "snapshot"):
        if kind == "snapshot":
            opt.snapshot_replicas(head)
        checkpoint = tf.train.Checkpoint(params=head, optimizer=opt)
        paths[kind] = checkpoint.save(str(tmp / kind))
    return paths, (x, y, n), head


def test_a_restore_that_skips_restore_replicas_fails_the_next_step(diverged_saves):
    paths, (x, y, n), head = diverged_saves
    path = paths["snapshot"]
    params, fresh = _fresh(M2, _local_sgd_3, head)
    tf.train.Checkpoint(params=params, optimizer=fresh).restore(path)
    before = [local_copies(M2, t) for t in _state(fresh, params)]
    with pytest.raises(tf.errors.InvalidArgumentError, match="restore_replicas"):
        train(M2, None, x[2:], y[2:], n[2:], state=(params, fresh))
    for b, t in zip(before, _state(fresh, params)):  # nothing was updated
        for cb, ct in zip(b, local_copies(M2, t)):
            np.testing.assert_array_equal(cb, ct)
    # The failed (traced) step kept the snapshot, so what the message asks
    # for still works: the run then equals one that never stopped. (It freed
    # the rows, and training went on from replica 0's copy.)
    assert int(fresh.sync.snapshot_step.numpy()) == 2
    fresh.restore_replicas(params)
    resumed, fresh, _ = train(M2, None, x[2:], y[2:], n[2:], state=(params, fresh))
    full, full_opt, _ = train(M2, _local_sgd_3, x, y, n)
    for a, b in zip(_state(fresh, resumed), _state(full_opt, full)):
        for ca, cb in zip(local_copies(M2, a), local_copies(M2, b)):
            np.testing.assert_array_equal(ca, cb)


@pytest.mark.parametrize(
    "mode,function", [("local_sgd", True), ("diloco", False)], ids=["function", "eager"]
)
def test_synchronize_after_a_snapshot_frees_it(mode, function):
    """snapshot_replicas, then synchronize (to export the average, say): the
    next step goes on as after synchronize alone. It failed, saying a restore
    had skipped restore_replicas, and following that advice eagerly undid
    the synchronize.
    """
    x, y, n = make_data(3, 2, seed=4)
    make = lambda: optimizer("momentum", sync=distopt.sync.get(mode, k=3))
    runs = []
    for snapshot in (False, True):
        head, opt, _ = train(M2, make, x[:2], y[:2], n[:2], function=function)
        if snapshot:
            opt.snapshot_replicas(head)
            assert int(opt.sync.snapshot_step.numpy()) == 2
        opt.synchronize(head)
        assert int(opt.sync.snapshot_step.numpy()) == -1
        assert_replicas_identical(M2, _state(opt, head))
        went_on, opt, _ = train(
            M2, None, x[2:], y[2:], n[2:], state=(head, opt), function=function
        )
        runs.append([local_copies(M2, t) for t in _state(opt, went_on)])
    assert not np.array_equal(*runs[0][0])  # a local step: the replicas differ
    for plain, snapped in zip(*runs):
        for a, b in zip(plain, snapped):
            np.testing.assert_array_equal(a, b)


def test_restore_replicas_rejects_a_diverged_save_without_snapshot(diverged_saves):
    paths, _, head = diverged_saves
    params, fresh = _fresh(M2, _local_sgd_3, head)
    tf.train.Checkpoint(params=params, optimizer=fresh).restore(paths["no_snapshot"])
    with pytest.raises(ValueError, match="replica 0's weights"):
        fresh.restore_replicas(params)


@pytest.mark.parametrize("mode", ["local_sgd", "diloco"])
def test_snapshot_on_4_replicas_restores_on_2_as_the_average(tmp_path, mode):
    """A different replica count resumes as if synchronize() preceded the save."""
    x, y, n = make_data(2, 4, seed=5)
    make = lambda: optimizer("adam", sync=distopt.sync.get(mode, k=3))
    head, opt, _ = train(M4, make, x, y, n)
    opt.snapshot_replicas(head)
    path = tf.train.Checkpoint(params=head, optimizer=opt).save(str(tmp_path / "c"))
    opt.synchronize(head)  # the reference: average (and outer step) at the save
    expected = [np.asarray(t.read_value()) for t in _state(opt, head)]

    params, fresh = _fresh(M2, make, head)
    tf.train.Checkpoint(params=params, optimizer=fresh).restore(path).assert_consumed()
    fresh.restore_replicas(params)
    assert_replicas_identical(M2, _state(fresh, params))
    for t, e in zip(_state(fresh, params), expected):
        np.testing.assert_allclose(np.asarray(t.read_value()), e, rtol=1e-6, atol=1e-7)
    assert int(fresh.sync.since_average.numpy()) == 0


def test_snapshot_needs_every_variable():
    x, y, n = make_data(1, 2)
    head, opt, _ = train(M2, lambda: optimizer(sync=distopt.sync.LocalSGD(3)), x, y, n)
    with pytest.raises(ValueError, match="^var_list: pass every variable"):
        opt.snapshot_replicas(head[:1])


def test_accumulation_resume_needs_no_synchronize(tmp_path):
    """For accumulation, synchronize() is a no-op: a mid-window resume is the
    uninterrupted run, bit for bit (compressed: `test_compression.py`)."""
    x, y, n = make_data(7, 2, seed=11)
    make = lambda: optimizer("adam", sync=distopt.sync.Accumulate(3))
    full, _, _ = train(M2, make, x, y, n)
    head, opt, _ = train(M2, make, x[:4], y[:4], n[:4])
    path = tf.train.Checkpoint(params=head, optimizer=opt).save(str(tmp_path / "ckpt"))
    with M2.scope():
        params = [tf.Variable(tf.zeros_like(p)) for p in head]
        fresh = make()
        fresh.build(params)
    tf.train.Checkpoint(params=params, optimizer=fresh).restore(path).assert_consumed()
    resumed, _, _ = train(M2, None, x[4:], y[4:], n[4:], state=(params, fresh))
    for a, b in zip(values(resumed), values(full)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("before,after", [(4, 2), (2, 4)], ids=["4_to_2", "2_to_4"])
@pytest.mark.parametrize("agg", ["mean", "sum", "weighted_mean"])
def test_accumulation_resumed_mid_window_on_another_replica_count(
    tmp_path, agg, before, after
):
    """Accumulate(4), plain GD: 2 micro-steps on `before` replicas, saved
    mid-window, 2 more on `after` (an elastic resume after a preemption).
    The one update is the NumPy one of the aggregation over the 4 micro-steps
    as they ran. The buffers were shared out as sums: under `mean` the
    finished micro-steps then counted before / after times (2x from 4 to 2)."""
    weighted = agg == "weighted_mean"
    make = lambda: optimizer(aggregation=agg, sync=distopt.sync.Accumulate(4))
    strategies = {2: M2, 4: M4}
    x1, y1, n1 = make_data(2, before, seed=21, uneven=weighted)
    x2, y2, n2 = make_data(2, after, seed=22, uneven=weighted)
    head, opt, _ = train(strategies[before], make, x1, y1, n1, weighted=weighted)
    path = tf.train.Checkpoint(params=head, optimizer=opt).save(str(tmp_path / "c"))
    with strategies[after].scope():
        params = [tf.Variable(tf.zeros_like(p)) for p in head]
        resumed = make()
        resumed.build(params)
    tf.train.Checkpoint(params=params, optimizer=resumed).restore(
        path
    ).assert_consumed()
    train(
        strategies[after], None, x2, y2, n2, weighted=weighted, state=(params, resumed)
    )
    assert int(resumed.iterations.numpy()) == 1
    # NumPy: every replica's gradient at w0 in each micro-step, aggregated.
    w0 = initial_params()
    total, weight = [np.zeros_like(p, np.float64) for p in w0], 0.0
    for x, y, n in ((x1, y1, n1), (x2, y2, n2)):
        for t in range(len(x)):
            replicas = x.shape[1]
            for r in range(replicas):
                g = numpy_grads(*w0, x[t, r], y[t, r], n[t, r])
                scale = {"mean": 1 / replicas, "sum": 1.0, "weighted_mean": n[t, r]}
                total = [a + scale[agg] * b for a, b in zip(total, g)]
                weight += n[t, r]
    divisor = weight if weighted else 4.0
    for p, p0, g in zip(params, w0, total):
        for copy in local_copies(strategies[after], p):
            np.testing.assert_allclose(
                copy - p0, -0.1 * g / divisor, rtol=1e-5, atol=1e-7
            )


def test_accumulators_restore_from_a_checkpoint_of_their_sum(tmp_path):
    # Checkpoints written before the buffers kept every replica's row hold
    # the on-read variables' sum: each replica takes an equal share.
    with M2.scope():
        params = [tf.Variable(tf.zeros([3]))]
        opt = optimizer(sync=distopt.sync.Accumulate(4))
        opt.build(params)
    old = tf.Module()
    old.sync = tf.Module()
    old.sync.accumulators = [tf.Variable([2.0, 4.0, 6.0])]
    old.sync.weight_sum = tf.Variable(4.0)
    path = tf.train.Checkpoint(optimizer=old).save(str(tmp_path / "old"))
    tf.train.Checkpoint(optimizer=opt).restore(path)
    for copy in local_copies(M2, opt.sync.accumulators[0].storage):
        np.testing.assert_array_equal(copy, [1.0, 2.0, 3.0])
    assert [float(c) for c in local_copies(M2, opt.sync.weight_sum.storage)] == [
        2.0,
        2.0,
    ]


# --- Bad input ------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory",
    [
        distopt.sync.Accumulate,
        distopt.sync.LocalSGD,
        distopt.sync.DiLoCo,
        distopt.sync.Hierarchical,
    ],
)
@pytest.mark.parametrize("k", [0, -1, 1.5])
def test_bad_period_names_k(factory, k):
    with pytest.raises(ValueError, match="^k:"):
        factory(k)


@pytest.mark.parametrize(
    "make,argument",
    [
        # Truncated to 1 in silence, and an int() error naming nothing.
        (lambda: distopt.sync.LocalSGD(4, warmup_steps=1.5), "warmup_steps"),
        (lambda: distopt.sync.DiLoCo(4, warmup_steps="a"), "warmup_steps"),
        (lambda: distopt.sync.Hierarchical(4, warmup_steps=-1), "warmup_steps"),
        (lambda: distopt.sync.Hierarchical(4, group_size=0), "group_size"),
        # An AttributeError, or (Keras's) accepted and failing at the first
        # outer step.
        (lambda: distopt.sync.DiLoCo(4, outer_optimizer="sgd"), "outer_optimizer"),
        (lambda: distopt.sync.DiLoCo(4, outer_optimizer=0.7), "outer_optimizer"),
        # The class, not an instance: a TypeError naming nothing.
        (
            lambda: distopt.sync.DiLoCo(
                4, outer_optimizer=distopt.optimizers.GradientDescent
            ),
            "outer_optimizer",
        ),
        (
            lambda: distopt.sync.DiLoCo(4, outer_optimizer=tf.keras.optimizers.SGD()),
            "outer_optimizer",
        ),
    ],
)
def test_bad_sync_arguments_raise_one_error_naming_them(make, argument):
    with pytest.raises(ValueError) as e:
        make()
    assert str(e.value).startswith(f"{argument}:"), str(e.value)


@pytest.mark.parametrize(
    "option,value",
    [
        ("aggregation", "sum"),
        ("sync", "local_sgd"),
        ("global_clipnorm", 1.0),
        ("clipvalue", 1.0),
        ("clipnorm", 1.0),
        ("skip_nonfinite", True),
        ("wire_dtype", "bfloat16"),
        ("loss_scale", "dynamic"),
        ("use_ema", True),
        ("compression", "topk"),
    ],
)
def test_an_outer_optimizer_option_the_outer_step_ignores_is_refused(option, value):
    """Each was accepted and did nothing (the outer step applies the rule
    alone). Refused, the outer optimizer still serves a later DiLoCo: the
    refusal claimed nothing."""
    values = {
        "sync": lambda: distopt.sync.LocalSGD(2),
        "compression": lambda: distopt.compression.TopK(0.5),
    }
    value = values[option]() if option in values else value
    outer = distopt.optimizers.Momentum(0.7, 0.9, **{option: value})
    with pytest.raises(ValueError) as e:
        distopt.sync.DiLoCo(4, outer_optimizer=outer)
    assert str(e.value).startswith("outer_optimizer: DiLoCo's outer step"), e.value
    assert f"its {option} would do nothing; leave it out" in str(e.value)
    with pytest.raises(ValueError) as again:  # Not "already belongs to ...".
        distopt.sync.DiLoCo(4, outer_optimizer=outer)
    assert str(again.value) == str(e.value)


def test_numpy_integers_are_integers():
    """A count read from an array was refused, "must be an integer, got 2"."""
    assert distopt.sync.Accumulate(np.int64(4)).k == 4
    mode = distopt.sync.LocalSGD(np.int32(8), warmup_steps=np.int64(2))
    assert (mode.k, mode.warmup_steps) == (8, 2)
    assert type(mode.k) is int and type(mode.warmup_steps) is int
    assert distopt.compression.PowerSGD(rank=np.int64(2)).rank == 2
    with pytest.raises(ValueError, match="^k:"):
        distopt.sync.Accumulate(np.float64(4.0))
    with pytest.raises(ValueError, match="^k:"):
        distopt.sync.Accumulate(np.bool_(True))


@pytest.mark.parametrize(
    "weight,match",
    [
        (-1.0, "non-negative"),
        (float("nan"), "finite"),
        ([1.0, 2.0], "scalar"),
        (None, "needs"),
    ],
)
def test_bad_weight_is_named_and_nothing_changes(weight, match):
    var = tf.Variable([1.0, 2.0])
    opt = optimizer(aggregation="weighted_mean")
    with pytest.raises(ValueError, match=f"^weight:.*{match}"):
        opt.apply_gradients([tf.constant([1.0, 1.0])], [var], weight=weight)
    np.testing.assert_array_equal(var.numpy(), [1.0, 2.0])
    assert int(opt.iterations.numpy()) == 0


@pytest.mark.parametrize(
    "strategy, jit",
    [(M2, False), (DEFAULT, True)],
    ids=["function_2_replicas", "xla_default_strategy"],
)
@pytest.mark.parametrize("bad", [-2.0, float("nan"), float("inf")])
def test_invalid_weight_in_a_function_skips_everywhere_and_counts(strategy, jit, bad):
    # Compiled code drops assertions (XLA always; tf.function here, since
    # the weight is a runtime tensor): the invalid weight must travel as
    # data and veto the step on every replica. Under M2, replica 1 passes a
    # good weight. (XLA cannot compile a step that spans several devices.)
    with strategy.scope():
        var = tf.Variable([1.0, 2.0])
        opt = optimizer("gradient_descent", aggregation="weighted_mean")

    def replica_step(w):
        ctx = tf.distribute.get_replica_context()
        w = tf.where(tf.equal(ctx.replica_id_in_sync_group, 0), w, 3.0)
        opt.apply_gradients([tf.constant([1.0, 1.0])], [var], weight=w)

    @tf.function(jit_compile=jit)
    def step(w):
        strategy.run(replica_step, args=(w,))

    step(tf.constant(bad))
    for copy in local_copies(strategy, var):
        np.testing.assert_array_equal(copy, [1.0, 2.0])
    assert int(opt.iterations.numpy()) == 0
    assert int(opt.skipped_steps.numpy()) == 1
    assert int(opt.invalid_weight_steps.numpy()) == 1
    # A valid weight afterwards trains normally: nothing was left poisoned.
    step(tf.constant(1.0))
    for copy in local_copies(strategy, var):
        np.testing.assert_allclose(copy, [0.9, 1.9], rtol=1e-6)
    assert int(opt.invalid_weight_steps.numpy()) == 1


def test_all_weights_zero_skips_the_step():
    x, y, n = make_data(2, 2)
    n[1] = 0  # every replica has no examples at step 1
    params, opt, _ = train(
        M2, lambda: optimizer(aggregation="weighted_mean"), x, y, n, weighted=True
    )
    assert int(opt.skipped_steps.numpy()) == 1
    assert int(opt.iterations.numpy()) == 1
    ref, _, _ = train(
        M2,
        lambda: optimizer(aggregation="weighted_mean"),
        x[:1],
        y[:1],
        n[:1],
        weighted=True,
    )
    for a, b in zip(values(params), values(ref)):
        np.testing.assert_array_equal(a, b)
        assert np.all(np.isfinite(a))


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="valid names: accumulate, diloco"):
        distopt.sync.get("sometimes")
    with pytest.raises(ValueError, match="valid names: mean, sum, weighted_mean"):
        distopt.aggregation.get("median")


def test_a_sync_mode_and_an_outer_optimizer_serve_one_owner():
    # A DiLoCo shared by two optimizers (a sweep's pattern) failed with a
    # KeyError at trace time: its anchors and outer slots were the first's.
    mode = distopt.sync.DiLoCo(2)
    # A constructor that raised claimed nothing (it was claimed, and the
    # corrected call refused).
    with pytest.raises(ValueError, match="compression"):
        distopt.optimizers.GradientDescent(0.1, sync=mode, compression="nope")
    first = distopt.optimizers.GradientDescent(0.1, sync=mode)
    with M2.scope():
        first.build([tf.Variable(tf.zeros([3]))])
    with pytest.raises(ValueError) as e:
        distopt.optimizers.GradientDescent(0.1, sync=mode)
    assert str(e.value).startswith("sync: this PeriodicAverage instance already")
    outer = distopt.optimizers.GradientDescent(1.0)
    distopt.sync.DiLoCo(2, outer_optimizer=outer)
    with pytest.raises(ValueError) as e:
        distopt.sync.DiLoCo(2, outer_optimizer=outer)
    assert str(e.value).startswith(
        "outer_optimizer: this GradientDescent instance already belongs to "
        "sync mode DiLoCo"
    )
