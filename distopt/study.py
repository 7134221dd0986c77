"""The convergence study behind `python -m distopt.compare`, as a library.

One run is one optimizer at one learning rate on a `distopt.problems`
problem: a parameter starts at the problem's start point and takes up to
`max_iters` steps, the whole loop one `tf.function` with a `tf.while_loop`
that stops at the outcome, as in TensorFlow's Core optimizers guide:
"converged" (the parameter did not change in one step), "exploded" (a
non-finite gradient) or "exceeded". Under a strategy every step runs inside
`strategy.run`, and each replica's path is kept, to check that they agree.

`distopt.compare` is the command line; `distopt.study_figures` draws the runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import numpy as np
import tensorflow as tf

from distopt import distribute as dist
from distopt import output_files

# Loop status codes inside the tf.while_loop.
_RUNNING, _CONVERGED, _EXPLODED = 0, 1, 2


def check_specs(specs, learning_rate) -> None:
    """Builds each optimizer once, so that bad hyperparameters fail up front."""
    for spec in specs:
        try:
            spec.build(learning_rate)
        except (TypeError, ValueError) as e:
            # TypeError: an unexpected keyword, i.e. an unknown hyperparameter.
            raise ValueError(f"optimizers: {spec.label}: {e}") from None


# --- The study -------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
    """One optimizer at one learning rate.

    Attributes:
        optimizer: The optimizer's label (name and hyperparameters).
        name: The registered optimizer name.
        hyperparameters: The hyperparameters given besides the learning rate.
        learning_rate: The learning rate.
        outcome: "converged", "exploded" or "exceeded".
        iterations: The step at which the outcome was decided.
        x_final: The last parameter value (float32, shape `[dim]`).
        loss_final: The loss at `x_final` (may be inf after an explosion).
        path: Replica 0's parameter after each step, shape `[points, dim]`,
            starting with the start point.
        replicas: The number of replicas the run used.
        replicas_identical: Whether every replica's copy followed the same
            path, bit for bit.
        seconds: Wall time of the run, tracing included.
    """

    optimizer: str
    name: str
    hyperparameters: dict
    learning_rate: float
    outcome: str
    iterations: int
    x_final: np.ndarray
    loss_final: float
    path: np.ndarray
    replicas: int
    replicas_identical: bool
    seconds: float

    def to_json(self, problem) -> dict:
        """The `results.json` entry (non-finite numbers become null)."""
        x = [_finite_or_none(v) for v in self.x_final.tolist()]
        with np.errstate(over="ignore"):
            gap = self.x_final.astype(np.float64) - problem.minimum
            dist_to_min = float(np.sqrt(np.sum(gap * gap)))
        return {
            "optimizer": self.optimizer,
            "name": self.name,
            "hyperparameters": self.hyperparameters,
            "learning_rate": self.learning_rate,
            "outcome": self.outcome,
            "iterations": self.iterations,
            # A number for a 1-D problem, a list otherwise.
            "x_final": x[0] if problem.dim == 1 else x,
            "loss_final": _finite_or_none(self.loss_final),
            "distance_to_minimum": _finite_or_none(dist_to_min),
            "problem": problem.name,
            "replicas": self.replicas,
            "replicas_identical": self.replicas_identical,
            "seconds": round(self.seconds, 3),
        }


def run_study(problem, specs, learning_rates, *, max_iters=2000, strategy=None):
    """Runs every optimizer at every learning rate; returns `RunResult`s.

    Args:
        problem: A `distopt.problems.Problem`.
        specs: `distopt.compare.OptimizerSpec`s (see `compare.parse_optimizers`).
        learning_rates: Positive floats.
        max_iters: The step budget of one run.
        strategy: A `tf.distribute.Strategy` whose `run` executes each step,
            or None for no distribution.
    """
    strategy = strategy or dist.current_strategy()
    return [
        run_one(problem, spec, lr, max_iters=max_iters, strategy=strategy)
        for spec in specs
        for lr in learning_rates
    ]


def run_one(problem, spec, learning_rate, *, max_iters=2000, strategy=None):
    """One convergence test: `spec`'s optimizer at `learning_rate` on `problem`."""
    strategy = strategy or dist.current_strategy()
    t0 = time.perf_counter()
    with strategy.scope():
        x = tf.Variable(problem.start, dtype=tf.float32, name="x")
        opt = spec.build(learning_rate)
        opt.build([x])
        # In scope: `dist.local_values` sees the replicas' copies only there.
        study = _make_study(problem, opt, x, max_iters, strategy)
        steps, status, copies = study()
    steps, status, copies = int(steps), int(status), copies.numpy()
    if status == _EXPLODED:
        # The point whose gradient was non-finite is the last one kept.
        outcome, points = "exploded", steps
    elif status == _CONVERGED:
        outcome, points = "converged", steps + 1
    else:
        outcome, points = "exceeded", max_iters + 1
    copies = copies[:points]  # [points, replicas, dim]
    identical = bool(
        all(_same(copies[:, r], copies[:, 0]) for r in range(copies.shape[1]))
    )
    path = copies[:, 0]
    x_final = path[-1]
    with np.errstate(over="ignore", invalid="ignore"):
        loss_final = float(np.asarray(problem.loss(x_final.astype(np.float64))))
    return RunResult(
        optimizer=spec.label,
        name=spec.name,
        hyperparameters=dict(spec.hyperparameters),
        learning_rate=float(learning_rate),
        outcome=outcome,
        iterations=steps,
        x_final=x_final,
        loss_final=loss_final,
        path=path,
        replicas=copies.shape[1],
        replicas_identical=identical,
        seconds=time.perf_counter() - t0,
    )


