"""The trainer's speed defaults: XLA for the model step by device type."""

import tensorflow as tf

from distopt import distribute, optimizers
from distopt.trainer import config as config_lib
from distopt.trainer import factories
from distopt.trainer import strategy as tstrategy


def test_explicit_jit_compile_wins():
    assert tstrategy.resolve_jit_compile(True) is True
    assert tstrategy.resolve_jit_compile(False) is False


def test_default_picks_by_device_type():
    has_gpu = bool(tf.config.list_logical_devices("GPU"))
    assert config_lib.TrainConfig().jit_compile is None
    assert tstrategy.resolve_jit_compile(None) is has_gpu
    cpu = distribute.make_strategy("one_device")
    assert tstrategy.resolve_jit_compile(None, cpu) is False


def test_lenet_on_cpu_uses_the_plain_pooling():
    if tf.config.list_logical_devices("GPU"):
        return
    model = factories.build_model("lenet")
    assert model.pooling == "max_pool2d"


def test_float16_is_compiled_on_cpu_too():
    """TensorFlow's float16 CPU kernels ran the MLP at 63 examples/s, 60-300x
    slower than XLA's (12-07); bfloat16 and float32 keep the plain kernels."""
    cpu = distribute.make_strategy("one_device")
    assert tstrategy.resolve_jit_compile(None, cpu, tf.float16) is True
    assert tstrategy.resolve_jit_compile(None, cpu, tf.bfloat16) is False
    assert tstrategy.resolve_jit_compile(False, cpu, tf.float16) is False
    assert factories.build_model("lenet", mixed_precision="float16").pooling != (
        "max_pool2d"
    )


def test_the_loops_pass_the_models_compute_dtype(monkeypatch):
    from distopt.trainer import step as step_lib

    seen = []

    def resolve(jit_compile, strategy=None, compute_dtype=tf.float32):
        seen.append(tf.as_dtype(compute_dtype))
        return tstrategy.resolve_jit_compile(jit_compile, strategy, compute_dtype)

    monkeypatch.setattr(step_lib, "resolve_jit_compile", resolve)
    strategy = distribute.make_strategy("one_device")
    with strategy.scope():
        model = factories.build_model("mlp", mixed_precision="float16")
        sums = step_lib.Sums("sums")
        step = tf.Variable(0, dtype=tf.int64)
    step_lib.make_eval_loop(strategy, model, sums)
    step_lib.make_train_loop(strategy, model, optimizers.Adam(), sums, step)
    assert seen == [tf.float16, tf.float16]
