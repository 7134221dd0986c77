"""Specs: how distopt saves an object whose class a user may have written.

An optimizer or a compressor is saved (inside a Keras model, DiLoCo's
outer optimizer, SAM's base) as `{"class", "module", "config"}` and loaded
as the class of that name that the caller knows (a registry, Keras's
`custom_objects`). Both rules below hold for every kind, once.
"""

from __future__ import annotations

import inspect


def init_arguments(cls) -> list[str]:
    """The named arguments of `cls.__init__` (not `self`, `*args`, `**kwargs`)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return [p.name for p in params if p.kind in kinds]


def qualified(cls) -> str:
    """`module.QualName`: what tells two classes of one name apart."""
    return f"{cls.__module__}.{cls.__qualname__}"


def spec(obj, base: type, kind: str) -> dict:
    """`obj`'s `{"class", "module", "config"}`.

    Args:
        obj: An object with `get_config()`.
        base: distopt's base class of the kind: its own arguments are its
            business (an optimizer's `communication_options` is not JSON and
            is left out on purpose).
        kind: "optimizer" or "compressor", for the message.

    Raises:
        NotImplementedError: the config lacks an argument of the class's
            `__init__` (a subclass's own, such as a `beta`), which a loaded
            object would silently take at its default. Keras refuses such a
            layer the same way.
    """
    config = obj.get_config()
    cls = type(obj)
    inherited = set(init_arguments(base))
    missing = [n for n in init_arguments(cls) if n not in {*config, *inherited}]
    if missing:
        raise NotImplementedError(
            f"{cls.__name__}.get_config: lacks {', '.join(map(repr, missing))}, "
            f"of {cls.__name__}.__init__, so a saved {kind} would load with "
            "the default; override get_config to add it: "
            f"{{**super().get_config(), {missing[0]!r}: self.{missing[0]}}}."
        )
    return {"class": cls.__name__, "module": cls.__module__, "config": config}


def find_class(saved: dict, candidates, kind: str, register: str) -> type:
    """The class among `candidates` that a spec `saved` names.

    Its module may differ (a class moved from a notebook into a module), but
    not between distopt's and another's: a class of yours named like one of
    distopt's loaded as distopt's and trained on with another rule. A spec
    without a module (saved before it was kept) takes the name alone.

    Raises:
        ValueError: no such class; names `register` (the registry's
            function) and Keras's `custom_objects`.
    """
    name, module = saved["class"], saved.get("module")
    found = [c for c in candidates if c and c.__name__ == name]
    exact = [c for c in found if c.__module__ == module]
    cls = (exact or found or [None])[0]
    if cls is not None and module and not exact:
        ours = [m.startswith("distopt.") for m in (module, cls.__module__)]
        if ours[0] != ours[1]:
            cls = None
    if cls is None:
        where = f"{module}.{name}" if module else name
        raise ValueError(
            f"{kind}: unknown class {where!r}; register it before loading "
            f"({register}({name}), or Keras's custom_objects)."
        )
    return cls
