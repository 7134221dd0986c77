r"""Trainer throughput and time to first step against ``keras.Model.fit``.

    python -m distopt.benchmarks.trainer_vs_keras                 # all 4 cells, 3 repeats
    python -m distopt.benchmarks.trainer_vs_keras --models=lenet --strategies=default
    python -m distopt.benchmarks.trainer_vs_keras --steps=3 --repeats=1   # smoke run

Default run: about 8-15 min on this 2-core host (48 fresh processes; 8 min
on a quiet machine, BUILD_NOTES.md).

Cells: each model (MLP, LeNet-5) x strategy (default; mirrored over 2
virtual CPUs). Contenders in each cell, all with global batch 128 and Adam
1e-3 on MNIST:

* ``trainer``: ``python -m distopt.train`` with its default flags (only the
  model, strategy, step count and a temporary ``--model_dir`` are given).
  Throughput is the trainer's own figure (``metrics.json``), which leaves
  out its first, compiling step; time to first step is its
  ``seconds_to_first_step``, from process start. By default it reads MNIST
  from memory (``--input=auto``); ``"trainer:--input=dataset"`` measures its
  ``tf.data`` pipeline.
* ``keras_auto`` / ``keras_nojit``: an equivalent ``keras.Sequential`` model
  compiled with ``jit_compile="auto"`` / ``False``, and
  ``steps_per_execution=--keras_steps_per_execution`` where that works (it
  falls back to 1 if fit fails with it; the result records which ran). It
  reads the trainer's own ``tf.data`` pipeline (global batches; Keras
  distributes them). Time to first step: process start to the end of a
  1-step ``fit`` (with ``steps_per_execution`` that first execution runs
  that many steps, which can only make Keras look later). Throughput: a timed ``fit`` of ``--steps`` steps after a
  warm-up ``fit``.
* ``trainer:<flags>`` (not by default): the trainer with these further
  flags, separated by spaces, e.g. ``"trainer:--jit_compile"``.
* ``bare``: the ceiling. The trainer's model and optimizer (the trainer's
  default XLA choice for this device), forward, backward and update in a
  ``tf.range`` loop in one ``tf.function`` over one in-memory batch per
  replica: no input pipeline, no metrics, no Python per step. The trainer's
  in-memory feed does more than this (a gather and a normalise per step),
  so bare stays a ceiling.

Protocol: every measurement is a fresh process, so none inherits another's
threads, compiled state or collective keys. The contenders alternate, in an
order rotated every round, and each runs ``--repeats`` times (>= 3 for a
figure you report). The report gives each contender's median and min-max,
and ratios of medians taken within the same run: trainer / best Keras
variant, trainer / bare step, and trainer / Keras for time to first step.
Absolute figures on a shared machine mean little; the ratios and spreads
are what to read. Targets (issue 11): trainer >= 1.2x the best Keras and >=
0.9x bare in every cell; time to first step <= 5 s (LeNet default), <= 6 s
(mirrored) and no later than Keras fit's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from distopt.benchmarks import protocol

PROG = "distopt.benchmarks.trainer_vs_keras"
MODELS = ("lenet", "mlp")
STRATEGIES = ("default", "mirrored")
#: Besides "trainer:<flags>" (see the module docstring).
CONTENDERS = ("trainer", "keras_auto", "keras_nojit", "bare")


def parse_args(argv=None):
    """The benchmark's command line (``argv`` without the program name)."""
    parser = protocol.Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        type=protocol.names(MODELS),
        default=",".join(MODELS),
        help=", ".join(MODELS),
    )
    parser.add_argument(
        "--strategies",
        type=protocol.names(STRATEGIES),
        default=",".join(STRATEGIES),
        help="default, mirrored (2 vCPUs)",
    )
    parser.add_argument(
        "--contenders",
        type=protocol.names(CONTENDERS, prefix="trainer:"),
        default=",".join(CONTENDERS),
        help=f"{', '.join(CONTENDERS)}, trainer:<flags>; see the module docstring",
    )
    positive = protocol.at_least(1)
    parser.add_argument("--steps", type=positive, default=400, help="timed steps")
    parser.add_argument(
        "--warmup_steps",
        type=protocol.at_least(0),
        default=50,
        help="Keras and bare: untimed steps first (0: none)",
    )
    parser.add_argument("--repeats", type=positive, default=3, help="processes each")
    parser.add_argument("--batch_size", type=positive, default=128, help="global batch")
    parser.add_argument(
        "--keras_steps_per_execution",
        type=positive,
        default=50,
        help="Keras steps_per_execution (1 where it fails)",
    )
    parser.add_output("output", "also write the results (JSON) here")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _check_batch(parser, args)
    return args


def _check_batch(parser, args) -> None:
    """Refuses a ``--batch_size`` that mirrored cannot split over its replicas.

    Bare's per-replica batch dropped the remainder (batch 1: 0 examples).
    """
    why = protocol.mirrored_batch_error(args.batch_size, args.strategies, VIRTUAL_CPUS)
    if why:
        parser.error(f"argument --batch_size: {why}")


