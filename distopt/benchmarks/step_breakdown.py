"""Where the trainer's time goes: per-step phases and time to first step.

    python -m distopt.benchmarks.step_breakdown --model=lenet --strategy=default
    python -m distopt.benchmarks.step_breakdown --model=lenet --strategy=mirrored
    python -m distopt.benchmarks.step_breakdown --startup_only --repeats=3

Per step (one process, the phases interleaved round by round so that load
drift hits them alike; ms per step, median and min-max over rounds), each a
``tf.range`` loop in one ``tf.function``, the trainer's default settings for
this device (``train_lib.resolve_jit_compile``) and its optimizer:

* ``pipeline``: the trainer's distributed input iterator alone.
* ``forward``: loss on one in-memory batch per replica.
* ``forward_backward``: and the gradients.
* ``bare_step``: and ``optimizer.apply_gradients`` (the ceiling of
  ``trainer_vs_keras``).
* ``trainer_loop``: ``train_lib.make_train_loop`` on the trainer's own
  iterator, exactly as ``distopt.train`` runs it.

Differences of medians attribute the step: backward = forward_backward -
forward, update = bare_step - forward_backward, input and bookkeeping =
trainer_loop - bare_step.

Time to first step (``--startup``, each repeat a fresh process, seconds from
process start): importing TensorFlow, the data, model and optimizer, the
datasets, tracing the training loop, and its first call (graph
optimisation, XLA compilation of whatever is compiled, one step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from distopt.benchmarks import protocol

PHASES = ("pipeline", "forward", "forward_backward", "bare_step", "trainer_loop")


def _setup(strategy_name):
    from distopt import train_lib

    return train_lib.make_strategy(
        strategy_name, virtual_devices=train_lib.DEFAULT_CPU_VIRTUAL_DEVICES
    )


def step_phases(model_name, strategy_name, steps, rounds, batch_size=128):
    """ms per step of each phase, median and min-max over interleaved rounds."""
    import tensorflow as tf

    from distopt import data as data_lib
    from distopt import train_lib

    strategy = _setup(strategy_name)
    config = train_lib.TrainConfig(
        model=model_name, strategy=strategy_name, batch_size=batch_size
    )
    source = data_lib.load_source()
    with strategy.scope():
        model = train_lib.build_model(model_name, source)
        optimizer = train_lib.make_optimizer(config, 10**6, strategy)
        optimizer.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64, trainable=False)
        sums = train_lib._Sums("sums")
        sink = tf.Variable(
            0.0,
            synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=tf.VariableAggregation.SUM,
        )
    variables = model.trainable_variables
    jit = train_lib.resolve_jit_compile(None, strategy)
    replicas = strategy.num_replicas_in_sync
    per_replica = batch_size // replicas

    batch = protocol.random_mnist_batch(strategy, per_replica)

    def loss_of(images, labels):
        logits = model(images, training=True)
        return tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
        )

    def forward(images, labels):
        sink.assign_add(loss_of(images, labels))

    def grads_of(images, labels):
        with tf.GradientTape() as tape:
            loss = loss_of(images, labels)
        return tape.gradient(loss, variables)

    def forward_backward(images, labels):
        grads = grads_of(images, labels)
        sink.assign_add(tf.add_n([tf.reduce_sum(g) for g in grads]))

    def bare_step(images, labels):
        optimizer.apply_gradients(grads_of(images, labels), variables)

    if jit and replicas == 1:
        forward = tf.function(forward, jit_compile=True)
        forward_backward = tf.function(forward_backward, jit_compile=True)
        bare_step = tf.function(bare_step, jit_compile=True)
    elif jit:
        loss_of = tf.function(loss_of, jit_compile=True)
        grads_of = tf.function(grads_of, jit_compile=True)

    def in_memory_loop(fn):
        @tf.function
        def loop(num_steps):
            for _ in tf.range(num_steps):
                strategy.run(fn, args=batch)

        return lambda n: loop(n)

    train_ds, _, _ = train_lib.make_datasets(strategy, source, config)
    iterator = iter(train_ds)

    def consume(images, labels):
        sink.assign_add(tf.cast(labels[0], tf.float32) + images[0, 0, 0, 0])

    @tf.function
    def pipeline(num_steps):
        for _ in tf.range(num_steps):
            strategy.run(consume, args=next(iterator))

    trainer_loop = train_lib.make_train_loop(strategy, model, optimizer, sums, step)
    loops = {
        "pipeline": pipeline,
        "forward": in_memory_loop(forward),
        "forward_backward": in_memory_loop(forward_backward),
        "bare_step": in_memory_loop(bare_step),
        "trainer_loop": lambda n: trainer_loop(iterator, n),
    }

    def run(name, n):
        loops[name](tf.constant(n, tf.int64))
        float(sink.read_value())  # Waits for the loop.
        int(step.numpy())

    for name in PHASES:
        run(name, 10)  # Trace, compile, warm up.
    samples = {name: [] for name in PHASES}
    for r in range(rounds):
        order = PHASES[r % len(PHASES) :] + PHASES[: r % len(PHASES)]
        for name in order:
            t = time.perf_counter()
            run(name, steps)
            samples[name].append(1e3 * (time.perf_counter() - t) / steps)
    stats = {
        name: {"median": statistics.median(s), "min": min(s), "max": max(s)}
        for name, s in samples.items()
    }
    med = {name: s["median"] for name, s in stats.items()}
    return {
        "model": model_name,
        "strategy": strategy_name,
        "jit_compile": jit,
        "steps": steps,
        "rounds": rounds,
        "ms_per_step": stats,
        "attribution_ms": {
            "forward": med["forward"],
            "backward": med["forward_backward"] - med["forward"],
            "update": med["bare_step"] - med["forward_backward"],
            "input_and_bookkeeping": med["trainer_loop"] - med["bare_step"],
            "input_pipeline_alone": med["pipeline"],
        },
    }


def startup(model_name, strategy_name, tensorflow_imported):
    """Seconds from process start to the end of each phase (a fresh process).

    ``tensorflow_imported``: ``time.time()`` after ``import tensorflow``.
    """
    import tensorflow as tf

    from distopt import data as data_lib
    from distopt import train_lib

    marks = [("import tensorflow", tensorflow_imported)]
    marks.append(("import distopt", time.time()))

    start = train_lib.process_start_time()
    config = train_lib.TrainConfig(
        model=model_name, strategy=strategy_name, train_steps=1, eval_steps=1
    )
    strategy = _setup(strategy_name)
    marks.append(("strategy", time.time()))
    source = data_lib.load_source()
    marks.append(("data", time.time()))
    with strategy.scope():
        model = train_lib.build_model(model_name, source)
        optimizer = train_lib.make_optimizer(config, 1, strategy)
        optimizer.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64, trainable=False)
        sums = train_lib._Sums("sums")
    marks.append(("model and optimizer", time.time()))
    train_ds, _, _ = train_lib.make_datasets(strategy, source, config)
    iterator = iter(train_ds)
    marks.append(("datasets", time.time()))
    loop = train_lib.make_train_loop(strategy, model, optimizer, sums, step)
    loop.get_concrete_function(iterator, tf.TensorSpec([], tf.int64))
    marks.append(("trace", time.time()))
    loop(iterator, tf.constant(1, tf.int64))
    int(step.numpy())
    marks.append(("first call", time.time()))
    phases, previous = {}, start
    for name, t in marks:
        phases[name] = t - previous
        previous = t
    return {"phases_s": phases, "first_step_s": marks[-1][1] - start}


def _startup_in_subprocess(model_name, strategy_name):
    return protocol.measure_in_subprocess(
        "distopt.benchmarks.step_breakdown",
        [f"--model={model_name}", f"--strategy={strategy_name}", "--measure_startup"],
        f"startup {model_name} {strategy_name}",
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--strategy", default="default", help="default, mirrored")
    parser.add_argument("--steps", type=int, default=100, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--repeats", type=int, default=3, help="startup processes")
    parser.add_argument("--startup_only", action="store_true")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    parser.add_argument(
        "--measure_startup", action="store_true", help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.measure_startup:
        # As `python -m distopt.train` does: TensorFlow without matplotlib.
        sys.modules["matplotlib"] = None
        import tensorflow  # noqa: F401

        del sys.modules["matplotlib"]
        result = startup(args.model, args.strategy, time.time())
        protocol.print_result(result)
        return result
    results = {"load_average": os.getloadavg()}
    if not args.startup_only:
        # A fresh process of its own, so that the startup runs below do not
        # share its threads.
        phases = step_phases(args.model, args.strategy, args.steps, args.rounds)
        results["step"] = phases
        print(
            f"{args.model} / {args.strategy} (XLA {phases['jit_compile']}): ms per "
            f"step, median (min-max) of {args.rounds} interleaved rounds of "
            f"{args.steps} steps"
        )
        for name, s in phases["ms_per_step"].items():
            print(f"  {name:<18} {s['median']:7.2f} ({s['min']:.2f}-{s['max']:.2f})")
        print("  attribution (differences of medians, ms):")
        for name, value in phases["attribution_ms"].items():
            print(f"    {name:<22} {value:7.2f}")
    runs = [
        _startup_in_subprocess(args.model, args.strategy) for _ in range(args.repeats)
    ]
    runs = [r for r in runs if r]
    results["startup"] = runs
    if runs:
        print(
            f"{args.model} / {args.strategy}: time to first step, seconds from "
            f"process start, median (min-max) of {len(runs)} fresh processes"
        )
        for name in runs[0]["phases_s"]:
            values = [r["phases_s"][name] for r in runs]
            print(
                f"  {name:<20} {statistics.median(values):6.2f} "
                f"({min(values):.2f}-{max(values):.2f})"
            )
        total = [r["first_step_s"] for r in runs]
        print(
            f"  {'first step':<20} {statistics.median(total):6.2f} "
            f"({min(total):.2f}-{max(total):.2f})"
        )
    results["load_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
