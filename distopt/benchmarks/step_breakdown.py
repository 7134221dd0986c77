"""Where the trainer's time goes: per-step phases and time to first step.

    python -m distopt.benchmarks.step_breakdown --model=lenet --strategy=default
    python -m distopt.benchmarks.step_breakdown --model=lenet --strategy=mirrored
    python -m distopt.benchmarks.step_breakdown --startup_only --repeats=3
    python -m distopt.benchmarks.step_breakdown --kernels --repeats=0

Default run: about 2-4 min on this 2-core host (the phases in this process,
then 3 start-up processes; 3.8 min with other jobs on the machine,
2026-12-04).

Per step (one process, the phases interleaved round by round so that load
drift hits them alike; ms per step, median and min-max over rounds), each a
``tf.range`` loop in one ``tf.function``, the trainer's default settings for
this device (``trainer.strategy.resolve_jit_compile``) and its optimizer:

* ``pipeline``: the trainer's input alone (its feed: in memory for MNIST
  on one host, as ``distopt.train`` picks by default, else ``tf.data``).
* ``forward``: loss on one in-memory batch per replica.
* ``forward_backward``: and the gradients.
* ``bare_step``: and ``optimizer.apply_gradients`` (the ceiling of
  ``trainer_vs_keras``).
* ``update``: ``optimizer.apply_gradients`` alone, of gradients computed
  once before the loop.
* ``trainer_loop``: ``trainer.step.make_train_loop`` on the trainer's own
  feed, exactly as ``distopt.train`` runs it.

The attribution: forward; backward = forward_backward - forward; update,
measured directly (the difference bare_step - forward_backward of two noisy
medians came out at -2.54 ms under load); input and bookkeeping =
trainer_loop - bare_step. A difference below 0 is within the rounds' noise:
it is shown as 0, with a note giving the raw difference.

LeNet's kernels (``--kernels``, one process, interleaved rounds): each
convolution and pooling kernel of the training step alone, at the step's
batch size and with the ops the step runs without XLA (the CPU default):
forward, input gradient and filter gradient of each convolution, and
each pooling's forward and gradient. Keras's LeNet runs the same kernels,
so their time is time no CPU trainer saves over Keras fit.

Time to first step (``--startup``, each repeat a fresh process, seconds from
process start): importing TensorFlow, the data, model and optimizer, the
training input, tracing the training loop, and its first call (graph
optimisation, XLA compilation of whatever is compiled, one step).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import NamedTuple

from distopt.benchmarks import protocol

PROG = "distopt.benchmarks.step_breakdown"
MODELS = ("lenet", "mlp")
STRATEGIES = ("default", "mirrored")
PHASES = (
    "pipeline",
    "forward",
    "forward_backward",
    "bare_step",
    "update",
    "trainer_loop",
)


def _setup(strategy_name):
    from distopt.trainer import config as tconfig
    from distopt.trainer import strategy as tstrategy

    return tstrategy.make_strategy(
        strategy_name, virtual_devices=tconfig.DEFAULT_CPU_VIRTUAL_DEVICES
    )


class _State(NamedTuple):
    """What the phases train and write, made in the strategy's scope."""

    model: object
    optimizer: object
    step: object  # The trainer's step counter (int64 variable).
    sums: object  # The trainer's metric sums.
    sink: object  # Where the phases put a result, so none is pruned.


