"""SAM and Heun against NumPy references, without and with a mirrored strategy.

Each replica of the mirrored runs has its own data (so its own loss and
gradients): the references below say what aggregation does with them.
"""

import functools

import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_replicas_identical, mirrored

from distopt import distribute as dist
from distopt import optimizers
from distopt.optimizers import SAM, Heun

STEPS = 3
RHO = 0.3
LR = 0.1
QUARTIC = 0.05  # A w^4 term, so that gradients are not linear in p.

_rng = np.random.default_rng(7)
# Two replicas' data sets: 4 examples of 3 features each.
XS = _rng.normal(size=(2, 4, 3)).astype(np.float32)
YS = _rng.normal(size=(2, 4)).astype(np.float32)
W0 = np.array([0.5, -1.0, 2.0], np.float32)
B0 = np.float32(0.25)


# --- NumPy references (float64) ---------------------------------------------


def np_grad(p, x, y):
    """Gradient of 0.5 * mean((x w + b - y)^2) + QUARTIC * sum(w^4); p = (w, b)."""
    w, b = p[:3], p[3]
    r = x @ w + b - y
    gw = x.T @ r / len(y) + 4 * QUARTIC * w**3
    return np.append(gw, r.mean())


def np_sam(p, data, steps, lr, rho, perturbation, momentum=None):
    p, m = p.astype(np.float64), np.zeros(len(p))
    for _ in range(steps):
        grads = [np_grad(p, x, y) for x, y in data]
        if perturbation == "aggregated":
            g = np.mean(grads, axis=0)
            es = [rho * g / np.linalg.norm(g)] * len(data)
        else:
            es = [rho * g / np.linalg.norm(g) for g in grads]
        g_sam = np.mean([np_grad(p + e, x, y) for e, (x, y) in zip(es, data)], axis=0)
        if momentum is None:
            p = p - lr * g_sam
        else:
            m = momentum * m - lr * g_sam
            p = p + m
    return p


def np_heun(p, data, steps, lr):
    p = p.astype(np.float64)
    for _ in range(steps):
        g1 = np.mean([np_grad(p, x, y) for x, y in data], axis=0)
        trial = p - lr * g1
        g2 = np.mean([np_grad(trial, x, y) for x, y in data], axis=0)
        p = p - lr / 2 * (g1 + g2)
    return p


def np_gd(p, data, steps, lr):
    p = p.astype(np.float64)
    for _ in range(steps):
        p = p - lr * np.mean([np_grad(p, x, y) for x, y in data], axis=0)
    return p


P0 = np.append(W0, B0)


# --- Running the TF optimizers -------------------------------------------------


def _strategy(kind):
    return tf.distribute.get_strategy() if kind == "default" else mirrored(2)


def _data(kind):
    n = 1 if kind == "default" else 2
    return list(zip(XS[:n], YS[:n]))


def _train(strategy, make_opt, steps=STEPS, w0=W0, b0=B0):
    """`steps` calls of `opt.minimize` inside strategy.run; each replica its data."""
    with strategy.scope():
        w = tf.Variable(w0, name="w")
        b = tf.Variable(b0, name="b")
        opt = make_opt()
        opt.build([w, b])
    xs, ys = tf.constant(XS), tf.constant(YS)

    def replica_step():
        r = dist.replica_id()
        x, y = tf.gather(xs, r), tf.gather(ys, r)

        def loss_fn():
            pred = tf.linalg.matvec(x, w) + b
            return 0.5 * tf.reduce_mean(tf.square(pred - y)) + QUARTIC * tf.reduce_sum(
                w**4
            )

        return opt.minimize(loss_fn, [w, b])

    @tf.function
    def train():
        for _ in range(steps):
            strategy.run(replica_step)

    with strategy.scope():
        train()
    if strategy.num_replicas_in_sync > 1:
        assert_replicas_identical(strategy, [w, b])
    assert int(opt.iterations.numpy()) == steps
    return np.append(w.numpy(), b.numpy()), opt


@functools.cache
def _sam_gradient_descent(kind, perturbation):
    """SAM around gradient descent, trained once per strategy and perturbation.

    The aggregated Mirrored(2) run is also the wire test's float32 reference.
    Returns `_train`'s (values, optimizer), which callers only read.
    """
    return _train(
        _strategy(kind),
        lambda: SAM(optimizers.GradientDescent(LR), rho=RHO, perturbation=perturbation),
    )


@pytest.mark.parametrize("kind", ["default", "mirrored2"])
@pytest.mark.parametrize("perturbation", ["replica", "aggregated"])
def test_sam_matches_numpy(kind, perturbation):
    got, _ = _sam_gradient_descent(kind, perturbation)
    want = np_sam(P0, _data(kind), STEPS, LR, RHO, perturbation)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_sam_perturbations_differ_with_two_replicas():
    # Otherwise the two variants' tests above could not tell them apart.
    data = _data("mirrored2")
    a = np_sam(P0, data, STEPS, LR, RHO, "replica")
    b = np_sam(P0, data, STEPS, LR, RHO, "aggregated")
    plain = np_gd(P0, data, STEPS, LR)
    assert np.abs(a - b).max() > 1e-3
    assert np.abs(a - plain).max() > 1e-3


