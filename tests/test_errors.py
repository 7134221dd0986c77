"""Bad input: a ValueError naming the argument, and nothing updated.

Also the two accepted call forms and the skipping of None gradients.
"""

import math

import numpy as np
import numpy_reference as ref
import pytest
import tensorflow as tf
from conftest import local_copies, mirrored

import distopt
from distopt import optimizers

NAMES = [
    "gradient_descent",
    "momentum",
    "adam",
    "adamw",
    "adamax",
    "rmsprop",
    "adagrad",
    "lion",
    "lamb",
    "lars",
]
#: Options that give an optimizer all its slots.
OPTIONS = {"adam": {"amsgrad": True}, "rmsprop": {"centered": True, "momentum": 0.5}}


def _snapshot(opt, variables):
    """Every value that an update could change, by name."""
    values = {f"var{k}": v.numpy() for k, v in enumerate(variables)}
    for k, v in enumerate(variables):
        for name, s in opt.slots(v).items():
            values[f"var{k}/{name}"] = s.numpy()
    values["iterations"] = opt.iterations.numpy()
    values["num_variables"] = len(opt.variables)
    return values


def _assert_unchanged(before, after):
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)


def _stepped(name):
    """An optimizer that has taken one step, so its slots are not initial."""
    # The plain kernel: validation happens before it and XLA would only cost
    # compile time here.
    opt = optimizers.get(
        name, learning_rate=0.1, jit_compile=False, **OPTIONS.get(name, {})
    )
    params, (grads,) = ref.problem(1, seed=10)
    variables = [tf.Variable(p) for p in params]
    opt.apply_gradients([tf.constant(g) for g in grads], variables)
    return opt, variables, grads


def _bad_calls(variables, grads):
    """(argument named in the error, call) for each kind of bad input.

    The bad item comes last, so that a library which validated as it went
    would already have updated the first variables.
    """
    g = [tf.constant(x) for x in grads]
    int_var = tf.Variable(np.zeros(3, np.int32))
    wrong_shape = g[:-1] + [tf.zeros((2, 3))]
    return {
        "fewer_grads": ("var_list", lambda o: o.apply_gradients(g[:-1], variables)),
        "more_grads": ("var_list", lambda o: o.apply_gradients(g + g[:1], variables)),
        "not_pairs": ("grads_and_vars", lambda o: o.apply_gradients(g)),
        "wrong_shape": ("grads", lambda o: o.apply_gradients(wrong_shape, variables)),
        "wrong_shape_pairs": (
            "grads",
            lambda o: o.apply_gradients(list(zip(wrong_shape, variables))),
        ),
        "integer_variable": (
            "var_list",
            lambda o: o.apply_gradients(g + [tf.zeros(3)], variables + [int_var]),
        ),
    }


BAD_KINDS = [
    "fewer_grads",
    "more_grads",
    "not_pairs",
    "wrong_shape",
    "wrong_shape_pairs",
    "integer_variable",
]


@pytest.mark.parametrize("kind", BAD_KINDS)
@pytest.mark.parametrize("name", NAMES)
def test_bad_input_updates_nothing(name, kind):
    opt, variables, grads = _stepped(name)
    argument, call = _bad_calls(variables, grads)[kind]
    before = _snapshot(opt, variables)
    assert before["iterations"] == 1
    with pytest.raises(ValueError, match=rf"\b{argument}\b"):
        call(opt)
    _assert_unchanged(before, _snapshot(opt, variables))


@pytest.mark.parametrize("kind", ["wrong_shape", "integer_variable", "fewer_grads"])
def test_bad_first_call_builds_nothing(kind):
    opt = optimizers.Adam(0.1, jit_compile=False)
    params, (grads,) = ref.problem(1, seed=11)
    variables = [tf.Variable(p) for p in params]
    argument, call = _bad_calls(variables, grads)[kind]
    with pytest.raises(ValueError, match=rf"\b{argument}\b"):
        call(opt)
    assert len(opt.variables) == 9  # the 9 counters only: no slots
    assert opt.iterations.numpy() == 0
    for v, p in zip(variables, params):
        np.testing.assert_array_equal(v.numpy(), p)


