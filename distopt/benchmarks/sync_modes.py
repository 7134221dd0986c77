"""Communication and speed of each sync mode on 2 localhost workers (the MLP).

    python -m distopt.benchmarks.sync_modes [--steps=80] [--batch_size=128]

Default run: about 30-90 s on this 2-core host (30 s quiet, 2026-12-05;
1.5 min with other jobs on the machine).

Starts 2 worker processes of this module with TF_CONFIG on free localhost
ports (MultiWorkerMirroredStrategy, one CPU device each). Each trains the MLP
(784-700-500-10) with Adam for the same number of steps under every mode and
reports, from the optimizer's own run-time counters (not assumed):

* all-reduce calls and payload bytes per step and per applied update;
* bytes sent per step: what each replica puts into its all-reduces and
  all-gathers (the compressors gather their payloads: top-k's values and
  indices, 1-bit's packed signs);
* steps per second, measured after a warm-up, as a ratio to every-step sync
  in the same run.

The compressors (`distopt.compression`) are rows of every-step sync: each
step still communicates, but less (PowerSGD rank 2, top-k 1%, 1-bit).
Payload bytes are what each replica contributes to an all-reduce (the packed
buffer); the wire traffic of a ring all-reduce is about twice that.
"""

from __future__ import annotations

import math
import os
import sys
import time

from distopt import cluster
from distopt.benchmarks import protocol

PROG = "distopt.benchmarks.sync_modes"
WORKERS = 2

#: (row label, sync mode, its arguments, compression). A later mode or
#: compressor joins the table by adding one row.
MODES = [
    ("every_step", "every_step", {}, None),
    ("accumulate", "accumulate", {"k": 8}, None),
    ("local_sgd", "local_sgd", {"k": 8}, None),
    ("diloco", "diloco", {"k": 8}, None),
    ("powersgd", "every_step", {}, {"name": "powersgd", "rank": 2}),
    ("topk", "every_step", {}, {"name": "topk", "fraction": 0.01}),
    ("onebit", "every_step", {}, {"name": "onebit"}),
]
#: The timed steps are a multiple of every mode's sync period k: then each
#: window of them holds exactly steps / k syncs whatever the warm-up, and the
#: per-step figures are exact. Fewer steps than k measured no sync at all
#: (0 bytes, a 12x "speed-up"); 12 steps of k = 8 one sync in 12 steps.
PERIOD = math.lcm(*(kwargs.get("k", 1) for _, _, kwargs, _ in MODES))
PERIODIC = ", ".join(label for label, _, kwargs, _ in MODES if kwargs.get("k", 1) > 1)


def _compressor(spec):
    """A fresh compressor from a `MODES` entry (each holds its own state)."""
    import distopt

    if spec is None:
        return None
    spec = dict(spec)
    return distopt.compression.get(spec.pop("name"), **spec)


def _make_run(strategy, model, opt, images, labels):
    """``run(n)``: n training steps of ``model`` with ``opt`` in one function."""
    import tensorflow as tf

    variables = model.trainable_variables

    def replica_step():
        with tf.GradientTape() as tape:
            logits = model(images)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
            )
        opt.apply_gradients(tape.gradient(loss, variables), variables)

    @tf.function
    def run(n):
        for _ in tf.range(n):
            strategy.run(replica_step)

    return run


