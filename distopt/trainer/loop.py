"""The training loop: chunks of steps, and what happens between them.

The loop runs in chunks of at most ``steps_per_loop`` steps, cut at every
log, evaluation and checkpoint boundary. The first chunk is one step, so the
time to the first step (tracing and compilation included) is measured on its
own and kept out of the throughput. Stop notices, divergence and the target
accuracy are read between chunks: a chunk is what "the current step" means
for them.
"""

from __future__ import annotations

import os
import time

import tensorflow as tf
from absl import logging

from distopt import trainer_faults
from distopt.trainer.checkpointing import (
    METRICS_FILE,
    read_json,
    write_json_atomically,
)
from distopt.trainer.step import make_train_loop
from distopt.trainer.summaries import ProgressWindow, log_done, run_metrics

STATUS_TARGET_REACHED = "target_reached"


class TrainLoop:
    """Trains a run to its end, its target accuracy, a stop notice or divergence.

    Args:
      run: the :class:`~distopt.trainer.run.Run` (set up and resumed).
      outputs: its :class:`~distopt.trainer.run.Outputs` (writers, saver,
        evaluator, stop agreement).
    """

    def __init__(self, run, outputs):
        self.run, self.out = run, outputs
        self.timing = run.timing
        self.window = ProgressWindow()
        self._train = make_train_loop(
            run.strategy,
            run.model,
            run.optimizer,
            run.train_sums,
            run.step,
            jit_compile=run.config.jit_compile,
            guard=run.guard,
            feed=outputs.feed,
        )
        self._inputs = outputs.feed.inputs()
        # The evaluation that reached --target_accuracy, once one has.
        self._target_result = None

    def run_to_end(self) -> dict:
        """Trains, then evaluates and writes ``metrics.json``; returns the metrics."""
        current = self.run.start_step
        self._evaluate_on_resume(current)
        while current < self.run.total_steps and self._target_result is None:
            current = self._chunk(current)
        self._stop_clock()
        return self._end()

    # --- One chunk ---------------------------------------------------------------

    def _chunk(self, current: int) -> int:
        n = self._chunk_size(current)
        self.run.signals.maybe_inject(current)
        self._train_steps(n)
        current += n
        if delay := trainer_faults.chunk_delay():
            time.sleep(delay)
        # One agreement per chunk: every worker stops (or diverges) together.
        stop, bad = self.out.agreement()
        if diverged := self.run.guard.diverged(bad):
            self._finish(trainer_faults.STATUS_DIVERGED, current)
            raise trainer_faults.Diverged(
                f"Training diverged: {diverged} in steps {current - n + 1}-{current}"
                f"; {self.out.saver.kept()}. Lower --learning_rate, add "
                "--global_clipnorm, or see --on_nonfinite"
            )
        self._between_chunks(current, stop)
        return current

    def _chunk_size(self, current: int) -> int:
        if self.timing.first_step is None:
            return 1
        config = self.run.config
        n = min(config.steps_per_loop, self.run.total_steps - current)
        for every in (config.log_every, config.eval_every, config.checkpoint_every):
            if every > 0:
                n = min(n, every - current % every)
        return n

    def _train_steps(self, n: int) -> None:
        started = time.time()
        if self.timing.train_started is None:
            self.timing.train_started = started
        self._train(self._inputs, tf.constant(n, tf.int64))
        if self.timing.first_step is None:
            int(self.run.step.numpy())  # Wait for the step to finish.
            self.timing.first_step = time.time() - self.timing.start_time
            logging.info("First step done %.1f s after start", self.timing.first_step)
            self.window.reset()
        else:
            self.timing.steps += n
            self.timing.step_seconds += time.time() - started
            self.window.steps += n

    def _between_chunks(self, current: int, stop: bool) -> None:
        config, total = self.run.config, self.run.total_steps
        if current % config.log_every == 0 or current == total:
            self.window.line(self.run, current, self.out.writers.train)
        if stop:
            self._preempt(current)
        if config.eval_every and current % config.eval_every == 0 and current < total:
            result = self.out.evaluator.evaluate(current)
            if result is None:
                self._preempt(current)
            self._check_target(current, result)
        if config.checkpoint_every and current % config.checkpoint_every == 0:
            self.out.saver.save(current)

    def _evaluate_on_resume(self, current: int) -> None:
        """A run resumed at an evaluation step evaluates it before training.

        A stop notice may have cut that evaluation short (it is then missing
        from ``evaluations.json``, and a target it reaches would be missed).
        Whether it was is known only to the chief, so every worker evaluates
        again (the same weights: the same result, which replaces the first).
        """
        config = self.run.config
        if (
            self.run.resumed_from
            and config.eval_every
            and current % config.eval_every == 0
            and 0 < current < self.run.total_steps
        ):
            result = self.out.evaluator.evaluate(current)
            if result is None:
                self._preempt(current)
            self._check_target(current, result)

    def _check_target(self, current: int, result: dict) -> None:
        target = self.run.config.target_accuracy
        if target is None or result["accuracy"] < target:
            return
        self._target_result = result
        self.run.target_step = current
        logging.info(
            "Target accuracy %.2f%% reached at step %d (%.2f%%): stopping",
            100 * target,
            current,
            100 * result["accuracy"],
        )

    # --- The end -----------------------------------------------------------------

    def _stop_clock(self) -> None:
        if self.timing.train_stopped is None:
            self.timing.train_stopped = time.time()
            self.timing.eval_seconds = self.timing.evaluating

    def _end(self) -> dict:
        run = self.run
        final_step = int(run.step.numpy())
        averaged = run.optimizer.use_ema and final_step > 0
        if averaged:
            # As at the end of Keras's fit: the moving average becomes the
            # weights that are saved and evaluated. Idempotent (the average
            # is not changed), so a resumed final phase repeats it harmlessly.
            with run.strategy.scope():
                run.optimizer.finalize_variable_values(run.model.trainable_variables)
            logging.info("Weights set to their moving average (use_ema)")
        if averaged:
            self.out.saver.save(final_step)  # New weights, even if saved before.
        elif final_step > run.start_step:
            self.out.saver.save_unless_saved(final_step)
        result = self._final_result(final_step, averaged)
        skipped = int(run.optimizer.skipped_steps.numpy())
        if skipped:
            logging.warning(
                "%d step(s) were skipped for a non-finite gradient (--on_nonfinite=skip)",
                skipped,
            )
        metrics = self._finish(self._status(final_step, result), final_step, result)
        # This process's figures: a rerun that trained no step says n/a
        # examples/s and its own seconds, whatever metrics.json keeps.
        log_done(
            metrics,
            final_step,
            examples_per_second=self.timing.examples_per_second(run.config.batch_size),
            wall_seconds=time.time() - self.timing.called,
        )
        return metrics

    def _final_result(self, final_step: int, averaged: bool) -> dict:
        # The evaluation that reached the target is of these very weights
        # (unless the moving average replaced them).
        if self._target_result is not None and not averaged:
            return self._target_result
        result = self.out.evaluator.evaluate(final_step, final=True)
        if result is None:
            self._preempt(final_step, " during the final evaluation")
        return result

    def _status(self, final_step: int, result: dict) -> str:
        target = self.run.config.target_accuracy
        if target is not None and result["accuracy"] >= target:
            if self.run.target_step is None:
                self.run.target_step = final_step
            return STATUS_TARGET_REACHED
        return trainer_faults.STATUS_COMPLETED

    def _finish(self, status: str, final_step: int, result=None) -> dict:
        """Writes ``metrics.json`` (chief) with ``status``; returns the metrics."""
        self._stop_clock()
        self.out.writers.flush()
        metrics = run_metrics(
            self.run, status, final_step, result, self.timing, self.out.saver
        )
        if self.run.chief:
            path = os.path.join(self.run.config.model_dir, METRICS_FILE)
            if self.timing.first_step is None:
                metrics = _with_measured_figures(metrics, path)
            write_json_atomically(path, metrics)
        return metrics

    def _preempt(self, at_step: int, when: str = "") -> None:
        self.out.saver.save_unless_saved(at_step)
        self._finish(trainer_faults.STATUS_PREEMPTED, at_step)
        raise trainer_faults.Preempted(
            f"Stopped by {self.run.signals.requested or 'a stop notice to another worker'}"
            f" at step {at_step} of {self.run.total_steps}{when}; saved a checkpoint "
            f"there. {trainer_faults.RERUN_TO_RESUME}"
        )


# The figures of the training: a rerun of a finished run (a scheduler's
# restart after the last save, or the README's "rerun to resume") trains no
# step and keeps them from the metrics.json it replaces, so that runs compare
# by how they trained, not by how long their last process took to evaluate.
# start_step stays this process's (the step it resumed at), as after a resume.
_MEASURED = (
    "examples_per_second",
    "seconds_to_first_step",
    "training_seconds_excluding_eval",
    "run_training_seconds",
    "wall_seconds",
    "threads_at_end",
    "target_reached_at_step",
)


def _with_measured_figures(metrics: dict, path: str) -> dict:
    """``metrics`` of a process that trained no step, with the stored run's figures."""
    stored = read_json(path)
    if (
        not isinstance(stored, dict)
        or stored.get("train_steps") != metrics["train_steps"]
    ):
        return metrics
    kept = {k: stored[k] for k in _MEASURED if stored.get(k) is not None}
    return {**metrics, **kept}
