"""The convergence study of TensorFlow's Core optimizers guide, as a tool.

    python -m distopt.compare --optimizers=gradient_descent,momentum,adam \\
        --learning_rates=0.001,0.01,0.1 --output_dir=DIR

For every optimizer and learning rate, a parameter starts at the problem's
start point and takes up to `--max_iters` steps of a real distopt optimizer
(`apply_gradients` with the problem's gradient, or `minimize` with its loss
for optimizers that evaluate the loss themselves, such as `sam` and `heun`).
Each run ends with one of three outcomes, as in the guide:

* "converged": the parameter did not change in one step (`iterations` is
  that step);
* "exploded": a non-finite gradient appeared (`iterations` is the step
  whose gradient it was; the final x is the point where it was evaluated);
* "exceeded": `--max_iters` steps were taken.

The default problem is the guide's quartic L(x) = 2x^4 + 3x^3 + 2 from the
poor start x = 2 (saddle point at 0, global minimum at x* = -9/8); see
`distopt.problems` for `rosenbrock` and `noisy_quadratic`.

Optimizers are given as a comma-separated list of registered names
(`distopt.optimizers.names()`), each optionally followed by `:` and
hyperparameters `key=value`; further `key=value` items, until the next name,
belong to the same optimizer:

    --optimizers=momentum:momentum=0.5,nesterov=true,adam:beta_1=0.8
    --optimizers=gradient_descent,sam:base_optimizer=momentum,rho=0.1,heun

Values are read as Python literals where possible (numbers, True/False or
true/false, None) and as strings otherwise. The learning rate comes from
`--learning_rates`; for `sam` it is the base optimizer's.

The tool prints a table (optimizer, learning rate, outcome, iterations, final
x, final loss). With `--output_dir` it writes `results.json`, a list with one
entry per run: `optimizer`, `learning_rate`, `outcome`, `iterations`,
`x_final` (a number for a 1-D problem, else a list), `loss_final`,
`distance_to_minimum`, `replicas`, `replicas_identical` and a few more;
non-finite numbers are written as null. With matplotlib installed
(`pip install distopt[viz]`) it also writes PNG figures there:
`loss_and_gradient.png` (the problem, its critical points marked),
`paths_<optimizer>.png` per optimizer (every learning rate's parameter path
over a heat map of the log loss against iteration and x, or over the contour
plot for a 2-D problem) and `loss_curves.png` (L - L* along every run).

`--strategy=mirrored --virtual_devices=N` runs every step inside
`strategy.run` on N replicas (virtual CPUs) and checks that every replica's
copy of the parameter follows the same path.

The whole loop of one run is one `tf.function` with a `tf.while_loop` that
stops at the outcome, so a default run takes seconds, not minutes.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import re
import sys
import time

import numpy as np
from absl import flags

from distopt import cli, quiet

# Before TensorFlow: its C++ start-up block is held back (--verbosity=1
# prints it).
quiet.import_tensorflow()

import tensorflow as tf

from distopt import distribute as dist
from distopt import optimizers
from distopt import problems as problems_lib

# Flags live in their own FlagValues, not absl's global FLAGS: the tool is
# importable (tests, notebooks) next to other absl programs without clashing.
_FLAGS = flags.FlagValues()
flags.DEFINE_string(
    "optimizers",
    "gradient_descent,momentum,adam",
    "Comma-separated registered optimizer names, each optionally with "
    "hyperparameters: NAME[:KEY=VALUE[,KEY=VALUE...]], e.g. "
    "'momentum:momentum=0.5,nesterov=true,adam:beta_1=0.8'.",
    flag_values=_FLAGS,
)
flags.DEFINE_list(
    "learning_rates",
    ["0.001", "0.01", "0.1"],
    "Comma-separated positive learning rates; every optimizer runs with each.",
    flag_values=_FLAGS,
)
flags.DEFINE_string(
    "problem",
    "quartic",
    "The test problem: " + ", ".join(problems_lib.names()) + ".",
    flag_values=_FLAGS,
)
flags.DEFINE_integer(
    "max_iters",
    2000,
    "Steps after which a run that neither converged nor exploded stops ('exceeded').",
    flag_values=_FLAGS,
)
flags.DEFINE_string(
    "output_dir",
    None,
    "Directory for results.json and the PNG figures (created if missing). "
    "Without it only the table is printed.",
    flag_values=_FLAGS,
)
flags.DEFINE_string(
    "strategy",
    "default",
    "'default' (no distribution) or 'mirrored' (every step inside strategy.run "
    "on --virtual_devices replicas).",
    flag_values=_FLAGS,
)
flags.DEFINE_integer(
    "virtual_devices",
    2,
    "Replicas for --strategy=mirrored: the CPU is split into this many logical "
    "devices.",
    flag_values=_FLAGS,
)
flags.DEFINE_float(
    "noise_scale",
    0.5,
    "Standard deviation of the gradient noise of --problem=noisy_quadratic.",
    flag_values=_FLAGS,
)
flags.DEFINE_integer(
    "seed", 0, "Noise seed of --problem=noisy_quadratic.", flag_values=_FLAGS
)
flags.DEFINE_integer(
    "verbosity",
    0,
    "1 or more: also TensorFlow's start-up output, INFO lines and retracing warnings.",
    flag_values=_FLAGS,
)
flags.DEFINE_boolean(
    "figures",
    True,
    "Write PNG figures to --output_dir (needs matplotlib); --nofigures skips them.",
    flag_values=_FLAGS,
)

OUTCOMES = ("converged", "exploded", "exceeded")
VIZ_HINT = (
    "Figures skipped: matplotlib is not installed; `pip install distopt[viz]` "
    "to get them."
)
# Loop status codes inside the tf.while_loop.
_RUNNING, _CONVERGED, _EXPLODED = 0, 1, 2


# --- Optimizer specifications --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """A registered optimizer name with fixed hyperparameters."""

    name: str
    hyperparameters: dict = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        """`name`, or `name(key=value, ...)` when hyperparameters are set."""
        if not self.hyperparameters:
            return self.name
        args = ", ".join(f"{k}={v}" for k, v in self.hyperparameters.items())
        return f"{self.name}({args})"

    def build(self, learning_rate: float):
        """A fresh optimizer with this learning rate."""
        return optimizers.get(
            self.name, learning_rate=learning_rate, **self.hyperparameters
        )


def parse_optimizers(text: str) -> list[OptimizerSpec]:
    """Parses `--optimizers` (see the module docstring for the syntax).

    Raises:
        ValueError: for an unknown name (listing the valid ones), a malformed
            item, or `learning_rate` among the hyperparameters.
    """
    specs: list[tuple[str, dict]] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        if ":" in item:
            name, _, rest = item.partition(":")
            specs.append((name.strip(), {}))
            if rest.strip():
                _add_hyperparameter(specs[-1], rest.strip())
        elif "=" in item:
            if not specs:
                raise ValueError(
                    f"optimizers: {item!r} comes before any optimizer name; write "
                    "NAME:KEY=VALUE."
                )
            _add_hyperparameter(specs[-1], item)
        else:
            specs.append((item, {}))
    if not specs:
        raise ValueError(
            "optimizers: give at least one; valid names: "
            f"{', '.join(optimizers.names())}."
        )
    valid = optimizers.names()
    for name, _ in specs:
        if name not in valid:
            raise ValueError(
                f"optimizers: unknown optimizer {name!r}; valid names: "
                f"{', '.join(valid)}."
            )
    return [OptimizerSpec(name, hp) for name, hp in specs]


def _add_hyperparameter(spec, item):
    name, hp = spec
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise ValueError(
            f"optimizers: malformed hyperparameter {item!r} of {name!r}; write "
            "KEY=VALUE."
        )
    if key == "learning_rate":
        raise ValueError(
            f"optimizers: set the learning rate of {name!r} with --learning_rates."
        )
    hp[key] = _parse_value(value.strip())


def _parse_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_learning_rates(values) -> list[float]:
    """Floats from `--learning_rates`; each must be finite and positive."""
    rates = []
    for v in values:
        try:
            lr = float(v)
        except (TypeError, ValueError):
            raise ValueError(
                f"learning_rates: {v!r} is not a number; give positive numbers, "
                "e.g. 0.001,0.01,0.1."
            ) from None
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"learning_rates: must be positive and finite, got {v!r}.")
        rates.append(lr)
    if not rates:
        raise ValueError("learning_rates: give at least one positive number.")
    return rates


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
        specs: `OptimizerSpec`s (see `parse_optimizers`).
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
        path = tf.TensorArray(
            tf.float32, size=max_iters + 1, element_shape=[replicas, problem.dim]
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
            _format_x(r.x_final),
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


def _format_x(x) -> str:
    parts = [f"{v:.6g}" for v in np.asarray(x).tolist()]
    return parts[0] if len(parts) == 1 else "(" + ", ".join(parts) + ")"


def write_results(results, problem, output_dir) -> str:
    """Writes `results.json` (a list, one entry per run); returns its path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "results.json")
    with open(path, "w") as f:
        json.dump([r.to_json(problem) for r in results], f, indent=2, allow_nan=False)
        f.write("\n")
    return path


