r"""`keras.Model.fit` with `distopt.keras.wrap(Adam)` against Keras's own Adam.

    python -m distopt.benchmarks.keras_fit
    python -m distopt.benchmarks.keras_fit --strategies=mirrored --repeats=5

Default run: about 4-8 min on this 2-core host (12 fresh processes of 20 to
40 s; the longer figure with other jobs on the machine, 2026-12-04).

Protocol: every measurement runs in a fresh process (a second model or
MirroredStrategy in one process changes Keras's speed and reuses collective
keys); the contenders alternate (keras, distopt, keras, distopt, ...), so
drifting machine load hits both alike; each is measured `--repeats` (>= 3)
times. A measurement builds the model, runs one untimed `fit` of
`--warmup_steps` (tracing, XLA compilation), then times a second `fit` of
`--steps`. Printed per strategy: each contender's median examples/s with the
min-max spread, and the ratio of the medians (distopt / Keras). Also printed:
the median CPU time (user + system, all threads) per example, which other
processes on a shared machine disturb less than wall-clock time does.

Both sides use the same model (an MLP on MNIST, 784-512-512-10), global
batch, Adam(1e-3), `model.compile` defaults, and in-memory MNIST.
"""

import os
import statistics
import sys
import time

from absl import flags

from distopt import cli
from distopt.benchmarks import protocol

# Its own FlagValues, parsed by distopt.cli: --help exits 0, a bad flag is one
# line and exit status 2 (absl's app.run exits 1 after --help).
FLAGS = flags.FlagValues()
flags.DEFINE_list(
    "strategies",
    ["default", "mirrored"],
    "default and/or mirrored (2 virtual CPUs).",
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "steps", 300, "Timed steps per measurement.", lower_bound=1, flag_values=FLAGS
)
flags.DEFINE_integer(
    "warmup_steps",
    20,
    "Untimed steps before timing (0: no warm-up fit).",
    lower_bound=0,
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "batch_size", 128, "Global batch size.", lower_bound=1, flag_values=FLAGS
)
flags.DEFINE_integer(
    "hidden",
    512,
    "Width of the MLP's two hidden layers.",
    lower_bound=1,
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "repeats",
    3,
    "Measurements per contender and strategy (>= 3).",
    flag_values=FLAGS,
)
VIRTUAL_CPUS = 2
CONTENDERS = ("keras", "distopt")
# An unknown name was a traceback (or measured distopt under its label).
flags.DEFINE_enum(
    "measure",
    None,
    CONTENDERS,
    "Internal: one measurement, keras or distopt.",
    flag_values=FLAGS,
)
STRATEGIES = ("default", "mirrored")
# An unknown name measured the default strategy under its label.
protocol.check_items(FLAGS, "strategies", STRATEGIES)
PROG = "distopt.benchmarks.keras_fit"


