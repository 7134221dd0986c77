"""Scenarios run both on 2 localhost workers and on MirroredStrategy(2).

Sync modes are given as (name, kwargs) and built per run: building one
creates variables, which must not happen before the multi-worker strategy.
"""

import distopt

# name: (optimizer kwargs, sync spec or None, weighted, uneven batches)
SCENARIOS = {
    "every_step": ({"name": "adam", "learning_rate": 0.05}, None, False, False),
    "weighted_mean": (
        {"name": "adam", "learning_rate": 0.05, "aggregation": "weighted_mean"},
        None,
        True,
        True,
    ),
    "accumulate": ({}, ("accumulate", {"k": 2}), False, False),
    "local_sgd": ({}, ("local_sgd", {"k": 2}), False, False),
    "diloco": ({"name": "momentum"}, ("diloco", {"k": 3}), False, False),
    "skip_nonfinite": ({"name": "adam", "skip_nonfinite": True}, None, False, False),
}


def optimizer_kwargs(name, **extra):
    """The optimizer kwargs of scenario `name`, with a fresh sync mode."""
    kwargs, sync, _, _ = SCENARIOS[name]
    kwargs = {**kwargs, **extra}
    if sync is not None:
        kwargs["sync"] = distopt.sync.get(sync[0], **sync[1])
    return kwargs
