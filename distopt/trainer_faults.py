"""How the trainer ends when the cluster or the numbers go wrong.

* **Stop notices.** :class:`StopSignals` turns SIGTERM and SIGINT into a flag
  that the training loop reads between chunks of ``steps_per_loop`` steps:
  the chunk that is running finishes, a checkpoint is saved at the step
  reached, and :class:`Preempted` ends the run with :data:`EXIT_PREEMPTED`.
  Under ``multi_worker`` the flags are summed over all workers once per
  chunk (:func:`make_agreement`), so a notice to any worker stops every
  worker after the same chunk and they save together. This is the protocol
  of ``tf.distribute.experimental.PreemptionCheckpointHandler`` (agree on a
  step, save, exit with a restart code) without its own checkpoint and exit
  path, so that the trainer's atomic save and ``metrics.json`` are used.
* **Divergence.** :data:`ON_NONFINITE` policies; :class:`Diverged` ends a
  run with :data:`EXIT_DIVERGED`.
* :func:`strict_json`: ``metrics.json`` without NaN or Infinity.

Exit codes of ``python -m distopt.train``: 0 completed, 1 bad input or an
error (one line), 3 diverged, 42 preempted (checkpoint saved; rerun the same
command to resume; 42 is TensorFlow's restart code for preemption).
"""

from __future__ import annotations

import math
import os
import signal
import threading

import tensorflow as tf
from absl import logging

from distopt import stop_notice

# The policies' names live with the flags (no TensorFlow there); used here.
from distopt.trainer.config import ON_NONFINITE  # noqa: F401

EXIT_DIVERGED = 3
EXIT_PREEMPTED = 42
STATUS_COMPLETED, STATUS_PREEMPTED, STATUS_DIVERGED = (
    "completed",
    "preempted",
    "diverged",
)

# Test-only fault injection: DISTOPT_FAULT_SIGTERM_AT=N makes the trainer send
# itself SIGTERM when it starts the first chunk (of training, or of an
# evaluation at a step) at or after step N, through
# the same os.kill a scheduler uses. DISTOPT_FAULT_CHUNK_DELAY=S sleeps S
# seconds after each chunk (of training or of an evaluation) so that a test
# can signal a run, or fill its disk, mid-way.
SIGTERM_AT_ENV = "DISTOPT_FAULT_SIGTERM_AT"
CHUNK_DELAY_ENV = "DISTOPT_FAULT_CHUNK_DELAY"


#: How a preempted run's line ends; the trainer names the directory instead
#: when it made one (without --model_dir the same command starts a new run).
RERUN_TO_RESUME = "Rerun the same command to resume"


class Preempted(Exception):
    """A stop notice ended the run after saving a checkpoint."""

    exit_code = EXIT_PREEMPTED


class Diverged(Exception):
    """A non-finite loss or gradient ended the run; nothing was saved after it."""

    exit_code = EXIT_DIVERGED