def _make_study(problem, opt, x, max_iters, strategy):
    """The whole run as one tf.function: a while loop that stops at the outcome."""
    needs_loss = getattr(opt, "needs_loss", False)
    replicas = len(dist.local_values(strategy, x))

    def replica_step(step):
        # Inside strategy.run: `x` reads as this replica's copy.
        if needs_loss:
            opt.minimize(lambda: problem.objective(tf.convert_to_tensor(x), step), [x])
        else:
            grad = problem.gradient(tf.convert_to_tensor(x), step)
            opt.apply_gradients([grad], [x])

    def read_copies():
        return tf.stack(
            [tf.convert_to_tensor(c) for c in dist.local_values(strategy, x)]
        )

    def cond(i, status, path):
        del path
        return tf.logical_and(tf.equal(status, _RUNNING), i < max_iters)

    def body(i, status, path):
        del status
        step = i + 1
        before = read_copies()
        # The guide's test: the gradient at the current point, before the step.
        finite = tf.reduce_all(tf.math.is_finite(problem.gradient(before[0], step)))
        strategy.run(replica_step, args=(step,))
        after = read_copies()
        moved = tf.reduce_any(tf.not_equal(after[0], before[0]))
        status = tf.where(finite, tf.where(moved, _RUNNING, _CONVERGED), _EXPLODED)
        return step, status, path.write(step, after)

    @tf.function(autograph=False)
    def study():
        # Grown as the run goes: memory follows the steps taken, not
        # max_iters (a generous bound cost gigabytes for a run of 200 steps).
        path = tf.TensorArray(
            tf.float32,
            size=0,
            dynamic_size=True,
            element_shape=[replicas, problem.dim],
        )
        path = path.write(0, read_copies())
        steps, status, path = tf.while_loop(
            cond, body, (tf.constant(0), tf.constant(_RUNNING), path)
        )
        return steps, status, path.stack()

    return study


def _same(a, b) -> bool:
    return bool(np.array_equal(a, b, equal_nan=True))


def _finite_or_none(v):
    v = float(v)
    return v if math.isfinite(v) else None


# --- Output ------------------------------------------------------------------------


def format_table(results) -> str:
    """The results as an aligned text table."""
    header = (
        "optimizer",
        "learning rate",
        "outcome",
        "iterations",
        "final x",
        "final loss",
    )
    rows = [
        (
            r.optimizer,
            f"{r.learning_rate:g}",
            r.outcome,
            str(r.iterations),
            format_x(r.x_final),
            f"{r.loss_final:.6g}",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    right = {1, 3, 4, 5}

    def line(row):
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def format_x(x) -> str:
    parts = [f"{v:.6g}" for v in np.asarray(x).tolist()]
    return parts[0] if len(parts) == 1 else "(" + ", ".join(parts) + ")"


def write_results(results, problem, output_dir) -> str:
    """Writes `results.json` (a list, one entry per run); returns its path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "results.json")
    text = json.dumps([r.to_json(problem) for r in results], indent=2, allow_nan=False)
    # Whole or not at all: a full disk keeps the earlier results.json.
    output_files.write_atomically(path, text + "\n")
    return path
