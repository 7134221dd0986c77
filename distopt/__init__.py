"""distopt: distribute-aware Core-API optimizers for TensorFlow.

The submodules load on first use (``distopt.optimizers``, ``from distopt
import sync``, ...), so that ``import distopt`` alone does not import
TensorFlow: ``python -m distopt.train`` imports this package first and wants
to choose how TensorFlow is imported (see ``distopt/train.py``).

Unless ``TF_CPP_MIN_LOG_LEVEL`` is 0 or 1, the first import of TensorFlow
after ``import distopt`` leaves out the C++ start-up lines that TensorFlow
prints whatever that level says (see ``distopt.quiet.quiet_library_import``).
"""

import importlib as _importlib

from distopt import quiet as _quiet

_quiet.quiet_library_import()

__version__ = "0.1.0"
__all__ = [
    "aggregation",
    "compression",
    "counter",
    "distribute",
    "keras",
    "optimizers",
    "reduce",
    "sync",
    "transforms",
]


def __getattr__(name):
    if name in __all__:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *__all__} - {"_importlib", "_quiet"})
