"""Test-set evaluation during and at the end of a run.

Where replicas diverge by design (local SGD, DiLoCo, hierarchical), "the
model" evaluated is the replicas' average. During the run each replica holds
the average only for the evaluation and gets its own weights back after it:
ending the period early (``optimizer.synchronize``) would change the run,
and evaluating every 50 steps would turn DiLoCo(128) into DiLoCo(50). The
final evaluation synchronises (the saved and reported model is the average).

Each evaluation is also recorded in ``evaluations.json`` in ``model_dir``
(chief; rewritten atomically, a resumed run goes on with the list): the
step, the accuracy and loss, the run's training seconds so far (evaluations
excluded; across resumes, see ``Timing.run_training_seconds``) and the
optimizer's ``bytes_sent``, for accuracy-against-time and -bytes curves (the
time-to-accuracy benchmark).
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import tensorflow as tf
from absl import logging

from distopt import distribute as dist
from distopt import trainer_faults
from distopt.trainer.checkpointing import write_json_atomically
from distopt.trainer.config import DIVERGING_SYNC
from distopt.trainer.inputs import make_eval_dataset
from distopt.trainer.step import make_eval_loop
from distopt.trainer.summaries import communication_counters, write_scalars

#: Every evaluation of the run (see the module docstring).
EVALUATIONS_FILE = "evaluations.json"


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
        self._history = None  # Read from EVALUATIONS_FILE at the first record.

    def evaluate(self, at_step: int, final: bool = False) -> dict | None:
        """The test metrics, or None when a stop notice cut the pass short.

        Args:
            at_step: The step evaluated.
            final: The run's last evaluation: replicas that diverge are
                synchronised for good (see the module docstring).
        """
        started = time.time()
        # Read before the evaluation's own averaging, which is not training.
        sent = (communication_counters(self._run.optimizer) or {}).get("bytes_sent")
        try:
            if final:
                self._synchronize()
                result = self._evaluate(at_step, started)
            else:
                with self._replicas_averaged():
                    result = self._evaluate(at_step, started)
        finally:
            self._run.timing.evaluating += time.time() - started
        if result is not None:
            self._record(at_step, result, sent)
        return result

    def _synchronize(self) -> None:
        run = self._run
        # The optimizer needs the strategy in scope.
        with run.strategy.scope():
            run.optimizer.synchronize(run.model.trainable_variables)

    @contextlib.contextmanager
    def _replicas_averaged(self):
        """Every replica holds the replicas' average inside; its own after.

        The average is taken outside the optimizer, so its counters keep
        counting training only.
        """
        run = self._run
        if (
            run.config.sync not in DIVERGING_SYNC
            or run.strategy.num_replicas_in_sync == 1
        ):
            yield
            return
        strategy, variables = run.strategy, run.model.trainable_variables
        with strategy.scope():
            own = dist.read_per_replica(strategy, variables)
            mean = [dist.reduce(strategy, dist.MEAN, v, v) for v in own]
            dist.assign(strategy, variables, mean)
        try:
            yield
        finally:
            with strategy.scope():
                dist.assign(strategy, variables, own)

    def _record(self, at_step: int, result: dict, sent) -> None:
        run = self._run
        if not run.chief:
            return
        line = {
            "step": at_step,
            "accuracy": result["accuracy"],
            "loss": result["loss"],
            # The whole run's, across resumes.
            "training_seconds": run.timing.run_training_seconds(),
            "bytes_sent": sent,
        }
        path = os.path.join(run.config.model_dir, EVALUATIONS_FILE)
        if self._history is None:
            self._history = _read_list(path)
        # A resumed run may evaluate a step again: the newer result counts.
        self._history = [e for e in self._history if e.get("step") != at_step]
        self._history.append(line)
        write_json_atomically(path, self._history)

    def _evaluate(self, at_step: int, started: float) -> dict | None:
        run = self._run
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


def _read_list(path: str) -> list:
    """The JSON list at ``path``; empty if there is none or it is damaged."""
    try:
        with tf.io.gfile.GFile(path) as f:
            value = json.load(f)
    except (tf.errors.OpError, OSError, ValueError):
        return []
    return value if isinstance(value, list) else []
