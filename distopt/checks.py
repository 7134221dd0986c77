"""Argument checks shared by the library's constructors (no TensorFlow).

Each returns the value in its canonical type or raises ValueError naming the
argument, before anything is built.
"""

from __future__ import annotations

import contextlib
import math
import numbers

import numpy as np

#: The largest integer argument (and trainer flag): periods, steps and
#: frequencies meet int64 counters inside the step (the optimizer's, the sync
#: modes', tf.data's), where a larger Python int failed at the first trace
#: ("Python int too large to convert to C long").
INT64_MAX = 2**63 - 1
INT64_LIMIT = "2**63 - 1 (TensorFlow's int64)"


def check_int(name, value, minimum, maximum=INT64_MAX) -> int:
    """`value` as an int in [`minimum`, `maximum`], or a ValueError naming `name`.

    NumPy's integers count (a value read from an array is one); bools and
    floats do not, not even 4.0 (a rate where a count belongs is a mistake).
    """
    integral = isinstance(value, numbers.Integral) and not isinstance(
        value, (bool, np.bool_)
    )
    if not integral or value < minimum:
        raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}.")
    if value > maximum:
        limit = INT64_LIMIT if maximum == INT64_MAX else maximum
        raise ValueError(f"{name}: must be at most {limit}, got {value!r}.")
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


def check_number(name, value) -> float:
    """`value` as a finite float, or a ValueError naming `name`.

    A real number only: not a bool (True is no rate), and not a str, even
    "0.1" (`float` took it; a flag's string becomes a number where it is
    parsed, `distopt.trainer.config.parse_kv`, not in the library).
    """
    real = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if not real:
        raise ValueError(f"{name}: must be a number, got {value!r}.")
    try:
        v = float(value)
    except OverflowError:  # An int beyond float's range: 10**400.
        v = math.inf
    if not math.isfinite(v):
        raise ValueError(f"{name}: must be finite, got {value!r}.")
    return v


@contextlib.contextmanager
def owned_by(owner: str):
    """Adds `owner` (e.g. "TopK") to a ValueError or TypeError raised inside.

    The message keeps its "argument: problem" start, which callers match
    and re-prefix (the trainer's "--compression_args: "): `owner` goes at
    its end, "... got '2' (in PowerSGD).". A message naming it already
    (from a nested check) is left alone.
    """
    try:
        yield
    except (TypeError, ValueError) as e:
        if f"(in {owner})" in str(e) or type(e) not in (TypeError, ValueError):
            raise
        raise type(e)(f"{str(e).rstrip('.')} (in {owner}).") from None
