"""Every optimizer against the independent NumPy reference; config; registry."""

import json

import numpy as np
import numpy_reference as ref
import pytest
import tensorflow as tf

from distopt import optimizers
from distopt.optimizers import schedules

#: (registry name, hyperparameters). Learning rates are large enough that
#: 5 steps move every parameter far beyond the comparison tolerance.
CONFIGS = [
    ("gradient_descent", {"learning_rate": 0.1}),
    ("momentum", {"learning_rate": 0.1, "momentum": 0.9}),
    ("momentum", {"learning_rate": 0.1, "momentum": 0.5, "nesterov": True}),
    ("adam", {"learning_rate": 0.1}),
    ("adam", {"learning_rate": 0.1, "beta_1": 0.5, "beta_2": 0.9, "epsilon": 1e-3}),
    ("adam", {"learning_rate": 0.1, "amsgrad": True}),
    # 1-bit Adam's frozen variance: v stops changing after the 2nd update.
    ("adam", {"learning_rate": 0.1, "freeze_variance_step": 2}),
    ("adamw", {"learning_rate": 0.1}),
    ("adamw", {"learning_rate": 0.1, "weight_decay": 0.5, "amsgrad": True}),
    ("adamax", {"learning_rate": 0.1}),
    ("adamax", {"learning_rate": 0.1, "beta_1": 0.5, "beta_2": 0.9, "epsilon": 1e-3}),
    ("adamax", {"learning_rate": 0.1, "weight_decay": 0.5}),
    ("rmsprop", {"learning_rate": 0.1}),
    ("rmsprop", {"learning_rate": 0.1, "centered": True}),
    ("rmsprop", {"learning_rate": 0.1, "momentum": 0.9, "rho": 0.8}),
    (
        "rmsprop",
        {"learning_rate": 0.1, "momentum": 0.5, "centered": True, "epsilon": 1e-3},
    ),
    ("adagrad", {"learning_rate": 0.1}),
    (
        "adagrad",
        {"learning_rate": 0.1, "initial_accumulator_value": 0.0, "epsilon": 1e-3},
    ),
    ("lion", {"learning_rate": 0.1}),
    ("lion", {"learning_rate": 0.1, "beta_1": 0.5, "beta_2": 0.9}),
    # beta_1 = 1, Keras's upper end: the direction is the kept momentum alone.
    ("lion", {"learning_rate": 0.1, "beta_1": 1.0, "beta_2": 0.5}),
    ("lamb", {"learning_rate": 0.1}),
    ("lamb", {"learning_rate": 0.1, "beta_1": 0.5, "beta_2": 0.9, "epsilon": 1e-3}),
    ("lars", {"learning_rate": 1.0, "eta": 0.1}),
    ("lars", {"learning_rate": 1.0, "eta": 0.1, "weight_decay": 0.1, "momentum": 0.5}),
    ("lars", {"learning_rate": 1.0, "eta": 0.1, "momentum": 0.0}),
    # Decoupled weight decay through the base class, on optimizers without it.
    ("momentum", {"learning_rate": 0.1, "weight_decay": 0.5}),
    ("adam", {"learning_rate": 0.1, "weight_decay": 0.5}),
    ("rmsprop", {"learning_rate": 0.1, "weight_decay": 0.5, "centered": True}),
    ("adagrad", {"learning_rate": 0.1, "weight_decay": 0.5}),
    ("lion", {"learning_rate": 0.1, "weight_decay": 0.5}),
    ("lamb", {"learning_rate": 0.1, "weight_decay": 0.5}),
    # The moving average (a slot, checked below with the others); with an
    # overwrite every 2 updates, over a fused elementwise and a fused
    # layer-wise rule.
    ("adam", {"learning_rate": 0.1, "use_ema": True, "ema_momentum": 0.5}),
    (
        "gradient_descent",
        {"learning_rate": 0.1, "use_ema": True, "ema_overwrite_frequency": 2},
    ),
    ("lamb", {"learning_rate": 0.1, "use_ema": True, "ema_overwrite_frequency": 2}),
]

