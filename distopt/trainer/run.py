"""The entry point of the library: :func:`train`, from set-up to the end.

Order matters: everything that can fail on bad input (names, batch
divisibility, data checksums, a ``model_dir`` of another run) is checked
before the first byte is written to ``model_dir``.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging

from distopt import checkpoints as checkpoints_lib
from distopt import data as data_lib
from distopt import distribute, quiet, trainer_faults
from distopt import models as models_lib
from distopt.trainer import checkpointing, inputs, summaries
from distopt.trainer import config as config_lib
from distopt.trainer import step as step_lib
from distopt.trainer.checkpointing import (
    CHECKPOINT_SUBDIR,
    RUN_CONFIG_FILE,
    Saver,
    WriteError,
)
from distopt.trainer.config import TrainConfig
from distopt.trainer.evaluation import Evaluator
from distopt.trainer.factories import build_model, make_optimizer
from distopt.trainer.loop import TrainLoop
from distopt.trainer.step import Sums
from distopt.trainer.strategy import is_chief, make_strategy, worker_id


@dataclasses.dataclass
class Run:
    """What :func:`train` sets up once and the loop then works on."""

    config: TrainConfig
    strategy: tf.distribute.Strategy
    chief: bool
    source: Any
    total_steps: int
    model: Any
    optimizer: Any
    step: tf.Variable
    train_sums: Sums
    eval_sums: Sums
    checkpoint: tf.train.Checkpoint
    guard: trainer_faults.NonfiniteGuard
    signals: trainer_faults.StopSignals
    timing: summaries.Timing
    input: str = "dataset"
    lock: checkpoints_lib.RunLock | None = None
    start_step: int = 0
    resumed_from: str | None = None
    # The step whose evaluation reached --target_accuracy (None: not yet).
    target_step: int | None = None

    def close(self) -> None:
        if self.lock:
            self.lock.release()


@dataclasses.dataclass
class Outputs:
    """Where a run's results go, opened once everything was checked."""

    writers: summaries.Writers
    saver: Saver
    evaluator: Evaluator
    agreement: trainer_faults.StopAgreement
    feed: Any


def train(
    config: TrainConfig,
    *,
    strategy: tf.distribute.Strategy | None = None,
    start_time: float | None = None,
) -> dict[str, Any]:
    """Trains and evaluates; writes checkpoints, summaries and metrics.json.

    Resumes from the newest checkpoint in ``config.model_dir`` that loads.
    Only the chief writes to ``model_dir``, and only one trainer at a time
    (a lock file). SIGTERM or SIGINT stops the run after the current chunk
    of at most ``steps_per_loop`` steps, with a checkpoint there. With
    ``target_accuracy``, the run stops at the first evaluation that reaches
    it (``status`` ``"target_reached"``).

    Args:
      config: the run.
      strategy: use this strategy instead of creating ``config.strategy``
        (tests and benchmarks that already initialised TensorFlow).
      start_time: ``time.time()`` when the user started the run, for the time
        to the first step (default: this call).

    Returns:
      The metrics also written to ``model_dir/metrics.json`` (``status``
      ``"completed"`` or ``"target_reached"``).

    Raises:
      ConfigError, ModelDirError, data.DataError: bad input; nothing was
        written to ``model_dir`` then.
      checkpoints.LockError: another trainer holds ``model_dir``, or the
        lock cannot be written.
      checkpoints.CheckpointSaveError: a save failed; the previous
        checkpoint is still the latest.
      checkpointing.WriteError: another file of the run could not be written.
      trainer_faults.Preempted: a stop notice; a checkpoint was saved and
        ``metrics.json`` says ``"preempted"``.
      trainer_faults.Diverged: a non-finite loss or gradient under
        ``on_nonfinite="stop"`` (or too many skipped steps in a row); the
        last checkpoint is the last good one, ``metrics.json`` says
        ``"diverged"``.
    """
    signals = trainer_faults.StopSignals()
    # Only for this run: a sweep's later runs are not made deterministic.
    # The step, evaluation and agreement are made anew for each run: a
    # sweep's runs are not the caller's retracing (see `quiet`).
    with (
        distribute.op_determinism(bool(config.deterministic)),
        quiet.retracing_of_made_functions_hidden(
            step_lib.make_train_loop,
            step_lib.make_eval_loop,
            trainer_faults.make_agreement,
        ),
    ):
        try:
            run = setup(config, strategy, start_time, signals)
            try:
                resume(run)
                return TrainLoop(run, open_outputs(run)).run_to_end()
            finally:
                run.close()
        finally:
            signals.uninstall()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    tf.random.set_seed(seed)


