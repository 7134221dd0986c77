"""distopt: distribute-aware Core-API optimizers for TensorFlow."""

from distopt import aggregation, distribute, optimizers, sync, transforms

__version__ = "0.1.0"
__all__ = ["aggregation", "distribute", "optimizers", "sync", "transforms"]