#: Relative/absolute tolerance per dtype: float32 accumulates a few ulps of
#: rounding per step against the float64 reference.
TOL = {np.float32: 2e-5, np.float64: 1e-12}

NUM_STEPS = 5


def _ids(configs):
    return [f"{n}-{'-'.join(f'{k}={v}' for k, v in c.items())}" for n, c in configs]


def _run(opt, params, grad_steps, dtype):
    variables = [tf.Variable(p.astype(dtype)) for p in params]
    for grads in grad_steps:
        opt.apply_gradients([tf.constant(g.astype(dtype)) for g in grads], variables)
    return variables


def _assert_close(actual, expected, dtype, what):
    tol = TOL[dtype]
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol, err_msg=what)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,config", CONFIGS, ids=_ids(CONFIGS))
def test_matches_numpy_reference(name, config, dtype):
    params, grad_steps = ref.problem(NUM_STEPS, seed=1, dtype=dtype)
    # float32 takes the default path, an XLA kernel per variable; float64 (which
    # TPUs lack) runs op by op, checking the rule without XLA's rewrites and
    # sparing compilations. test_execution_modes ties the two paths together.
    opt = optimizers.get(name, jit_compile=dtype == np.float32, **config)
    variables = _run(opt, params, grad_steps, dtype)
    hyper = dict(config)
    # The learning rate is a float32 scalar (as in Keras), also for float64
    # variables; everything else is exact in float64.
    lr = float(np.float32(hyper.pop("learning_rate")))
    want, want_slots = ref.run(name, params, grad_steps, lr, **hyper)
    assert int(opt.iterations.numpy()) == NUM_STEPS
    for i, (v, w, p0) in enumerate(zip(variables, want, params)):
        assert v.dtype == tf.as_dtype(dtype)
        # The reference must have moved well beyond the tolerance, or the
        # comparison below could not tell a no-op from a correct update.
        assert np.max(np.abs(w - p0)) > 100 * TOL[np.float32]
        _assert_close(v.numpy(), w, dtype, f"{name} variable {i}")
        slots = opt.slots(v)
        assert set(slots) == set(want_slots[i]), f"{name} slots of variable {i}"
        for s, value in slots.items():
            _assert_close(value.numpy(), want_slots[i][s], dtype, f"{name} {s}")


def test_momentum_zero_equals_gradient_descent():
    params, grad_steps = ref.problem(NUM_STEPS, seed=2)
    gd = _run(optimizers.GradientDescent(0.1), params, grad_steps, np.float32)
    for nesterov in (False, True):
        mom = optimizers.Momentum(0.1, momentum=0.0, nesterov=nesterov)
        got = _run(mom, params, grad_steps, np.float32)
        for a, b in zip(got, gd):
            # Equal up to rounding: XLA contracts GD's p - lr * g into one
            # fused multiply-add, which Momentum's separate m cannot use.
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)
    # Without XLA both are the same two roundings: bit-identical.
    gd = _run(
        optimizers.GradientDescent(0.1, jit_compile=False),
        params,
        grad_steps,
        np.float32,
    )
    mom = optimizers.Momentum(0.1, momentum=0.0, jit_compile=False)
    for a, b in zip(_run(mom, params, grad_steps, np.float32), gd):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


# --- Schedules -----------------------------------------------------------------

