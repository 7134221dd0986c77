"""Every optimizer under the default, OneDevice and Mirrored(2, 4) strategies.

Inside `strategy.run`, with a different gradient on every replica, one step
is: the mean across replicas, then one update. So every replica's copy of
every variable and slot stays identical, and the result equals the
single-device update with the mean gradient. A `MirroredVariable` assigned in
replica context would silently diverge instead, which these tests catch.
"""

import functools

import numpy as np
import numpy_reference as ref
import pytest
import tensorflow as tf
from conftest import local_copies, mirrored
from numpy_reference import CONFIGS

from distopt import distribute, optimizers

#: Created once per module: MirroredStrategy construction is not free.
STRATEGIES = {
    "default": tf.distribute.get_strategy(),
    "one_device": distribute.make_strategy("one_device"),
    "mirrored2": mirrored(2),
    "mirrored4": mirrored(4),
}

NUM_STEPS = 2


def _create(strategy, params, build=False):
    """One optimizer and one fresh set of variables per configuration."""
    with strategy.scope():
        opts = [optimizers.get(name, **config) for name, config in CONFIGS]
        var_sets = [[tf.Variable(p) for p in params] for _ in CONFIGS]
        if build:
            for opt, variables in zip(opts, var_sets):
                opt.build(variables)
    return opts, var_sets


def _train(strategy, opts, var_sets, replica_grads, mode):
    """Runs the steps inside `strategy.run`, where unbuilt optimizers build.

    `replica_grads[t][r]` is replica r's list of gradients at step t.
    """

    def replica_step(grads):
        for opt, variables in zip(opts, var_sets):
            opt.apply_gradients(grads, variables)

    def step(grads):
        strategy.run(replica_step, args=(grads,))

    if mode == "function":
        step = tf.function(step)
    for grads in replica_grads:
        per_replica = strategy.experimental_distribute_values_from_function(
            lambda ctx, grads=grads: [
                tf.constant(g) for g in grads[ctx.replica_id_in_sync_group]
            ]
        )
        step(per_replica)


def _state(strategy, opt, variables):
    """Every replica's copy of every variable, slot and the step counter."""
    out = {f"var{k}": local_copies(strategy, v) for k, v in enumerate(variables)}
    for k, v in enumerate(variables):
        for name, s in opt.slots(v).items():
            out[f"var{k}/{name}"] = local_copies(strategy, s)
    out["iterations"] = local_copies(strategy, opt.iterations.variable)
    return out


def _mean_gradients(replica_grads):
    """Per step, per variable: the mean over replicas, in float64."""
    return [
        [
            np.mean([g[k] for g in grads], axis=0, dtype=np.float64)
            for k in range(len(grads[0]))
        ]
        for grads in replica_grads
    ]


@functools.cache
def _single_device(num_replicas):
    """Final variables of each optimizer given the mean gradient, no strategy."""
    params, replica_grads = ref.problem(NUM_STEPS, seed=8, num_replicas=num_replicas)
    results = []
    for name, config in CONFIGS:
        # Op by op (no XLA compilation to pay for): within an ulp or two of
        # the compiled kernel, see test_execution_modes.
        opt = optimizers.get(name, jit_compile=False, **config)
        variables = [tf.Variable(p) for p in params]
        for mean in _mean_gradients(replica_grads):
            opt.apply_gradients([tf.constant(m, tf.float32) for m in mean], variables)
        results.append([v.numpy() for v in variables])
    return results


@functools.cache
def _trained(strategy_name, mode):
    """Every optimizer after NUM_STEPS steps inside `strategy.run`.

    Cached: the checkpoint tests reuse the Mirrored(4) run. Every optimizer
    builds lazily, inside its first step, except in the Mirrored(4)
    function: built inside a `tf.function`, the step is traced twice, behind
    a condition, which costs about 3 times the CPU; Mirrored(2) checks that
    path under a MirroredStrategy already.
    """
    strategy = STRATEGIES[strategy_name]
    n = strategy.num_replicas_in_sync
    params, replica_grads = ref.problem(NUM_STEPS, seed=8, num_replicas=n)
    build = (strategy_name, mode) == ("mirrored4", "function")
    opts, var_sets = _create(strategy, params, build=build)
    _train(strategy, opts, var_sets, replica_grads, mode)
    return params, replica_grads, opts, var_sets


#: tf.function under every strategy; eager, the slow mode (one compiled
#: kernel per device and variable shape, dispatched from Python), on all but
#: Mirrored(4).
CASES = [(s, "function") for s in STRATEGIES] + [
    ("default", "eager"),
    ("one_device", "eager"),
    ("mirrored2", "eager"),
]