def test_sam_wraps_momentum_mirrored():
    strategy = mirrored(2)
    got, _ = _train(
        strategy,
        lambda: SAM(optimizers.Momentum(LR, momentum=0.9), rho=RHO),
    )
    want = np_sam(P0, _data("mirrored2"), STEPS, LR, RHO, "replica", momentum=0.9)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("kind", ["default", "mirrored2"])
def test_heun_matches_numpy(kind):
    got, _ = _train(_strategy(kind), lambda: Heun(LR))
    data = _data(kind)
    want = np_heun(P0, data, STEPS, LR)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    # And it is not gradient descent.
    assert np.abs(want - np_gd(P0, data, STEPS, LR)).max() > 1e-3


def test_sam_undo_is_exact_per_replica():
    # With a zero learning rate a step must leave every copy bit-identical to
    # where it started, although each replica moved by its own e.
    rho = 0.3
    # For these values, in float32, undoing by subtraction would not be exact:
    # (p + e) - e != p.
    naive = []
    for x, y in _data("mirrored2"):
        g = np_grad(P0.astype(np.float64), x, y)
        e = (rho * g / np.linalg.norm(g)).astype(np.float32)
        naive.append((P0 + e) - e)
    assert any((n != P0).any() for n in naive)
    got, _ = _train(
        mirrored(2), lambda: SAM(optimizers.GradientDescent(0.0), rho=rho), steps=1
    )
    np.testing.assert_array_equal(got, P0)


def test_apply_gradients_says_use_minimize():
    v = tf.Variable([1.0])
    for opt in (SAM(optimizers.GradientDescent(0.1)), Heun(0.1)):
        with pytest.raises(NotImplementedError, match=r"minimize\(loss_fn, var_list\)"):
            opt.apply_gradients([tf.constant([1.0])], [v])


def test_registry_and_config():
    sam = optimizers.get(
        "sam", base_optimizer=optimizers.get("momentum", learning_rate=0.1), rho=0.2
    )
    assert isinstance(sam, SAM) and sam.rho == 0.2
    assert isinstance(sam.base_optimizer, optimizers.Momentum)
    by_name = optimizers.get(
        "sam", base_optimizer="adam", learning_rate=0.01, perturbation="aggregated"
    )
    assert isinstance(by_name.base_optimizer, optimizers.Adam)
    assert by_name.learning_rate == 0.01
    again = optimizers.from_config({"class": "SAM", "config": by_name.get_config()})
    assert again.get_config() == by_name.get_config()
    heun = optimizers.get("heun", learning_rate=0.05)
    assert isinstance(heun, Heun) and heun.learning_rate == 0.05
    assert {"sam", "heun"} <= set(optimizers.names())


def test_bad_arguments():
    gd = optimizers.GradientDescent(0.1)
    with pytest.raises(ValueError, match="rho"):
        SAM(gd, rho=-1.0)
    with pytest.raises(ValueError, match="perturbation"):
        SAM(gd, perturbation="global")
    with pytest.raises(ValueError, match="base_optimizer"):
        SAM(Heun(0.1))
    with pytest.raises(ValueError, match="base_optimizer"):
        SAM("not_an_optimizer")
    # By name too: SAM(base_optimizer="sam") failed inside, "missing 1
    # required positional argument: 'base_optimizer'".
    for name, cls in [("sam", "SAM"), ("heun", "Heun")]:
        with pytest.raises(ValueError) as e:
            SAM(name, learning_rate=0.1)
        assert str(e.value) == (
            f"base_optimizer: {cls} evaluates the loss itself; SAM needs a base "
            "optimizer with apply_gradients."
        )
    with pytest.raises(TypeError, match="base_optimizer"):
        SAM(object())
    with pytest.raises(ValueError, match="base-optimizer arguments"):
        SAM(gd, learning_rate=0.1)
    with pytest.raises(ValueError, match="sync"):
        Heun(0.1, sync="local_sgd")


# --- One reduction path: transforms, wire and counters hold for SAM and Heun -----


def _clip(g, clipnorm):
    return g * min(1.0, clipnorm / np.linalg.norm(g))


def np_heun_clipped(p, data, steps, lr, clipnorm):
    """Heun with global-norm clipping of both aggregated gradients."""
    p = p.astype(np.float64)
    for _ in range(steps):
        grads1 = [np_grad(p, x, y) for x, y in data]
        g1 = _clip(np.mean(grads1, axis=0), clipnorm)
        trial = p - lr * g1
        grads2 = [np_grad(trial, x, y) for x, y in data]
        # The update clips the aggregated mean of 0.5 * (g1_r + g2_r).
        avg = np.mean([0.5 * (a + b) for a, b in zip(grads1, grads2)], axis=0)
        p = p - lr * _clip(avg, clipnorm)
    return p


