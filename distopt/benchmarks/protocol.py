"""The measurement protocol the benchmarks share.

Each measurement runs in a fresh process (`measure_in_subprocess`), which
prints one `RESULT {json}` line (`print_result`); the caller alternates the
contenders and repeats each, then reports `stats` (median and spread).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

RESULT = "RESULT "


def print_result(result: dict) -> None:
    """Prints a measurement for `measure_in_subprocess` to read."""
    print(RESULT + json.dumps(result), flush=True)


def measure_in_subprocess(module: str, flags: list[str], label: str) -> dict | None:
    """Runs `python -m module *flags` and returns its `RESULT` line, or None.

    A failed measurement prints the tail of its stderr under `label` and
    returns None, so one crash does not end a long benchmark.
    """
    command = [sys.executable, "-m", module, *flags]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT) :])
    print(f"{label} failed:\n{proc.stderr[-3000:]}")
    return None


def stats(values) -> dict | None:
    """Median, min, max and count of `values` (None when empty)."""
    values = list(values)
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def random_mnist_batch(strategy, per_replica: int):
    """One MNIST-shaped batch per replica, made on its device (for bare steps).

    Images uniform in [0, 1), labels in [0, 10): the bare-step ceilings run on
    in-memory tensors, with no input pipeline.
    """
    import tensorflow as tf

    def batch_fn(context):
        del context
        images = tf.random.stateless_uniform([per_replica, 28, 28, 1], (0, 1))
        labels = tf.random.stateless_uniform([per_replica], (0, 2), 0, 10, tf.int32)
        return images, labels

    return strategy.experimental_distribute_values_from_function(batch_fn)
