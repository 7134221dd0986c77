"""The measurement protocol the benchmarks share.

Each measurement runs in a fresh process (`measure_in_subprocess`), which
prints one `RESULT {json}` line (`print_result`, read back by
`parse_result`); the caller alternates the contenders and repeats each
(`alternate`), then reports `stats` (median and spread) and may keep the
results (`write_json`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

RESULT = "RESULT "


class Parser(argparse.ArgumentParser):
    """argparse with the other tools' errors: one line, ``prog: error: ...``
    on stderr, exit status 2 (argparse adds a usage line first)."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def no_results(prog: str, results) -> bool:
    """Says so on stderr if every measurement failed (the caller exits 1)."""
    if results:
        return False
    print(f"{prog}: error: every run failed (see above)", file=sys.stderr)
    return True


def check_items(flag_values, name: str, allowed=None, minimum=None) -> None:
    """Registers a check of list flag `name`: every item in `allowed`, or
    (with `minimum`) an integer >= `minimum`; a bad one is the tool's one-line
    error before any run (an unknown name failed every run, then printed an
    empty table with exit status 0)."""
    from absl import flags

    def check(values):
        for value in values or ():
            if minimum is not None:
                try:
                    at_least(minimum)(value)
                except argparse.ArgumentTypeError:
                    raise flags.ValidationError(
                        f"{value!r} is not an integer >= {minimum}"
                    ) from None
            elif value not in allowed:
                raise flags.ValidationError(
                    f"{value!r} is not one of {', '.join(allowed)}"
                )
        return True

    flags.register_validator(name, check, flag_values=flag_values)


def at_least(minimum: int):
    """An argparse ``type``: an integer >= ``minimum``, or an error naming it."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


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
    result = parse_result(proc.stdout)
    if result is None:
        print(f"{label} failed:\n{proc.stderr[-3000:]}")
    return result


def parse_result(stdout: str) -> dict | None:
    """The last `RESULT` line's measurement in a process's output, or None."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT) :])
    return None


def alternate(contenders, repeats: int, measure) -> dict:
    """Each contender's samples from `repeats` rounds, the order rotated each round.

    Rotating the order means no contender always goes first, and a drift in
    the machine's load hits every contender alike.

    Args:
        contenders: The contenders' names.
        repeats: How many rounds.
        measure: `measure(contender)`: one sample, or None if it failed (it
            is then left out).

    Returns:
        `{contender: [sample, ...]}`.
    """
    contenders = list(contenders)
    samples = {c: [] for c in contenders}
    for r in range(repeats):
        shift = r % len(contenders)
        for c in contenders[shift:] + contenders[:shift]:
            result = measure(c)
            if result is not None:
                samples[c].append(result)
    return samples


def write_json(path: str | None, results) -> None:
    """Writes `results` to `path` as indented JSON; nothing when `path` is empty."""
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)


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
