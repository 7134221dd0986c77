"""Test-set evaluation during and at the end of a run.

Where replicas diverge by design (local SGD, DiLoCo, hierarchical) they are
averaged first (``optimizer.synchronize``): "the model" that is evaluated,
saved at the end and reported is the replicas' average.
"""

from __future__ import annotations

import time

import tensorflow as tf
from absl import logging

from distopt import trainer_faults
from distopt.trainer.inputs import make_eval_dataset
from distopt.trainer.step import make_eval_loop
from distopt.trainer.summaries import write_scalars


class Evaluator:
    """Test passes over the run's model, with their seconds counted.

    A pass runs in chunks of ``steps_per_loop`` batches with a stop
    agreement between them: a large test set must not outlast the grace
    period a scheduler gives after SIGTERM. The test pipeline is built at
    the first evaluation, not before the first training step.
    """

    def __init__(self, run, writer, agreement):
        self._run, self._writer, self._agreement = run, writer, agreement
        self._loop = make_eval_loop(
            run.strategy, run.model, run.eval_sums, jit_compile=run.config.jit_compile
        )
        self._test = None
        # Seconds spent evaluating, averaging included.
        self.seconds = 0.0

    def evaluate(self, at_step: int) -> dict | None:
        """The test metrics, or None when a stop notice cut the pass short."""
        started = time.time()
        try:
            return self._evaluate(at_step, started)
        finally:
            self.seconds += time.time() - started

    def _synchronize(self) -> None:
        run = self._run
        # The optimizer needs the strategy in scope.
        with run.strategy.scope():
            run.optimizer.synchronize(run.model.trainable_variables)

    def _evaluate(self, at_step: int, started: float) -> dict | None:
        run = self._run
        self._synchronize()
        if self._test is None:
            self._test = make_eval_dataset(run.strategy, run.source, run.config)
        test_ds, test_steps = self._test
        iterator, done = iter(test_ds), 0
        while done < test_steps:
            run.signals.maybe_inject(at_step)
            n = min(run.config.steps_per_loop, test_steps - done)
            self._loop(iterator, tf.constant(n, tf.int64))
            done += n
            if delay := trainer_faults.chunk_delay():
                time.sleep(delay)
            if done < test_steps and self._agreement()[0]:
                run.eval_sums.result()  # Drops the partial sums.
                logging.warning(
                    "Evaluation at step %d cut short by a stop notice (%d of %d "
                    "batches)",
                    at_step,
                    done,
                    test_steps,
                )
                return None
        result = run.eval_sums.result()
        logging.info(
            "eval step %d: loss %.4f, accuracy %.2f%% on %d examples (%.1f s)",
            at_step,
            result["loss"],
            100 * result["accuracy"],
            result["examples"],
            time.time() - started,
        )
        write_scalars(
            self._writer,
            at_step,
            {"loss": result["loss"], "accuracy": result["accuracy"]},
        )
        return result