def step_phases(model_name, strategy_name, steps, rounds, batch_size=128):
    """ms per step of each phase, median and min-max over interleaved rounds."""
    import tensorflow as tf

    from distopt import data as data_lib
    from distopt.trainer import config as tconfig
    from distopt.trainer import inputs as tinputs
    from distopt.trainer import step as tstep
    from distopt.trainer import strategy as tstrategy

    strategy = _setup(strategy_name)
    config = tconfig.TrainConfig(
        model=model_name, strategy=strategy_name, batch_size=batch_size
    )
    source = data_lib.load_source()
    state = _build_state(strategy, config, model_name, source)
    jit = tstrategy.resolve_jit_compile(None, strategy)
    replicas = strategy.num_replicas_in_sync
    batch = protocol.random_mnist_batch(strategy, batch_size // replicas)
    fns = _step_functions(state, jit, replicas)
    # Each replica's gradients of its batch, once: the update phase's input.
    fixed_grads = tuple(
        tf.function(lambda: strategy.run(fns["grads_of"], args=batch))()
    )
    # The trainer's own feed, as distopt.train picks it (in memory for MNIST).
    kind = tinputs.resolve_input(config, strategy, source)
    feed = tinputs.make_train_feed(strategy, source, config, kind)
    inputs = feed.inputs()
    trainer_loop = tstep.make_train_loop(
        strategy, state.model, state.optimizer, state.sums, state.step, feed=feed
    )
    loops = {
        "pipeline": _pipeline_loop(strategy, feed, inputs, state.step, state.sink),
        "forward": _in_memory_loop(strategy, fns["forward"], batch),
        "forward_backward": _in_memory_loop(strategy, fns["forward_backward"], batch),
        "bare_step": _in_memory_loop(strategy, fns["bare_step"], batch),
        "update": _in_memory_loop(strategy, fns["update"], fixed_grads),
        "trainer_loop": lambda n: trainer_loop(inputs, n),
    }
    stats = _time_interleaved(loops, state, steps, rounds)
    attribution, notes = attribute(stats)
    return {
        "model": model_name,
        "strategy": strategy_name,
        "jit_compile": jit,
        "steps": steps,
        "rounds": rounds,
        "ms_per_step": stats,
        "attribution_ms": attribution,
        "attribution_notes": notes,
    }


def _build_state(strategy, config, model_name, source):
    """The model, its built optimizer and the variables, in the strategy's scope."""
    import tensorflow as tf

    from distopt.trainer import factories
    from distopt.trainer import step as tstep

    with strategy.scope():
        model = factories.build_model(model_name, source)
        optimizer = factories.make_optimizer(config, 10**6)
        optimizer.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64, trainable=False)
        sums = tstep.Sums("sums")
        sink = tf.Variable(
            0.0,
            synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=tf.VariableAggregation.SUM,
        )
    return _State(model, optimizer, step, sums, sink)


def _step_functions(state, jit, replicas):
    """Each in-memory phase's per-replica function, with XLA where it applies.

    Args:
        state: The `_State` the functions train and write.
        jit: Whether the trainer compiles with XLA on this device.
        replicas: The strategy's replicas in sync.

    Returns:
        `forward`, `forward_backward`, `bare_step`, `update` (of the gradients
        it is given) and `grads_of` (a batch's gradients, for that input).
    """
    import tensorflow as tf

    optimizer, sink = state.optimizer, state.sink
    variables = state.model.trainable_variables
    # With XLA, one replica's phases are compiled whole; with several, only
    # the loss and the gradients that the phases call.
    loss_of, grads_of = _loss_and_gradients(state.model, jit and replicas != 1)

    def forward(images, labels):
        sink.assign_add(loss_of(images, labels))

    def forward_backward(images, labels):
        grads = grads_of(images, labels)
        sink.assign_add(tf.add_n([tf.reduce_sum(g) for g in grads]))

    def bare_step(images, labels):
        optimizer.apply_gradients(grads_of(images, labels), variables)

    def update(*grads):
        optimizer.apply_gradients(list(grads), variables)

    if jit and replicas == 1:
        forward = tf.function(forward, jit_compile=True)
        forward_backward = tf.function(forward_backward, jit_compile=True)
        bare_step = tf.function(bare_step, jit_compile=True)
        update = tf.function(update, jit_compile=True)
    return {
        "forward": forward,
        "forward_backward": forward_backward,
        "bare_step": bare_step,
        "update": update,
        "grads_of": grads_of,
    }