def test_bad_input_inside_strategy_run_updates_no_replica():
    strategy = mirrored(2)
    params, (grads,) = ref.problem(1, seed=12)
    with strategy.scope():
        opt = optimizers.Adam(0.1, jit_compile=False)
        variables = [tf.Variable(p) for p in params]
        opt.build(variables)
    wrong = [tf.constant(g) for g in grads[:-1]] + [tf.zeros((2, 3))]
    with pytest.raises(ValueError, match=r"\bgrads\b"):
        strategy.run(lambda: opt.apply_gradients(wrong, variables))
    for v, p in zip(variables, params):
        for copy in local_copies(strategy, v):
            np.testing.assert_array_equal(copy, p)
        for s in opt.slots(v).values():
            for copy in local_copies(strategy, s):
                assert not copy.any()
    assert opt.iterations.numpy() == 0


# --- Hyperparameters ---------------------------------------------------------

BAD_RATES = [-0.1, math.nan, math.inf, "fast"]


@pytest.mark.parametrize("value", BAD_RATES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_bad_learning_rate(name, value):
    with pytest.raises(ValueError, match=r"\blearning_rate\b"):
        optimizers.get(name, learning_rate=value)


BAD_UNIT = [-0.1, 1.0, 1.5, math.nan]

#: (optimizer, argument) for every argument that must lie in [0, 1).
UNIT_ARGUMENTS = [
    ("adam", "beta_1"),
    ("adam", "beta_2"),
    ("adamw", "beta_1"),
    ("adamw", "beta_2"),
    ("adamax", "beta_1"),
    ("adamax", "beta_2"),
    ("lion", "beta_2"),
    ("lamb", "beta_1"),
    ("lamb", "beta_2"),
    ("momentum", "momentum"),
    ("rmsprop", "rho"),
    ("rmsprop", "momentum"),
    ("lars", "momentum"),
    ("gradient_descent", "ema_momentum"),
]


@pytest.mark.parametrize("value", BAD_UNIT, ids=str)
@pytest.mark.parametrize("name,argument", UNIT_ARGUMENTS)
def test_argument_outside_unit_interval(name, argument, value):
    with pytest.raises(ValueError, match=rf"\b{argument}\b"):
        optimizers.get(name, **{argument: value})


#: (optimizer, argument, bad value) for the other range checks.
OTHER_BAD = [
    ("adam", "epsilon", -1e-7),
    ("rmsprop", "epsilon", -1e-7),
    ("adamax", "epsilon", -1e-7),
    ("adagrad", "epsilon", -1e-7),
    ("lamb", "epsilon", math.nan),
    ("adagrad", "initial_accumulator_value", -0.1),
    ("lars", "eta", 0.0),
    ("lars", "eta", -1.0),
    ("lars", "weight_decay", -1e-4),
    ("adamw", "weight_decay", -0.1),
    ("adam", "weight_decay", math.nan),
    ("adam", "clipnorm", 0.0),
    ("adam", "clipnorm", -1.0),
    ("adam", "clipnorm", math.inf),
    ("adam", "clipnorm", math.nan),
    ("adam", "ema_overwrite_frequency", 0),
    ("adam", "ema_overwrite_frequency", 2.0),
    ("adam", "ema_overwrite_frequency", True),
    ("adam", "freeze_variance_step", 0),
    ("adam", "freeze_variance_step", 2.5),
    ("adamw", "freeze_variance_step", True),
    # Strings are truthy: "false" turned each on.
    ("adam", "amsgrad", "false"),
    ("momentum", "nesterov", "no"),
    ("rmsprop", "centered", "yes"),
    ("adam", "shard_state", "false"),
    ("adam", "use_ema", "off"),
    ("adam", "skip_nonfinite", "true"),
    ("adam", "jit_compile", 2),
]


@pytest.mark.parametrize("name,argument,value", OTHER_BAD)
def test_other_bad_hyperparameters(name, argument, value):
    with pytest.raises(ValueError, match=rf"\b{argument}\b"):
        optimizers.get(name, **{argument: value})


@pytest.mark.parametrize("value", [0.0, 0.999999])
@pytest.mark.parametrize("name,argument", UNIT_ARGUMENTS)
def test_unit_interval_ends_accepted(name, argument, value):
    # The check is [0, 1), not (0, 1) or [0, 1]: the edges are exact.
    optimizers.get(name, **{argument: value})


@pytest.mark.parametrize("value", [0.0, -0.1, 1.0000001, 1.5, math.nan, "high"])
def test_lion_beta_1_outside_keras_range(value):
    # Keras's Lion takes beta_1 in (0, 1]: 0 would make it SignSGD.
    with pytest.raises(ValueError, match=r"\bbeta_1\b.*\(0, 1\]"):
        optimizers.Lion(beta_1=value)


@pytest.mark.parametrize("value", [1e-6, 0.5, 1.0])
def test_lion_beta_1_range_ends_accepted(value):
    assert optimizers.Lion(beta_1=value).beta_1 == value


# --- Accepted forms ----------------------------------------------------------


def _gd_reference(params, grads, lr=0.1):
    return [
        p - np.float32(lr) * g if g is not None else p for p, g in zip(params, grads)
    ]


@pytest.mark.parametrize("form", ["lists", "pairs"])
def test_none_gradient_is_skipped(form):
    params, grad_steps = ref.problem(2, seed=13)
    opt = optimizers.Adam(0.1)
    variables = [tf.Variable(p) for p in params]
    opt.build(variables)
    # Variable 1 has no gradient at the first step, variable 0 at the second.
    steps = [
        [grad_steps[0][0], None, grad_steps[0][2]],
        [None, grad_steps[1][1], grad_steps[1][2]],
    ]
    for t, grads in enumerate(steps):
        g = [None if x is None else tf.constant(x) for x in grads]
        if form == "lists":
            opt.apply_gradients(g, variables)
        else:
            opt.apply_gradients(list(zip(g, variables)))
        if t == 0:
            # Untouched so far: the variable, and its slots.
            np.testing.assert_array_equal(variables[1].numpy(), params[1])
            for name, slot in opt.slots(variables[1]).items():
                assert not slot.numpy().any(), name
    assert opt.iterations.numpy() == 2
    # The reference skips None gradients too, and counts the steps (Adam's
    # bias correction uses the optimizer's step, not the variable's).
    want, want_slots = ref.run("adam", params, steps, 0.1)
    for k, w in enumerate(want):
        np.testing.assert_allclose(variables[k].numpy(), w, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(
            opt.slots(variables[k])["v"].numpy(), want_slots[k]["v"], rtol=2e-5
        )


def test_variable_without_first_gradient_trains_later():
    params, grad_steps = ref.problem(2, seed=16)
    opt = optimizers.GradientDescent(0.1, jit_compile=False)
    variables = [tf.Variable(p) for p in params]
    opt.apply_gradients([tf.constant(grad_steps[0][0]), None, None], variables)
    opt.apply_gradients([tf.constant(g) for g in grad_steps[1]], variables)
    want, _ = ref.run(
        "gradient_descent", params, [[grad_steps[0][0], None, None], grad_steps[1]], 0.1
    )
    for v, w in zip(variables, want):
        np.testing.assert_allclose(v.numpy(), w, rtol=1e-6)


@pytest.mark.parametrize("where", ["eager", "function", "mirrored"])
def test_all_none_gradients_are_refused_and_change_nothing(where):
    # They counted an update (the schedule, the sync period) that changed no
    # variable; Keras refuses them too.
    params, _ = ref.problem(1, seed=14)
    strategy = mirrored(2) if where == "mirrored" else tf.distribute.get_strategy()
    with strategy.scope():
        opt = optimizers.GradientDescent(0.1)
        variables = [tf.Variable(p) for p in params]

    def apply():
        return opt.apply_gradients([None] * len(variables), variables)

    step = {
        "eager": apply,
        "function": tf.function(apply),
        "mirrored": tf.function(lambda: strategy.run(apply)),
    }[where]
    with pytest.raises(ValueError, match=r"grads: every gradient is None \(var"):
        step()
    for v, p in zip(variables, params):
        for copy in local_copies(strategy, v):
            np.testing.assert_array_equal(copy, p)
    assert opt.iterations.numpy() == 0 and not opt.built_variables()


@pytest.mark.parametrize("form", ["lists", "pairs", "zip"])
def test_call_forms(form):
    params, (grads,) = ref.problem(1, seed=15)
    opt = optimizers.GradientDescent(0.1, jit_compile=False)
    variables = [tf.Variable(p) for p in params]
    g = [tf.constant(x) for x in grads]
    if form == "lists":
        opt.apply_gradients(g, variables)
    elif form == "pairs":
        opt.apply_gradients([(a, b) for a, b in zip(g, variables)])
    else:
        opt.apply_gradients(zip(g, variables))
    for v, w in zip(variables, _gd_reference(params, grads)):
        np.testing.assert_array_equal(v.numpy(), w)
    assert opt.iterations.numpy() == 1


# --- An XLA-compiled step around several replicas -------------------------------

#: Per-replica gradients of the 2-replica XLA tests, and the start point.
XLA_GRADS = np.array([[1.0, -2.0], [3.0, 0.5]], np.float32)
XLA_W0 = np.array([1.0, 2.0], np.float32)


def _xla_step(strategy, jit_outer, jit_inner, kind):
    """A step of `kind` (apply_gradients, sam, heun) on a linear loss.

    Replica r's loss is `sum(XLA_GRADS[r] * var)`, so its gradient is
    `XLA_GRADS[r]` at every point and SAM and Heun step as gradient descent
    does. `jit_outer` compiles the function around `strategy.run`;
    `jit_inner` the per-replica loss (and, for apply_gradients, gradient).
    """
    with strategy.scope():
        var = tf.Variable(XLA_W0)
        if kind == "sam":
            opt = optimizers.SAM(
                optimizers.GradientDescent(0.1), perturbation="aggregated"
            )
        elif kind == "heun":
            opt = optimizers.Heun(0.1)
        else:
            opt = optimizers.GradientDescent(0.1)
        opt.build([var])
    grads = tf.constant(XLA_GRADS)

    def loss_fn():
        r = tf.distribute.get_replica_context().replica_id_in_sync_group
        return tf.reduce_sum(tf.gather(grads, r) * var)

    def grad_fn():
        with tf.GradientTape() as tape:
            loss = loss_fn()
        return tape.gradient(loss, [var])

    if jit_inner:
        loss_fn = tf.function(loss_fn, jit_compile=True)
        grad_fn = tf.function(grad_fn, jit_compile=True)

    def replica_step():
        if kind == "apply_gradients":
            opt.apply_gradients(grad_fn(), [var])
        else:
            opt.minimize(loss_fn, [var])

    @tf.function(jit_compile=jit_outer)
    def step():
        strategy.run(replica_step)

    return step, var, opt


@pytest.mark.parametrize("kind", ["apply_gradients", "sam", "heun"])
def test_jit_compile_around_a_2_replica_step_names_the_fix(kind):
    strategy = mirrored(2)
    step, var, opt = _xla_step(strategy, jit_outer=True, jit_inner=False, kind=kind)
    # Without the check TensorFlow fails at run time with "Trying to access
    # resource ... located in device CPU:1 from device CPU:0".
    with pytest.raises(RuntimeError) as error:
        step()
    message = str(error.value)
    assert "tf.function(jit_compile=True) wraps strategy.run" in message
    assert "MirroredStrategy with 2 replicas" in message
    assert "Keep the outer function a plain @tf.function" in message
    assert "compile the per-replica computation" in message
    assert "TPUStrategy" in message
    assert "jit_compile=False" in message  # the Keras fix
    for copy in local_copies(strategy, var):
        np.testing.assert_array_equal(copy, XLA_W0)
    assert int(opt.iterations) == 0
    # The fix the message names works: the same step, outer function plain,
    # the per-replica computation compiled. The mean gradient is constant,
    # so every kind steps by -lr * mean.
    step, var, opt = _xla_step(strategy, jit_outer=False, jit_inner=True, kind=kind)
    step()
    want = -0.1 * XLA_GRADS.astype(np.float64).mean(0)
    for copy in local_copies(strategy, var):
        np.testing.assert_allclose(copy - XLA_W0, want, rtol=1e-6)
    assert int(opt.iterations) == 1


@pytest.mark.parametrize("name", ["default", "mirrored1"])
def test_jit_compile_around_a_single_replica_step_still_works(name):
    # One replica is one device: XLA compiles the whole step, update included.
    strategy = tf.distribute.get_strategy() if name == "default" else mirrored(1)
    step, var, opt = _xla_step(
        strategy, jit_outer=True, jit_inner=False, kind="apply_gradients"
    )
    step()
    # Replica 0's gradient alone.
    for copy in local_copies(strategy, var):
        np.testing.assert_allclose(copy - XLA_W0, -0.1 * XLA_GRADS[0], rtol=1e-6)
    assert int(opt.iterations) == 1


def _gd(**kwargs):
    return optimizers.GradientDescent(0.1, **kwargs)


#: Every integer argument a step compares with the optimizer's int64
#: counters (or hands to TensorFlow): (where, argument, made with value v).
INT64_ARGUMENTS = [
    ("local_sgd", "k", lambda v: _gd(sync=distopt.sync.LocalSGD(v))),
    (
        "local_sgd_warmup",
        "warmup_steps",
        lambda v: _gd(sync=distopt.sync.LocalSGD(2, warmup_steps=v)),
    ),
    ("accumulate", "k", lambda v: _gd(sync=distopt.sync.Accumulate(v))),
    ("diloco", "k", lambda v: _gd(sync=distopt.sync.DiLoCo(v))),
    ("hierarchical", "k", lambda v: _gd(sync=distopt.sync.Hierarchical(v))),
    (
        "ema",
        "ema_overwrite_frequency",
        lambda v: _gd(use_ema=True, ema_overwrite_frequency=v),
    ),
    (
        "topk",
        "start_step",
        lambda v: _gd(compression=distopt.compression.TopK(0.5, start_step=v)),
    ),
    (
        "powersgd_rank",
        "rank",
        lambda v: _gd(compression=distopt.compression.PowerSGD(rank=v)),
    ),
    (
        "powersgd_seed",
        "seed",
        lambda v: _gd(compression=distopt.compression.PowerSGD(seed=v)),
    ),
    (
        "adam",
        "freeze_variance_step",
        lambda v: optimizers.Adam(0.1, freeze_variance_step=v),
    ),
]


@pytest.mark.parametrize(
    "where,argument,make", INT64_ARGUMENTS, ids=[a[0] for a in INT64_ARGUMENTS]
)
def test_an_integer_beyond_int64_is_refused_when_made(where, argument, make):
    # 2**63 was accepted, then failed at the first traced step with "Python
    # int too large to convert to C long". 2**63 - 1 is made and steps on 2
    # replicas, where the sync modes and compressors run.
    with pytest.raises(ValueError) as e:
        make(2**63)
    assert str(e.value).startswith(
        f"{argument}: must be at most 2**63 - 1 (TensorFlow's int64), got {2**63}"
    ), str(e.value)
    strategy = mirrored(2)
    with strategy.scope():
        var = tf.Variable(tf.ones([4, 4]))
        opt = make(2**63 - 1)
    step = tf.function(
        lambda: strategy.run(lambda: opt.apply_gradients([tf.ones([4, 4])], [var]))
    )
    step()
    # Accumulate's first micro-step updates nothing yet.
    assert int(opt.iterations) == (0 if where == "accumulate" else 1)
