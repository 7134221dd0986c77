"""One worker of a localhost MultiWorkerMirroredStrategy cluster running `fit`.

Usage: python tests/keras_mw_worker.py INDEX PORT0,PORT1 OUT_DIR

Runs every scenario of `SCENARIOS` through `keras.Model.fit` with
`distopt.keras.wrap` and writes this worker's copy of the weights to
OUT_DIR/worker{INDEX}.npz. tests/test_keras_wrap.py runs the same scenarios
on MirroredStrategy(2): worker i's copy must be replica i's.
"""

import json
import os
import sys

import numpy as np

# name: (optimizer kwargs, sync spec or None, examples); at batch 64 on 2
# replicas, 353 examples end with a batch of 33, split 17/16.
SCENARIOS = {
    "weighted_mean": ({"aggregation": "weighted_mean"}, None, 353),
    "local_sgd": ({}, ("local_sgd", {"k": 4}), 384),  # 6 steps: mid-period
    "diloco_clip": ({"global_clipnorm": 0.5}, ("diloco", {"k": 4}), 384),
}


def run(strategy, name, x, y):
    """This process's copy of every weight after one epoch of `fit`."""
    import keras
    import tensorflow as tf

    import distopt
    import distopt.keras

    class Model(keras.Sequential):
        # Keras 3.15's fit fails under MultiWorkerMirroredStrategy with its own
        # optimizers too (tensorflow#72388): it reduces the scalar logs with
        # axis=0. The step is Keras's; its logs get that axis.
        def train_step(self, data):
            logs = super().train_step(data)
            return {k: tf.reshape(v, [1]) for k, v in logs.items()}

    kwargs, sync, examples = SCENARIOS[name]
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = Model([keras.Input((784,)), keras.layers.Dense(10)])
        opt = distopt.optimizers.Adam(
            1e-2,
            sync=None if sync is None else distopt.sync.get(sync[0], **sync[1]),
            jit_compile=False,
            **kwargs,
        )
        model.compile(
            optimizer=distopt.keras.wrap(opt),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.optimizer.build(model.trainable_variables)
    # Keras's symbolic build before the first step also fails there (it
    # reduces a data batch with strategy.reduce); without a strategy of its
    # own the model takes the one in scope and skips that build.
    model._distribute_strategy = None
    with strategy.scope():
        model.fit(x[:examples], y[:examples], batch_size=64, shuffle=False, verbose=0)
    return [
        [np.asarray(c) for c in strategy.experimental_local_results(w.value)]
        for w in model.trainable_weights
    ]


def mnist():
    from distopt import data

    images, labels = data.load_mnist_idx("test")
    return (images[:512].reshape(-1, 784) / 255.0).astype(np.float32), labels[:512]


if __name__ == "__main__":
    index, ports, out_dir = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3]
    os.environ["TF_CONFIG"] = json.dumps(
        {
            "cluster": {"worker": [f"localhost:{p}" for p in ports]},
            "task": {"type": "worker", "index": index},
        }
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import tensorflow as tf

    from distopt import distribute

    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=60)
    strategy = distribute.make_strategy("multi_worker", communication_options=options)
    assert strategy.num_replicas_in_sync == len(ports)
    x, y = mnist()
    results = {}
    for name in SCENARIOS:
        for i, copies in enumerate(run(strategy, name, x, y)):
            (results[f"{name}/{i}"],) = copies  # one device per worker
        print(f"worker {index}: {name} done", flush=True)
    np.savez(os.path.join(out_dir, f"worker{index}.npz"), **results)
