r"""LeNet-5 as a `keras.Sequential` on MNIST, trained by `fit` with DiLoCo.

    python examples/keras_lenet_diloco.py                 # 2 epochs of 468 steps
    python examples/keras_lenet_diloco.py --steps=4 --eval_examples=256   # smoke run

`MirroredStrategy` over every GPU, or over 2 virtual CPUs on a CPU-only host.
Each replica takes `--sync_period` local Adam steps on its own copy; then the
copies are averaged and DiLoCo's outer Nesterov step moves them all
(`distopt.sync.DiLoCo`). `distopt.keras.SyncCallback` makes the validation
and the final `evaluate` see the replicas' average without changing the run.
MNIST is the copy bundled with distopt (no network).
"""

import argparse  # noqa: I001 (distopt first, on purpose)

# distopt before TensorFlow: then TensorFlow's C++ start-up lines are left
# out (see distopt/quiet.py).
import distopt  # noqa: F401
import tensorflow as tf


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=468, help="Steps per epoch.")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=128, help="Global batch.")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--sync_period", type=int, default=8, help="DiLoCo's k.")
    parser.add_argument("--virtual_cpus", type=int, default=2)
    parser.add_argument(
        "--eval_examples", type=int, default=10000, help="Test examples to evaluate."
    )
    return parser.parse_args(argv)


def make_strategy(virtual_cpus):
    """MirroredStrategy over the GPUs, or over `virtual_cpus` logical CPUs."""
    from distopt import distribute

    if tf.config.list_physical_devices("GPU"):
        # NCCL between GPUs: TensorFlow's default cross-device ops.
        return distribute.make_strategy("mirrored", cross_device_ops="default")
    # NCCL-free reduction through one device: what CPU replicas can do.
    return distribute.make_strategy("mirrored", num_cpu_devices=virtual_cpus)


def lenet(keras):
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Conv2D(6, 5, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(16, 5, activation="relu"),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(120, activation="relu"),
            layers.Dense(84, activation="relu"),
            layers.Dense(10),
        ]
    )


def main(argv=None):
    args = parse_args(argv)
    strategy = make_strategy(args.virtual_cpus)

    import keras

    import distopt.keras
    from distopt import data

    def dataset(split, shuffle):
        images, labels = data.load_mnist_idx(split)
        if split == "test":
            images, labels = images[: args.eval_examples], labels[: args.eval_examples]
        ds = tf.data.Dataset.from_tensor_slices((images, labels))
        if shuffle:
            ds = ds.shuffle(len(labels), seed=0).repeat()
        return ds.batch(args.batch_size).map(data.normalize).prefetch(2)

    with strategy.scope():
        model = lenet(keras)
        optimizer = distopt.optimizers.Adam(
            args.learning_rate, sync=distopt.sync.DiLoCo(args.sync_period)
        )
        model.compile(
            optimizer=distopt.keras.wrap(optimizer),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    sync_callback = distopt.keras.SyncCallback()
    model.fit(
        dataset("train", shuffle=True),
        epochs=args.epochs,
        steps_per_epoch=args.steps,
        validation_data=dataset("test", shuffle=False),
        callbacks=[sync_callback],
        verbose=2,
        shuffle=False,  # The dataset shuffles; Keras would only warn.
    )
    loss, accuracy = model.evaluate(
        dataset("test", shuffle=False), callbacks=[sync_callback], verbose=0
    )
    print(
        f"evaluate: loss {loss:.4f} accuracy {accuracy:.4f} after "
        f"{int(model.optimizer.iterations.numpy())} updates on "
        f"{strategy.num_replicas_in_sync} replicas"
    )


if __name__ == "__main__":
    main()
