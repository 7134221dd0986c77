"""`Counter`: an int64 variable that reads naturally in Python under any strategy.

Under `MirroredStrategy` a variable created in the strategy's scope is a
`MirroredVariable`, and `int(v)`, `float(v)` and `f"{v:d}"` raise `TypeError`
(only `.numpy()` works). The optimizer's counters (`iterations`,
`skipped_steps`, `allreduce_calls`, ...) are read by users in logs and
conditions, so they are wrapped: a `Counter` converts to a tensor wherever a
tensor is expected (schedules, `tf.cast`, arithmetic) and to a Python int
wherever Python wants one. The variable itself is `counter.variable`.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


class Counter(tf.Module):
    """An int64 counter variable; `int()`, `float()`, formatting and `.numpy()` work.

    Args:
        name: The variable's name.
    """

    def __init__(self, name: str):
        super().__init__(name=name)
        self.variable = tf.Variable(0, dtype=tf.int64, trainable=False, name=name)

    # --- Python reads ---------------------------------------------------------

    def numpy(self):
        return self.variable.numpy()

    def __int__(self) -> int:
        return int(self.variable.numpy())

    __index__ = __int__

    def __float__(self) -> float:
        return float(self.variable.numpy())

    def __bool__(self) -> bool:
        return bool(int(self))

    def __format__(self, spec: str) -> str:
        return format(int(self), spec)

    def __repr__(self) -> str:
        value = int(self) if tf.executing_eagerly() else "?"
        return f"<Counter {self.variable.name} value={value}>"

    def __array__(self, dtype=None, copy=None):
        del copy
        # An array, not the NumPy scalar `.numpy()` gives (`np.asarray`
        # refused that, and with it Keras's `convert_to_numpy`).
        return np.asarray(self.variable.numpy(), dtype=dtype)

    # --- Tensor behaviour -----------------------------------------------------

    @property
    def dtype(self):
        return self.variable.dtype

    @property
    def shape(self):
        return self.variable.shape

    def read_value(self):
        return self.variable.read_value()

    def value(self):
        return self.variable.value()

    def assign(self, value):
        return self.variable.assign(value)

    def assign_add(self, delta):
        return self.variable.assign_add(delta)

    def _tensor(self):
        return tf.convert_to_tensor(self.variable)

    def __add__(self, other):
        return self._tensor() + other

    def __radd__(self, other):
        return other + self._tensor()

    def __sub__(self, other):
        return self._tensor() - other

    def __rsub__(self, other):
        return other - self._tensor()

    def __mul__(self, other):
        return self._tensor() * other

    __rmul__ = __mul__

    def __mod__(self, other):
        return self._tensor() % other

    def __floordiv__(self, other):
        return self._tensor() // other

    def __lt__(self, other):
        return self._tensor() < other

    def __le__(self, other):
        return self._tensor() <= other

    def __gt__(self, other):
        return self._tensor() > other

    def __ge__(self, other):
        return self._tensor() >= other


def _to_tensor(value, dtype=None, name=None, as_ref=False):
    # Cast to a requested dtype, as Keras's own `iterations` (a Keras
    # variable) does: Keras's TensorBoard callback asks for float32.
    del as_ref
    tensor = tf.convert_to_tensor(value.variable, name=name)
    if dtype is not None and tf.as_dtype(dtype) != tensor.dtype:
        tensor = tf.cast(tensor, dtype)
    return tensor


tf.register_tensor_conversion_function(Counter, _to_tensor)