# --- Figures -----------------------------------------------------------------------

_LR_COLORS = (
    "#ff3b30",
    "#ffffff",
    "#00e5ff",
    "#ffcc00",
    "#ff66ff",
    "#66ff66",
    "#ff9500",
)


def make_figures(problem, results, output_dir) -> list[str]:
    """Writes the PNG figures; returns their paths.

    Raises:
        ImportError: when matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(output_dir, exist_ok=True)
    written = [_figure_problem(plt, problem, output_dir)]
    labels = list(dict.fromkeys(r.optimizer for r in results))
    for label in labels:
        runs = [r for r in results if r.optimizer == label]
        if problem.dim == 1:
            written.append(_figure_paths_1d(plt, problem, label, runs, output_dir))
        else:
            written.append(_figure_paths_2d(plt, problem, label, runs, output_dir))
    written.append(_figure_loss_curves(plt, problem, labels, results, output_dir))
    return written


def _log_gap(problem, loss):
    """log10(L - L*), floored so that the minimum itself stays finite."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.log10(
            np.maximum(np.asarray(loss, np.float64) - problem.min_loss, 1e-6)
        )


def _grid_2d(problem, n=300):
    (x0, x1), (y0, y1) = problem.bounds
    xs, ys = np.linspace(x0, x1, n), np.linspace(y0, y1, n)
    xx, yy = np.meshgrid(xs, ys)
    pts = np.stack([xx, yy], axis=-1)
    return xs, ys, pts


