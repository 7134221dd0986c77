"""Benchmark: one Adam step on 16 float32 variables of 1M elements each.

    python -m distopt.benchmarks.adam_step [--repeats 30] [--json out.json]

Contenders, timed in one run, interleaved round by round (in a shuffled order
each round, so that drift in machine load hits them all alike):

* `distopt`: distopt's default path, `opt.apply_gradients` inside the user's
  own plain `tf.function` (no `jit_compile` set by the user).
* `keras_plain`: `keras.optimizers.Adam` in a plain `tf.function`.
* `keras_xla`: the same in a `tf.function(jit_compile=True)`.
* `floor`: the memory-bandwidth floor. An Adam step must read p, g, m, v and
  write p, m, v: 28 bytes per parameter. The streaming bandwidth is measured
  with NumPy, `np.add(a, b, out=c)` (12 bytes moved per element) over buffers
  of as many elements as there are parameters, on one thread and on one
  thread per core; the floor is 28 bytes per parameter at the faster rate.

Each contender is warmed up (tracing, XLA compilation) first; the figure is
the median over the repeats. Targets (issue 2): distopt/keras_plain <= 0.55,
distopt/keras_xla <= 1.1.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import platform
import random
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from distopt import optimizers

NUM_VARIABLES = 16
NUM_ELEMENTS = 1 << 20
BYTES_PER_PARAM = 28  # read p, g, m, v; write p, m, v; 4 bytes each
TARGETS = {"keras_plain": 0.55, "keras_xla": 1.1}


def _variables(init):
    return [tf.Variable(x) for x in init]


def make_contenders(learning_rate=1e-3, seed=0):
    """name -> a callable that runs one step and waits for it to finish."""
    rng = np.random.default_rng(seed)
    init = [
        rng.standard_normal(NUM_ELEMENTS, dtype=np.float32)
        for _ in range(NUM_VARIABLES)
    ]
    grads = [
        tf.constant(rng.standard_normal(NUM_ELEMENTS, dtype=np.float32))
        for _ in range(NUM_VARIABLES)
    ]

    ours = optimizers.Adam(learning_rate)
    ours_vars = _variables(init)

    @tf.function
    def distopt_step(grads):
        ours.apply_gradients(grads, ours_vars)
        return ours.iterations

    def keras_step_fn(jit_compile):
        opt = keras.optimizers.Adam(learning_rate)
        variables = _variables(init)
        opt.build(variables)

        @tf.function(jit_compile=jit_compile)
        def step(grads):
            opt.apply_gradients(zip(grads, variables))
            return opt.iterations

        return step

    keras_plain = keras_step_fn(False)
    keras_xla = keras_step_fn(True)
    # `.numpy()` on the returned counter waits for the step to finish.
    return {
        "distopt": lambda: distopt_step(grads).numpy(),
        "keras_plain": lambda: keras_plain(grads).numpy(),
        "keras_xla": lambda: keras_xla(grads).numpy(),
    }


def make_floor_pass(num_elements, threads=1, seed=1):
    """A callable streaming `c = a + b` over buffers of `num_elements` floats.

    One pass moves 12 bytes per element (two reads, one write). With several
    threads each streams its own slice: NumPy releases the GIL in the loop,
    and one core alone may not saturate the memory bus.
    """
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(num_elements, dtype=np.float32)
    b = rng.standard_normal(num_elements, dtype=np.float32)
    c = np.empty_like(a)
    if threads <= 1:
        return lambda: np.add(a, b, out=c)
    bounds = np.linspace(0, num_elements, threads + 1).astype(int)
    chunks = [slice(lo, hi) for lo, hi in itertools.pairwise(bounds)]
    pool = concurrent.futures.ThreadPoolExecutor(threads)

    def one(sl):
        np.add(a[sl], b[sl], out=c[sl])

    return lambda: list(pool.map(one, chunks))


def run(repeats=30, warmup=3, seed=0):
    """Times every contender; returns a JSON-able dict of results."""
    num_params = NUM_VARIABLES * NUM_ELEMENTS
    contenders = make_contenders(seed=seed)
    # As many elements as the whole parameter set: same cache behaviour. The
    # floor is the faster of one thread and one per core.
    contenders["floor_1"] = make_floor_pass(num_params)
    contenders["floor_n"] = make_floor_pass(num_params, threads=os.cpu_count() or 1)
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in contenders}
    order = list(contenders)
    shuffle = random.Random(seed)
    for _ in range(repeats):
        shuffle.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            contenders[name]()
            samples[name].append(time.perf_counter() - t0)
    ms = {name: 1e3 * statistics.median(s) for name, s in samples.items()}
    stream_ms = min(ms.pop("floor_1"), ms.pop("floor_n"))
    bandwidth = 12 * num_params / (stream_ms / 1e3)
    # The floor: an Adam step's 28 bytes per parameter at that bandwidth.
    ms["floor"] = stream_ms * BYTES_PER_PARAM / 12
    ratios = {
        "distopt/keras_plain": ms["distopt"] / ms["keras_plain"],
        "distopt/keras_xla": ms["distopt"] / ms["keras_xla"],
        "distopt/floor": ms["distopt"] / ms["floor"],
    }
    return {
        "ms_per_step": ms,
        "ratios": ratios,
        "targets": {f"distopt/{k}": v for k, v in TARGETS.items()},
        "spread_ms": {
            name: [1e3 * min(s), 1e3 * max(s)]
            for name, s in samples.items()
            if not name.startswith("floor")
        },
        "bandwidth_gb_s": bandwidth / 1e9,
        "repeats": repeats,
        "num_variables": NUM_VARIABLES,
        "elements_per_variable": NUM_ELEMENTS,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }


def report(results) -> str:
    ms, ratios = results["ms_per_step"], results["ratios"]
    lines = [
        (
            f"Adam step, {results['num_variables']} x "
            f"{results['elements_per_variable']:,} float32 parameters, "
            f"median of {results['repeats']} interleaved runs"
        ),
    ]
    for name in ("distopt", "keras_plain", "keras_xla", "floor"):
        spread = results["spread_ms"].get(name)
        extra = f"  (min {spread[0]:.1f}, max {spread[1]:.1f})" if spread else ""
        if name == "floor":
            extra = (
                f"  ({BYTES_PER_PARAM} B/param at "
                f"{results['bandwidth_gb_s']:.1f} GB/s, NumPy)"
            )
        lines.append(f"  {name:12s} {ms[name]:8.2f} ms{extra}")
    for key, value in ratios.items():
        target = results["targets"].get(key)
        verdict = ""
        if target is not None:
            verdict = f"  target <= {target}: {'met' if value <= target else 'NOT met'}"
        lines.append(f"  {key:22s} {value:6.3f}{verdict}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args(argv)
    results = run(repeats=args.repeats, warmup=args.warmup)
    print(report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
