"""Sharpness-aware minimization (SAM), wrapping any distopt optimizer.

SAM needs the gradient at a second, perturbed point, so it cannot be written
as `apply_gradients`: it takes the loss as a function and evaluates it twice
per step (`minimize`). The helpers at the end of this module (reducing
gradients from replica context through the optimizer's `Reducer`) are
shared with `distopt.optimizers.heun`.
"""

from __future__ import annotations

import math

import tensorflow as tf

from distopt import distribute as dist
from distopt import reduce as reduce_lib
from distopt.optimizers.base import Optimizer

PERTURBATIONS = ("replica", "aggregated")


class SAM(tf.Module):
    """Sharpness-aware minimization around a base optimizer.

    One step of `minimize(loss_fn, var_list)`:

        g   = grad L(p)
        e   = rho * g / ||g||_2          (the global norm over all variables)
        g_s = grad L(p + e)
        p  <- base_optimizer step with g_s, taken from p (not from p + e)

    Reference: Foret, Kleiner, Mobahi & Neyshabur (2021), "Sharpness-Aware
    Minimization for Efficiently Improving Generalization", ICLR; Algorithm 1.

    Under a distribution strategy (`minimize` called inside `strategy.run`),
    the base optimizer aggregates the replicas' g_s (its `aggregation`, mean
    by default) and every replica's copy takes the same update. Which
    gradient defines the perturbation e is chosen by `perturbation`:

    * `"replica"` (default): each replica perturbs its own copy with its own
      gradient, as in Foret et al. §4 ("m-sharpness", m = the per-replica
      batch) and the default of their reference implementation. No extra
      communication; the paper reports that smaller m generalises better.
      The copies differ only between the two gradient evaluations.
    * `"aggregated"`: e comes from the aggregated gradient (one extra
      all-reduce per step), so SAM over R replicas equals SAM on the union of
      their batches (for equal per-replica batches, or with `weighted_mean`
      aggregation), the m = global-batch variant. A `tf.IndexedSlices`
      gradient (an embedding) stays sparse on that all-reduce too, and e
      moves only the rows it touches.

    Without a strategy, or called in cross-replica context, both coincide.

    The perturbation is applied per replica with
    `distopt.distribute.add_per_replica`, and undone by writing back each
    replica's saved copy (see `distopt.distribute.assign_per_replica`): subtracting e again
    would leave p + e - e, which in floating point is not always p, and with
    per-replica e the copies would drift apart by an ulp.

    `minimize` returns the loss at p (before the perturbation).

    Args:
        base_optimizer: A distopt `Optimizer`, or the registered name of one,
            in which case `**base_kwargs` are its constructor arguments
            (`SAM("momentum", rho=0.05, learning_rate=0.1, momentum=0.9)`).
        rho: The radius of the perturbation, >= 0 (0 gives the base
            optimizer, at twice the cost).
        perturbation: `"replica"` or `"aggregated"`, see above.
        epsilon: Added to ||g|| so that a zero gradient gives e = 0.
        name: The module name.
        **base_kwargs: The base optimizer's arguments, when it is given by name.

    Raises:
        ValueError: for a bad argument.
        TypeError: when `base_optimizer` is not a distopt optimizer.
    """

    #: Optimizers with this attribute need `minimize`: they evaluate the loss.
    needs_loss = True

    def __init__(
        self,
        base_optimizer,
        rho=0.05,
        *,
        perturbation="replica",
        epsilon=1e-12,
        name=None,
        **base_kwargs,
    ):
        super().__init__(name=name or "sam")
        if isinstance(base_optimizer, str):
            # Imported here: the registry imports this module.
            from distopt import optimizers as registry

            try:
                # Checked before it is built: SAM or Heun would not even build.
                _check_applies_gradients(registry.get_class(base_optimizer))
                base_optimizer = registry.get(base_optimizer, **base_kwargs)
            except (TypeError, ValueError) as e:
                raise ValueError(f"base_optimizer: {e}") from None
        elif base_kwargs:
            raise ValueError(
                f"SAM: {sorted(base_kwargs)} are base-optimizer arguments; pass them "
                "to the base optimizer, or give base_optimizer by name."
            )
        if not isinstance(base_optimizer, Optimizer):
            raise TypeError(
                "base_optimizer: expected a distopt Optimizer or a registered name, "
                f"got {type(base_optimizer).__name__}."
            )
        try:
            _check_applies_gradients(type(base_optimizer))
        except ValueError as e:
            raise ValueError(f"base_optimizer: {e}") from None
        self.base_optimizer = base_optimizer
        self.rho = _check_non_negative("rho", rho)
        if perturbation not in PERTURBATIONS:
            raise ValueError(
                f"perturbation: must be one of {', '.join(PERTURBATIONS)}, "
                f"got {perturbation!r}."
            )
        self.perturbation = perturbation
        self.epsilon = _check_non_negative("epsilon", epsilon)

    # --- The optimizer's surface, delegated to the base ----------------------

    @property
    def iterations(self) -> tf.Variable:
        """The base optimizer's step counter (one per `minimize`)."""
        return self.base_optimizer.iterations

    @property
    def skipped_steps(self) -> tf.Variable:
        """The base optimizer's count of skipped non-finite steps."""
        return self.base_optimizer.skipped_steps

    @property
    def learning_rate(self):
        return self.base_optimizer.learning_rate

    @property
    def aggregation(self):
        return self.base_optimizer.aggregation

    @property
    def use_ema(self) -> bool:
        return self.base_optimizer.use_ema

    def learning_rate_value(self) -> tf.Tensor:
        return self.base_optimizer.learning_rate_value()

    def build(self, var_list) -> None:
        """Builds the base optimizer's slots; call in cross-replica context."""
        self.base_optimizer.build(var_list)

    def slots(self, var):
        return self.base_optimizer.slots(var)

    def synchronize(self, var_list) -> None:
        self.base_optimizer.synchronize(var_list)

    def snapshot_replicas(self, var_list) -> None:
        self.base_optimizer.snapshot_replicas(var_list)

    def restore_replicas(self, var_list) -> None:
        self.base_optimizer.restore_replicas(var_list)

    def state_bytes_per_device(self) -> dict[str, int]:
        return self.base_optimizer.state_bytes_per_device()

    def finalize_variable_values(self, var_list) -> None:
        self.base_optimizer.finalize_variable_values(var_list)

    def apply_gradients(self, *args, **kwargs):
        """Not available: SAM needs the loss. Use `minimize(loss_fn, var_list)`."""
        del args, kwargs
        raise NotImplementedError(
            "SAM needs the loss, not gradients: call minimize(loss_fn, var_list). "
            "apply_gradients cannot evaluate the gradient at the perturbed point "
            "p + rho * g / ||g||."
        )

    # --- The step -------------------------------------------------------------

    @tf.autograph.experimental.do_not_convert
    def minimize(self, loss_fn, var_list, *, weight=None):
        """One SAM step: two evaluations of `loss_fn`, one base update.

        Call it inside `strategy.run` (each replica's `loss_fn` on its own
        data) or without a strategy.

        Args:
            loss_fn: A callable of no arguments returning the scalar loss; it
                must read the variables (it is called at p and at p + e).
            var_list: The variables to optimise.
            weight: This replica's weight, for `WeightedMean` aggregation.

        Returns:
            The loss at p, before the perturbation.
        """
        var_list = list(var_list)
        with tf.GradientTape() as tape:
            loss = loss_fn()
            # With loss scaling, the reducer divides the scale out again;
            # the replica perturbation is scale-invariant (g / ||g||).
            scaled = self.base_optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, var_list)
        pairs = [(g, v) for g, v in zip(grads, var_list) if g is not None]
        if not pairs:
            raise ValueError("var_list: loss_fn depends on none of the variables.")
        moved = [v for _, v in pairs]
        if self.perturbation == "aggregated":
            # A `tf.IndexedSlices` gradient (an embedding) stays sparse on the
            # wire and comes back with each index once, as in the update.
            grads = self.base_optimizer.reducer.reduce_in_replica_context(
                [g for g, _ in pairs], weight
            )
        else:
            # No communication; the dense sum merges duplicate indices.
            grads = [tf.convert_to_tensor(g) for g, _ in pairs]
        # The norm of a sparse gradient is that of its rows (each index once).
        norm = tf.linalg.global_norm([tf.cast(g, tf.float32) for g in grads])
        scale = self.rho / (norm + self.epsilon)
        deltas = [
            reduce_lib.map_values(g, lambda x: x * tf.cast(scale, x.dtype))
            for g in grads
        ]
        # This replica's copy, read before the move (automatic control
        # dependencies keep the read before the write in a tf.function).
        saved = [tf.identity(v) for v in moved]
        dist.add_per_replica(moved, deltas)
        with tf.GradientTape() as tape:
            perturbed_loss = self.base_optimizer.scale_loss(loss_fn())
        sam_grads = tape.gradient(perturbed_loss, var_list)
        dist.assign_per_replica(moved, saved)
        self.base_optimizer.apply_gradients(
            [(g, v) for g, v in zip(sam_grads, var_list)], weight=weight
        )
        return loss

    # --- Serialisation --------------------------------------------------------

    def get_config(self) -> dict:
        """The constructor arguments; the base optimizer as `{class, config}`."""
        return {
            "base_optimizer": self.base_optimizer.spec(),
            "rho": self.rho,
            "perturbation": self.perturbation,
            "epsilon": self.epsilon,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config: dict) -> SAM:
        from distopt import optimizers as registry

        config = dict(config)
        base = config.pop("base_optimizer")
        if isinstance(base, dict):
            base = registry.from_config(base)
        return cls(base, **config)


def _check_non_negative(name, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: must be a number >= 0, got {value!r}.") from None
    if not (v >= 0 and math.isfinite(v)):
        raise ValueError(f"{name}: must be finite and >= 0, got {value!r}.")
    return v


def _check_applies_gradients(cls: type) -> None:
    """SAM's base optimizer steps with `apply_gradients`; SAM and Heun cannot."""
    if getattr(cls, "needs_loss", False):
        raise ValueError(
            f"{cls.__name__} evaluates the loss itself; SAM needs a base "
            "optimizer with apply_gradients."
        )