def _figure_problem(plt, problem, output_dir):
    if problem.dim == 1:
        lo, hi = problem.bounds[0]
        xs = np.linspace(lo, hi, 801)[:, None]
        loss = np.asarray(problem.loss(xs))
        grad = np.asarray(problem.gradient(xs))[:, 0]
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True)
        ax1.plot(xs[:, 0], loss, color="tab:blue", lw=2)
        ax1.set_ylabel("L(x)")
        ax1.set_title(f"{problem.title}: loss and gradient")
        ax2.plot(xs[:, 0], grad, color="tab:orange", lw=2)
        ax2.axhline(0, color="0.5", lw=0.8)
        ax2.set_ylabel("dL/dx")
        ax2.set_xlabel("x")
        marks = [("start", problem.start[0], "tab:gray", "o")]
        if problem.saddle is not None:
            marks.append(("saddle point", problem.saddle[0], "tab:red", "s"))
        marks.append(("global minimum", problem.minimum[0], "tab:green", "*"))
        for ax, values in ((ax1, loss), (ax2, grad)):
            for name, xv, color, marker in marks:
                yv = np.interp(xv, xs[:, 0], values)
                ax.axvline(xv, color=color, ls="--", lw=1)
                ax.plot(
                    [xv],
                    [yv],
                    marker=marker,
                    color=color,
                    ms=11,
                    ls="none",
                    label=f"{name}, x = {xv:g}",
                )
            ax.grid(alpha=0.3)
        ax1.legend(loc="upper center")
        # The interesting range of the gradient is near the critical points.
        gmax = np.abs(grad[(xs[:, 0] >= lo) & (xs[:, 0] <= 1.0)]).max()
        ax2.set_ylim(-1.2 * gmax, 1.2 * gmax)
    else:
        xs, ys, pts = _grid_2d(problem)
        loss = np.asarray(problem.loss(pts))
        grad = np.asarray(problem.gradient(pts))
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
        im = ax1.contourf(xs, ys, _log_gap(problem, loss), levels=30, cmap="viridis")
        fig.colorbar(im, ax=ax1, label="log10(L - L*)")
        ax1.set_title(f"{problem.title}\nloss")
        gnorm = np.log10(np.linalg.norm(grad, axis=-1) + 1e-12)
        im2 = ax2.contourf(xs, ys, gnorm, levels=30, cmap="magma")
        fig.colorbar(im2, ax=ax2, label="log10 ||grad L||")
        s = slice(None, None, 20)
        g = -grad[s, s]
        g = g / (np.linalg.norm(g, axis=-1, keepdims=True) + 1e-12)
        ax2.quiver(
            pts[s, s, 0],
            pts[s, s, 1],
            g[..., 0],
            g[..., 1],
            color="white",
            alpha=0.8,
            scale=30,
        )
        noise = " (without its noise)" if problem.stochastic else ""
        ax2.set_title(f"gradient{noise}: log norm, and the direction of -grad")
        for ax in (ax1, ax2):
            ax.plot(
                *problem.start, "o", color="white", mec="black", ms=9, label="start"
            )
            ax.plot(
                *problem.minimum,
                "*",
                color="red",
                mec="black",
                ms=16,
                label="global minimum",
            )
            if problem.saddle is not None:
                ax.plot(
                    *problem.saddle, "s", color="orange", ms=9, label="saddle point"
                )
            ax.set_xlabel("x0")
            ax.set_ylabel("x1")
            ax.legend(loc="upper left")
    return _save_figure(plt, fig, output_dir, "loss_and_gradient.png")