def _worker(index, ports, steps, batch_size, warmup):
    os.environ["TF_CONFIG"] = cluster.localhost_tf_config(ports, index)
    import numpy as np
    import tensorflow as tf

    import distopt
    from distopt import distribute, models

    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=120)
    strategy = distribute.make_strategy("multi_worker", communication_options=options)
    rng = np.random.default_rng(index)
    per_replica = batch_size // strategy.num_replicas_in_sync
    images = tf.constant(rng.random((per_replica, 28, 28, 1), dtype=np.float32))
    labels = tf.constant(rng.integers(0, 10, per_replica))
    results = {}
    for label, mode, kwargs, compression in MODES:
        with strategy.scope():
            model = models.build_model("mlp", seed=0)
            opt = distopt.optimizers.get(
                "adam",
                learning_rate=1e-3,
                sync=distopt.sync.get(mode, **kwargs),
                compression=_compressor(compression),
                communication_options=options,
            )
            # Slots and counters exist before the first trace: variables
            # created inside a tf.function under MultiWorkerMirroredStrategy
            # fail at run time ("must feed a value for placeholder").
            opt.build(model.trainable_variables)
        variables = model.trainable_variables
        run = _make_run(strategy, model, opt, images, labels)
        run(tf.constant(warmup, tf.int64))
        calls0, bytes0 = (
            int(opt.allreduce_calls.numpy()),
            int(opt.allreduce_bytes.numpy()),
        )
        sent0 = int(opt.reducer.bytes_sent.numpy())
        updates0 = int(opt.iterations.numpy())
        start = time.perf_counter()
        run(tf.constant(steps, tf.int64))
        opt.allreduce_calls.numpy()  # waits for the run to finish
        seconds = time.perf_counter() - start
        calls = int(opt.allreduce_calls.numpy()) - calls0
        nbytes = int(opt.allreduce_bytes.numpy()) - bytes0
        sent = int(opt.reducer.bytes_sent.numpy()) - sent0
        updates = int(opt.iterations.numpy()) - updates0
        results[label] = {
            "k": kwargs.get("k", 1),
            "steps": steps,
            "applied_updates": updates,
            "allreduce_calls": calls,
            "allreduce_calls_per_step": calls / steps,
            "payload_bytes_per_step": nbytes / steps,
            "payload_bytes_per_update": nbytes / max(updates, 1),
            "bytes_sent_per_step": sent / steps,
            "steps_per_second": steps / seconds,
            "parameters": sum(int(v.shape.num_elements()) for v in variables),
        }
    if index == 0:
        protocol.print_result(results)


def main(argv):
    import argparse

    parser = protocol.Parser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps",
        type=protocol.multiple_of(PERIOD, f"the sync period of {PERIODIC}"),
        default=80,
        help=f"timed steps per mode, a multiple of {PERIOD} (the k of {PERIODIC})",
    )
    parser.add_argument(
        "--warmup", type=protocol.at_least(0), default=16, help="untimed steps per mode"
    )
    # Split evenly over the workers: 1 gave each 0 examples, reported as
    # "global batch 1"; an odd size dropped one.
    parser.add_argument(
        "--batch_size",
        type=protocol.multiple_of(WORKERS, "the workers"),
        default=128,
        help=f"global batch, a multiple of {WORKERS}",
    )
    parser.add_output("json", "write the results to this file")
    parser.add_argument("--worker_index", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ports", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_index is not None:
        ports = [int(p) for p in args.ports.split(",")]
        return _worker(
            args.worker_index, ports, args.steps, args.batch_size, args.warmup
        )

    ports = cluster.free_ports(WORKERS)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [
        sys.executable,
        "-m",
        "distopt.benchmarks.sync_modes",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--batch_size={args.batch_size}",
        f"--ports={','.join(map(str, ports))}",
    ]
    print(f"starting {WORKERS} workers on localhost ports {ports} ...", flush=True)
    procs = protocol.run_children(
        [cmd + [f"--worker_index={i}"] for i in range(WORKERS)],
        env=env,
        merge_stderr=True,
        timeout=1800,
    )
    if any(p.returncode for p in procs):
        for i, p in enumerate(procs):
            print(f"--- worker {i} (exit {p.returncode})\n{p.stdout[-3000:]}")
        return 1
    results = protocol.parse_result(procs[0].stdout)
    base = results["every_step"]["steps_per_second"]
    print(
        f"\nMLP, Adam, global batch {args.batch_size}, {WORKERS} workers x 1 CPU, "
        f"{args.steps} timed steps per mode"
    )
    print(
        f"{'mode':<12}{'k':>3}{'calls/step':>12}{'bytes/step':>14}{'bytes/update':>14}"
        f"{'sent/step':>12}{'steps/s':>10}{'vs every':>10}"
    )
    for mode, r in results.items():
        print(
            f"{mode:<12}{r['k']:>3}{r['allreduce_calls_per_step']:>12.3f}"
            f"{r['payload_bytes_per_step']:>14,.0f}{r['payload_bytes_per_update']:>14,.0f}"
            f"{r['bytes_sent_per_step']:>12,.0f}{r['steps_per_second']:>10.1f}{r['steps_per_second'] / base:>9.2f}x"
        )
    return protocol.write_json(PROG, args.json, results)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