def _loss_and_gradients(model, xla):
    """``loss_of`` and ``grads_of`` a batch of ``model``, compiled if ``xla``."""
    import tensorflow as tf

    variables = model.trainable_variables

    def loss_of(images, labels):
        logits = model(images, training=True)
        return tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
        )

    def grads_of(images, labels):
        with tf.GradientTape() as tape:
            # `loss_of` is looked up here at call time: compiled if `xla`.
            loss = loss_of(images, labels)
        return tape.gradient(loss, variables)

    if xla:
        loss_of = tf.function(loss_of, jit_compile=True)
        grads_of = tf.function(grads_of, jit_compile=True)
    return loss_of, grads_of


def _in_memory_loop(strategy, fn, args):
    """``n -> None``: ``n`` steps of ``fn`` on ``args`` in one ``tf.function``."""
    import tensorflow as tf

    @tf.function
    def loop(num_steps):
        for _ in tf.range(num_steps):
            strategy.run(fn, args=args)

    return lambda n: loop(n)


def _pipeline_loop(strategy, feed, inputs, step, sink):
    """``n -> None``: ``n`` batches of the trainer's feed, each barely used."""
    import tensorflow as tf

    def consume(*args):
        images, labels = feed.replica_batch(*args)
        sink.assign_add(tf.cast(labels[0], tf.float32) + images[0, 0, 0, 0])

    @tf.function
    def pipeline(num_steps):
        first = tf.identity(step)
        state = feed.start(first)
        for i in tf.range(num_steps):
            args, state = feed.next(inputs, state, first + tf.cast(i, tf.int64))
            strategy.run(consume, args=args)
        step.assign_add(num_steps)

    return pipeline


def _time_interleaved(loops, state, steps, rounds):
    """Each loop's ms per step: `{name: {"median", "min", "max"}}`.

    Every round runs every loop once, starting one phase further along each
    round, so that a drift in the machine's load hits every phase alike.
    """
    import tensorflow as tf

    def run(name, n):
        loops[name](tf.constant(n, tf.int64))
        float(state.sink.read_value())  # Waits for the loop.
        int(state.step.numpy())

    for name in PHASES:
        run(name, 10)  # Trace, compile, warm up.
    samples = {name: [] for name in PHASES}
    for r in range(rounds):
        order = PHASES[r % len(PHASES) :] + PHASES[: r % len(PHASES)]
        for name in order:
            t = time.perf_counter()
            run(name, steps)
            samples[name].append(1e3 * (time.perf_counter() - t) / steps)
    return {
        name: {"median": statistics.median(s), "min": min(s), "max": max(s)}
        for name, s in samples.items()
    }


def attribute(stats):
    """The step's time by part, ms: `(attribution, notes)`; never negative.

    Args:
        stats: Each phase's `{"median": ms, ...}`.

    Returns:
        The parts (see the module docstring), and a note for each difference
        of medians that came out below 0 and is shown as 0.
    """
    med = {name: s["median"] for name, s in stats.items()}
    differences = {
        "backward": ("forward_backward", "forward"),
        "input_and_bookkeeping": ("trainer_loop", "bare_step"),
    }
    attribution = {"forward": med["forward"], "update": med["update"]}
    notes = []
    for part, (total, base) in differences.items():
        value = med[total] - med[base]
        if value < 0:
            notes.append(
                f"{part}: {total} - {base} = {value:.2f} ms, below 0 within the "
                "rounds' noise; shown as 0"
            )
        attribution[part] = max(value, 0.0)
    attribution["input_pipeline_alone"] = med["pipeline"]
    return attribution, notes