def test_heun_clips_both_reductions_and_counts_them():
    clip = 0.2
    got, opt = _train(mirrored(2), lambda: Heun(LR, global_clipnorm=clip))
    want = np_heun_clipped(P0, _data("mirrored2"), STEPS, LR, clip)
    # The clip binds: without it the result is elsewhere.
    assert not np.allclose(want, np_heun(P0, _data("mirrored2"), STEPS, LR), atol=1e-3)
    np.testing.assert_allclose(got - P0, want - P0, rtol=1e-5, atol=1e-7)
    # Two fused all-reduces per step (trial gradient, update), both counted.
    assert int(opt.allreduce_calls) == 2 * STEPS
    assert int(opt.allreduce_bytes) == 2 * STEPS * (4 * 4 + 4)


def test_sam_aggregated_perturbation_uses_the_wire_and_counters():
    exact, opt_exact = _sam_gradient_descent("mirrored2", "aggregated")
    narrow, opt = _train(
        mirrored(2),
        lambda: SAM(
            optimizers.GradientDescent(LR, wire_dtype="bfloat16"),
            rho=RHO,
            perturbation="aggregated",
        ),
    )
    # Perturbation and update each: the weight in float32 first, then the
    # 4 gradients in 2 bytes each.
    assert int(opt.base_optimizer.allreduce_calls) == 2 * 2 * STEPS
    assert int(opt.base_optimizer.allreduce_bytes) == 2 * STEPS * (4 + 4 * 2)
    assert int(opt_exact.base_optimizer.allreduce_bytes) == 2 * STEPS * (4 * 4 + 4)
    # bfloat16 rounding shows, within its tolerance.
    assert 0 < np.abs(narrow - exact).max() <= 2.0**-8 * 8 * np.abs(exact - P0).max()


# --- An invalid weight: one skipped step, counted once -----------------------------


def _weighted_mean(grads, weights):
    return np.average(grads, axis=0, weights=weights)


def np_weighted_step(p, data, weights, lr, kind, rho=RHO):
    """One weighted-mean step of Heun or SAM (aggregated), float64."""
    p = p.astype(np.float64)
    g1 = _weighted_mean([np_grad(p, x, y) for x, y in data], weights)
    if kind == "heun":
        g2 = _weighted_mean([np_grad(p - lr * g1, x, y) for x, y in data], weights)
        return p - lr / 2 * (g1 + g2)
    e = rho * g1 / np.linalg.norm(g1)
    return p - lr * _weighted_mean([np_grad(p + e, x, y) for x, y in data], weights)


@pytest.mark.parametrize("bad", [-2.0, float("nan"), float("inf")])
@pytest.mark.parametrize("kind", ["heun", "sam_aggregated"])
def test_an_invalid_weight_skips_the_step_and_counts_it_once(kind, bad):
    # Heun and aggregated SAM reduce the same weights twice per step (the
    # trial point or the perturbation, then the update): one step with an
    # invalid weight is one invalid-weight step.
    strategy = mirrored(2)
    with strategy.scope():
        w = tf.Variable(W0, name="w")
        b = tf.Variable(B0, name="b")
        if kind == "heun":
            opt = Heun(LR, aggregation="weighted_mean")
            base = opt
        else:
            base = optimizers.GradientDescent(LR, aggregation="weighted_mean")
            opt = SAM(base, rho=RHO, perturbation="aggregated")
        opt.build([w, b])
    xs, ys = tf.constant(XS), tf.constant(YS)

    @tf.function
    def step(weight0):
        def replica_step():
            r = dist.replica_id()
            x, y = tf.gather(xs, r), tf.gather(ys, r)
            # Replica 1 always passes a good weight; replica 0's is run-time.
            weight = tf.where(tf.equal(r, 0), weight0, 3.0)

            def loss_fn():
                pred = tf.linalg.matvec(x, w) + b
                return 0.5 * tf.reduce_mean(
                    tf.square(pred - y)
                ) + QUARTIC * tf.reduce_sum(w**4)

            opt.minimize(loss_fn, [w, b], weight=weight)

        strategy.run(replica_step)

    step(tf.constant(bad))
    assert_replicas_identical(strategy, [w, b])
    np.testing.assert_array_equal(np.append(w.numpy(), b.numpy()) - P0, 0.0)
    assert int(base.invalid_weight_steps) == 1
    assert int(opt.skipped_steps) == 1
    assert int(opt.iterations) == 0
    # A valid step afterwards: the weighted mean, and nothing more counted.
    step(tf.constant(2.0))
    assert_replicas_identical(strategy, [w, b])
    got = np.append(w.numpy(), b.numpy())
    want = np_weighted_step(P0, _data("mirrored2"), [2.0, 3.0], LR, kind[:4])
    np.testing.assert_allclose(got - P0, want - P0, rtol=1e-5, atol=1e-7)
    assert int(base.invalid_weight_steps) == 1
    assert int(opt.skipped_steps) == 1
    assert int(opt.iterations) == 1
