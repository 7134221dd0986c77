"""What a run reports: TensorBoard scalars, log lines and ``metrics.json``.

Also the run's clock (:class:`Timing`), which every figure of time in the
log and in ``metrics.json`` comes from.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import tensorflow as tf
from absl import logging
from tensorflow.core.framework import summary_pb2

from distopt import checkpoints as checkpoints_lib
from distopt.trainer.checkpointing import WriteError

# tf.summary.scalar lives in the tensorboard package, which TensorFlow does not
# require; this writes the same event (TensorBoard's "scalars" plugin) with
# core TensorFlow only.
_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
    data_class=summary_pb2.DATA_CLASS_SCALAR,
)


def write_scalars(writer, step: int, values: dict[str, float]) -> None:
    """Writes TensorBoard scalars ``values`` at ``step`` with ``writer``."""
    with writer.as_default(step=step):
        for name, value in values.items():
            tf.summary.write(
                name, tf.constant(value, tf.float32), metadata=_SCALAR_METADATA
            )


@dataclasses.dataclass
class Writers:
    """The run's TensorBoard event writers, ``model_dir/train`` and ``/eval``."""

    train: Any
    eval: Any

    @classmethod
    def open(cls, model_dir: str, chief: bool) -> Writers:
        """File writers on the chief, writers that drop everything elsewhere."""
        if not chief:
            noop = tf.summary.create_noop_writer()
            return cls(noop, noop)
        try:
            return cls(
                *(
                    tf.summary.create_file_writer(os.path.join(model_dir, name))
                    for name in ("train", "eval")
                )
            )
        except (tf.errors.OpError, OSError) as e:
            raise WriteError(
                f"Could not open the event files in {model_dir}: "
                f"{checkpoints_lib.first_line(e)}"
            ) from None

    def flush(self) -> None:
        """Writes what is buffered; a failure is one WARNING, not the run's end."""
        for writer in (self.train, self.eval):
            try:
                writer.flush()
            except (tf.errors.OpError, OSError) as e:
                logging.warning(
                    "Could not write TensorBoard events: %s",
                    checkpoints_lib.first_line(e),
                )


def format_seconds(seconds: float) -> str:
    """``1h02m03s`` or ``2m03s``."""
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


@dataclasses.dataclass
class Timing:
    """The run's clock.

    ``start_time`` is when the user started the run: the Python
    interpreter's start for ``python -m distopt.train``, the call to
    ``train()`` for a library call (unless its caller says otherwise).
    """

    start_time: float
    # time.time() when train() was called.
    called: float
    # Seconds from start_time to the end of the first step (None before it).
    first_step: float | None = None
    # Steps after the first one, and their seconds: the throughput.
    steps: int = 0
    step_seconds: float = 0.0
    # When the first training chunk started, and when training stopped.
    train_started: float | None = None
    train_stopped: float | None = None
    # Seconds spent in evaluations between train_started and train_stopped.
    eval_seconds: float = 0.0
    # Seconds this process has spent evaluating so far (averaging included).
    evaluating: float = 0.0
    # The training seconds of the run's earlier processes, up to the
    # checkpoint this one resumed from (recorded at each save).
    seconds_before: float = 0.0

    def training_seconds_excluding_eval(self) -> float | None:
        """This process's wall-clock seconds of training (saves included),
        evaluations excluded."""
        if self.train_started is None:
            return None
        if self.train_stopped is None:
            return time.time() - self.train_started - self.evaluating
        return self.train_stopped - self.train_started - self.eval_seconds

    def run_training_seconds(self) -> float:
        """The whole run's training seconds so far: the earlier processes'
        (to the checkpoint resumed from) and this one's, evaluations excluded.

        Work a preempted process did after its last checkpoint is not
        counted: it is done again, and counted, in the process that resumes.
        """
        return self.seconds_before + (self.training_seconds_excluding_eval() or 0.0)

    def examples_per_second(self, batch_size: int) -> float | None:
        if not self.step_seconds:
            return None
        return self.steps * batch_size / self.step_seconds


