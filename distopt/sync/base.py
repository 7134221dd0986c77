"""The `Sync` interface: what a sync mode receives, and what it may call.

A sync mode gets each step's per-replica payload in cross-replica context
(from the optimizer's one `merge_call`) and decides what to communicate. It
talks to the optimizer through public names only:

* `optimizer.reducer`: `reduce` (aggregate, normalise, transform), `mean`
  and `all_reduce`, all counted;
* `optimizer.apply_update(strategy, grads, variables, scale=, ok=, var_ok=)`;
* `optimizer.built_variables()`, `optimizer.variable_index(var)`,
  `optimizer.slots(var)`.

Every decision is a function of counters that every replica and worker
holds identically, taken in cross-replica context (`distribute.cond`), so
conditional communication never hangs and never meets a `merge_call`
inside a `tf.cond` (tensorflow#27716).
"""

from __future__ import annotations

import tensorflow as tf

from distopt.checks import check_int


class Sync(tf.Module):
    """Base class of sync modes."""

    name = "sync"
    #: Whether gradients must come from inside `strategy.run`.
    needs_replica_context = False
    #: Whether replicas' weights differ between synchronisations.
    diverges = False
    #: Whether the mode reduces gradients (or DiLoCo's outer gradient), so
    #: that `compression` applies.
    sends_gradients = True

    def __init__(self):
        super().__init__(name=self.name)

    def build(self, optimizer, variables, strategy) -> None:
        """Creates the mode's state, in cross-replica context."""

    def scaled_state(self) -> list:
        """The mode's variables in the gradient's units, which a loss scale
        multiplies (the optimizer rescales them when it changes)."""
        return []

    def apply(self, optimizer, strategy, grads, weight, variables) -> None:
        """One step: `grads`/`weight` are the replicas' payloads (`Reducer.payload`)."""
        raise NotImplementedError

    def synchronize(self, optimizer, strategy, variables) -> None:
        """Makes replicas identical (a no-op where they always are)."""

    def snapshot_replicas(self, optimizer, strategy, variables) -> None:
        """Stores every replica's own state for a checkpoint (where it differs)."""

    def restore_replicas(self, optimizer, strategy, variables) -> None:
        """Gives every replica its own state back after a restore."""

    def get_config(self) -> dict:
        return {"name": self.name}


def check_period(name, k) -> int:
    """Validates a period argument (an int >= 1)."""
    return check_int(name, k, 1)