def measure(contender: str, strategy_name: str) -> tuple[float, float]:
    """Examples per second of one timed `fit`, in this (fresh) process."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from distopt import distribute

    # Split the CPU before Keras or anything else touches a device (for both
    # strategies, as the figures in BUILD_NOTES.md were measured).
    devices = distribute.logical_cpu_devices(VIRTUAL_CPUS)
    import keras
    import numpy as np

    import distopt
    import distopt.keras
    from distopt import data

    strategy = (
        distribute.make_strategy("mirrored", devices=devices)
        if strategy_name == "mirrored"
        else tf.distribute.get_strategy()
    )
    images, labels = data.load_mnist_idx("train")
    x = (images.reshape(-1, 784) / 255.0).astype(np.float32)
    steps = FLAGS.warmup_steps + FLAGS.steps
    ds = (
        tf.data.Dataset.from_tensor_slices((x, labels))
        .repeat()
        .batch(FLAGS.batch_size, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((784,)),
                keras.layers.Dense(FLAGS.hidden, activation="relu"),
                keras.layers.Dense(FLAGS.hidden, activation="relu"),
                keras.layers.Dense(10),
            ]
        )
        optimizer = (
            keras.optimizers.Adam(1e-3)
            if contender == "keras"
            else distopt.keras.wrap(distopt.optimizers.Adam(1e-3))
        )
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    protocol.warm_up_fit(model, ds, FLAGS.warmup_steps)
    # shuffle=False: a dataset is not shuffled by fit, which would only warn.
    start, cpu_start = time.perf_counter(), time.process_time()
    model.fit(ds, steps_per_epoch=FLAGS.steps, verbose=0, shuffle=False)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    assert int(model.optimizer.iterations.numpy()) == steps
    examples = FLAGS.steps * FLAGS.batch_size
    return examples / elapsed, 1e6 * cpu / examples


def _in_subprocess(contender, strategy_name, argv) -> dict | None:
    """One measurement in a fresh process; None if it failed (said on stdout).

    A failed run was a RuntimeError traceback that lost every other run;
    now it is left out, as in the other benchmarks.
    """
    return protocol.measure_in_subprocess(
        PROG,
        [*argv, f"--strategies={strategy_name}", f"--measure={contender}"],
        f"{contender} {strategy_name}",
    )


def main(argv=None) -> int:
    """Runs the benchmark (or, with ``--measure``, one measurement).

    Returns:
        The exit status: 1 if every measurement failed.
    """
    status = cli.parse(PROG, __doc__, FLAGS, argv)
    if status is not None:
        return status
    # Mirrored's 2 replicas: a batch they cannot split failed every run
    # (after a minute), then said only that every run failed.
    why = protocol.mirrored_batch_error(
        FLAGS.batch_size, FLAGS.strategies, VIRTUAL_CPUS
    )
    if why:
        return cli.error(PROG, f"flag --batch_size={FLAGS.batch_size}: {why}")
    if FLAGS.measure:
        if len(FLAGS.strategies) != 1:
            return cli.error(PROG, "--measure: takes exactly one --strategies")
        (strategy_name,) = FLAGS.strategies
        rate, cpu = measure(FLAGS.measure, strategy_name)
        protocol.print_result({"examples_per_second": rate, "cpu_us_per_example": cpu})
        return 0
    if FLAGS.repeats < 3:
        return cli.error(PROG, "--repeats: at least 3.")
    passed = [
        f"--{name}={getattr(FLAGS, name)}"
        for name in ("steps", "warmup_steps", "batch_size", "hidden")
    ]
    print(
        f"keras.Model.fit, MLP 784-{FLAGS.hidden}-{FLAGS.hidden}-10, batch "
        f"{FLAGS.batch_size}, {FLAGS.steps} timed steps, Adam(1e-3); "
        f"{FLAGS.repeats} fresh processes per contender, alternating"
    )
    measured = []
    for strategy_name in FLAGS.strategies:
        samples = {c: [] for c in CONTENDERS}
        for _ in range(FLAGS.repeats):
            for contender in CONTENDERS:
                result = _in_subprocess(contender, strategy_name, passed)
                if result is not None:
                    samples[contender].append(result)
        _report(strategy_name, samples)
        measured += [r for runs in samples.values() for r in runs]
    return 1 if protocol.no_results(PROG, measured) else 0


def _report(strategy_name, samples) -> None:
    """Each contender's medians and spread; their ratios if both have runs."""
    medians = {}
    for contender, runs in samples.items():
        if not runs:
            print(f"{strategy_name:9s} {contender:8s} failed (every run; see above)")
            continue
        values = [r["examples_per_second"] for r in runs]
        cpu = statistics.median(r["cpu_us_per_example"] for r in runs)
        medians[contender] = statistics.median(values), cpu
        print(
            f"{strategy_name:9s} {contender:8s} median {medians[contender][0]:9.0f} "
            f"examples/s  (min {min(values):.0f}, max {max(values):.0f}; "
            f"runs {', '.join(f'{v:.0f}' for v in values)}); CPU "
            f"{cpu:.1f} us/example"
        )
    if len(medians) < len(CONTENDERS):
        return  # No ratio without both.
    ratio = medians["distopt"][0] / medians["keras"][0]
    cpu_ratio = medians["keras"][1] / medians["distopt"][1]
    print(
        f"{strategy_name:9s} ratio of medians distopt/keras: {ratio:.3f} "
        f"(by CPU time per example: {cpu_ratio:.3f})"
    )


if __name__ == "__main__":
    sys.exit(main())
