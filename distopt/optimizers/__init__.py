"""Distribute-aware Core-API optimizers and their registry.

opt = distopt.optimizers.get("adam", learning_rate=1e-3)
opt.apply_gradients(grads, variables)      # inside or outside strategy.run
"""

from __future__ import annotations

from distopt import specs
from distopt.optimizers import schedules
from distopt.optimizers.adagrad import Adagrad
from distopt.optimizers.adam import Adam, AdamW
from distopt.optimizers.adamax import Adamax
from distopt.optimizers.base import Optimizer, _snake_case
from distopt.optimizers.gradient_descent import GradientDescent, Momentum
from distopt.optimizers.heun import Heun
from distopt.optimizers.lamb import Lamb
from distopt.optimizers.lars import Lars
from distopt.optimizers.lion import Lion
from distopt.optimizers.rmsprop import RMSprop
from distopt.optimizers.sam import SAM
from distopt.sync import periodic

_REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Adds an Optimizer subclass to the registry under its snake_case name.

    A saved optimizer of a class of yours loads only once it is registered
    (or, through `distopt.keras`, passed in Keras's `custom_objects`).

    Raises:
        ValueError: the name is another class's (a redefinition of the same
            class, as a notebook cell run again makes, replaces it).
    """
    name = _snake_case(cls.__name__)
    held = _REGISTRY.get(name)
    if held is not None and specs.qualified(held) != specs.qualified(cls):
        raise ValueError(
            f"register: {name!r} is {specs.qualified(held)}; give "
            f"{specs.qualified(cls)} another class name."
        )
    _REGISTRY[name] = cls
    return cls


for _cls in (
    GradientDescent,
    Momentum,
    Adam,
    AdamW,
    Adamax,
    RMSprop,
    Adagrad,
    Lion,
    Lamb,
    Lars,
):
    register(_cls)

register(Heun)
# DiLoCo's default outer step (Douillard et al. 2023), given to the sync modes
# as a factory: they sit below the optimizers and do not import them.
periodic.set_default_outer_optimizer(
    lambda: Momentum(
        learning_rate=0.7, momentum=0.9, nesterov=True, name="outer_momentum"
    )
)
# SAM wraps another optimizer: `get("sam", base_optimizer=..., rho=...)`.
register(SAM)


def names() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


def get_class(name: str) -> type:
    """The optimizer class registered as `name`; ValueError listing the names."""
    if name not in _REGISTRY:
        raise ValueError(
            f"optimizer: unknown {name!r}; valid names: {', '.join(names())}."
        )
    return _REGISTRY[name]


def get(identifier, /, **kwargs) -> Optimizer:
    """An optimizer by registered name, e.g. `get("adam", learning_rate=1e-3)`.

    Positional-only, so that `name=` reaches the optimizer (its module name).
    """
    if isinstance(identifier, Optimizer):
        return identifier
    return get_class(identifier)(**kwargs)


def from_config(spec: dict, classes=()) -> Optimizer:
    """An optimizer from `Optimizer.spec()`'s `{"class", "module", "config"}`.

    The class is the registered one (or one of `classes`) of that name, by
    `distopt.specs.find_class`'s rules.
    """
    cls = specs.find_class(
        spec,
        [*classes, *_REGISTRY.values()],
        "optimizer",
        "distopt.optimizers.register",
    )
    return cls.from_config(spec["config"])


__all__ = [
    "SAM",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "GradientDescent",
    "Heun",
    "Lamb",
    "Lars",
    "Lion",
    "Momentum",
    "Optimizer",
    "RMSprop",
    "from_config",
    "get",
    "names",
    "register",
    "schedules",
]
