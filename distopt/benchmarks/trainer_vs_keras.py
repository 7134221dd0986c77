r"""Trainer throughput against ``keras.Model.fit``, in the same process.

    python -m distopt.benchmarks.trainer_vs_keras
    python -m distopt.benchmarks.trainer_vs_keras --models=lenet --steps=600

For each model (MLP, LeNet-5) and strategy (default; mirrored over 2 virtual
CPUs), trains the distopt trainer and an equivalent Keras model on the same
MNIST input pipeline, global batch (128) and optimizer (Adam 1e-3), and
prints examples per second and the ratio. Keras runs with its defaults
(``jit_compile="auto"``, one step per execution); ``--keras_tuned`` adds a
Keras run with ``jit_compile=True`` and the trainer's ``steps_per_loop`` as
``steps_per_execution``, for the fairest comparison.

Both sides exclude compilation: Keras is timed on a second ``fit`` call, the
trainer reports throughput after its first (compiling) step. Run it on an
otherwise idle machine; with shared cores the numbers mean little.
"""

import json
import os
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
flags.DEFINE_integer("repeats", 1, "Measurements per configuration (best is kept).")
flags.DEFINE_boolean(
    "keras_tuned", False, "Also time Keras with jit_compile=True, steps_per_execution."
)
flags.DEFINE_string("output", None, "Optional JSON file for the results.")

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


def time_keras(model_name, strategy, dataset, *, tuned=False):
    """Returns Keras fit's examples/s (timed after a warm-up fit)."""
    import keras

    with strategy.scope():
        model = _keras_model(model_name)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            **(
                {"jit_compile": True, "steps_per_execution": FLAGS.steps_per_loop}
                if tuned
                else {}
            ),
        )
    model.fit(dataset, epochs=1, steps_per_epoch=FLAGS.warmup_steps, verbose=0)
    start = time.perf_counter()
    model.fit(dataset, epochs=1, steps_per_epoch=FLAGS.steps, verbose=0)
    return FLAGS.steps * FLAGS.batch_size / (time.perf_counter() - start)


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


def main(argv):
    del argv
    import tensorflow as tf

    # Before anything initialises TensorFlow's devices.
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * VIRTUAL_CPUS
    )
    from distopt import data

    source = data.load_source()
    # Keras reads the trainer's own pipeline (global batches), so both do the
    # same input work.
    dataset = data.make_dataset_fn(
        source, "train", FLAGS.batch_size, training=True, seed=0
    )(tf.distribute.InputContext())

    strategies = {
        "default": lambda: tf.distribute.get_strategy(),
        "mirrored": lambda: tf.distribute.MirroredStrategy(
            [f"/cpu:{i}" for i in range(VIRTUAL_CPUS)]
        ),
    }
    results = []
    for model_name in FLAGS.models:
        for strategy_name in FLAGS.strategies:
            row = {"model": model_name, "strategy": strategy_name}
            for _ in range(FLAGS.repeats):
                strategy = strategies[strategy_name]()
                keras_rate = time_keras(model_name, strategy, dataset)
                trainer_rate = time_trainer(model_name, strategy_name, strategy)
                row["keras"] = max(row.get("keras", 0), keras_rate)
                row["trainer"] = max(row.get("trainer", 0), trainer_rate)
                if FLAGS.keras_tuned:
                    try:
                        tuned = time_keras(model_name, strategy, dataset, tuned=True)
                    except Exception as e:  # noqa: BLE001 (Keras bugs are reported)
                        print(f"Keras jit+steps_per_execution failed: {str(e)[:200]}")
                        tuned = 0.0
                    row["keras_tuned"] = max(row.get("keras_tuned", 0), tuned)
            row["ratio"] = row["trainer"] / row["keras"]
            if row.get("keras_tuned"):
                row["ratio_vs_tuned"] = row["trainer"] / row["keras_tuned"]
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
                    "results": results,
                },
                f,
                indent=2,
            )


def _format(row):
    text = (
        f"{row['model']:<6} {row['strategy']:<9} {row['keras']:>11.0f} "
        f"{row['trainer']:>13.0f} {row['ratio']:>6.2f}x"
    )
    if row.get("keras_tuned"):
        text += f"  (Keras jit+steps_per_execution {row['keras_tuned']:.0f}: "
        text += f"{row['ratio_vs_tuned']:.2f}x)"
    return text


if __name__ == "__main__":
    app.run(main)