class ProgressWindow:
    """The steps since the last progress line, for its examples/s and ETA."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.started, self.steps = time.time(), 0

    def line(self, run, current: int, writer) -> None:
        """Logs the progress line at ``current`` and writes its scalars."""
        config = run.config
        result = run.train_sums.result()
        elapsed = time.time() - self.started
        # None: no timed step since the last line (the first step compiles).
        rate = self.steps * config.batch_size / elapsed if self.steps else None
        steps_per_second = self.steps / elapsed if self.steps else 0.0
        left = run.total_steps - current
        # Unknown before any timed step, unless nothing is left.
        eta = left / steps_per_second if steps_per_second else (None if left else 0.0)
        lr = float(run.optimizer.learning_rate_value())
        logging.info(
            "step %d/%d: loss %.4f, accuracy %.2f%%, %s examples/s, lr %.3g, ETA %s",
            current,
            run.total_steps,
            result["loss"],
            100 * result["accuracy"],
            "n/a" if rate is None else f"{rate:.0f}",
            lr,
            "n/a" if eta is None else format_seconds(eta),
        )
        scalars = {
            "loss": result["loss"],
            "accuracy": result["accuracy"],
            "learning_rate": lr,
            "skipped_steps": int(run.optimizer.skipped_steps.numpy()),
        }
        if rate is not None:  # No 0 where nothing was timed.
            scalars["examples_per_second"] = rate
        write_scalars(writer, current, scalars)
        self.reset()


def communication_counters(optimizer) -> dict[str, int] | None:
    """The optimizer's communication counters (``Reducer.counters()``) by name.

    ``bytes_sent`` is the payload this worker's replica put into collectives
    (every replica sends the same), since the run began: the counters are
    variables of the optimizer, saved and restored with it.
    """
    reducer = getattr(optimizer, "reducer", None)
    if reducer is None:  # SAM: its base optimizer communicates.
        reducer = getattr(getattr(optimizer, "base_optimizer", None), "reducer", None)
    return reducer.counters() if reducer is not None else None


def process_threads() -> int | None:
    """Threads of this process (Linux), or None where /proc has no count.

    Recorded because collectives with a timeout each park a thread for that
    long in TensorFlow: a run that piles them up should show it.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def run_metrics(run, status: str, final_step: int, result, timing, saver) -> dict:
    """The contents of ``metrics.json``."""
    config, result = run.config, result or {}
    metrics: dict[str, Any] = {
        "status": status,
        "test_accuracy": result.get("accuracy"),
        "test_loss": result.get("loss"),
        "test_examples": int(result["examples"]) if result else None,
        "train_steps": final_step,
        "start_step": run.start_step,
        "examples_per_second": timing.examples_per_second(config.batch_size),
        "wall_seconds": time.time() - timing.called,
        "seconds_to_first_step": timing.first_step,
        "training_seconds_excluding_eval": timing.training_seconds_excluding_eval(),
        "run_training_seconds": timing.run_training_seconds(),
        "skipped_steps": int(run.optimizer.skipped_steps.numpy()),
        "num_replicas": run.strategy.num_replicas_in_sync,
        "global_batch_size": config.batch_size,
        "model": config.model,
        "dataset": config.dataset,
        "data_source": run.source.origin,
        "input": run.input,
        "strategy": config.strategy,
        "optimizer": config.optimizer,
        "aggregation": config.aggregation,
        "sync": config.sync,
        "sync_period": config.sync_period,
        "last_checkpoint_step": saver.last_step,
        "threads_at_end": process_threads(),
    }
    # Flat (every value a number): "communication_bytes_sent" and the rest.
    for name, value in (communication_counters(run.optimizer) or {}).items():
        metrics[f"communication_{name}"] = value
    if config.target_accuracy is not None:
        metrics["target_accuracy"] = config.target_accuracy
        metrics["target_reached_at_step"] = run.target_step
    return metrics


def log_done(
    metrics: dict,
    final_step: int,
    *,
    examples_per_second: float | None = None,
    wall_seconds: float | None = None,
) -> None:
    """The last line of a completed run.

    ``examples_per_second`` and ``wall_seconds`` are this process's (a rerun
    of a finished run trained nothing: n/a), not those ``metrics`` keeps.
    """
    rate = examples_per_second
    logging.info(
        "Done: test accuracy %.2f%%, test loss %.4f, %d steps, %s examples/s, %.1f s",
        100 * metrics["test_accuracy"],
        metrics["test_loss"],
        final_step,
        f"{rate:.0f}" if rate else "n/a",
        metrics["wall_seconds"] if wall_seconds is None else wall_seconds,
    )
