"""`EveryStep`: one all-reduce of the gradients per step (the default)."""

from __future__ import annotations

from distopt.sync.base import Sync


class EveryStep(Sync):
    """One fused all-reduce of the gradients per step, then one update."""

    name = "every_step"

    def apply(self, optimizer, strategy, grads, weight, variables):
        grads, scale, ok = optimizer.reducer.reduce(
            strategy, grads, weight, variables=variables
        )
        optimizer.apply_update(strategy, grads, variables, scale=scale, ok=ok)
