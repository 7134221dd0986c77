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
    # One device per worker here: local steps across workers, averaged every 2.
    "hierarchical": ({"name": "adam"}, ("hierarchical", {"k": 2}), False, False),
    "skip_nonfinite": ({"name": "adam", "skip_nonfinite": True}, None, False, False),
}

# What a scenario is on one worker with 2 devices, where it differs: there,
# hierarchical sync would average gradients every step between the devices.
MIRRORED_COUNTERPART = {"hierarchical": ("local_sgd", {"k": 2})}


def optimizer_kwargs(name, mirrored=False, **extra):
    """The optimizer kwargs of scenario `name`, with a fresh sync mode."""
    kwargs, sync, _, _ = SCENARIOS[name]
    if mirrored:
        sync = MIRRORED_COUNTERPART.get(name, sync)
    kwargs = {**kwargs, **extra}
    if sync is not None:
        kwargs["sync"] = distopt.sync.get(sync[0], **sync[1])
    return kwargs


# Save mid-period with snapshot_replicas(), restore into fresh objects with
# restore_replicas(), and finish: each worker's own copy must equal the
# matching replica of one uninterrupted MirroredStrategy(2) run.
SNAPSHOT = {"steps": 6, "split": 2, "optimizer": {"name": "adam"}, "k": 4}


def snapshot_optimizer(**extra):
    return {
        **SNAPSHOT["optimizer"],
        "sync": distopt.sync.LocalSGD(SNAPSHOT["k"]),
        **extra,
    }


# Compression (issue 25): each compressor for 20 steps on per-replica
# gradients given as data (tests/compression_harness.py); each worker records
# every step's payload, its residual row, Q and weights, which the test
# compares with tests/numpy_reference.py replica by replica.
COMPRESSION = {
    "compress_powersgd": "powersgd",
    "compress_topk": "topk",
    "compress_onebit": "onebit",
}
COMPRESSION_STEPS, COMPRESSION_SEED = 20, 67