def lenet_kernels(steps, rounds, batch_size=128):
    """ms per call of each LeNet conv/pool kernel, median and min-max over rounds."""
    import numpy as np
    import tensorflow as tf

    from distopt import models, quiet

    model = models.LeNet5(pooling="max_pool2d")
    rng = np.random.default_rng(0)

    def tensor(*shape):
        return tf.constant(rng.standard_normal(shape, dtype=np.float32))

    kernels = {}
    x = tensor(batch_size, 28, 28, 1)
    for name, conv in (("conv1", model.conv1), ("conv2", model.conv2)):
        w = tf.convert_to_tensor(conv.w)
        y = tf.nn.conv2d(x, w, 1, conv.padding)
        dy = tensor(*y.shape)
        pad = conv.padding
        kernels[f"{name} forward"] = lambda x=x, w=w, p=pad: tf.nn.conv2d(x, w, 1, p)
        if name != "conv1":  # The images need no gradient.
            kernels[f"{name} input gradient"] = lambda x=x, w=w, dy=dy, p=pad: (
                tf.raw_ops.Conv2DBackpropInput(
                    input_sizes=tf.shape(x),
                    filter=w,
                    out_backprop=dy,
                    strides=[1, 1, 1, 1],
                    padding=p,
                )
            )
        kernels[f"{name} filter gradient"] = lambda x=x, w=w, dy=dy, p=pad: (
            tf.raw_ops.Conv2DBackpropFilter(
                input=x,
                filter_sizes=tf.shape(w),
                out_backprop=dy,
                strides=[1, 1, 1, 1],
                padding=p,
            )
        )
        pooled = tf.nn.max_pool2d(y, 2, 2, "VALID")
        pool = name.replace("conv", "pool")
        # Forward and gradient together, as in the step: with the forward in
        # the same graph the gradient reuses its workspace (oneDNN); alone,
        # it is several times slower than in training.
        dpool = tensor(*pooled.shape)
        kernels[f"{pool} forward + gradient"] = lambda y=y, d=dpool: (
            tf.raw_ops.MaxPoolGrad(
                orig_input=y,
                orig_output=tf.nn.max_pool2d(y, 2, 2, "VALID"),
                grad=d,
                ksize=[1, 2, 2, 1],
                strides=[1, 2, 2, 1],
                padding="VALID",
            )
        )
        x = pooled

    def loop_of(fn):
        @tf.function
        def loop(n):
            total = tf.constant(0.0)
            for _ in tf.range(n):
                # A one-element read keeps the kernel; it costs next to nothing.
                total += tf.reshape(fn(), [-1])[0]
            return total

        return loop

    # One loop per kernel, each traced once: TensorFlow's retracing warning
    # (it counts traces per code object) would blame the caller.
    with quiet.retracing_of_made_functions_hidden(loop_of):
        loops = {name: loop_of(fn) for name, fn in kernels.items()}
        for loop in loops.values():
            loop(tf.constant(3)).numpy()
        samples = {name: [] for name in loops}
        names = list(loops)
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t = time.perf_counter()
                loops[name](tf.constant(steps)).numpy()
                samples[name].append(1e3 * (time.perf_counter() - t) / steps)
    return {
        name: {"median": statistics.median(s), "min": min(s), "max": max(s)}
        for name, s in samples.items()
    }


def _process_start_time() -> float:
    """Wall-clock time this process started (Linux; else now).

    Each measurement is a fresh ``python`` process started directly by the
    benchmark, so the process's start is the interpreter's.
    """
    try:
        with open("/proc/self/stat") as f:
            # Field 22, after the parenthesised command name: start time in
            # clock ticks since boot.
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return time.time()
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