def setup(config, strategy, start_time, signals) -> Run:
    """Checks the input and builds strategy, model, optimizer and checkpoint.

    Writes nothing. Installs ``signals`` as soon as the strategy exists.
    """
    called = time.time()
    config_lib.validate_config(config)
    _check_storage(config.model_dir)
    _seed_everything(config.seed)
    if strategy is None:
        # First TF device use: virtual devices must be configured before it.
        strategy = make_strategy(
            config.strategy,
            virtual_devices=config.virtual_devices,
            tpu=config.tpu,
            communication_timeout=config.communication_timeout,
            slurm_port_base=config.slurm_port_base,
        )
    # Right after the strategy, whose coordination service (multi_worker)
    # installs a log-only SIGTERM handler: ours replaces it, so that a notice
    # during the set-up is not lost; it stops the run after its first step.
    signals.install()
    inputs.check_batch_size(config.batch_size, strategy.num_replicas_in_sync)
    _check_replica_groups(config, strategy)
    if strategy.num_replicas_in_sync == 1:
        _warn_what_one_replica_ignores(config)
    checkpointing.check_model_dir(config.model_dir, config)
    source = data_lib.load_source(
        config.dataset, config.data_dir, config.data_source, download=config.download
    )
    total_steps = config_lib.resolve_train_steps(config, source.num_examples["train"])
    config_lib.check_total_steps(config, total_steps)
    return Run(
        config=config,
        strategy=strategy,
        chief=is_chief(strategy),
        source=source,
        total_steps=total_steps,
        signals=signals,
        timing=summaries.Timing(start_time=start_time or called, called=called),
        input=inputs.resolve_input(config, strategy, source),
        **_build_state(config, strategy, source, total_steps),
    )


def _check_storage(model_dir: str) -> None:
    """A ``scheme://`` model_dir TensorFlow cannot reach, as ModelDirError.

    Before any device work: ``paths.check_model_dir`` leaves such paths to
    the storage system, whose first use (after the strategy and the data)
    ended in a traceback: ``s3://`` without tensorflow-io ("File system
    scheme 's3' not implemented"), ``gs://`` offline.
    """
    if "://" not in model_dir:
        return
    try:
        tf.io.gfile.exists(model_dir)
    except tf.errors.OpError as e:
        raise config_lib.ModelDirError(
            f"--model_dir={model_dir}: TensorFlow cannot use it: "
            f"{checkpoints_lib.first_line(e)}. Nothing was written."
        ) from None


def _check_replica_groups(config, strategy) -> None:
    """--sync_args=group_size=G against this worker's devices, as a flag error."""
    size = config_lib.replica_group_size(config)
    if size is not None:
        try:
            with strategy.scope():  # It counts the devices of the one in scope.
                distribute.check_group_size(strategy, size)
        except ValueError as e:
            raise config_lib.ConfigError(f"--sync_args: {e}") from None


def _build_state(config, strategy, source, total_steps) -> dict[str, Any]:
    """Model, optimizer, step, sums, guard and checkpoint, under the strategy."""
    with strategy.scope():
        model = build_model(
            config.model,
            source,
            seed=config.seed,
            mixed_precision=config.mixed_precision,
            # TPUs compile everything with XLA, whatever the flag says.
            jit_compile=True if distribute.is_tpu(strategy) else config.jit_compile,
            model_args=config.model_args,
        )
        optimizer = make_optimizer(config, total_steps)
        optimizer.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        guard = trainer_faults.NonfiniteGuard(
            config_lib.nonfinite_policy(config), config.max_skipped_steps, optimizer
        )
        sums = {"train_sums": Sums("train_sums"), "eval_sums": Sums("eval_sums")}
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step)
    return dict(
        model=model,
        optimizer=optimizer,
        step=step,
        guard=guard,
        checkpoint=checkpoint,
        **sums,
    )


def resume(run: Run) -> None:
    """Locks ``model_dir`` (chief) and restores the newest checkpoint that loads.

    What a save killed mid-way left is removed first; a latest checkpoint
    that fails to load is moved aside with a WARNING (see
    :func:`checkpoints.newest_loadable`).

    Raises:
      checkpoints.LockError: another trainer writes this ``model_dir``.
      ModelDirError: the checkpoint does not fit this model, or is past its end.
    """
    config = run.config
    directory = os.path.join(config.model_dir, CHECKPOINT_SUBDIR)
    if run.chief:
        run.lock = checkpoints_lib.RunLock(config.model_dir)
        run.lock.acquire()
        checkpoints_lib.remove_temporaries(directory)
    latest = checkpoints_lib.newest_loadable(directory, chief=run.chief)
    if latest:
        checkpointing.restore(run.checkpoint, latest, config.model_dir, config)
        # Local SGD / DiLoCo: each replica's own weights and slots, saved by
        # snapshot_replicas(), go back to their replica (on another replica
        # count, every replica starts from their average).
        run.optimizer.restore_replicas(run.model.trainable_variables)
    run.resumed_from = latest
    run.start_step = int(run.step.numpy())
    if latest and run.start_step < run.total_steps:
        _warn_if_weights_are_the_average(run)
    if latest and run.chief:
        _resume_clock(run)
    if run.start_step > run.total_steps:
        # It would "complete" at once, reporting more steps than asked for.
        raise config_lib.ModelDirError(
            f"{config.model_dir} holds a run at step {run.start_step}, beyond "
            f"this run's {run.total_steps} steps (--train_steps, --epochs). "
            "Nothing was written; raise them to continue it, or use another "
            "--model_dir."
        )
    _log_state_bytes(run)
    logging.info(
        "Model %s (%d parameters), %s optimizer, aggregation %s, sync %s; "
        "global batch %d over %d replica(s); %s step %d of %d",
        config.model,
        models_lib.parameter_count(run.model),
        config.optimizer,
        config.aggregation,
        config.sync
        if config.sync == "every_step"
        else f"{config.sync} k={config.sync_period}",
        config.batch_size,
        run.strategy.num_replicas_in_sync,
        "resuming at" if latest else "starting at",
        run.start_step,
        run.total_steps,
    )


