"""The PNG figures of a convergence study (`distopt.study`'s `RunResult`s).

`make_figures` writes `loss_and_gradient.png` (the problem, its critical
points marked), `paths_<optimizer>.png` per optimizer (every learning rate's
path over a heat map of the log loss, or over the contour plot of a 2-D
problem) and `loss_curves.png` (L - L* along every run). Needs matplotlib
(`pip install distopt[viz]`); it is imported only here.
"""

from __future__ import annotations

import io
import math
import os
import re

import numpy as np

from distopt import output_files

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
    _remove_stale_paths_figures(output_dir, written)
    return written


def _remove_stale_paths_figures(output_dir, written) -> None:
    """Removes `paths_*.png` of an earlier study that this one did not write.

    results.json is replaced by this study's; a figure of an optimizer it
    did not run would sit beside it as if it belonged to it.
    """
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if re.fullmatch(r"paths_.*\.png", name) and path not in written:
            os.remove(path)
            print(f"Removed {path}, a figure of an earlier study")


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
    """Lays out `fig`, writes it to `output_dir/name` (PNG) and closes it.

    Whole or not at all: a full disk leaves no truncated PNG.
    """
    fig.tight_layout()
    path = os.path.join(output_dir, name)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    output_files.write_atomically(path, png.getvalue())
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