def _save_figure(plt, fig, output_dir, name):
    """Lays out `fig`, writes it to `output_dir/name` (PNG) and closes it."""
    fig.tight_layout()
    path = os.path.join(output_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _run_label(r):
    return f"lr={r.learning_rate:g}: {r.outcome} at iteration {r.iterations}"


def _figure_paths_1d(plt, problem, label, runs, output_dir):
    lo, hi = problem.bounds[0]
    t_max = max(max(len(r.path) - 1 for r in runs), 10)
    xs = np.linspace(lo, hi, 400)
    ts = np.linspace(0, t_max * 1.25, 600)
    gap = _log_gap(problem, problem.loss(xs[:, None]))
    fig, ax = plt.subplots(figsize=(9, 5.5))
    im = ax.pcolormesh(
        ts,
        xs,
        np.repeat(gap[:, None], len(ts), axis=1),
        cmap="viridis",
        shading="nearest",
    )
    fig.colorbar(im, ax=ax, label="log10(L(x) - L*)")
    for i, r in enumerate(runs):
        color = _LR_COLORS[i % len(_LR_COLORS)]
        p, t = _drawable(r, problem.bounds)
        p = p[:, 0]
        ax.plot(t, p, color=color, lw=2, label=_run_label(r))
        # The end of the run, or where the path leaves the figure.
        ax.plot(
            [t[-1]],
            [p[-1]],
            ls="none",
            color=color,
            mec="black",
            ms=10,
            marker="X" if r.outcome == "exploded" else "o",
            clip_on=False,
        )
    text = {
        "textcoords": "offset points",
        "fontsize": 9,
        "bbox": {"boxstyle": "round,pad=0.2", "fc": "white", "alpha": 0.8},
    }
    if problem.saddle is not None:
        ax.axhline(problem.saddle[0], color="tab:orange", ls="--", lw=1.5)
        ax.annotate(
            "saddle point",
            (0, problem.saddle[0]),
            xytext=(6, 5),
            color="tab:orange",
            **text,
        )
    ax.axhline(problem.minimum[0], color="tab:red", ls=":", lw=1.8)
    ax.annotate(
        f"global minimum x* = {problem.minimum[0]:g}",
        (0, problem.minimum[0]),
        xytext=(6, -16),
        color="tab:red",
        **text,
    )
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlim(0, t_max * 1.25)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("iteration (linear to 10, then log)")
    ax.set_ylabel("x")
    return _save_paths_figure(plt, fig, ax, problem, label, "upper right", output_dir)


def _save_paths_figure(plt, fig, ax, problem, label, legend_loc, output_dir):
    """Titles a paths figure, writes it as PNG and returns its path."""
    ax.set_title(f"{label} on {problem.title}")
    ax.legend(loc=legend_loc, fontsize=9, framealpha=0.85)
    return _save_figure(plt, fig, output_dir, f"paths_{_slug(label)}.png")


def _figure_paths_2d(plt, problem, label, runs, output_dir):
    xs, ys, pts = _grid_2d(problem)
    gap = _log_gap(problem, problem.loss(pts))
    fig, ax = plt.subplots(figsize=(8.5, 6.5))
    im = ax.contourf(xs, ys, gap, levels=30, cmap="viridis")
    fig.colorbar(im, ax=ax, label="log10(L - L*)")
    for i, r in enumerate(runs):
        color = _LR_COLORS[i % len(_LR_COLORS)]
        p, _ = _drawable(r, problem.bounds)
        ax.plot(p[:, 0], p[:, 1], color=color, lw=1.5, label=_run_label(r))
        ax.plot(
            *p[-1],
            marker="X" if r.outcome == "exploded" else "o",
            color=color,
            mec="black",
            ms=10,
            ls="none",
            clip_on=False,
        )
    # Above the paths (zorder), which may swarm around the minimum.
    ax.plot(*problem.start, "o", color="white", mec="black", ms=9, zorder=5)
    ax.annotate(
        "start",
        problem.start,
        xytext=(6, 6),
        textcoords="offset points",
        color="white",
        zorder=5,
    )
    ax.plot(*problem.minimum, "*", color="red", mec="black", ms=18, zorder=5)
    ax.annotate(
        "minimum",
        problem.minimum,
        xytext=(8, -16),
        textcoords="offset points",
        color="red",
        zorder=5,
        bbox={"boxstyle": "round,pad=0.2", "fc": "white", "alpha": 0.8},
    )
    (x0, x1), (y0, y1) = problem.bounds
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_xlabel("x0")
    ax.set_ylabel("x1")
    return _save_paths_figure(plt, fig, ax, problem, label, "lower right", output_dir)


def _figure_loss_curves(plt, problem, labels, results, output_dir):
    n = len(labels)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 4), squeeze=False, sharey=True)
    start_gap = float(problem.loss(problem.start.astype(np.float64))) - problem.min_loss
    floor, top = 1e-12, 10.0 ** (math.ceil(math.log10(max(start_gap, 1e-12))) + 2)
    for ax, label in zip(axes[0], labels):
        runs = [r for r in results if r.optimizer == label]
        for i, r in enumerate(runs):
            with np.errstate(over="ignore", invalid="ignore"):
                gap = (
                    np.asarray(problem.loss(r.path.astype(np.float64)))
                    - problem.min_loss
                )
            # Exploded runs leave through the top instead of setting the scale.
            gap = np.where(np.isfinite(gap), np.clip(gap, floor, top * 10), top * 10)
            ax.plot(
                np.arange(len(gap)), gap, lw=1.8, label=_run_label(r), color=f"C{i}"
            )
        ax.set_xscale("symlog", linthresh=10)
        ax.set_yscale("log")
        ax.set_ylim(floor, top)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("L(x) - L*")
    fig.suptitle(f"Loss gap along each run: {problem.title}")
    return _save_figure(plt, fig, output_dir, "loss_curves.png")


