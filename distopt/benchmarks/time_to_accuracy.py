"""Time to accuracy of every sync mode and compressor over rate-limited links.

    python -m distopt.benchmarks.time_to_accuracy [--workers=2,4]
        [--links=none,1gbit,100mbit] [--modes=...] [--output_dir=DIR]

Each run is the real trainer (`python -m distopt.train`, the MLP on MNIST)
started by the real launcher (`launch/local.py --workers=N --link_rate=R`):
every worker sends and receives through a link of its own limited to R in
each direction (a token bucket on a veth pair into a bridge; "none" is the
launcher's private loopback). The trainer evaluates every `--eval_every`
steps, on the replicas' average where they diverge, and stops as soon as
the test accuracy reaches `--target` (`--target_accuracy`). Per cell
(workers x link x mode) the benchmark reports the median and min-max of
the wall-clock training time to the target (evaluations excluded), the
steps, the bytes each worker sent (the optimizer's `bytes_sent`, and the
frames its link carried), the final accuracy, and the ratio of the median
time to every_step's at the same link and worker count.

Protocol: a fresh process per run; the cells' runs alternate (round-robin
over the cells, `--repeats` rounds for the headline cells, 4 workers at
100mbit and with no limit, `--other_repeats` for the others). Scaling
efficiency: examples per second (training time only) with 1, 2 and 4
workers at each link, as a fraction of N times one worker's.

Fair settings: each mode's learning rate (and DiLoCo's outer rate) comes
from `SETTINGS`, chosen once by `--tune` (4 workers, no limit, seed
`TUNE_SEED`, never a measured seed) from the grids in `GRIDS`: the setting
with the fewest steps to the target wins. The grid and the choice are in
BUILD_NOTES.md; measured runs use seeds 0, 1, 2...

Writes `results.json` and, with the `viz` extra, one PNG per link rate:
test accuracy against training time and against bytes sent, one line per
mode. Default run: about 170-200 min on this 2-core host (113 runs of 0.5
to 4 min; 103 runs, before the onebit_adam row, took 166 min on 2026-12-05);
`--workers=2 --links=none
--modes=every_step,local_sgd8 --repeats=1 --other_repeats=1 --max_steps=40
--eval_every=20 --target=0.5 --noscaling` takes about 2 minutes (the
suite's end-to-end test).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import time

from absl import flags

from distopt import cli, output_files
from distopt.benchmarks import protocol
from distopt.trainer import paths

# Its own FlagValues, parsed by distopt.cli: --help exits 0, a bad flag is one
# line and exit status 2 (absl's app.run exits 1 after --help).
FLAGS = flags.FlagValues()
flags.DEFINE_list(
    "workers", ["2", "4"], "Worker counts (one CPU device each).", flag_values=FLAGS
)
flags.DEFINE_list(
    "links",
    ["none", "1gbit", "100mbit"],
    "Link rates; none: unlimited.",
    flag_values=FLAGS,
)
flags.DEFINE_list(
    "modes", None, "Rows to run (default: every row of MODES).", flag_values=FLAGS
)
flags.DEFINE_float(
    "target",
    0.97,
    "Test accuracy to reach.",
    lower_bound=0.0,
    upper_bound=1.0,
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "max_steps", 3000, "Step budget of each run.", lower_bound=1, flag_values=FLAGS
)
flags.DEFINE_integer(
    "eval_every", 50, "Steps between evaluations.", lower_bound=1, flag_values=FLAGS
)
flags.DEFINE_integer(
    "batch_per_worker",
    64,
    "Examples per worker per step.",
    lower_bound=1,
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "repeats", 3, "Runs of each headline cell.", lower_bound=1, flag_values=FLAGS
)
flags.DEFINE_integer(
    "other_repeats", 1, "Runs of each other cell.", lower_bound=1, flag_values=FLAGS
)
flags.DEFINE_boolean(
    "scaling", True, "Also run 1 worker (every_step), for scaling.", flag_values=FLAGS
)
flags.DEFINE_boolean(
    "tune", False, "Pick each mode's setting from GRIDS instead.", flag_values=FLAGS
)
flags.DEFINE_string(
    "output_dir", "", "Where results.json and the PNGs go.", flag_values=FLAGS
)
flags.DEFINE_integer(
    "first_seed",
    0,
    "Seed of the first round (round i uses first_seed + i): to add rounds to "
    "an earlier run's output_dir.",
    flag_values=FLAGS,
)
flags.DEFINE_boolean(
    "report_only",
    False,
    "Run nothing: summarise --output_dir's runs.jsonl (a finished or an "
    "interrupted run) into results.json, the table and the PNGs.",
    flag_values=FLAGS,
)

#: The rows: trainer flags of each mode (the learning rates come from SETTINGS).
MODES = {
    "every_step": ["--sync=every_step"],
    "every_step_bf16": ["--sync=every_step", "--optimizer_args=wire_dtype=bfloat16"],
    "accumulate8": ["--sync=accumulate", "--sync_period=8"],
    "local_sgd8": ["--sync=local_sgd", "--sync_period=8"],
    "local_sgd32": ["--sync=local_sgd", "--sync_period=32"],
    "diloco32": ["--sync=diloco", "--sync_period=32"],
    "diloco128": ["--sync=diloco", "--sync_period=128"],
    "powersgd": ["--compression=powersgd", "--compression_args=rank=2"],
    "topk": ["--compression=topk", "--compression_args=fraction=0.01"],
    "onebit": ["--compression=onebit"],
    # 1-bit Adam's recipe (Tang et al. 2021), as in compression_accuracy: 30
    # plain steps, then Adam's variance frozen and OneBit on.
    "onebit_adam": [
        "--compression=onebit",
        "--compression_args=start_step=30",
        "--optimizer_args=epsilon=0.0001,freeze_variance_step=30",
    ],
}

#: The grids `--tune` searches: (learning rate, DiLoCo's outer rate or None).
GRIDS = {
    mode: [(lr, None) for lr in (5e-4, 1e-3, 2e-3, 4e-3)]
    for mode in MODES
    if not mode.startswith("diloco")
}
# Accumulation takes 8x fewer optimizer steps: its best rate may be higher.
GRIDS["accumulate8"].append((8e-3, None))
# DiLoCo: the inner rate at the paper's outer rate (0.7, Nesterov 0.9), and
# a lower outer rate at the two lower inner rates.
GRIDS.update(
    {
        m: [(1e-3, 0.5), (1e-3, 0.7), (2e-3, 0.5), (2e-3, 0.7), (4e-3, 0.7)]
        for m in MODES
        if m.startswith("diloco")
    }
)

#: The settings measured runs use: chosen by `--tune` (BUILD_NOTES.md).
SETTINGS = {
    "every_step": (0.002, None),
    "every_step_bf16": (0.002, None),
    "accumulate8": (0.004, None),
    "local_sgd8": (0.004, None),
    "local_sgd32": (0.002, None),
    "powersgd": (0.002, None),
    "topk": (0.001, None),
    "onebit": (0.0005, None),
    "onebit_adam": (0.001, None),
    "diloco32": (0.002, 0.7),
    "diloco128": (0.001, 0.7),
}

PROG = "distopt.benchmarks.time_to_accuracy"
RUNS = "runs.jsonl"
TUNE = "tune.jsonl"
# The launcher gives its workers 25 s after a stop notice: it gets longer,
# so that it ends them itself (they run in sessions of their own).
LAUNCHER_GRACE_SECONDS = 30.0
TUNE_SEED = 1000
HEADLINE = [("4", "none"), ("4", "100mbit")]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
protocol.check_items(FLAGS, "workers", minimum=1)
protocol.check_items(FLAGS, "modes", list(MODES))


def _check_links(values) -> bool:
    """Each `--links` item is `none` or a rate the launcher takes."""
    spec = importlib.util.spec_from_file_location(
        "_distopt_links", os.path.join(ROOT, "launch", "links.py")
    )
    links = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(links)
    for value in values:
        if value != "none":
            try:
                links.parse_rate(value)
            except ValueError as e:
                raise flags.ValidationError(str(e)) from None
    return True


flags.register_validator("links", _check_links, flag_values=FLAGS)


def run_once(mode, workers, link, seed, setting, workdir) -> dict | None:
    """One trainer run through the launcher; its metrics and link bytes."""
    lr, outer = setting
    model_dir = os.path.join(workdir, f"{mode}_{workers}_{link}_{seed}")
    shutil.rmtree(model_dir, ignore_errors=True)
    stats = os.path.join(workdir, f"links_{mode}_{workers}_{link}_{seed}.json")
    launcher = [
        sys.executable,
        os.path.join(ROOT, "launch", "local.py"),
        f"--workers={workers}",
    ]
    if link != "none":
        launcher += [f"--link_rate={link}", f"--link_stats={stats}"]
    trainer = [
        "--model=mlp",
        "--strategy=multi_worker",
        "--optimizer=adam",
        f"--learning_rate={lr}",
        f"--batch_size={FLAGS.batch_per_worker * int(workers)}",
        f"--train_steps={FLAGS.max_steps}",
        f"--eval_every={FLAGS.eval_every}",
        f"--target_accuracy={FLAGS.target}",
        f"--seed={seed}",
        f"--model_dir={model_dir}",
        "--checkpoint_every=0",
        *MODES[mode],
    ]
    if outer is not None:
        trainer.append(f"--sync_args=outer_learning_rate={outer}")
    proc = protocol.run_child(
        [*launcher, "--", *trainer], grace_seconds=LAUNCHER_GRACE_SECONDS
    )
    path = os.path.join(model_dir, "metrics.json")
    if proc.returncode != 0 or not os.path.exists(path):
        print(
            f"{mode} {workers}w {link} seed {seed} failed ({proc.returncode}):\n"
            f"{proc.stderr[-2000:]}",
            file=sys.stderr,
        )
        return None
    with open(path) as f:
        metrics = json.load(f)
    evaluations = []
    history = os.path.join(model_dir, "evaluations.json")
    if os.path.exists(history):
        with open(history) as f:
            evaluations = json.load(f)
    link_bytes = None
    if os.path.exists(stats):
        with open(stats) as f:
            link_bytes = [w["tx_bytes"] for w in json.load(f)["workers"]]
    return {
        "mode": mode,
        "workers": int(workers),
        "link": link,
        "seed": seed,
        "learning_rate": lr,
        "outer_learning_rate": outer,
        "status": metrics["status"],
        "steps": metrics.get("target_reached_at_step") or metrics["train_steps"],
        "seconds": metrics["training_seconds_excluding_eval"],
        "accuracy": metrics["test_accuracy"],
        "bytes_sent": metrics.get("communication_bytes_sent"),
        "link_bytes_sent": link_bytes,
        "examples_per_second": metrics.get("examples_per_second"),
        "evaluations": evaluations,
    }


def schedule(cells, repeats_of):
    """Round-robin over the cells: (cell, repeat) in alternating order."""
    rounds = max(repeats_of(c) for c in cells)
    return [(c, r) for r in range(rounds) for c in cells if r < repeats_of(c)]


def summarise(runs) -> list[dict]:
    """Per cell: medians and spreads, and the ratio to every_step's time."""
    cells: dict[tuple, list] = {}
    for r in runs:
        cells.setdefault((r["workers"], r["link"], r["mode"]), []).append(r)
    rows = []
    for (w, link, mode), rs in sorted(cells.items()):
        reached = [r for r in rs if r["status"] == "target_reached"]
        row = {
            "workers": w,
            "link": link,
            "mode": mode,
            "runs": len(rs),
            "reached": len(reached),
            "seconds": protocol.stats(r["seconds"] for r in reached),
            "steps": protocol.stats(r["steps"] for r in reached),
            "bytes_sent": protocol.stats(
                r["bytes_sent"] for r in reached if r["bytes_sent"] is not None
            ),
            "link_bytes": protocol.stats(
                max(r["link_bytes_sent"]) for r in reached if r["link_bytes_sent"]
            ),
            "accuracy": protocol.stats(r["accuracy"] for r in rs),
        }
        rows.append(row)
    base = {(r["workers"], r["link"]): r for r in rows if r["mode"] == "every_step"}
    for r in rows:
        b = base.get((r["workers"], r["link"]))
        if b and b["seconds"] and r["seconds"]:
            r["ratio_to_every_step"] = r["seconds"]["median"] / b["seconds"]["median"]
    return rows


