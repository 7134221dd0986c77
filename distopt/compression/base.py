"""`Compressor`: what a gradient compressor does, and the state it keeps.

A compressor is called by the `distopt.reduce.Reducer` once per reduction
that sends gradients (`Reducer.reduce`), in cross-replica context, with
each replica's normalised share of the gradient, `s_r = P_r / N` (see
`distopt.reduce`: `g_r / R` for the mean, `g_r` for the sum,
`w_r g_r / sum(w)` for the weighted mean). It returns `sum_r C(s_r + e_r)`,
decompressed, on every replica, bit for bit the same everywhere. Like a
PyTorch DDP communication hook with its state object:

    x_r = s_r + beta e_r             error feedback (Karimireddy et al. 2019;
                                     Stich et al. 2018): what replica r
                                     did not send before is sent now;
                                     beta (`error_feedback_decay`) is 1
                                     unless decayed, as in SparseLoCo
    exchange                         the subclass: compress, communicate
                                     through the Reducer's counted
                                     collectives, decompress
    e_r <- x_r - D_r                 D_r: replica r's own decompressed part

The new residuals (and a subclass's own state, PowerSGD's Q) are staged by
`aggregate` and written by `commit(ok)` once the Reducer knows whether the
step is applied: a skipped step (a non-finite gradient, an invalid weight,
a loss-scale overflow) leaves every residual and every Q as it was.

Loss scaling. With a loss scale s (`distopt.transforms.LossScale`) the
shares are s times the true ones (the aggregate is divided by s after the
exchange), and so are the residuals. When a dynamic scale moves to s'
(halved on an overflow, doubled after its growth steps), the optimizer calls
`rescale(strategy, s' / s)` in that same step, after `commit`: every
replica's residual is multiplied by s'/s, into the units of the next step's
shares. The compressors commute with a positive factor, C(c x) = c C(x)
(top-k keeps the same entries, scaled sign the same signs, PowerSGD with
`epsilon=0` the same P^), and the scale moves by powers of two (exact in
floating point, but for a step down to the floor of 1 from a scale that is
not one), so the updates are those of compression in true units. PowerSGD's
Q is rescaled too (`scaled_state`): it is orthonormalised before use, so
with `epsilon=0` its size does not matter (a power-of-two factor cancels bit
for bit), but an `epsilon > 0` is added to norms of the scaled gradient's
size; rescaled, Q is what a run at s' throughout would hold.

Residuals are per replica: each replica writes its own copy
(`distribute.per_replica_zeros`), and a checkpoint holds every replica's row
(`distribute.ReplicaRows`), so a run resumed on the same number of replicas goes on
bit for bit. On another number of replicas the rows have no owner, but their
sum is what is still owed to the aggregate (`sum_r e_r`: each replica adds
its own to its next share, and the shares are summed): every replica starts
with that sum / R, so nothing owed is lost, with one line in the log. The
residuals can owe far more than a step's gradient (top-k at 1% on noisy
gradients: 16 times the mean gradient's norm, more than training had
applied; zeros would drop it). On one replica nothing is
compressed and the residuals are carried as they are, for a later run on
more replicas.

Only float32 shares are compressed; float64 ones travel uncompressed in the
Reducer's fused all-reduce (16-bit variables have float32 payloads).
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf
from absl import logging

from distopt import counter as counter_lib
from distopt import distribute as dist
from distopt import specs
from distopt.checks import (
    check_bool,
    check_int,
    check_name,
    check_unit_interval,
    owned_by,
)


class Compressor(tf.Module):
    """Base class of gradient compressors (see the module docstring).

    A subclass implements `exchange` (and may keep state of its own through
    `build_state` and `extra_state`).

    Args:
        error_feedback: Keep each replica's residual and add it to the next
            share (default). Without it, what is not sent is lost.
        error_feedback_decay: beta in [0, 1]: the residual is multiplied by
            it before it is added (1, the default: classic error feedback).
            SparseLoCo (Sarfi et al. 2025) decays it and drops DiLoCo's
            outer momentum, whose role the decayed residual takes.
        start_step: Reductions that send plain, uncompressed all-reduces
            first (PyTorch's `start_powerSGD_iter`); residuals stay zero.
        name: The module's name.
    """

    name = "compressor"

    #: Whether a non-finite entry of a replica's x reaches the aggregate
    #: whichever entries are selected, so that the step's finite check (on
    #: the aggregate) skips it. The built-ins' do: top-k ranks NaN first, a
    #: sign's scale and PowerSGD's products carry it. A subclass that may
    #: leave one unsent keeps False, and the base then sends that replica's
    #: whole x as NaN: left in the residual, it would skip every later step
    #: that selects it, or none.
    propagates_nonfinite = False

    def __init__(
        self,
        *positional,
        error_feedback=True,
        error_feedback_decay=1.0,
        start_step=0,
        name=None,
        **unknown,
    ):
        owner = type(self).__name__
        if unknown:
            # Python's own error named `Compressor.__init__` for OneBit, which
            # has no constructor of its own.
            raise TypeError(
                f"{owner}: unexpected keyword argument {min(unknown)!r}; it "
                "takes error_feedback, error_feedback_decay, start_step, name."
            )
        if positional:
            # OneBit has no hyperparameter of its own to come first, as TopK's
            # fraction and PowerSGD's rank do: `OneBit(False)` was Python's
            # "takes 1 positional argument but 2 were given", naming nothing.
            given = ", ".join(map(repr, positional))
            raise TypeError(
                f"{owner}: takes keyword arguments only (error_feedback, "
                f"error_feedback_decay, start_step, name), got the positional "
                f"{given}; e.g. {owner}(error_feedback=False)."
            )
        with owned_by(owner):
            super().__init__(name=check_name("name", name) or type(self).name)
            self.error_feedback = check_bool("error_feedback", error_feedback)
            self.error_feedback_decay = check_unit_interval(
                "error_feedback_decay", error_feedback_decay
            )
            if not self.error_feedback and self.error_feedback_decay != 1.0:
                # It would be ignored in silence: there is no residual to decay.
                raise ValueError(
                    "error_feedback_decay: applies only with error_feedback=True."
                )
            self.start_step = check_int("start_step", start_step, minimum=0)
        self._built = False
        self._pending = None
        self._noted_spread = False

    # --- What a subclass provides --------------------------------------------

    def compresses(self, shape: tf.TensorShape) -> bool:
        """Whether a float32 variable of `shape` is compressed (and has a residual).

        Not an empty one (a layer of 0 units): there is nothing to select,
        and top-k failed on it ("input must have at least k columns").
        """
        return shape.num_elements() != 0

    def build_state(self, strategy, variables, compressed) -> None:
        """Creates the subclass's own state; `compressed[i]` is `compresses(...)`."""

    def extra_state(self, indices) -> list:
        """The subclass's state variables for the variables at `indices`.

        Index by index: `extra_state([i, j])` is `extra_state([i]) +
        extra_state([j])` (`commit` keeps a variable's own by that).
        """
        del indices
        return []

    def exchange(self, reducer, strategy, xs, indices):
        """Compresses, communicates and decompresses.

        Args:
            reducer: The `distopt.reduce.Reducer`: its `all_reduce` and
                `all_gather` are the counted collectives to use.
            strategy: The strategy in scope.
            xs: Per-replica float32 tensors, one per variable (share plus
                residual).
            indices: Each one's variable index (in `build`'s order).

        Returns:
            `(aggregate, local, extra)`: per-replica tensors identical on
            every replica, one per `xs`; for each compressed one, this
            replica's own decompressed part (or None where not compressed);
            the new values of `extra_state(indices)`.
        """
        raise NotImplementedError

    def get_config(self) -> dict:
        """The constructor's arguments; a subclass adds its own (see `spec`)."""
        return {
            "name": type(self).name,
            "error_feedback": self.error_feedback,
            "error_feedback_decay": self.error_feedback_decay,
            "start_step": self.start_step,
        }

    @classmethod
    def from_config(cls, config: dict) -> Compressor:
        return cls(**config)

    def spec(self) -> dict:
        """`{"class", "module", "config"}`: what `compression.from_config` reads.

        Raises:
            NotImplementedError: the config lacks an argument of a subclass's
                own `__init__` (see `distopt.specs.spec`).
        """
        return specs.spec(self, Compressor, "compressor")

    # --- The Reducer's calls ---------------------------------------------------

    def build(self, strategy, variables: Sequence[tf.Variable]) -> None:
        """Creates the residuals and the subclass state for `variables`, once."""
        if self._built:
            return
        variables = list(variables)
        self._index = {v.ref(): i for i, v in enumerate(variables)}
        self._shapes = [v.shape for v in variables]
        compressed = [_float32(v) and self.compresses(v.shape) for v in variables]
        self._compressed = compressed
        with tf.name_scope(self.name):
            self.steps = counter_lib.Counter("steps")
            self.residuals = {}
            if self.error_feedback:
                for i, v in enumerate(variables):
                    if compressed[i]:
                        self.residuals[str(i)] = dist.ReplicaRows(
                            strategy,
                            v.shape,
                            tf.float32,
                            f"residual_{i}",
                            on_mismatch=self._note_spread,
                        )
            self.build_state(strategy, variables, compressed)
        self._strategy = strategy
        self._built = True

    def _note_spread(self, saved, current):
        """Logs that the residuals' sum is shared out: once, not per variable."""
        if self._noted_spread:
            return
        self._noted_spread = True
        logging.info(
            "compression (%s): the checkpoint holds the residuals of %d replicas "
            "and this run has %d; each replica starts with their sum / %d, so "
            "what was not yet sent is still owed.",
            self.name,
            saved,
            current,
            current,
        )

    def knows(self, var) -> bool:
        return self._built and var.ref() in self._index

    def residual(self, variable) -> tf.Tensor | None:
        """Every replica's residual for `variable`, stacked: `[R, *shape]`.

        Row r is `e_r`, what replica r has computed but not yet sent, in the
        shares' units (the mean's `g_r / R`; times the loss scale under one).
        For studies of error feedback: its norm against the gradient's, say.

        Call it outside `strategy.run`. Under `MultiWorkerMirroredStrategy`
        every worker calls it: it gathers the rows. DiLoCo's outer compressor
        (`opt.sync.outer_compression`) keeps residuals for the anchors
        (`opt.sync.anchors`), not for the variables.

        Args:
            variable: One of the optimizer's variables (a Keras variable too).

        Returns:
            The residuals; None where nothing is kept: a variable that is not
            compressed (not float32, or one the compressor leaves whole, as
            PowerSGD does vectors) or `error_feedback=False`.

        Raises:
            ValueError: before the optimizer's first step (or `build`), or for
                a variable it does not update.
        """
        if not isinstance(variable, tf.Variable):
            # A Keras 3 variable wraps the tf.Variable that was built.
            variable = getattr(variable, "value", variable)
        if not isinstance(variable, tf.Variable) or not self.knows(variable):
            state = "built for other variables" if self._built else "not built yet"
            raise ValueError(
                f"residual: {self.name} is {state}; pass one of the variables "
                f"of the optimizer that uses it, after its build or first "
                f"step, got {getattr(variable, 'name', variable)!r}."
            )
        rows = self.residuals.get(str(self._index[variable.ref()]))
        return None if rows is None else rows.logical_value()

    def aggregate(self, reducer, strategy, shares, variables) -> list:
        """`sum_r` of the replicas' shares, compressed; stages the new state.

        Args:
            reducer: The Reducer (for its counted collectives).
            strategy: The strategy in scope.
            shares: Per-replica float32 shares, one per variable.
            variables: The variables, in the same order.

        Returns:
            Per-replica tensors, identical on every replica.
        """
        indices = [self._index[v.ref()] for v in variables]
        state = self._state_of(indices)
        owners = self._owners_of(indices)

        def compressed():
            xs = list(shares)
            if self.error_feedback:
                xs = _add_residuals(
                    strategy, xs, indices, self.residuals, self.error_feedback_decay
                )
            if not self.propagates_nonfinite:
                xs = [dist.map_per_replica(strategy, _nan_unless_finite, x) for x in xs]
            agg, local, extra = self._exchange(reducer, strategy, xs, indices)
            new_res = [
                dist.map_per_replica(strategy, tf.subtract, x, d)
                for x, d, i in zip(xs, local, indices)
                if self.error_feedback and self._compressed[i]
            ]
            return list(agg) + new_res + list(extra)

        def plain():
            return list(reducer.all_reduce(strategy, shares)) + list(
                dist.read_per_replica(strategy, state) if state else []
            )

        if self.start_step:
            out = dist.cond_per_replica(
                strategy, self.steps.variable < self.start_step, plain, compressed
            )
        else:
            out = compressed()
        n = len(shares)
        # Untracked: a tf.Module attribute holding variables would be a
        # checkpoint dependency (the residuals' storage saved a second time,
        # as a sum over replicas, and restored over them at the next trace),
        # and assigning None later does not remove it.
        self._pending = dist.Untracked((state, out[n:], owners))
        return out[:n]

    def _exchange(self, reducer, strategy, xs, indices):
        """`exchange`, its result held to its contract.

        A subclass's slip there trained wrong in silence: one aggregate too
        few shifted a residual into a gradient, and an aggregate made
        without a collective differed between replicas.
        """
        owner = f"{type(self).__name__}.exchange"
        before = reducer.collectives_traced
        out = self.exchange(reducer, strategy, xs, indices)
        if not isinstance(out, (tuple, list)) or len(out) != 3:
            raise ValueError(f"{owner}: must return (aggregate, local, extra).")
        agg, local, extra = (list(x) for x in out)
        wanted = {"aggregate": len(xs), "local": len(xs)}
        wanted["extra"] = len(self.extra_state(indices))
        for what, got in (("aggregate", agg), ("local", local), ("extra", extra)):
            if len(got) != wanted[what]:
                raise ValueError(
                    f"{owner}: returned {len(got)} {what} values, not "
                    f"{wanted[what]} (one per x, in order; extra: one per "
                    "extra_state variable)."
                )
        for k, i in enumerate(indices):
            _check_part(strategy, f"{owner}: aggregate[{k}]", agg[k], xs[k])
            if self.error_feedback and self._compressed[i]:
                # The residual is x - local: it must be this replica's own.
                _check_part(strategy, f"{owner}: local[{k}]", local[k], xs[k])
        if dist.is_distributed(strategy) and reducer.collectives_traced == before:
            raise ValueError(
                f"{owner}: made no collective through the reducer; use "
                "reducer.all_reduce or reducer.all_gather (counted, and "
                "identical on every replica). Otherwise each replica applies "
                "an aggregate of its own, and the replicas diverge."
            )
        return agg, local, extra

    def commit(self, strategy, ok, keep=None) -> None:
        """Writes the staged state; where `ok` is False, keeps the old.

        Args:
            strategy: The strategy in scope.
            ok: The step's verdict (a scalar bool), or None.
            keep: None, or `{variable.ref(): scalar bool}`: where False, that
                variable's own state (residual, Q) is kept as it was, as if
                it had not been sent (`Accumulate`: no gradient in the whole
                window).
        """
        state, values, owners = self._pending.value
        self._pending = None
        keep = {self._index[ref]: k for ref, k in (keep or {}).items()}
        for var, value, owner in zip(state, values, owners):
            own = keep.get(owner)
            both = own if ok is None else ok if own is None else ok & own
            dist.update(strategy, var, _keep_unless, value, both)
        self.steps.assign_add(1)

    def scaled_state(self) -> list:
        """The subclass's state variables in the gradient's units (see `rescale`)."""
        return []

    def rescale(self, strategy, factor) -> None:
        """Multiplies the state kept in the gradient's units by `factor`.

        For whoever changes those units between two steps: the optimizer,
        when a dynamic loss scale goes from s to s' (`factor` = s'/s), after
        `commit` (see "Loss scaling" in the module docstring). Each replica
        scales its own residual; a factor of 1 (most steps) writes nothing.
        Call it in cross-replica context.

        Args:
            strategy: The strategy in scope.
            factor: A scalar, identical on every replica.
        """
        if not self._built:
            return
        if self._pending is not None:
            # Staged values are in the old units: commit first.
            raise RuntimeError("rescale: called between aggregate and commit.")
        state = [rows.storage for rows in self.residuals.values()]
        dist.scale_unless_one(strategy, state + list(self.scaled_state()), factor)

    def _state_of(self, indices):
        """The state variables the step writes, in `aggregate`'s order."""
        res = [
            self.residuals[str(i)].storage
            for i in indices
            if self.error_feedback and self._compressed[i]
        ]
        return res + list(self.extra_state(indices))

    def _owners_of(self, indices):
        """The variable index of each of `_state_of(indices)`, in its order."""
        res = [i for i in indices if self.error_feedback and self._compressed[i]]
        return res + [i for i in indices for _ in self.extra_state([i])]


def _float32(v) -> bool:
    return v.dtype in (tf.float16, tf.bfloat16, tf.float32)


def _keep_unless(var, value, ok):
    if ok is not None:
        value = tf.where(ok, value, tf.convert_to_tensor(var))
    return var.assign(value, read_value=False)


def _add_residuals(strategy, xs, indices, residuals, decay):
    """`x_r + decay * e_r` per replica (no multiply at 1: bit for bit as before)."""
    out = []
    for x, i in zip(xs, indices):
        rows = residuals.get(str(i))
        if rows is None:
            out.append(x)
            continue
        (r,) = dist.read_per_replica(strategy, [rows.storage])
        if decay != 1.0:
            r = dist.map_per_replica(strategy, lambda e: e * decay, r)
        out.append(dist.map_per_replica(strategy, tf.add, x, r))
    return out


def _nan_unless_finite(x):
    """`x`, or all NaN if any entry is not finite (`propagates_nonfinite`)."""
    return tf.where(tf.reduce_all(tf.math.is_finite(x)), x, float("nan"))


def _check_part(strategy, what, value, like):
    """`value` is per-replica float32 of `like`'s shape on every device."""
    if value is None:
        raise ValueError(
            f"{what} is None; a compressed variable needs this replica's "
            "own decompressed part (its residual is x - local)."
        )
    want = dist.local_values(strategy, like)[0].shape
    for part in dist.local_values(strategy, value):
        if part.dtype != tf.float32 or not part.shape.is_compatible_with(want):
            raise ValueError(
                f"{what}: {part.dtype.name} of shape {part.shape}; expected "
                f"float32 of shape {want}, the x's."
            )