def _drawable(run, bounds):
    """The points of `run`'s path to draw, and their iteration numbers."""
    if run.outcome == "exploded":
        return _until_outside(run.path, bounds)
    # Other paths may leave the frame and come back: matplotlib clips them.
    return run.path.astype(np.float64), np.arange(len(run.path), dtype=np.float64)


def _until_outside(path, bounds):
    """`path` until it leaves `bounds`, ending where it crosses the boundary.

    Returns the points and their (fractional) iteration numbers.

    An exploding path jumps between +-1e20 and beyond; drawn in full it
    covers the figure with lines. Cut at the boundary, it visibly leaves the
    frame, and the end marker sits where it does.
    """
    path = np.asarray(path, np.float64)
    lo = np.array([b[0] for b in bounds], np.float64)
    hi = np.array([b[1] for b in bounds], np.float64)
    with np.errstate(invalid="ignore"):
        outside = np.any((path < lo) | (path > hi) | ~np.isfinite(path), axis=-1)
    times = np.arange(len(path), dtype=np.float64)
    if not outside.any():
        return path, times
    k = int(np.argmax(outside))
    if k == 0:
        return path[:1], times[:1]
    inside, out = path[k - 1], path[k]
    if not np.all(np.isfinite(out)):
        return path[:k], times[:k]
    step = out - inside
    with np.errstate(divide="ignore", invalid="ignore"):
        t_lo = np.where(out < lo, (lo - inside) / step, np.inf)
        t_hi = np.where(out > hi, (hi - inside) / step, np.inf)
    t = float(np.min(np.minimum(t_lo, t_hi)))
    points = np.concatenate([path[:k], (inside + t * step)[None]], axis=0)
    return points, np.append(times[:k], k - 1 + t)


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label).strip("_")