def scaling(runs) -> list[dict]:
    """Examples per second per mode, worker count and link, over N x one worker."""
    one = [
        r["examples_per_second"]
        for r in runs
        if r["workers"] == 1 and r["examples_per_second"]
    ]
    if not one:
        return []
    single = protocol.stats(one)["median"]
    out = {}
    for r in runs:
        if r["workers"] > 1 and r["examples_per_second"]:
            out.setdefault((r["mode"], r["workers"], r["link"]), []).append(
                r["examples_per_second"]
            )
    return [
        {
            "mode": m,
            "workers": w,
            "link": link,
            "examples_per_second": protocol.stats(v),
            "efficiency": protocol.stats(x / (w * single) for x in v),
        }
        for (m, w, link), v in sorted(out.items())
    ]


def print_table(rows):
    def f(s, fmt):
        return "-" if not s else f"{fmt(s['median'])} ({fmt(s['min'])}-{fmt(s['max'])})"

    print(
        f"{'workers':>7} {'link':>8} {'mode':<16}{'reached':>8}{'seconds':>22}"
        f"{'steps':>18}{'MB sent/worker':>20}{'accuracy':>10}{'vs every_step':>14}"
    )
    for r in rows:
        ratio = r.get("ratio_to_every_step")
        acc = r["accuracy"]["median"] if r["accuracy"] else float("nan")
        print(
            f"{r['workers']:>7} {r['link']:>8} {r['mode']:<16}"
            f"{r['reached']:>4}/{r['runs']:<3}"
            f"{f(r['seconds'], lambda x: f'{x:.1f}'):>22}"
            f"{f(r['steps'], lambda x: f'{x:.0f}'):>18}"
            f"{f(r['bytes_sent'], lambda x: f'{x / 1e6:.1f}'):>20}"
            f"{100 * acc:>9.2f}%"
            f"{'' if ratio is None else f'{ratio:.2f}':>14}"
        )