class StopSignals:
    """SIGTERM and SIGINT set :attr:`requested` instead of killing the process.

    Install after the strategy exists: MultiWorkerMirroredStrategy's
    coordination service installs a SIGTERM handler that only logs
    ("SIGTERM caught"), and the one installed last is the one that runs. A
    second SIGINT restores the default handler's behaviour (an immediate
    KeyboardInterrupt), for a user at a terminal who means it.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = None  # The first signal's name, once one came.
        self._previous = {}

    def install(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            logging.warning("Not the main thread: SIGTERM/SIGINT not handled")
            return self
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        # A notice since the command line started (TensorFlow's import, the
        # strategy's start): ours now, so the run stops after its first step.
        early = stop_notice.take()
        if early and not self.requested:
            self.requested = early
            logging.warning(
                "%s received during the start: stopping after the first step, "
                "then saving a checkpoint",
                early,
            )
        return self

    def _handle(self, signum, frame):
        del frame
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:
            self.requested = name
            # Python runs this between bytecodes, so logging is safe here.
            logging.warning(
                "%s received: stopping after the current chunk of steps, then "
                "saving a checkpoint",
                name,
            )

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            # None: the previous handler was not installed from Python (a C
            # library's); Python cannot put it back, so fall back to default.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def maybe_inject(self, step: int) -> None:
        """Test hook: SIGTERM to this process at ``DISTOPT_FAULT_SIGTERM_AT``."""
        at = os.environ.get(SIGTERM_AT_ENV)
        if at and step >= int(at) and not self.requested:
            os.kill(os.getpid(), signal.SIGTERM)


def chunk_delay() -> float:
    """Test hook: seconds to sleep after each chunk (0 unless set)."""
    return float(os.environ.get(CHUNK_DELAY_ENV, "0") or 0)


def make_agreement(strategy: tf.distribute.Strategy):
    """``agree(stop, bad) -> (stops, bads)``: sums of every replica's values.

    One tiny all-reduce per chunk under ``multi_worker``: every worker then
    takes the same decision (stop and save, or end as diverged) after the
    same chunk, whichever worker got the signal. Each worker passes its own
    ``stop`` (1.0 if it got a notice); every replica of the worker
    contributes it. ``bad`` is a per-replica value already (a sync-on-read
    variable's local copy), read inside the replica function.
    """

    @tf.function
    def agree(stop, bad_var):
        def replica_fn():
            local_bad = bad_var.read_value() if bad_var is not None else 0.0
            return tf.stack([tf.cast(stop, tf.float32), local_bad])

        per_replica = strategy.run(replica_fn)
        total = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
        return total[0], total[1]

    return agree


class StopAgreement:
    """Whether to stop, and whether a replica diverged, agreed by every worker.

    Call between chunks of steps (and of evaluation batches): one tiny
    all-reduce under ``multi_worker`` (see :func:`make_agreement`).
    """

    def __init__(self, strategy: tf.distribute.Strategy, signals: StopSignals, guard):
        self._agree = make_agreement(strategy)
        self._signals, self._guard = signals, guard

    def __call__(self) -> tuple[bool, float]:
        """(stop, bad): whether any worker got a stop notice; the bad count."""
        stops, bad = self._agree(
            tf.constant(1.0 if self._signals.requested else 0.0), self._guard.bad
        )
        return float(stops) > 0, float(bad)


def strict_json(value):
    """``value`` with every NaN or infinite float replaced by None (JSON null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


class NonfiniteGuard(tf.Module):
    """The ``--on_nonfinite`` policy's in-graph bookkeeping.

    Create in ``strategy.scope()``. Nothing here is checkpointed.

    * ``stop``: :attr:`bad` (a sync-on-read sum, no communication per step)
      counts non-finite losses on each replica, and after every chunk
      non-finite weights (a non-finite gradient with a finite loss shows up
      there). The chunk's agreement sums it over all replicas.
    * ``skip``: the optimizer skips non-finite aggregated gradients on every
      replica; :attr:`skip_run_max` is the longest run of consecutive
      skipped steps, the same on every replica.
    * ``ignore``: nothing is watched.
    """

    def __init__(self, policy: str, max_skipped: int, optimizer):
        super().__init__(name="nonfinite_guard")
        self.policy, self.max_skipped = policy, max_skipped
        self._optimizer = optimizer
        self.bad = None
        if policy == "stop":
            self.bad = tf.Variable(
                0.0,
                trainable=False,
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.SUM,
                name="nonfinite",
            )
        kwargs = {
            "dtype": tf.int64,
            "trainable": False,
            "aggregation": tf.VariableAggregation.ONLY_FIRST_REPLICA,
        }
        self.skip_run = tf.Variable(0, name="skip_run", **kwargs)
        self.skip_run_max = tf.Variable(0, name="skip_run_max", **kwargs)

    def watch_loss(self, loss_sum):
        """Replica context: counts this replica's non-finite loss."""
        if self.bad is not None:
            self.bad.assign_add(
                tf.cast(tf.logical_not(tf.math.is_finite(loss_sum)), tf.float32)
            )

    def watch_weights(self, variables):
        """Replica context: counts non-finite values in this replica's weights."""
        if self.bad is None:
            return
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in variables])
        self.bad.assign_add(tf.cast(tf.logical_not(finite), tf.float32))

    def count_skips(self, skipped_before):
        """Cross-replica context, after a step: tracks consecutive skips."""
        if self.policy != "skip":
            return
        skipped = self._optimizer.skipped_steps.read_value() > skipped_before
        run = tf.where(skipped, self.skip_run + 1, tf.zeros_like(self.skip_run))
        self.skip_run.assign(run)
        self.skip_run_max.assign(tf.maximum(self.skip_run_max, run))

    def diverged(self, bad_total: float) -> str | None:
        """Why the run must end (one phrase), or None; same on every worker."""
        if self.policy == "stop" and bad_total > 0:
            return "a non-finite loss or weights (--on_nonfinite=stop)"
        if self.policy == "skip":
            run = int(self.skip_run_max.numpy())
            if run >= self.max_skipped:
                return (
                    f"{run} steps in a row skipped for a non-finite gradient "
                    f"(--max_skipped_steps={self.max_skipped})"
                )
        return None