# --- Command line ------------------------------------------------------------------


def mirrored_strategy(num_replicas: int):
    """A MirroredStrategy over `num_replicas` logical CPUs.

    Splits the CPU into logical devices when TensorFlow has not initialised
    its devices yet; otherwise uses the logical CPUs that exist.
    """
    if num_replicas < 1:
        raise ValueError(f"virtual_devices: must be >= 1, got {num_replicas}.")
    try:
        devices = dist.logical_cpu_devices(num_replicas)
    except ValueError as e:
        raise ValueError(f"virtual_devices: {e}") from None
    return dist.make_strategy("mirrored", devices=devices)


def main(argv=None) -> int:
    """Runs the tool with command-line `argv`; returns the exit status."""
    status = cli.parse("distopt.compare", __doc__, _FLAGS, argv)
    if status is not None:
        return status
    quiet.configure_logging(_FLAGS.verbosity)
    try:
        return _run(_FLAGS)
    except ValueError as e:
        return cli.error("distopt.compare", e)


def _run(f) -> int:
    problem_kwargs = {}
    if f.problem == "noisy_quadratic":
        problem_kwargs = {"noise_scale": f.noise_scale, "seed": f.seed}
    problem = problems_lib.get(f.problem, **problem_kwargs)
    specs = parse_optimizers(f.optimizers)
    rates = parse_learning_rates(f.learning_rates)
    if f.max_iters < 1:
        raise ValueError(f"max_iters: must be >= 1, got {f.max_iters}.")
    if f.strategy not in ("default", "mirrored"):
        raise ValueError(
            f"strategy: unknown {f.strategy!r}; valid names: default, mirrored."
        )
    strategy = (
        mirrored_strategy(f.virtual_devices) if f.strategy == "mirrored" else None
    )
    check_specs(specs, rates[0])

    t0 = time.perf_counter()
    results = run_study(problem, specs, rates, max_iters=f.max_iters, strategy=strategy)
    elapsed = time.perf_counter() - t0
    print(
        f"Problem: {problem.name}, {problem.title}; start x = {_format_x(problem.start)}, "
        f"minimum x* = {_format_x(problem.minimum)}, L* = {problem.min_loss:.6g}"
    )
    print(format_table(results))
    status = 0
    replicas = results[0].replicas
    if replicas > 1:
        diverged = [
            f"{r.optimizer} lr={r.learning_rate:g}"
            for r in results
            if not r.replicas_identical
        ]
        if diverged:
            # A library bug, not a property of the optimizer: fail the run.
            print(f"Replicas DIVERGED in: {', '.join(diverged)}")
            status = 1
        else:
            print(
                f"Mirrored over {replicas} replicas: every replica's path is "
                f"identical in all {len(results)} runs."
            )
    print(f"{len(results)} runs in {elapsed:.1f} s.")
    if not f.output_dir:
        print("Pass --output_dir=DIR for results.json and the figures.")
    else:
        print(f"Wrote {write_results(results, problem, f.output_dir)}")
        if f.figures:
            try:
                paths = make_figures(problem, results, f.output_dir)
            except ImportError:
                print(VIZ_HINT)
            else:
                print(f"Wrote {len(paths)} figures to {f.output_dir}")
    return status


if __name__ == "__main__":
    sys.exit(main())