def plot(runs, output_dir):
    """One PNG per link: accuracy against time and against bytes, per mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (the viz extra): no figures")
        return []
    paths = []
    for link in sorted({r["link"] for r in runs}):
        fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
        workers = max(r["workers"] for r in runs if r["link"] == link)
        for mode in MODES:
            rs = [
                r
                for r in runs
                if r["link"] == link
                and r["mode"] == mode
                and r["workers"] == workers
                and r["evaluations"]
            ]
            if not rs:
                continue
            ev = rs[0]["evaluations"]
            a.plot(
                [e["training_seconds"] for e in ev],
                [e["accuracy"] for e in ev],
                label=mode,
            )
            b.plot(
                [e["bytes_sent"] / 1e6 for e in ev],
                [e["accuracy"] for e in ev],
                label=mode,
            )
        for ax, x in (
            (a, "training seconds (evaluations excluded)"),
            (b, "MB sent per worker"),
        ):
            ax.set_xlabel(x)
            ax.set_ylabel("test accuracy")
            ax.set_ylim(FLAGS.target - 0.05, min(1.0, FLAGS.target + 0.02))
            ax.axhline(FLAGS.target, color="gray", lw=0.5)
            ax.grid(alpha=0.3)
        b.set_xscale("log")
        a.legend(fontsize=8)
        fig.suptitle(f"MLP on MNIST, {workers} workers, link: {link}")
        path = os.path.join(output_dir, f"time_to_accuracy_{link}.png")
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        output_files.write_atomically(path, png.getvalue())  # Names `path`.
        paths.append(path)
    return paths


def tune(modes, workdir) -> int:
    """Each mode's setting with the fewest steps to the target (seed TUNE_SEED).

    Results are kept in `workdir/tune.jsonl`, so a rerun with a wider grid
    only runs the new settings.

    Returns:
        The exit status: 2 if tune.jsonl cannot be appended to (before any
        run), 1 if an append failed (both said in one line on stderr).
    """
    path = os.path.join(workdir, TUNE)
    # Before any run: it was opened only after each (the run lost, with a
    # traceback), and read before the first (a traceback for a directory).
    why = _check_append(path)
    if why:
        return cli.error(PROG, why)
    done = _read_tuned(path)
    chosen = {}
    for mode in modes:
        results = []
        for setting in GRIDS[mode]:
            key = (mode, tuple(setting))
            if key not in done:
                r = run_once(mode, "4", "none", TUNE_SEED, setting, workdir)
                ok = r and r["status"] == "target_reached"
                done[key] = r["steps"] if ok else None
                record = {"mode": mode, "setting": setting, "steps": done[key]}
                try:
                    _append(path, record)
                except OSError as e:  # A full disk: one line naming the file.
                    return protocol.write_error(PROG, path, e)
            print(f"tune {mode} {setting}: {done[key]}", flush=True)
            steps = done[key]
            results.append((steps if steps is not None else float("inf"), setting))
        chosen[mode] = min(results, key=lambda x: x[0])[1]
    print(json.dumps(chosen, indent=1))
    return 0


def _read_tuned(path: str) -> dict:
    """tune.jsonl's steps to the target by (mode, setting); {} if it is empty."""
    done = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            done[(r["mode"], tuple(r["setting"]))] = r["steps"]
    return done


