"""Core-API models (``tf.Module``, no Keras layers): an MLP and LeNet-5.

Both return float32 logits. Weights are created with stateless random ops
from an explicit seed, so every replica and every worker builds the same
initial model whatever the global RNG state, and a run is reproducible.

``compute_dtype=tf.bfloat16`` runs the matmuls and convolutions in bfloat16
while the variables (and therefore the optimizer) stay float32; logits are
cast back to float32 so the loss is computed in full precision.
"""

from __future__ import annotations

import math

import tensorflow as tf

from distopt.checks import check_int


def _he_uniform(shape, fan_in, seed):
    # He et al. 2015: Var(w) = 2 / fan_in keeps ReLU activations from
    # shrinking or growing with depth.
    limit = math.sqrt(6.0 / fan_in)
    return tf.random.stateless_uniform(shape, seed, -limit, limit)


def _glorot_uniform(shape, fan_in, fan_out, seed):
    # Glorot & Bengio 2010, for the linear logit layer.
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return tf.random.stateless_uniform(shape, seed, -limit, limit)


class Dense(tf.Module):
    """A fully connected layer, ``activation(x @ w + b)``."""

    def __init__(self, in_dim, out_dim, *, relu, seed, name=None):
        """Creates the layer.

        Args:
          in_dim: input features.
          out_dim: output features.
          relu: apply ReLU (He init) or not (Glorot init, for logits).
          seed: shape-[2] int seed for ``tf.random.stateless_uniform``.
          name: module name.
        """
        super().__init__(name=name)
        shape = (in_dim, out_dim)
        init = (
            _he_uniform(shape, in_dim, seed)
            if relu
            else _glorot_uniform(shape, in_dim, out_dim, seed)
        )
        self.w = tf.Variable(init, name="w")
        self.b = tf.Variable(tf.zeros([out_dim]), name="b")
        self.relu = relu

    def __call__(self, x):
        y = tf.matmul(x, tf.cast(self.w, x.dtype)) + tf.cast(self.b, x.dtype)
        return tf.nn.relu(y) if self.relu else y


class Conv2D(tf.Module):
    """A 2-D convolution (NHWC, stride 1) followed by ReLU."""

    def __init__(self, in_channels, filters, kernel_size, *, padding, seed, name=None):
        """Creates the layer.

        Args:
          in_channels: input channels.
          filters: output channels.
          kernel_size: square kernel side.
          padding: "SAME" or "VALID".
          seed: shape-[2] int seed for ``tf.random.stateless_uniform``.
          name: module name.
        """
        super().__init__(name=name)
        shape = (kernel_size, kernel_size, in_channels, filters)
        fan_in = kernel_size * kernel_size * in_channels
        self.w = tf.Variable(_he_uniform(shape, fan_in, seed), name="w")
        self.b = tf.Variable(tf.zeros([filters]), name="b")
        self.padding = padding

    def __call__(self, x):
        y = tf.nn.conv2d(x, tf.cast(self.w, x.dtype), 1, self.padding)
        return tf.nn.relu(y + tf.cast(self.b, x.dtype))


POOLING = ("reshape", "max_pool2d")
PADDINGS = ("VALID", "SAME")


