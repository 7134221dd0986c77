"""How long TensorFlow takes to delete a tf.data iterator, plain or distributed.

    python tests/iterator_teardown_probe.py [--life=25] [--repeats=5]

A probe of TensorFlow, not of distopt (not collected by pytest). Each
measurement is a fresh process: it makes an iterator over
``Dataset.range(...).batch(4).prefetch(AUTOTUNE)``, plain (``iter(ds)``) or
distributed over ``MirroredStrategy`` on 2 logical CPUs
(``experimental_distribute_dataset``), takes 3 elements, keeps it ``--life``
seconds, then times ``del it`` and a ``gc.collect()``. Contenders alternate.

What it shows (BUILD_NOTES.md, "Known limitations"): a distributed iterator's
deletion can block until tf.data's autotuning thread next wakes (its sleep
doubles after each wake, 10 ms up to 60 s: wakes near 10.2, 20.5, 41 s of the
iterator's life); a plain one's does not. ``--life`` picks the phase: 25 s
leaves about 16 s of sleep, 20 s about 0.5 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

_CHILD = """
import gc, sys, time
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
kind, life = sys.argv[1], float(sys.argv[2])
ds = tf.data.Dataset.range(10**6).batch(4).prefetch(tf.data.AUTOTUNE)
if kind == "plain":
    it = iter(ds)
else:
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    dist = strategy.experimental_distribute_dataset(ds)
    it = iter(dist)
for _ in range(3):
    next(it)
time.sleep(life)
start = time.perf_counter()
del it
gc.collect()
print(f"TEARDOWN {time.perf_counter() - start:.3f}")
"""


def measure(kind: str, life: float) -> float:
    """Seconds to delete one iterator of ``kind``, in a fresh process."""
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, kind, str(life)],
        capture_output=True,
        check=False,  # a failure is reported with the child's stderr
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    if child.returncode or "TEARDOWN" not in child.stdout:
        sys.exit(f"error: the {kind} child failed:\n{child.stderr[-2000:]}")
    return float(child.stdout.split("TEARDOWN")[1])


def _positive(cast):
    def parse(text: str):
        value = cast(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, not {text}")
        return value

    parse.__name__ = cast.__name__  # argparse: "invalid float value"
    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--life", type=_positive(float), default=25.0)
    parser.add_argument("--repeats", type=_positive(int), default=5)
    args = parser.parse_args()
    kinds = ("plain", "mirrored")
    times = {kind: [] for kind in kinds}
    for i in range(args.repeats):
        for kind in kinds:
            times[kind].append(measure(kind, args.life))
            print(f"repeat {i + 1} {kind}: {times[kind][-1]:.2f} s", flush=True)
    for kind in kinds:
        t = times[kind]
        print(
            f"{kind}: median {statistics.median(t):.2f} s "
            f"({min(t):.2f}-{max(t):.2f}), over 1 s in {sum(x > 1 for x in t)}"
            f" of {len(t)}; iterator kept {args.life:g} s"
        )


if __name__ == "__main__":
    main()
