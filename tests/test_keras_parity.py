"""Every optimizer Keras also has agrees with `keras.optimizers.<Same>`.

Same arguments, 100 steps of random gradients, float32, within 1e-6 on the
default path (each update one XLA kernel). Without XLA the arithmetic is
Keras's, operation for operation, so the numbers are bit-identical; under XLA
the compiler contracts `a * b + c` into fused multiply-adds, which round once
instead of twice, so the two drift apart by ulps (most where momentum
accumulates them). GradientDescent and Momentum are Keras's SGD.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from distopt import optimizers

NUM_STEPS = 100
SHAPES = [(4, 3), (7,)]

#: (distopt class, Keras class, shared arguments). Learning rates are Keras's
#: defaults (SGD 0.01, the others 0.001) unless given.
CASES = [
    ("GradientDescent", "SGD", {}),
    ("Momentum", "SGD", {"momentum": 0.9}),
    ("Momentum", "SGD", {"momentum": 0.8, "nesterov": True, "learning_rate": 0.05}),
    ("Adam", "Adam", {}),
    ("Adam", "Adam", {"beta_1": 0.5, "amsgrad": True, "weight_decay": 0.05}),
    # A larger rate magnifies any difference in how `1 - beta` is rounded.
    ("Adam", "Adam", {"learning_rate": 0.01}),
    ("AdamW", "AdamW", {"weight_decay": 0.1, "epsilon": 1e-4}),
    ("AdamW", "AdamW", {"learning_rate": 0.01, "amsgrad": True}),
    ("Adamax", "Adamax", {}),
    ("Adamax", "Adamax", {"beta_1": 0.5, "beta_2": 0.9, "learning_rate": 0.01}),
    ("RMSprop", "RMSprop", {"learning_rate": 0.01}),
    ("RMSprop", "RMSprop", {"centered": True, "rho": 0.8, "weight_decay": 0.05}),
    ("RMSprop", "RMSprop", {"momentum": 0.9}),
    ("RMSprop", "RMSprop", {"momentum": 0.5, "centered": True, "learning_rate": 0.01}),
    ("Adagrad", "Adagrad", {"learning_rate": 0.05}),
    ("Adagrad", "Adagrad", {"initial_accumulator_value": 0.5, "epsilon": 1e-3}),
    ("Lion", "Lion", {}),
    ("Lion", "Lion", {"beta_1": 0.5, "beta_2": 0.9, "weight_decay": 0.1}),
    ("Lamb", "Lamb", {"learning_rate": 0.01}),
    ("Lamb", "Lamb", {"beta_2": 0.9, "epsilon": 1e-4, "weight_decay": 0.05}),
    # Keras's clipnorm: each variable's gradient to norm 0.5 (these are
    # about 3.5 and 2.6), in Keras's arithmetic.
    ("Adam", "Adam", {"clipnorm": 0.5, "learning_rate": 0.01}),
    ("Momentum", "SGD", {"momentum": 0.9, "clipnorm": 0.5}),
    # Keras's moving average; the overwrite brings it into the variables.
    (
        "Adam",
        "Adam",
        {"use_ema": True, "ema_momentum": 0.9, "ema_overwrite_frequency": 7},
    ),
    (
        "Momentum",
        "SGD",
        {"momentum": 0.9, "use_ema": True, "ema_overwrite_frequency": 30},
    ),
]

#: XLA's tolerance: 1e-6 by default; Adam's fused-multiply-add drift stays
#: within two float32 ulps of these |p| < 2 (once `1 - beta` is rounded as in
#: Keras; rounded in float32 instead, it drifted 2e-6 at lr 0.01). The moving
#: average's `m * ema + (1 - m) * p` contracts too, and each overwrite hands
#: that rounding to the variables: 1.2e-6 after 14 overwrites. Without XLA
#: every case is bit-identical to Keras (checked last).
_XLA_ATOL = {"Adam": 2.5e-7, "AdamW": 2.5e-7}


def _xla_atol(ours, args):
    return 2e-6 if args.get("ema_overwrite_frequency") else _XLA_ATOL.get(ours, 1e-6)


def _id(case):
    ours, _, args = case
    return ours + "".join(f"-{k}={v}" for k, v in args.items())


def _run(opt, variables, grads):
    opt.build(variables)

    # All steps in one tf.while_loop: eager Keras would spend seconds per
    # case on Python dispatch, an unrolled loop on tracing.
    @tf.function
    def run():
        for t in tf.range(NUM_STEPS):
            opt.apply_gradients(list(zip([g[t] for g in grads], variables)))

    run()
    assert int(opt.iterations.numpy()) == NUM_STEPS
    return [v.numpy() for v in variables]


@pytest.mark.parametrize("ours,theirs,args", CASES, ids=[_id(c) for c in CASES])
def test_matches_keras(ours, theirs, args):
    rng = np.random.default_rng(7)
    init = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    # Stacked over steps: grads[k][t] is variable k's gradient at step t.
    grads = [
        tf.constant(rng.normal(size=(NUM_STEPS,) + s).astype(np.float32))
        for s in SHAPES
    ]
    keras_args = dict(args, momentum=0.0) if ours == "GradientDescent" else args
    want = _run(
        getattr(keras.optimizers, theirs)(**keras_args),
        [tf.Variable(p) for p in init],
        grads,
    )
    cls = getattr(optimizers, ours)
    xla = _run(cls(**args), [tf.Variable(p) for p in init], grads)
    plain = _run(cls(jit_compile=False, **args), [tf.Variable(p) for p in init], grads)
    for k, p in enumerate(init):
        # Keras moved, so agreeing with it is not agreeing to do nothing.
        assert np.max(np.abs(want[k] - p)) > 1e-3
        np.testing.assert_allclose(xla[k], want[k], rtol=0, atol=_xla_atol(ours, args))
        np.testing.assert_allclose(plain[k], want[k], rtol=0, atol=1e-6)
    for k in range(len(init)):
        np.testing.assert_array_equal(plain[k], want[k], err_msg="not bit-identical")