def _check_append(path: str) -> str | None:
    """Why ``path`` cannot be appended to; None if it can (it is then created).

    The real operation, as `output_files` checks do: opening it to append
    also fails for a read-only file, which `output_files.check_file` (for
    files replaced whole, by a rename) lets pass.
    """
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        return f"cannot append to {path}: {e.strerror or e}"
    return None


def _append(path: str, record: dict) -> None:
    """Appends ``record`` to ``path`` as one JSON line (raises OSError)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def run_key(run) -> tuple:
    """What makes runs repeats of each other: another seed, not another run."""
    return (run["mode"], int(run["workers"]), run["link"], int(run["seed"]))


def read_runs(path: str) -> tuple[list[dict], int]:
    """``path``'s runs, each `run_key` once (the first), and how many repeated one.

    A rerun into the same --output_dir appended the same seeds again, which
    the report counted as independent repeats.
    """
    runs = {}
    lines = 0
    with open(path) as f:
        for line in f:
            if line.strip():
                lines += 1
                run = json.loads(line)
                runs.setdefault(run_key(run), run)
    return list(runs.values()), lines - len(runs)


def main(argv=None) -> int:
    """Runs the cells (or tunes, or reports); returns the exit status."""
    status = cli.parse(PROG, __doc__, FLAGS, argv)
    if status is not None:
        return status
    if FLAGS.report_only:
        return report_only(FLAGS.output_dir)
    # Before any run (the directory was made, or failed, only then).
    if FLAGS.output_dir:
        problems = paths.check_model_dir(FLAGS.output_dir, flag_name="output_dir")
        if problems:
            return cli.error(PROG, problems[0])
    modes = FLAGS.modes or list(MODES)
    output_dir = FLAGS.output_dir or tempfile.mkdtemp(prefix="tta_")
    workdir = os.path.join(output_dir, "runs")
    why = _make_workdir(workdir)
    if why:
        return cli.error(PROG, why)
    if FLAGS.tune:
        return tune(modes, workdir)
    # Before any run, as tune's file: it was first appended to after the
    # first run (hours lost to a read-only one), and read before it.
    why = _check_append(os.path.join(output_dir, RUNS))
    if why:
        return cli.error(PROG, why)
    runs = run_cells(modes, output_dir, workdir)
    if runs is None:
        return 1
    if protocol.no_results(PROG, runs):
        return 1
    return report(runs, output_dir)


def _make_workdir(workdir: str) -> str | None:
    """Creates ``workdir`` (if need be); None, or why it cannot be written in.

    --output_dir itself is checked already; a file named `runs` in it was a
    FileExistsError traceback. An existing `runs` that takes no new entry (a
    read-only mount, another user's) failed each run only after its start:
    every run's directory is made in it. The probe entry is removed again.
    """
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        return f"cannot create the directory {workdir}: {e.strerror or e}"
    why = output_files.probe(workdir)
    return f"cannot write in the directory {workdir}: {why}" if why else None


def report_only(output_dir: str) -> int:
    """`report` of ``output_dir``'s runs.jsonl; creates no directory."""
    if not output_dir:
        return cli.error(PROG, "--report_only needs --output_dir")
    path = os.path.join(output_dir, RUNS)
    if not os.path.isfile(path):
        return cli.error(PROG, f"--output_dir={output_dir} has no {RUNS}")
    problems = paths.check_model_dir(output_dir, flag_name="output_dir")
    if problems:
        return cli.error(PROG, problems[0])
    runs, repeated = read_runs(path)
    if not runs:  # Made before a first run that was stopped: nothing to report.
        return cli.error(PROG, f"{path} has no runs yet")
    if repeated:
        print(
            f"ignoring {repeated} runs of {path} that repeat a mode, workers, "
            "link and seed already there"
        )
    return report(runs, output_dir)


def run_cells(modes, output_dir, workdir) -> list[dict] | None:
    """Runs the cells' runs not yet in runs.jsonl; all of them, or None.

    None: runs.jsonl could not be written (said on stderr).
    """
    cells = [(m, w, link) for w in FLAGS.workers for link in FLAGS.links for m in modes]
    if FLAGS.scaling:
        cells.append(("every_step", "1", "none"))

    def repeats_of(cell):
        _, w, link = cell
        return (
            FLAGS.repeats if (w, link) in HEADLINE or w == "1" else FLAGS.other_repeats
        )

    path = os.path.join(output_dir, RUNS)  # main made it (_check_append).
    recorded = {run_key(r): r for r in read_runs(path)[0]}
    todo = [(c, FLAGS.first_seed + rep) for c, rep in schedule(cells, repeats_of)]
    again = sum((m, int(w), link, seed) in recorded for (m, w, link), seed in todo)
    if again:
        print(f"skipping {again} runs already in {path}", file=sys.stderr, flush=True)
    runs = []
    for (mode, w, link), seed in todo:
        key = (mode, int(w), link, seed)
        if key in recorded:  # A rerun into the same --output_dir: one run each.
            runs.append(recorded[key])
            continue
        print(
            f"[{time.strftime('%H:%M:%S')}] {mode} {w} workers {link} seed {seed}",
            file=sys.stderr,
            flush=True,
        )
        r = run_once(mode, w, link, seed, SETTINGS[mode], workdir)
        if r:
            runs.append(r)
            try:
                _append(path, r)
            except OSError as e:
                protocol.write_error(PROG, path, e)
                return None
    return runs


def report(runs, output_dir) -> int:
    """The table, the scaling lines, results.json and the PNGs of ``runs``."""
    rows = summarise(runs)
    print_table(rows)
    eff = scaling(runs)
    for e in eff:
        print(
            f"scaling {e['mode']:<16} {e['workers']} workers {e['link']:>8}: "
            f"{e['efficiency']['median']:.2f} of ideal"
        )
    path = os.path.join(output_dir, "results.json")
    results = {
        "settings": SETTINGS,
        "target": FLAGS.target,
        "rows": rows,
        "scaling": eff,
        "runs": runs,
    }
    status = protocol.write_json(PROG, path, results)
    if status:
        return status
    try:
        figures = plot(runs, output_dir)
    except OSError as e:
        return protocol.write_error(PROG, e.filename, e)
    for p in figures:
        print(f"figure: {p}")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
