"""The trainer's input: the training feed of each replica, and the test set.

``--input=memory`` copies the training split once to every replica's device
and each step gathers its batch there (:class:`distopt.data.InMemoryFeed`);
``--input=dataset`` runs a ``tf.data`` pipeline. The test set is always a
``tf.data`` pass, padded to whole batches.
"""

from __future__ import annotations

import tensorflow as tf
from absl import logging

from distopt import data as data_lib
from distopt import distribute
from distopt.trainer.config import ConfigError, TrainConfig
from distopt.trainer.strategy import batch_splits, runs_on_gpu


def check_batch_size(global_batch_size: int, num_replicas: int) -> None:
    """Raises ConfigError unless the global batch splits evenly over replicas."""
    if not batch_splits(global_batch_size, num_replicas):
        raise ConfigError(
            f"Global batch size {global_batch_size} is not divisible by the "
            f"{num_replicas} replicas in sync; use a multiple of {num_replicas}"
        )


def check_eval_batch_size(
    config: TrainConfig, source: data_lib.Source, num_replicas: int
) -> None:
    """Raises ConfigError: an ``--eval_batch_size`` larger than the test set.

    Evaluation pads its last batch with masked examples, so one batch of
    the test examples (rounded up to whole replica batches) evaluates them
    all; a larger batch adds padding only, and a huge one exhausts memory at
    the first evaluation, after the training. ``--eval_batch_size=0`` (the
    training batch) is left as it is.
    """
    eval_batch = config.eval_batch_size
    examples = source.num_examples["test"]
    whole = -(-examples // num_replicas) * num_replicas
    if eval_batch > whole:
        at_most = (
            f"at most {whole}"
            if whole == examples
            else f"at most {whole} (the smallest multiple of the {num_replicas} "
            "replicas that holds them)"
        )
        raise ConfigError(
            f"--eval_batch_size={eval_batch} is larger than the {examples} test "
            f"examples; use {at_most}: one batch evaluates them all"
        )


def resolve_input(
    config: TrainConfig, strategy: tf.distribute.Strategy, source: data_lib.Source
) -> str:
    """How training batches reach the replicas: "memory" or "dataset".

    ``--input=auto`` takes the in-memory feed wherever it applies (an
    in-memory source under a single-host strategy): it runs no input
    pipeline, which on small models is most of the gap to a bare step.

    Raises:
      ConfigError: ``--input=memory`` where it does not apply.
    """
    if config.input == "dataset":
        return "dataset"
    why_not = data_lib.can_feed_from_memory(strategy, source)
    if config.input == "memory" and why_not:
        raise ConfigError(f"--input=memory: {why_not}; use --input=dataset or auto")
    return "dataset" if why_not else "memory"


def make_train_feed(
    strategy: tf.distribute.Strategy,
    source: data_lib.Source,
    config: TrainConfig,
    kind: str,
    start_step: int = 0,
):
    """The training feed of :func:`~distopt.trainer.step.make_train_loop`.

    Args:
      kind: "memory" or "dataset" (:func:`resolve_input`).
      start_step: where a ``tf.data`` pipeline starts (the in-memory feed
        reads the step from the step variable).

    Raises:
      ConfigError: the in-memory feed has no whole batch per epoch.
    """
    check_batch_size(config.batch_size, strategy.num_replicas_in_sync)
    if kind == "memory":
        return _in_memory_feed(strategy, source, config)
    # TPUs need static shapes, so never a partial batch there.
    drop = config.drop_remainder or distribute.is_tpu(strategy)
    _check_pipeline_batch(strategy, source, config.batch_size, drop)
    train_fn = data_lib.make_dataset_fn(
        source,
        "train",
        config.batch_size,
        training=True,
        seed=config.seed,
        drop_remainder=drop,
        start_step=start_step,
    )
    logging.info("Input: tf.data pipeline (--input=%s)", config.input)
    return data_lib.DatasetFeed(
        strategy.distribute_datasets_from_function(train_fn, input_options(strategy))
    )


# The bundled MNIST's training examples, fixed by data.MNIST_SHA256.
BUNDLED_TRAIN_EXAMPLES = 60000


def check_batch_before_data(config: TrainConfig) -> None:
    """The in-memory feed's refusal of a batch larger than the bundled MNIST.

    Before the strategy and the data, in the same words: only where the run
    would feed the bundled files from memory (a single-host strategy, not
    --input=dataset) and drop the remainder. Other data is left to the run.

    Raises:
      ConfigError: --batch_size holds more than the training examples.
    """
    kind = data_lib.resolve_kind(config.dataset, config.data_dir, config.data_source)
    if (
        kind == "bundled"
        and config.input != "dataset"
        and config.strategy in ("default", "one_device", "mirrored")
        and config.drop_remainder
        and config.batch_size > BUNDLED_TRAIN_EXAMPLES
    ):
        why = data_lib.batch_larger_than_split(
            config.batch_size, BUNDLED_TRAIN_EXAMPLES, "train"
        )
        raise ConfigError(f"--batch_size={config.batch_size}: {why}")


def _check_pipeline_batch(strategy, source, batch_size: int, drop: bool) -> None:
    """A tf.data pipeline's refusal of a replica batch larger than its shard.

    Each worker's pipeline reads its shard and yields per-replica batches;
    with the remainder dropped, a batch larger than the shard left an empty
    epoch, repeated: an OutOfRangeError traceback at the first step.

    Raises:
      ConfigError: ``--batch_size`` leaves a pipeline no whole batch.
    """
    replicas = strategy.num_replicas_in_sync
    try:
        local = len(strategy.extended.worker_devices)
    except RuntimeError:  # The default strategy: one device, one pipeline.
        local = replicas
    pipelines = max(1, replicas // local)
    per_replica, shard = (
        batch_size // replicas,
        source.num_examples["train"] // pipelines,
    )
    if drop and per_replica > shard:
        raise ConfigError(
            f"--batch_size={batch_size}: a replica's batch of {per_replica} is "
            f"larger than the {shard} train examples its input pipeline reads "
            f"(of {pipelines}), and the remainder is dropped"
        )


def _in_memory_feed(strategy, source, config):
    try:
        feed = data_lib.InMemoryFeed(
            strategy,
            source,
            config.batch_size,
            seed=config.seed,
            drop_remainder=config.drop_remainder,
        )
    except ValueError as e:
        raise ConfigError(f"--batch_size={config.batch_size}: {e}") from e
    logging.info(
        "Input: in memory, on the replicas' devices (%d examples, %d steps "
        "per epoch; --input=dataset for tf.data)",
        feed.num_examples,
        feed.steps_per_epoch,
    )
    return feed


def input_options(strategy: tf.distribute.Strategy):
    """The distributed datasets' options: no prefetch copies on CPUs."""
    # On CPUs the batches are in the devices' memory already: skip the
    # per-replica prefetch copies (LeNet on 2 virtual CPUs: 1.2-1.4x faster).
    if not distribute.is_tpu(strategy) and not runs_on_gpu(strategy):
        return tf.distribute.InputOptions(experimental_fetch_to_device=False)
    return None


def make_eval_dataset(
    strategy: tf.distribute.Strategy, source: data_lib.Source, config: TrainConfig
):
    """The distributed test dataset and the number of steps of one pass."""
    eval_batch = config.eval_batch_size or config.batch_size
    check_batch_size(eval_batch, strategy.num_replicas_in_sync)
    check_eval_batch_size(config, source, strategy.num_replicas_in_sync)
    test_fn = data_lib.make_dataset_fn(
        source,
        "test",
        eval_batch,
        training=False,
        max_steps=config.eval_steps or None,
    )
    contexts = []

    def capture_context(input_context):
        contexts.append(input_context)
        return test_fn(input_context)

    test = strategy.distribute_datasets_from_function(
        capture_context, input_options(strategy)
    )
    # Known up front (the pass is padded to whole batches), so evaluation can
    # run a fixed-length loop instead of checking every replica for the end
    # of data at every step.
    test_steps = data_lib.eval_steps(
        source.num_examples["test"],
        eval_batch,
        contexts[0].num_input_pipelines,
        config.eval_steps or None,
    )
    return test, test_steps
