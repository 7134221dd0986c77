"""When replicas talk: every step, every k steps, or by periodic averaging.

| mode            | communication                  | replicas' weights          |
| --------------- | ------------------------------ | -------------------------- |
| `EveryStep`     | gradients, every step          | identical                  |
| `Accumulate(k)` | gradients, every k-th step     | identical                  |
| `LocalSGD(k)`   | weights, every k steps         | diverge, averaged every k  |
| `DiLoCo(k)`     | weights, every k steps         | diverge; outer step every k|
| `Hierarchical(k, group_size)` | gradients within a replica group every step, weights across groups every k | identical within a group |

All state (accumulators, anchors, outer momentum, position in the period) is
held in variables tracked by `tf.train.Checkpoint`, so a resumed run goes on
exactly as an uninterrupted one. The interface a mode implements, and the
public optimizer methods it may call, are in `distopt.sync.base`; per-replica
checkpoints of the divergent modes in `distopt.sync.snapshots`.
"""

from __future__ import annotations

from distopt.sync.accumulate import Accumulate
from distopt.sync.base import Sync
from distopt.sync.every_step import EveryStep
from distopt.sync.periodic import DiLoCo, Hierarchical, LocalSGD, PeriodicAverage

_FACTORIES = {
    "every_step": lambda k=1, **kw: EveryStep(**kw),
    "accumulate": lambda k=8, **kw: Accumulate(k, **kw),
    "local_sgd": lambda k=8, **kw: LocalSGD(k, **kw),
    "diloco": lambda k=8, **kw: DiLoCo(k, **kw),
    "hierarchical": lambda k=8, **kw: Hierarchical(k, **kw),
}


def names() -> list[str]:
    """The names `get` accepts."""
    return sorted(_FACTORIES)


def get(identifier=None, **kwargs) -> Sync:
    """A sync mode from a name (with `k=` etc.), an instance, or None (every step)."""
    if identifier is None:
        return EveryStep()
    if isinstance(identifier, Sync):
        return identifier
    if isinstance(identifier, str) and identifier in _FACTORIES:
        return _FACTORIES[identifier](**kwargs)
    raise ValueError(
        f"sync: unknown {identifier!r}; valid names: {', '.join(names())}."
    )


def from_config(config, outer_optimizer=None) -> Sync:
    """Inverse of `Sync.get_config` (None gives the default).

    Args:
        config: A `get_config()` dict, or None.
        outer_optimizer: DiLoCo's outer optimizer, already deserialised by
            the caller (`Optimizer.from_config`): sync modes sit below the
            optimizers and never import them.
    """
    if config is None:
        return EveryStep()
    config = dict(config)
    name = config.pop("name")
    config.pop("outer_optimizer", None)
    group_size = config.pop("group_size", None)
    if name == "hierarchical":
        config["group_size"] = group_size
    if outer_optimizer is not None:
        config["outer_optimizer"] = outer_optimizer
    return get(name, **config)


__all__ = [
    "Accumulate",
    "DiLoCo",
    "EveryStep",
    "Hierarchical",
    "LocalSGD",
    "PeriodicAverage",
    "Sync",
    "from_config",
    "get",
    "names",
]
