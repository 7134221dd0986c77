"""Gradient compression with error feedback: PowerSGD, top-k and 1-bit.

    opt = distopt.optimizers.Adam(1e-3, compression="powersgd")
    opt = distopt.optimizers.Adam(1e-3, compression=distopt.compression.TopK(0.01))

A compressor runs inside the optimizer's `Reducer`, on every reduction that
sends gradients (every step, an `Accumulate` flush, DiLoCo's outer
gradient), so aggregation, transforms, skips and counters hold as without
it. See `distopt.compression.base` for the data path and the state.

| compressor      | sends per replica, per variable of d floats | collective |
| --------------- | ------------------------------------------- | ---------- |
| `PowerSGD(r)`   | (rows + cols) * r floats                     | all-reduce |
| `TopK(f)`       | ceil(f * d) values + int32 indices           | all-gather |
| `OneBit()`      | ceil(d / 32) int32 words + 1 scale           | all-gather |
"""

from __future__ import annotations

import inspect

from distopt import specs
from distopt.compression.base import Compressor
from distopt.compression.onebit import OneBit
from distopt.compression.powersgd import PowerSGD
from distopt.compression.topk import TopK

_REGISTRY = {cls.name: cls for cls in (PowerSGD, TopK, OneBit)}


def register(cls: type) -> type:
    """Adds a `Compressor` subclass under its class attribute `name`.

    Then `get(name)` makes one, and a saved optimizer (a Keras model, a
    DiLoCo copy) with one loads; through `distopt.keras`, Keras's
    `custom_objects` serve as well.

    Raises:
        ValueError: not a `Compressor` subclass, or its `name` is another
            class's (a subclass of TopK inherits "topk": give it its own).
    """
    if not (isinstance(cls, type) and issubclass(cls, Compressor)):
        raise ValueError(f"register: {cls!r} is not a Compressor subclass.")  # noqa: TRY004
    held = _REGISTRY.get(cls.name)
    if held is not None and specs.qualified(held) != specs.qualified(cls):
        raise ValueError(
            f"register: the name {cls.name!r} is {specs.qualified(held)}'s; set "
            f"{cls.__name__}.name to a name of its own."
        )
    _REGISTRY[cls.name] = cls
    return cls


def names() -> list[str]:
    """The names `get` accepts."""
    return sorted(_REGISTRY)


def get(identifier=None, **kwargs) -> Compressor | None:
    """A compressor from a name (with its arguments), an instance, or None.

    Raises:
        ValueError: an unknown name (listing the valid ones) or a bad
            argument (naming it); nothing is built then.
    """
    if identifier is None:
        if kwargs:
            raise ValueError(
                f"compression_args: given ({', '.join(kwargs)}) without a compression."
            )
        return None
    if isinstance(identifier, Compressor):
        if kwargs:
            raise ValueError(
                f"compression_args: given ({', '.join(kwargs)}) with a compressor "
                "instance; pass them to its constructor."
            )
        return identifier
    if isinstance(identifier, str) and identifier in _REGISTRY:
        cls = _REGISTRY[identifier]
        # Not OneBit's `*positional`, there only to be refused by name.
        keyword = (
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.KEYWORD_ONLY,
        )
        params = inspect.signature(cls).parameters.values()
        takes = {p.name for p in params if p.kind in keyword}
        if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params):
            takes |= set(specs.init_arguments(Compressor))  # passed to the base
        takes = sorted(takes)
        unknown = sorted(set(kwargs) - set(takes))
        if unknown:
            raise ValueError(
                f"compression_args: {', '.join(unknown)}: not an argument of "
                f"{identifier!r}, which takes {', '.join(takes)}."
            )
        return cls(**kwargs)
    raise ValueError(
        f"compression: unknown {identifier!r}; valid names: {', '.join(names())}."
    )


def from_config(config, classes=()) -> Compressor | None:
    """A compressor from `Compressor.spec()` (None gives None).

    The class is the registered one (or one of `classes`) of the spec's
    name, by `distopt.specs.find_class`'s rules. A `get_config()` dict
    (saved before specs were) takes the registered `name`.
    """
    if config is None or isinstance(config, Compressor):
        return config
    if "class" in config:
        cls = specs.find_class(
            config,
            [*classes, *_REGISTRY.values()],
            "compression",
            "distopt.compression.register",
        )
        return cls.from_config(config["config"])
    config = dict(config)
    return get(config.pop("name"), **config)


__all__ = [
    "Compressor",
    "OneBit",
    "PowerSGD",
    "TopK",
    "from_config",
    "get",
    "names",
    "register",
]
