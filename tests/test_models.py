"""Tests of distopt.models: the Core-API MLP and LeNet-5."""

import numpy as np
import pytest
import tensorflow as tf

from distopt import models

IMAGES = tf.random.stateless_uniform([8, 28, 28, 1], seed=[0, 1])


def _params(model):
    return [v.numpy() for v in model.trainable_variables]


@pytest.mark.parametrize(
    "name,count",
    [
        # 784*700+700 + 700*500+500 + 500*10+10
        ("mlp", 905010),
        # conv 5*5*1*6+6, conv 5*5*6*16+16, 400*120+120, 120*84+84, 84*10+10
        ("lenet", 61706),
    ],
)
def test_architecture_and_logits(name, count):
    model = models.build_model(name)
    assert isinstance(model, tf.Module) and not isinstance(model, tf.keras.layers.Layer)
    assert models.parameter_count(model) == count
    logits = model(IMAGES)
    assert logits.shape == (8, 10) and logits.dtype == tf.float32
    # Logits, not probabilities.
    assert not np.allclose(tf.reduce_sum(logits, -1), 1.0)


def test_layer_widths():
    mlp = models.build_model("mlp")
    assert [tuple(layer.w.shape) for layer in mlp.layers] == [
        (784, 700),
        (700, 500),
        (500, 10),
    ]
    lenet = models.build_model("lenet")
    assert lenet.conv1.w.shape == (5, 5, 1, 6) and lenet.conv2.w.shape == (5, 5, 6, 16)
    assert [lenet.fc1.w.shape[1], lenet.fc2.w.shape[1], lenet.fc3.w.shape[1]] == [
        120,
        84,
        10,
    ]


@pytest.mark.parametrize("name", models.names())
def test_initialisation_is_seeded(name):
    a, b = models.build_model(name, seed=1), models.build_model(name, seed=1)
    c = models.build_model(name, seed=2)
    for x, y in zip(_params(a), _params(b)):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, z) for x, z in zip(_params(a), _params(c)))
    # Global RNG state does not matter.
    tf.random.set_seed(123)
    d = models.build_model(name, seed=1)
    np.testing.assert_array_equal(_params(a)[0], _params(d)[0])


def test_he_and_glorot_scales():
    mlp = models.build_model("mlp", seed=0)
    hidden = mlp.layers[0].w.numpy()
    assert hidden.std() == pytest.approx(np.sqrt(2 / 784), rel=0.03)
    logits = mlp.layers[2].w.numpy()
    assert logits.std() == pytest.approx(np.sqrt(2 / (500 + 10)), rel=0.05)
    assert not mlp.layers[0].b.numpy().any()


def test_lenet_conv_kernels_use_he_fan_in():
    # fan_in of a conv kernel is kernel_height * kernel_width * in_channels.
    lenet = models.build_model("lenet", seed=0)
    assert lenet.conv1.w.numpy().std() == pytest.approx(np.sqrt(2 / 25), rel=0.15)
    assert lenet.conv2.w.numpy().std() == pytest.approx(np.sqrt(2 / 150), rel=0.05)
    assert lenet.fc1.w.numpy().std() == pytest.approx(np.sqrt(2 / 400), rel=0.03)


def test_lenet_conv2_padding():
    lenet = models.build_model("lenet", model_args={"conv2_padding": "SAME"})
    # conv 156 + conv 2416 + 784*120+120 + 120*84+84 + 84*10+10
    assert models.parameter_count(lenet) == 107786
    assert lenet.fc1.w.shape == (7 * 7 * 16, 120)
    assert lenet(IMAGES).shape == (8, 10)
    with pytest.raises(ValueError, match="conv2_padding 'FULL'"):
        models.build_model("lenet", model_args={"conv2_padding": "FULL"})
    with pytest.raises(TypeError):
        models.build_model("mlp", model_args={"conv2_padding": "SAME"})


def test_pooling_implementations_agree_in_value_and_gradient():
    x = tf.random.stateless_normal([4, 10, 10, 3], seed=[1, 2])
    values, grads = [], []
    for pooling in models.POOLING:
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = models.max_pool_2x2(x, pooling)
            loss = tf.reduce_sum(y * y)
        values.append(y.numpy())
        grads.append(tape.gradient(loss, x).numpy())
    np.testing.assert_allclose(values[0], values[1])
    np.testing.assert_allclose(grads[0], grads[1])
    odd = tf.ones([1, 5, 5, 1])
    assert (
        models.max_pool_2x2(odd).shape == models.max_pool_2x2(odd, "max_pool2d").shape
    )


@pytest.mark.parametrize("name", models.names())
def test_xla_compiled_forward_matches_eager(name):
    model = models.build_model(name, jit_compile=True)
    compiled = tf.function(model.__call__, jit_compile=True)
    np.testing.assert_allclose(compiled(IMAGES), model(IMAGES), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", models.names())
def test_bfloat16_computes_in_bf16_with_float32_variables(name):
    model = models.build_model(name, compute_dtype=tf.bfloat16)
    assert all(v.dtype == tf.float32 for v in model.trainable_variables)
    logits = model(IMAGES)
    assert logits.dtype == tf.float32
    reference = models.build_model(name)(IMAGES)
    np.testing.assert_allclose(logits, reference, rtol=0.1, atol=0.1)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(IMAGES))
    grads = tape.gradient(loss, model.trainable_variables)
    assert all(g.dtype == tf.float32 for g in grads)


def test_other_input_shapes():
    model = models.build_model("lenet", (32, 32, 3), 100)
    assert model(tf.zeros([2, 32, 32, 3])).shape == (2, 100)
    mlp = models.build_model("mlp", (32, 32, 3), 100)
    assert mlp.layers[0].w.shape == (3072, 700)


def test_lenet_fits_a_small_batch():
    model = models.build_model("lenet", seed=0)
    labels = tf.range(8) % 10
    opt_vars = model.trainable_variables

    @tf.function(jit_compile=True)
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels, model(IMAGES))
            )
        for v, g in zip(opt_vars, tape.gradient(loss, opt_vars)):
            v.assign_sub(0.1 * g)
        return loss

    first = float(step())
    for _ in range(60):
        last = float(step())
    assert last < 0.2 * first


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match=r"Unknown model 'resnet'.*\['lenet', 'mlp'\]"):
        models.build_model("resnet")
    with pytest.raises(ValueError, match="pooling"):
        models.LeNet5(pooling="avg")