VIRTUAL_CPUS = 2
KERAS_JIT = {"keras_auto": "auto", "keras_nojit": False}


def _keras_model(name):
    """The Keras twin of distopt's model with the trainer's default args."""
    import keras

    if name == "mlp":
        layers = [
            keras.layers.Flatten(),
            keras.layers.Dense(700, activation="relu"),
            keras.layers.Dense(500, activation="relu"),
            keras.layers.Dense(10),
        ]
    else:
        layers = [
            keras.layers.Conv2D(6, 5, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(16, 5, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(120, activation="relu"),
            keras.layers.Dense(84, activation="relu"),
            keras.layers.Dense(10),
        ]
    return keras.Sequential([keras.Input((28, 28, 1)), *layers])


def _setup(strategy_name):
    """Initialises TensorFlow's devices; returns the strategy."""
    import tensorflow as tf

    from distopt import distribute

    if strategy_name != "mirrored":
        return tf.distribute.get_strategy()
    return distribute.make_strategy("mirrored", num_cpu_devices=VIRTUAL_CPUS)


def measure_keras(args, model_name, strategy_name, variant, start):
    """Keras fit: time to first step and examples/s (after a warm-up fit)."""
    import keras
    import tensorflow as tf

    from distopt import data

    strategy = _setup(strategy_name)
    dataset = data.make_dataset_fn(
        data.load_source(), "train", args.batch_size, training=True, seed=0
    )(tf.distribute.InputContext())

    def build(steps_per_execution):
        with strategy.scope():
            model = _keras_model(model_name)
            model.compile(
                optimizer=keras.optimizers.Adam(1e-3),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"],
                jit_compile=KERAS_JIT[variant],
                steps_per_execution=steps_per_execution,
            )
        model.fit(dataset, epochs=1, steps_per_epoch=1, verbose=0)
        return model

    spe = args.keras_steps_per_execution
    try:
        model = build(spe)
        first_step = time.time() - start
        protocol.warm_up_fit(model, dataset, args.warmup_steps)
    except Exception as e:  # noqa: BLE001 - any failure: retry without it.
        print(f"steps_per_execution={spe} failed ({type(e).__name__}); using 1")
        spe = 1
        model = build(spe)
        first_step = time.time() - start
        protocol.warm_up_fit(model, dataset, args.warmup_steps)
    t = time.perf_counter()
    model.fit(dataset, epochs=1, steps_per_epoch=args.steps, verbose=0)
    seconds = time.perf_counter() - t
    return {
        "examples_per_second": args.steps * args.batch_size / seconds,
        "seconds_to_first_step": first_step,
        "steps_per_execution": spe,
    }


def measure_bare(args, model_name, strategy_name):
    """The ceiling: the trainer's model and optimizer over in-memory tensors."""
    import tensorflow as tf

    from distopt import optimizers
    from distopt.trainer import factories
    from distopt.trainer import strategy as tstrategy

    strategy = _setup(strategy_name)
    jit = tstrategy.resolve_jit_compile(None, strategy)
    replicas = strategy.num_replicas_in_sync
    per_replica = args.batch_size // replicas
    with strategy.scope():
        model = factories.build_model(model_name, jit_compile=jit)
        optimizer = optimizers.Adam(1e-3)
        optimizer.build(model.trainable_variables)
    variables = model.trainable_variables

    batch = protocol.random_mnist_batch(strategy, per_replica)

    def step(images, labels):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
            )
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(grads, variables)

    if jit and replicas == 1:
        step = tf.function(step, jit_compile=True)

    @tf.function
    def loop(num_steps):
        for _ in tf.range(num_steps):
            strategy.run(step, args=batch)
        return optimizer.iterations

    loop(tf.constant(args.warmup_steps)).numpy()
    t = time.perf_counter()
    loop(tf.constant(args.steps)).numpy()
    seconds = time.perf_counter() - t
    return {
        "examples_per_second": args.steps * args.batch_size / seconds,
        "jit_compile": jit,
    }


def measure_trainer(args, model_name, strategy_name, extra_flags=()):
    """``python -m distopt.train`` with default flags, as a user runs it."""
    with tempfile.TemporaryDirectory() as model_dir:
        command = [
            sys.executable,
            "-m",
            "distopt.train",
            f"--model={model_name}",
            f"--strategy={strategy_name}",
            f"--train_steps={args.steps + 1}",  # The first step is not timed.
            f"--log_every={args.steps + 1}",
            "--checkpoint_every=0",
            "--eval_steps=1",
            f"--model_dir={model_dir}",
            *extra_flags,
        ]
        proc = protocol.run_child(command)
        path = os.path.join(model_dir, "metrics.json")
        if proc.returncode or not os.path.exists(path):
            raise RuntimeError(f"trainer failed:\n{proc.stderr[-3000:]}")
        with open(path) as f:
            metrics = json.load(f)
    return {
        "examples_per_second": metrics["examples_per_second"],
        "seconds_to_first_step": metrics["seconds_to_first_step"],
    }


def _measure_in_subprocess(args, contender, model_name, strategy_name):
    # The trainer is a process of its own already (python -m distopt.train);
    # only Keras and bare need the --measure re-entry.
    if contender.split(":")[0] == "trainer":
        extra = contender.split(":", 1)[1].split() if ":" in contender else []
        try:
            return measure_trainer(args, model_name, strategy_name, extra)
        except RuntimeError as e:
            print(e)
            return None
    return protocol.measure_in_subprocess(
        "distopt.benchmarks.trainer_vs_keras",
        [
            f"--models={model_name}",
            f"--strategies={strategy_name}",
            f"--measure={contender}",
            f"--steps={args.steps}",
            f"--warmup_steps={args.warmup_steps}",
            f"--batch_size={args.batch_size}",
            f"--keras_steps_per_execution={args.keras_steps_per_execution}",
        ],
        f"{contender} {model_name} {strategy_name}",
    )


def summarize(cell):
    """Medians, spreads and ratios of one cell's raw samples."""
    samples = cell["samples"]
    rate = {
        c: protocol.stats([s["examples_per_second"] for s in v])
        for c, v in samples.items()
    }
    first = {
        c: protocol.stats([s["seconds_to_first_step"] for s in v])
        for c, v in samples.items()
        if v and "seconds_to_first_step" in v[0]
    }
    cell["examples_per_second"] = rate
    cell["seconds_to_first_step"] = first
    keras = [c for c in rate if c.startswith("keras") and rate[c]]
    ratios = {}
    trainer = rate.get("trainer")
    if trainer and keras:
        best = max(keras, key=lambda c: rate[c]["median"])
        ratios[f"trainer/{best} (best Keras)"] = (
            trainer["median"] / rate[best]["median"]
        )
    if trainer and rate.get("bare"):
        ratios["trainer/bare"] = trainer["median"] / rate["bare"]["median"]
    keras_first = [c for c in first if c.startswith("keras") and first[c]]
    if first.get("trainer") and keras_first:
        fastest = min(keras_first, key=lambda c: first[c]["median"])
        ratios[f"first step trainer/{fastest}"] = (
            first["trainer"]["median"] / first[fastest]["median"]
        )
    cell["ratios"] = ratios
    return cell


def report(results) -> str:
    header = (
        f"{results['steps']} timed steps, batch {results['batch_size']}, "
        f"{results['repeats']} fresh-process repeats per contender, alternating; "
        f"{results['cpu_count']} CPUs, load average at start "
        f"{results['load_average'][0]:.1f}, at end {results['load_end'][0]:.1f}"
    )
    lines = [header]
    for cell in results["cells"]:
        lines += _report_cell(cell)
    return "\n".join(lines)


def _report_cell(cell) -> list[str]:
    lines = [
        f"\n{cell['model']} / {cell['strategy']}",
        f"  {'contender':<12} {'ex/s median':>11} {'(min-max)':>17}   "
        + f"{'first step s':>12} {'(min-max)':>11}",
    ]
    for c, r in cell["examples_per_second"].items():
        if not r:
            lines.append(f"  {c:<12} failed")
            continue
        f = cell["seconds_to_first_step"].get(c)
        first = f"   {f['median']:>12.1f} ({f['min']:.1f}-{f['max']:.1f})" if f else ""
        lines.append(
            f"  {c:<12} {r['median']:>11,.0f} "
            f"({r['min']:>7,.0f}-{r['max']:>7,.0f}){first}"
        )
    for name, value in cell["ratios"].items():
        lines.append(f"  {name}: {value:.2f}x")
    return lines


def run(args):
    """Runs every cell, contenders alternating; returns the results dict."""
    contenders = list(args.contenders)
    load = os.getloadavg()
    cells = []
    for model_name in args.models:
        for strategy_name in args.strategies:
            samples = protocol.alternate(
                contenders,
                args.repeats,
                lambda c, m=model_name, s=strategy_name: _measure_in_subprocess(
                    args, c, m, s
                ),
            )
            cell = {"model": model_name, "strategy": strategy_name}
            cell["samples"] = samples
            cells.append(summarize(cell))
            print("\n".join(_report_cell(cell)), flush=True)
    return {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "load_average": load,
        "load_end": os.getloadavg(),
        "cells": cells,
    }


def main(argv=None) -> int:
    """Runs the benchmark (or, with ``--measure``, one measurement).

    Returns:
        The exit status: 1 if every measurement failed or the results could
        not be written.
    """
    args = parse_args(argv)
    if args.measure:
        start = _process_start()
        (model_name,), (strategy_name,) = args.models, args.strategies
        if args.measure == "bare":
            result = measure_bare(args, model_name, strategy_name)
        else:
            result = measure_keras(args, model_name, strategy_name, args.measure, start)
        protocol.print_result(result)
        return 0
    results = run(args)
    samples = [s for c in results["cells"] for v in c["samples"].values() for s in v]
    if protocol.no_results(PROG, samples):
        return 1
    print(report(results))
    return protocol.write_json(PROG, args.output, results)


def _process_start():
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


if __name__ == "__main__":
    sys.exit(main())