SCHEDULES = [
    (schedules.Constant(0.3), lambda t: ref.constant(t, 0.3)),
    (
        schedules.ExponentialDecay(0.5, decay_steps=3, decay_rate=0.5),
        lambda t: ref.exponential_decay(t, 0.5, 3, 0.5),
    ),
    (
        schedules.ExponentialDecay(0.5, decay_steps=3, decay_rate=0.5, staircase=True),
        lambda t: ref.exponential_decay(t, 0.5, 3, 0.5, staircase=True),
    ),
    (
        schedules.PiecewiseConstant([2, 5], [0.3, 0.2, 0.05]),
        lambda t: ref.piecewise_constant(t, [2, 5], [0.3, 0.2, 0.05]),
    ),
    (
        schedules.CosineDecay(0.4, decay_steps=6, warmup_steps=3, alpha=0.1),
        lambda t: ref.cosine_decay(t, 0.4, 6, 3, 0.1),
    ),
    (
        schedules.CosineDecay(0.4, decay_steps=4),
        lambda t: ref.cosine_decay(t, 0.4, 4),
    ),
]
_SCHEDULE_IDS = ["constant", "exp", "exp-stair", "piecewise", "cosine-warmup", "cosine"]


@pytest.mark.parametrize("schedule,closed_form", SCHEDULES, ids=_SCHEDULE_IDS)
def test_schedule_closed_form(schedule, closed_form):
    for t in range(14):
        got = float(schedule(tf.constant(t, tf.int64)).numpy())
        assert got == pytest.approx(closed_form(t), rel=1e-6, abs=1e-8), f"step {t}"


def test_cosine_schedule_landmarks():
    # Hand-computed points, independent of the reference's formula.
    s = schedules.CosineDecay(1.0, decay_steps=4, warmup_steps=2, alpha=0.0)
    expected = {0: 0.0, 1: 0.5, 2: 1.0, 4: 0.5, 6: 0.0, 50: 0.0}
    for t, want in expected.items():
        assert float(s(tf.constant(t, tf.int64))) == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize(
    "name,schedule,closed_form",
    [
        ("gradient_descent", SCHEDULES[3][0], SCHEDULES[3][1]),
        ("adam", SCHEDULES[4][0], SCHEDULES[4][1]),
        ("lamb", SCHEDULES[1][0], SCHEDULES[1][1]),
    ],
    ids=["gd-piecewise", "adam-cosine", "lamb-exp"],
)
def test_schedule_drives_optimizer(name, schedule, closed_form):
    params, grad_steps = ref.problem(6, seed=3, dtype=np.float64)
    opt = optimizers.get(name, learning_rate=schedule)
    variables = _run(opt, params, grad_steps, np.float64)
    # Schedules compute in float32: round the closed form the same way.
    want, _ = ref.run(
        name, params, grad_steps, lambda t: float(np.float32(closed_form(t)))
    )
    for v, w in zip(variables, want):
        np.testing.assert_allclose(v.numpy(), w, rtol=2e-6, atol=2e-6)
    assert float(opt.learning_rate_value()) == pytest.approx(closed_form(6), rel=1e-6)


# --- Config round-trip -----------------------------------------------------------

#: Non-default hyperparameters of every optimizer.
NON_DEFAULT = {
    "gradient_descent": {},
    "momentum": {"momentum": 0.7, "nesterov": True},
    "adam": {"beta_1": 0.8, "beta_2": 0.95, "epsilon": 1e-5, "amsgrad": True},
    "adamw": {"weight_decay": 0.03, "beta_1": 0.8},
    "rmsprop": {"rho": 0.8, "momentum": 0.3, "epsilon": 1e-5, "centered": True},
    "adagrad": {"initial_accumulator_value": 0.2, "epsilon": 1e-5},
    "lion": {"beta_1": 0.8, "beta_2": 0.95},
    "lamb": {"beta_1": 0.8, "beta_2": 0.95, "epsilon": 1e-5},
    "lars": {"momentum": 0.8, "eta": 0.01, "weight_decay": 1e-4},
}


