"""Argument checks shared by the library's constructors (no TensorFlow).

Each returns the value in its canonical type or raises ValueError naming the
argument, before anything is built.
"""

from __future__ import annotations

import numbers

import numpy as np


def check_int(name, value, minimum, maximum=None) -> int:
    """`value` as an int in [`minimum`, `maximum`], or a ValueError naming `name`.

    NumPy's integers count (a value read from an array is one); bools and
    floats do not, not even 4.0 (a rate where a count belongs is a mistake).
    """
    integral = isinstance(value, numbers.Integral) and not isinstance(
        value, (bool, np.bool_)
    )
    if not integral or value < minimum:
        raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}: must be at most {maximum}, got {value!r}.")
    return int(value)


def check_name(name, value):
    """A module name (None: the default), or a ValueError naming `name`."""
    if value is None or (isinstance(value, str) and value.isidentifier()):
        return value
    raise ValueError(f"{name}: must be a Python identifier, got {value!r}.")


def check_bool(name, value) -> bool:
    """`value` as a bool: True, False, or an integer 0 or 1 (NumPy's too).

    Not `bool(value)`: the string "false" (a config file's, a flag's) is
    truthy, and came out True.
    """
    if isinstance(value, np.bool_) or (
        isinstance(value, numbers.Integral) and value in (0, 1)
    ):
        return bool(value)
    raise ValueError(f"{name}: must be True or False, got {value!r}.")


def check_unit_interval(name, value) -> float:
    """`value` as a float in [0, 1], or a ValueError naming `name`."""
    real = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if not real or not 0.0 <= float(value) <= 1.0:  # NaN too.
        raise ValueError(f"{name}: must be a number in [0, 1], got {value!r}.")
    return float(value)