def _warn_what_one_replica_ignores(config) -> None:
    """Flags that change nothing on 1 replica, said once (not refused: the
    same flagfile serves any device count, and the numbers are the same)."""
    if config.compression:
        # Nothing travels; the residuals are still kept, so that the
        # checkpoint resumes compressed on more replicas.
        logging.warning(
            "--compression=%s does nothing on 1 replica (nothing is "
            "communicated); training is uncompressed",
            config.compression,
        )
    if config.shard_optimizer_state:
        # One shard is the whole state: nothing is saved. The checkpoint
        # still resumes sharded on more replicas.
        logging.warning(
            "--shard_optimizer_state does nothing on 1 replica (its one shard "
            "is the whole optimizer state)"
        )


def _warn_if_weights_are_the_average(run: Run) -> None:
    """Warns when training goes on from a finished ``use_ema`` run's average.

    Its final checkpoint holds the moving average as the weights (as after
    Keras's ``fit``); the trained weights are not kept, so the extended run
    is not the one that trained straight through. Told by the weights: only
    that save makes every weight bit-equal to its average.
    """
    opt, variables = run.optimizer, run.model.trainable_variables
    if not opt.use_ema or not all(
        np.array_equal(v.numpy(), opt.slots(v)["ema"].numpy()) for v in variables
    ):
        return
    logging.warning(
        "The checkpoint of step %d holds the moving average as the weights "
        "(use_ema: the run ended there); training goes on from the average, so "
        "this run differs from one that trained %d steps without stopping",
        run.start_step,
        run.total_steps,
    )


def _resume_clock(run: Run) -> None:
    """The run's training seconds go on from those of its checkpoint."""
    seconds = checkpointing.TrainingClock(run.config.model_dir).seconds_at(
        run.start_step
    )
    if seconds is None:
        logging.warning(
            "The training seconds up to step %d were not recorded (%s is "
            "missing or damaged): evaluations.json's training_seconds count "
            "from this process",
            run.start_step,
            checkpointing.CLOCK_FILE,
        )
        return
    run.timing.seconds_before = seconds


def _log_state_bytes(run: Run) -> None:
    """The optimizer state each device holds (sharded or not), once."""
    held = run.optimizer.state_bytes_per_device()
    if not held:
        return
    sizes = sorted(held.values())
    sharded = " (sharded)" if run.config.shard_optimizer_state else ""
    logging.info(
        "Optimizer state%s: %s per device on %d device(s)",
        sharded,
        _megabytes(sizes[-1])
        if sizes[0] == sizes[-1]
        else f"{_megabytes(sizes[0])}-{_megabytes(sizes[-1])}",
        len(held),
    )


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def open_outputs(run: Run) -> Outputs:
    """Every check passed: creates ``model_dir``'s files and the loop's parts.

    Raises:
      WriteError: ``model_dir``, ``run_config.json`` or the event files
        cannot be written.
    """
    config, strategy = run.config, run.strategy
    # The input's checks first (a batch larger than the data, one the
    # replicas cannot split): a run refused here must leave nothing behind,
    # and a run_config.json left would bind the directory to these flags.
    feed = inputs.make_train_feed(
        strategy, run.source, config, run.input, run.start_step
    )
    # The test pipeline is built at the first evaluation, not before the
    # first step; its batch size is checked now, before anything runs.
    inputs.check_batch_size(
        config.eval_batch_size or config.batch_size, strategy.num_replicas_in_sync
    )
    inputs.check_eval_batch_size(config, run.source, strategy.num_replicas_in_sync)
    if run.chief:
        try:
            tf.io.gfile.makedirs(config.model_dir)
        except (tf.errors.OpError, OSError) as e:
            raise WriteError(
                f"Could not create {config.model_dir}: {checkpoints_lib.first_line(e)}"
            ) from None
        checkpointing.write_json_atomically(
            os.path.join(config.model_dir, RUN_CONFIG_FILE),
            config_lib.run_identity(config),
        )
    writers = summaries.Writers.open(config.model_dir, run.chief)
    saver = Saver(
        run,
        checkpoints_lib.CheckpointWriter(
            run.checkpoint,
            os.path.join(config.model_dir, CHECKPOINT_SUBDIR),
            run.chief,
            worker_id(strategy),
            config.keep_checkpoints,
        ),
    )
    agreement = trainer_faults.StopAgreement(strategy, run.signals, run.guard)
    return Outputs(
        writers=writers,
        saver=saver,
        evaluator=Evaluator(run, writers.eval, agreement),
        agreement=agreement,
        feed=feed,
    )