@pytest.mark.parametrize("name", sorted(NON_DEFAULT))
def test_config_round_trip(name):
    kwargs = dict(NON_DEFAULT[name])
    if name not in ("adamw", "lars"):
        kwargs["weight_decay"] = 0.01
    schedule = schedules.CosineDecay(0.2, decay_steps=10, warmup_steps=2, alpha=0.1)
    opt = optimizers.get(name, learning_rate=schedule, jit_compile=False, **kwargs)
    config = opt.get_config()
    config = json.loads(json.dumps(config))  # JSON-able
    for k, v in kwargs.items():
        assert config[k] == v, k
    assert config["jit_compile"] is False
    clone = type(opt).from_config(config)
    assert type(clone) is type(opt)
    assert clone.get_config() == config
    assert isinstance(clone.learning_rate, schedules.CosineDecay)
    assert clone.learning_rate.get_config() == schedule.get_config()
    spec = {"class": type(opt).__name__, "config": config}
    assert optimizers.from_config(spec).get_config() == config
    # Same hyperparameters, same numbers.
    params, grad_steps = ref.problem(3, seed=4)
    a = _run(opt, params, grad_steps, np.float32)
    b = _run(clone, params, grad_steps, np.float32)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.numpy(), y.numpy())


# --- Registry ----------------------------------------------------------------------

NAMES = [
    "adagrad",
    "adam",
    "adamw",
    "adamax",
    "gradient_descent",
    "lamb",
    "lars",
    "lion",
    "momentum",
    "rmsprop",
]
CLASSES = {
    "gradient_descent": "GradientDescent",
    "momentum": "Momentum",
    "adam": "Adam",
    "adamw": "AdamW",
    "adamax": "Adamax",
    "rmsprop": "RMSprop",
    "adagrad": "Adagrad",
    "lion": "Lion",
    "lamb": "Lamb",
    "lars": "Lars",
}


def test_registry_names():
    registered = optimizers.names()
    assert registered == sorted(registered)
    assert set(NAMES) <= set(registered)


@pytest.mark.parametrize("name", NAMES)
def test_registry_get(name):
    opt = optimizers.get(name, learning_rate=0.25)
    assert type(opt).__name__ == CLASSES[name]
    assert type(opt) is getattr(optimizers, CLASSES[name])
    assert opt.learning_rate == 0.25
    assert opt.name == name
    assert optimizers.get(opt) is opt


def test_registry_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="optimizer") as info:
        optimizers.get("adadelta")
    for name in NAMES:
        assert name in str(info.value)


def test_default_hyperparameters():
    # Keras 3's defaults, written out here (not read from Keras); Momentum is
    # Keras's SGD with its usual momentum of 0.9; Lars has tensorflow/models'
    # defaults.
    expected = {
        "gradient_descent": {"learning_rate": 0.01},
        "momentum": {"learning_rate": 0.01, "momentum": 0.9, "nesterov": False},
        "adam": {
            "learning_rate": 0.001,
            "beta_1": 0.9,
            "beta_2": 0.999,
            "epsilon": 1e-7,
            "amsgrad": False,
        },
        "adamw": {"learning_rate": 0.001, "weight_decay": 0.004},
        "rmsprop": {
            "learning_rate": 0.001,
            "rho": 0.9,
            "momentum": 0.0,
            "epsilon": 1e-7,
            "centered": False,
        },
        "adagrad": {
            "learning_rate": 0.001,
            "initial_accumulator_value": 0.1,
            "epsilon": 1e-7,
        },
        "lion": {"learning_rate": 0.001, "beta_1": 0.9, "beta_2": 0.99},
        "lamb": {
            "learning_rate": 0.001,
            "beta_1": 0.9,
            "beta_2": 0.999,
            "epsilon": 1e-7,
        },
        "lars": {
            "learning_rate": 0.01,
            "momentum": 0.9,
            "eta": 0.001,
            "weight_decay": 0.0,
        },
    }
    for name, want in expected.items():
        config = optimizers.get(name).get_config()
        for k, v in want.items():
            assert config[k] == v, (name, k)