@pytest.mark.parametrize(
    "strategy_name,mode", CASES, ids=[f"{s}-{m}" for s, m in CASES]
)
def test_mean_of_replica_gradients_then_one_update(strategy_name, mode):
    strategy = STRATEGIES[strategy_name]
    n = strategy.num_replicas_in_sync
    params, replica_grads, opts, var_sets = _trained(strategy_name, mode)
    single = _single_device(n)
    for (name, config), opt, variables, alone in zip(CONFIGS, opts, var_sets, single):
        state = _state(strategy, opt, variables)
        assert all(len(c) == n for c in state.values())
        # Identical on every replica: the replicas' different gradients did
        # not leak into their own copies.
        for key, copies in state.items():
            for r, c in enumerate(copies[1:], start=1):
                np.testing.assert_array_equal(
                    c, copies[0], err_msg=f"{name} {key}: replica {r} diverged"
                )
        assert int(state["iterations"][0]) == NUM_STEPS
        # Equal to the single-device update with the mean gradient (up to
        # the order of summation in the all-reduce)...
        for k, (v, a) in enumerate(zip(variables, alone)):
            got = local_copies(strategy, v)[0]
            np.testing.assert_allclose(
                got, a, rtol=1e-6, atol=1e-6, err_msg=f"{name} var{k}"
            )
        # ...which is the mean-gradient update of the NumPy reference.
        hyper = dict(config)
        lr = hyper.pop("learning_rate")
        want, _ = ref.run(name, params, _mean_gradients(replica_grads), lr, **hyper)
        for k, w in enumerate(want):
            got = local_copies(strategy, variables[k])[0]
            np.testing.assert_allclose(got, w, rtol=2e-5, atol=2e-5, err_msg=name)


@pytest.fixture(scope="module")
def checkpoint_under_mirrored4(tmp_path_factory):
    """The optimizers trained under Mirrored(4), saved; their state."""
    strategy = STRATEGIES["mirrored4"]
    params, _, opts, var_sets = _trained("mirrored4", "function")
    path = tf.train.Checkpoint(opts=opts, var_sets=var_sets).save(
        str(tmp_path_factory.mktemp("ckpt") / "ckpt")
    )
    states = [_state(strategy, o, vs) for o, vs in zip(opts, var_sets)]
    return path, params, states


@pytest.mark.parametrize("build_first", [True, False], ids=["built", "deferred"])
@pytest.mark.parametrize("target", ["default", "mirrored2"])
def test_checkpoint_from_mirrored4_restores(
    checkpoint_under_mirrored4, target, build_first
):
    path, params, saved = checkpoint_under_mirrored4
    strategy = STRATEGIES[target]
    # Fresh variables with other values, so that a restore that did nothing
    # would show.
    opts, var_sets = _create(strategy, [np.full_like(p, 7.0) for p in params])
    checkpoint = tf.train.Checkpoint(opts=opts, var_sets=var_sets)

    def build():
        with strategy.scope():
            for opt, variables in zip(opts, var_sets):
                opt.build(variables)

    if build_first:
        build()
        checkpoint.restore(path).assert_existing_objects_matched()
    else:
        # Slots created after the restore call get their saved values then.
        status = checkpoint.restore(path)
        build()
        status.assert_existing_objects_matched()
    for (name, _), opt, variables, want in zip(CONFIGS, opts, var_sets, saved):
        state = _state(strategy, opt, variables)
        assert state.keys() == want.keys()
        assert int(want["iterations"][0]) == NUM_STEPS
        for key, copies in state.items():
            assert len(copies) == strategy.num_replicas_in_sync
            for c in copies:
                np.testing.assert_array_equal(c, want[key][0], err_msg=f"{name} {key}")


@pytest.mark.parametrize("aggregation", ["mean", "sum", "weighted_mean"])
@pytest.mark.parametrize("strategy_name", ["default", "mirrored2", "mirrored4"])
def test_a_gradient_given_outside_strategy_run_is_applied_as_given(
    strategy_name, aggregation
):
    # The docstring's contract: outside strategy.run the gradient is the
    # aggregate. Plain GD shows a scale (a sum over 4 replicas was 4x).
    strategy = {
        "default": tf.distribute.get_strategy,
        "mirrored2": lambda: mirrored(2),
        "mirrored4": lambda: mirrored(4),
    }[strategy_name]()
    g = np.array([0.5, -1.0, 2.0], np.float32)
    with strategy.scope():
        v = tf.Variable(tf.zeros([3]))
        opt = optimizers.GradientDescent(0.1, aggregation=aggregation)
        weight = 3.0 if aggregation == "weighted_mean" else None
        opt.apply_gradients([tf.constant(g)], [v], weight=weight)
    for copy in local_copies(strategy, v):
        np.testing.assert_allclose(copy, -0.1 * g, rtol=1e-6)
    assert int(opt.iterations) == 1
