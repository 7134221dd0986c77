r"""Trainer throughput against ``keras.Model.fit``, in the same process.

    python -m distopt.benchmarks.trainer_vs_keras
    python -m distopt.benchmarks.trainer_vs_keras --models=lenet --steps=600

For each model (MLP, LeNet-5) and strategy (default; mirrored over 2 virtual
CPUs), trains the distopt trainer and an equivalent Keras model on the same
MNIST input pipeline, global batch (128) and optimizer (Adam 1e-3), and
prints examples per second and the ratio. Keras is timed with its defaults
(``jit_compile="auto"``) and with ``jit_compile=False`` (faster for LeNet on
CPU: XLA's MaxPool gradient is slow), and the ratio is taken against the
faster of the two.

Each measurement runs in a fresh process (one benchmark run spawns them in
turn), so none inherits another's threads or compiled state. Both sides
exclude compilation: Keras is timed on a second ``fit`` call, the trainer
reports throughput after its first (compiling) step. Run it on an otherwise
idle machine; with shared cores the numbers mean little.
"""

import gc
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["mlp", "lenet"], "Models to compare.")
flags.DEFINE_list(
    "strategies", ["default", "mirrored"], "default and/or mirrored (2 virtual CPUs)."
)
flags.DEFINE_integer("steps", 400, "Timed training steps per measurement.")
flags.DEFINE_integer("warmup_steps", 50, "Keras: untimed steps before timing.")
flags.DEFINE_integer("batch_size", 128, "Global batch size.")
flags.DEFINE_integer("steps_per_loop", 50, "Trainer: steps per tf.function call.")
flags.DEFINE_boolean("jit_compile", True, "Trainer: XLA-compile the step.")
flags.DEFINE_integer(
    "repeats", 2, "Measurements per configuration and side (best is kept)."
)
flags.DEFINE_list(
    "keras_variants",
    ["default", "nojit"],
    "Keras settings to time: default (jit_compile='auto'), nojit "
    "(jit_compile=False), tuned (jit_compile=True and steps_per_execution="
    "--steps_per_loop; fails under MirroredStrategy in Keras 3.15). The "
    "ratio is against the fastest.",
)
flags.DEFINE_string("output", None, "Optional JSON file for the results.")
flags.DEFINE_string(
    "measure", None, "Internal: run one measurement (keras:<variant> or trainer)."
)

VIRTUAL_CPUS = 2


def _keras_model(name):
    import keras

    if name == "mlp":
        layers = [
            keras.layers.Flatten(),
            keras.layers.Dense(700, activation="relu"),
            keras.layers.Dense(500, activation="relu"),
            keras.layers.Dense(10),
        ]
    else:
        layers = [
            keras.layers.Conv2D(6, 5, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(16, 5, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(120, activation="relu"),
            keras.layers.Dense(84, activation="relu"),
            keras.layers.Dense(10),
        ]
    return keras.Sequential([keras.Input((28, 28, 1)), *layers])


KERAS_VARIANTS = {
    "default": {},
    "nojit": {"jit_compile": False},
    "tuned": {"jit_compile": True, "steps_per_execution": None},
}


def time_keras(model_name, strategy, dataset, variant="default"):
    """Returns Keras fit's examples/s (timed after a warm-up fit)."""
    import keras

    options = dict(KERAS_VARIANTS[variant])
    if "steps_per_execution" in options:
        options["steps_per_execution"] = FLAGS.steps_per_loop
    with strategy.scope():
        model = _keras_model(model_name)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            **options,
        )
    model.fit(dataset, epochs=1, steps_per_epoch=FLAGS.warmup_steps, verbose=0)
    start = time.perf_counter()
    model.fit(dataset, epochs=1, steps_per_epoch=FLAGS.steps, verbose=0)
    rate = FLAGS.steps * FLAGS.batch_size / (time.perf_counter() - start)
    # Drop the model and its input iterators (and their prefetch threads)
    # before the next measurement.
    del model
    keras.backend.clear_session()
    gc.collect()
    return rate


def time_trainer(model_name, strategy_name, strategy):
    """Returns the distopt trainer's examples/s (after its compiling step)."""
    from distopt import train_lib

    with tempfile.TemporaryDirectory() as model_dir:
        config = train_lib.TrainConfig(
            model=model_name,
            strategy=strategy_name,
            virtual_devices=VIRTUAL_CPUS if strategy_name == "mirrored" else 0,
            optimizer="adam",
            learning_rate=1e-3,
            batch_size=FLAGS.batch_size,
            train_steps=FLAGS.steps + 1,
            steps_per_loop=FLAGS.steps_per_loop,
            jit_compile=FLAGS.jit_compile,
            log_every=100,
            checkpoint_every=0,
            eval_steps=1,
            model_dir=model_dir,
        )
        return train_lib.train(config, strategy=strategy)["examples_per_second"]


def measure(spec: str) -> float:
    """Runs one measurement, "keras:<variant>" or "trainer", in this process.

    Every measurement gets a fresh process (see :func:`main`): Keras fit ran
    several times slower after another model had trained in the same process
    (its step times quantised to ~50 ms), and a second MirroredStrategy in a
    process reuses collective instance keys.
    """
    import tensorflow as tf

    # Before anything initialises TensorFlow's devices.
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * VIRTUAL_CPUS
    )
    from distopt import data

    strategy = (
        tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(VIRTUAL_CPUS)])
        if FLAGS.strategies == ["mirrored"]
        else tf.distribute.get_strategy()
    )
    (model_name,) = FLAGS.models
    if spec == "trainer":
        return time_trainer(model_name, FLAGS.strategies[0], strategy)
    source = data.load_source()
    # Keras reads the trainer's own pipeline (global batches), so both do the
    # same input work.
    dataset = data.make_dataset_fn(
        source, "train", FLAGS.batch_size, training=True, seed=0
    )(tf.distribute.InputContext())
    return time_keras(model_name, strategy, dataset, spec.split(":", 1)[1])