def max_pool_2x2(x, pooling="reshape"):
    """2x2 max pooling, stride 2, 'VALID' (odd edges dropped), of NHWC ``x``.

    Both implementations compute the same function. ``"reshape"`` writes it as
    a reshape and a ``reduce_max``, which XLA fuses with the surrounding ReLU
    and with its own gradient (a select): under ``jit_compile`` the whole
    LeNet step runs ~1.4x faster than with ``max_pool2d``, whose gradient is a
    separate, slow ``MaxPoolGrad`` kernel. Without XLA, ``max_pool2d``'s
    dedicated kernels are the faster choice.
    """
    if pooling == "max_pool2d":
        return tf.nn.max_pool2d(x, 2, 2, "VALID")
    _, height, width, channels = x.shape
    x = x[:, : height // 2 * 2, : width // 2 * 2, :]
    x = tf.reshape(x, [-1, height // 2, 2, width // 2, 2, channels])
    return tf.reduce_max(x, axis=[2, 4])


def _widths(hidden) -> tuple[int, ...]:
    """``hidden`` as a tuple of layer widths, or a ValueError naming it.

    A list or tuple only: a str's characters were taken for widths, and a
    bare int failed in Python's ``*`` ("Value after * must be an
    iterable"), naming neither the argument nor the value.
    """
    if isinstance(hidden, (list, tuple)):
        try:
            return tuple(check_int("hidden", w, minimum=1) for w in hidden)
        except ValueError:
            pass  # The message below names the whole value.
    raise ValueError(
        "hidden: must be a list of integers >= 1 (the hidden layers' widths), "
        f"got {hidden!r}."
    )


class MLP(tf.Module):
    """784-700-500-10 ReLU network, as in TensorFlow's Core API MLP guide."""

    def __init__(
        self,
        input_shape=(28, 28, 1),
        num_classes=10,
        hidden=(700, 500),
        *,
        seed=0,
        compute_dtype=tf.float32,
        name="mlp",
    ):
        """Creates the model.

        Args:
          input_shape: shape of one image (flattened on input).
          num_classes: number of logits.
          hidden: hidden layer widths, each an integer >= 1 (a list or
            tuple; empty: a linear model).
          seed: initialisation seed.
          compute_dtype: dtype of the forward computation.
          name: module name.

        Raises:
          ValueError: ``hidden`` is not a sequence of integers >= 1.
        """
        super().__init__(name=name)
        self.compute_dtype = tf.as_dtype(compute_dtype)
        self.input_dim = math.prod(input_shape)
        dims = (self.input_dim, *_widths(hidden), num_classes)
        self.layers = [
            Dense(
                dims[i],
                dims[i + 1],
                relu=i + 2 < len(dims),
                seed=(seed, i),
                name=f"dense_{i}",
            )
            for i in range(len(dims) - 1)
        ]

    def __call__(self, images, training=False):
        """Returns float32 logits [batch, num_classes] for images [batch, ...]."""
        del training  # No dropout or batch norm: same graph in both modes.
        x = tf.reshape(tf.cast(images, self.compute_dtype), [-1, self.input_dim])
        for layer in self.layers:
            x = layer(x)
        return tf.cast(x, tf.float32)


class LeNet5(tf.Module):
    """LeNet-5 with ReLU and max pooling, the usual modern reading of LeCun 1998.

    conv 6@5x5 'SAME' (28x28 in, as the original on 32x32 padded digits) ->
    pool 2 -> conv 16@5x5 'VALID' (10x10) -> pool 2 (5x5x16 = 400) -> 120 ->
    84 -> logits.

    ``conv2_padding="SAME"`` keeps the second convolution's 14x14 (pool:
    7x7x16 = 784 features into the 120 units; 107,786 parameters instead of
    61,706): the same layers, with more of each digit's border seen twice.
    """

    def __init__(
        self,
        input_shape=(28, 28, 1),
        num_classes=10,
        *,
        seed=0,
        compute_dtype=tf.float32,
        pooling="reshape",
        conv2_padding="VALID",
        name="lenet",
    ):
        """Creates the model.

        Args:
          input_shape: (height, width, channels) of one image.
          num_classes: number of logits.
          seed: initialisation seed.
          compute_dtype: dtype of the forward computation.
          pooling: "reshape" (fastest under XLA) or "max_pool2d" (fastest
            without); see :func:`max_pool_2x2`.
          conv2_padding: "VALID" (LeCun's 5x5x16 = 400 features) or "SAME"
            (7x7x16 = 784 on 28x28 digits).
          name: module name.
        """
        super().__init__(name=name)
        if pooling not in POOLING:
            raise ValueError(f"Unknown pooling {pooling!r}; valid: {list(POOLING)}")
        if conv2_padding not in PADDINGS:
            raise ValueError(
                f"Unknown conv2_padding {conv2_padding!r}; valid: {list(PADDINGS)}"
            )
        self.compute_dtype = tf.as_dtype(compute_dtype)
        self.pooling = pooling
        height, width, channels = input_shape
        self.input_shape = tuple(input_shape)
        self.conv1 = Conv2D(
            channels, 6, 5, padding="SAME", seed=(seed, 0), name="conv1"
        )
        self.conv2 = Conv2D(
            6, 16, 5, padding=conv2_padding, seed=(seed, 1), name="conv2"
        )
        shrink = 4 if conv2_padding == "VALID" else 0
        flat = ((height // 2 - shrink) // 2) * ((width // 2 - shrink) // 2) * 16
        self.fc1 = Dense(flat, 120, relu=True, seed=(seed, 2), name="fc1")
        self.fc2 = Dense(120, 84, relu=True, seed=(seed, 3), name="fc2")
        self.fc3 = Dense(84, num_classes, relu=False, seed=(seed, 4), name="fc3")
        self.flat = flat

    def __call__(self, images, training=False):
        """Returns float32 logits [batch, num_classes] for NHWC images."""
        del training
        x = tf.reshape(tf.cast(images, self.compute_dtype), (-1, *self.input_shape))
        x = max_pool_2x2(self.conv1(x), self.pooling)
        x = max_pool_2x2(self.conv2(x), self.pooling)
        x = tf.reshape(x, [-1, self.flat])
        x = self.fc3(self.fc2(self.fc1(x)))
        return tf.cast(x, tf.float32)


MODELS = {"mlp": MLP, "lenet": LeNet5}


def names() -> list[str]:
    """Returns the sorted model names accepted by :func:`build_model`."""
    return sorted(MODELS)


def build_model(
    name: str,
    input_shape=(28, 28, 1),
    num_classes: int = 10,
    *,
    seed: int = 0,
    compute_dtype=tf.float32,
    jit_compile: bool = False,
    model_args: dict | None = None,
) -> tf.Module:
    """Builds a model by name.

    Create it inside ``strategy.scope()`` to get distributed variables.

    Args:
      name: one of :func:`names`.
      input_shape: (height, width, channels) of one image.
      num_classes: number of logits.
      seed: initialisation seed.
      compute_dtype: tf.float32, or tf.bfloat16 for mixed precision.
      jit_compile: whether the caller compiles the model with XLA; picks the
        faster of two equivalent implementations where that matters.
      model_args: further keyword arguments of the model's constructor, e.g.
        ``{"conv2_padding": "SAME"}`` for LeNet-5 or ``{"hidden": [256, 128]}``
        for the MLP (the trainer's ``--model_args=hidden=[256,128]``).

    Returns:
      A ``tf.Module`` mapping images to float32 logits.

    Raises:
      ValueError: unknown name (the message lists the valid ones), or a bad
        ``model_args`` value.
      TypeError: a ``model_args`` key the model does not take.
    """
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; valid models: {names()}")
    kwargs = {}
    if name == "lenet":
        kwargs["pooling"] = "reshape" if jit_compile else "max_pool2d"
    kwargs.update(model_args or {})
    return MODELS[name](
        input_shape, num_classes, seed=seed, compute_dtype=compute_dtype, **kwargs
    )


def parameter_count(model: tf.Module) -> int:
    """Returns the number of scalars in the model's trainable variables."""
    return sum(int(v.shape.num_elements()) for v in model.trainable_variables)
