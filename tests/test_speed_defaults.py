"""The trainer's speed defaults: XLA for the model step by device type."""

import tensorflow as tf

from distopt import distribute
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