def _measure_in_subprocess(spec, model_name, strategy_name, argv):
    command = [
        sys.executable,
        "-m",
        "distopt.benchmarks.trainer_vs_keras",
        *argv,
        f"--models={model_name}",
        f"--strategies={strategy_name}",
        f"--measure={spec}",
    ]
    proc = subprocess.run(command, check=False, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT):
            return float(line[len(_RESULT) :])
    print(f"{spec} {model_name} {strategy_name} failed:\n{proc.stderr[-2000:]}")
    return 0.0


_RESULT = "RESULT examples_per_second="


def main(argv):
    if FLAGS.measure:
        print(f"{_RESULT}{measure(FLAGS.measure)}", flush=True)
        return
    del argv
    # Flags to pass on to every measurement, minus those set per measurement.
    passed = [
        a
        for a in sys.argv[1:]
        if a.startswith("--")
        and not a.startswith(("--models", "--strategies", "--output", "--measure"))
    ]
    results = []
    for model_name in FLAGS.models:
        for strategy_name in FLAGS.strategies:
            row = {"model": model_name, "strategy": strategy_name}
            for _ in range(FLAGS.repeats):
                specs = [f"keras:{v}" for v in FLAGS.keras_variants] + ["trainer"]
                for spec in specs:
                    rate = _measure_in_subprocess(
                        spec, model_name, strategy_name, passed
                    )
                    key = "trainer" if spec == "trainer" else f"keras_{spec[6:]}"
                    row[key] = max(row.get(key, 0.0), rate)
            row["keras"] = max(row[f"keras_{v}"] for v in FLAGS.keras_variants)
            row["ratio"] = row["trainer"] / row["keras"] if row["keras"] else None
            results.append(row)
            print(_format(row), flush=True)

    print("\nmodel  strategy   keras ex/s  trainer ex/s  ratio")
    for row in results:
        print(_format(row))
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump(
                {
                    "cpus": os.cpu_count(),
                    "batch_size": FLAGS.batch_size,
                    "steps": FLAGS.steps,
                    "results": results,
                },
                f,
                indent=2,
            )


def _format(row):
    variants = ", ".join(f"{v} {row[f'keras_{v}']:.0f}" for v in FLAGS.keras_variants)
    ratio = f"{row['ratio']:.2f}x" if row["ratio"] else "n/a"
    return (
        f"{row['model']:<6} {row['strategy']:<9} {row['keras']:>11.0f} "
        f"{row['trainer']:>13.0f} {ratio:>6}   (Keras: {variants})"
    )


if __name__ == "__main__":
    app.run(main)
