"""Distribute-aware Core-API optimizers and their registry.

opt = distopt.optimizers.get("adam", learning_rate=1e-3)
opt.apply_gradients(grads, variables)      # inside or outside strategy.run
"""

from __future__ import annotations

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
    if held is not None and _qualified(held) != _qualified(cls):
        raise ValueError(
            f"register: {name!r} is {_qualified(held)}; give "
            f"{_qualified(cls)} another class name."
        )
    _REGISTRY[name] = cls
    return cls


def _qualified(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


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

    The class is the registered one (or one of `classes`) of that name. Its
    module may differ (a class moved from a notebook into a module), but
    not between distopt's and another's: a class of yours named like one
    of distopt's loaded as distopt's, with the same slots, and trained on
    with another rule. A spec without a module (saved before it was kept)
    takes the name alone.
    """
    name, module = spec["class"], spec.get("module")
    found = [c for c in [*classes, *_REGISTRY.values()] if c and c.__name__ == name]
    exact = [c for c in found if c.__module__ == module]
    cls = (exact or found or [None])[0]
    if cls is not None and module and not exact:
        ours = [m.startswith("distopt.") for m in (module, cls.__module__)]
        if ours[0] != ours[1]:
            cls = None
    if cls is None:
        saved = f"{module}.{name}" if module else name
        raise ValueError(
            f"optimizer: unknown class {saved!r}; register it before loading "
            f"(distopt.optimizers.register({name}), or Keras's custom_objects)."
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