def startup(model_name, strategy_name, tensorflow_imported):
    """Seconds from process start to the end of each phase (a fresh process).

    ``tensorflow_imported``: ``time.time()`` after ``import tensorflow``.
    """
    import tensorflow as tf

    from distopt import data as data_lib
    from distopt.trainer import config as tconfig
    from distopt.trainer import factories
    from distopt.trainer import inputs as tinputs
    from distopt.trainer import step as tstep

    marks = [("import tensorflow", tensorflow_imported)]
    marks.append(("import distopt", time.time()))

    start = _process_start_time()
    config = tconfig.TrainConfig(
        model=model_name, strategy=strategy_name, train_steps=1, eval_steps=1
    )
    strategy = _setup(strategy_name)
    marks.append(("strategy", time.time()))
    source = data_lib.load_source()
    marks.append(("data", time.time()))
    with strategy.scope():
        model = factories.build_model(model_name, source)
        optimizer = factories.make_optimizer(config, 1)
        optimizer.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64, trainable=False)
        sums = tstep.Sums("sums")
    marks.append(("model and optimizer", time.time()))
    kind = tinputs.resolve_input(config, strategy, source)
    feed = tinputs.make_train_feed(strategy, source, config, kind)
    inputs = feed.inputs()
    marks.append(("input", time.time()))
    loop = tstep.make_train_loop(strategy, model, optimizer, sums, step, feed=feed)
    loop.get_concrete_function(inputs, tf.TensorSpec([], tf.int64))
    marks.append(("trace", time.time()))
    loop(inputs, tf.constant(1, tf.int64))
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


def main(argv=None) -> int:
    """Runs the breakdown (or, with ``--measure_startup``, one start-up).

    Returns:
        The exit status: 1 if every start-up run failed or the results could
        not be written.
    """
    parser = protocol.Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", choices=MODELS, default="lenet", help=", ".join(MODELS)
    )
    parser.add_argument(
        "--strategy", choices=STRATEGIES, default="default", help=", ".join(STRATEGIES)
    )
    positive = protocol.at_least(1)
    parser.add_argument("--steps", type=positive, default=100, help="steps per round")
    parser.add_argument("--rounds", type=positive, default=5, help="interleaved rounds")
    parser.add_argument(
        "--repeats", type=protocol.at_least(0), default=3, help="startup processes"
    )
    parser.add_argument(
        "--startup_only", action="store_true", help="only the time to first step"
    )
    parser.add_argument(
        "--kernels", action="store_true", help="also time LeNet's conv/pool kernels"
    )
    parser.add_output("json", "also write the results here")
    parser.add_argument(
        "--measure_startup", action="store_true", help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.measure_startup:
        # As `python -m distopt.train` does: TensorFlow without matplotlib.
        sys.modules["matplotlib"] = None
        import tensorflow  # noqa: F401

        del sys.modules["matplotlib"]
        protocol.print_result(startup(args.model, args.strategy, time.time()))
        return 0
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
        print("  attribution (ms; see the module docstring):")
        for name, value in phases["attribution_ms"].items():
            print(f"    {name:<22} {value:7.2f}")
        for note in phases["attribution_notes"]:
            print(f"    note: {note}")
    if args.kernels:
        kernels = lenet_kernels(args.steps, args.rounds)
        results["lenet_kernels"] = kernels
        total = sum(k["median"] for k in kernels.values())
        print(
            f"LeNet kernels without XLA, batch 128: ms per call, median (min-max) "
            f"of {args.rounds} interleaved rounds of {args.steps} calls"
        )
        for name, k in kernels.items():
            print(f"  {name:<26} {k['median']:7.3f} ({k['min']:.3f}-{k['max']:.3f})")
        print(f"  {'sum':<26} {total:7.3f}")
        if "step" in results:
            bare = results["step"]["ms_per_step"]["bare_step"]["median"]
            print(f"  {'sum / bare step':<26} {total / bare:7.3f}")
    runs = [
        _startup_in_subprocess(args.model, args.strategy) for _ in range(args.repeats)
    ]
    runs = [r for r in runs if r]
    if args.repeats and protocol.no_results(PROG, runs):
        return 1
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
    return protocol.write_json(PROG, args.json, results)


if __name__ == "__main__":
    sys.exit(main())
