"""What compression costs in computation, against the bytes it saves.

    python -m distopt.benchmarks.compression_cost [--replicas=4] [--steps=30]
        [--repeats=3] [--compressors=none,powersgd,topk,onebit]

PyTorch users found that compressing can cost more time than it saves
(pytorch#65813). This measures one step of `apply_gradients` (plain gradient
descent, so the update itself is cheap) on the MLP's gradient shapes
(784x700, 700, 700x500, 500, 500x10, 10; each replica a different random
gradient) under MirroredStrategy on `--replicas` logical CPUs, where moving
bytes between devices is a memory copy: the time over the uncompressed step
is the compressors' own work (compress, decompress, residuals). Each
contender runs in a fresh process, contenders alternate, `--repeats` times.

For each compressor it prints the median (min-max) step time, the overhead
over `none`, the bytes each replica sends per step on a ring (from the
optimizer's counters: 2 (R-1)/R of each all-reduce's buffer, (R-1)/R of each
all-gather's gathered bytes), and the break-even link rate: below it the
bytes saved take longer to send than the compression takes to compute, so
compression pays on slower links. Default run: about 2-4 min on this 2-core
host.

Compressors: powersgd (rank 2), topk (fraction 0.01), onebit.
"""

from __future__ import annotations

import sys
import time

from absl import flags

from distopt import cli
from distopt.benchmarks import protocol

# Its own FlagValues, parsed by distopt.cli: --help exits 0, a bad flag is one
# line and exit status 2 (absl's app.run exits 1 after --help).
FLAGS = flags.FlagValues()
flags.DEFINE_list(
    "compressors",
    ["none", "powersgd", "topk", "onebit"],
    "Contenders to measure.",
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "replicas", 4, "Logical CPU devices (replicas).", lower_bound=1, flag_values=FLAGS
)
flags.DEFINE_integer(
    "steps",
    30,
    "Timed steps per run (after 3 warm-up steps).",
    lower_bound=1,
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "repeats",
    3,
    "Runs per contender (fresh processes).",
    lower_bound=1,
    flag_values=FLAGS,
)
flags.DEFINE_string(
    "measure", "", "Internal: the compressor one run measures.", flag_values=FLAGS
)
flags.DEFINE_string(
    "output", "", "Also write the results as JSON to this file.", flag_values=FLAGS
)

PROG = "distopt.benchmarks.compression_cost"
SHAPES = [(784, 700), (700,), (700, 500), (500,), (500, 10), (10,)]
ARGS = {"powersgd": {"rank": 2}, "topk": {"fraction": 0.01}, "onebit": {}}
protocol.check_items(FLAGS, "compressors", ["none", *ARGS])


def _measure(name: str) -> dict:
    from distopt import quiet

    quiet.import_tensorflow()
    import numpy as np
    import tensorflow as tf

    import distopt
    from distopt import distribute

    strategy = distribute.make_strategy("mirrored", num_cpu_devices=FLAGS.replicas)
    compression = (
        None if name == "none" else distopt.compression.get(name, **ARGS[name])
    )
    with strategy.scope():
        variables = [tf.Variable(tf.zeros(s)) for s in SHAPES]
        opt = distopt.optimizers.GradientDescent(0.0, compression=compression)

    def replica_step():
        r = tf.distribute.get_replica_context().replica_id_in_sync_group
        grads = [
            tf.random.stateless_normal(v.shape, (r, i)) for i, v in enumerate(variables)
        ]
        opt.apply_gradients(grads, variables)

    step = tf.function(lambda: strategy.run(replica_step))
    for _ in range(3):
        step()
    float(opt.iterations)
    before = opt.reducer.counters()
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
        step()
    float(opt.iterations)
    seconds = (time.perf_counter() - start) / FLAGS.steps
    after = opt.reducer.counters()
    per_step = {k: (after[k] - before[k]) / FLAGS.steps for k in after}
    n = FLAGS.replicas
    ring = (
        2 * (n - 1) / n * per_step["allreduce_bytes"]
        + (n - 1) / n * per_step["allgather_bytes"]
    )
    del np
    return {
        "compressor": name,
        "step_ms": 1000 * seconds,
        "counters": per_step,
        "ring_bytes": ring,
    }


def _summary(results):
    by = {c: [r for r in results if r["compressor"] == c] for c in FLAGS.compressors}
    base = protocol.stats(r["step_ms"] for r in by.get("none", []))
    rows = []
    for c, runs in by.items():
        if not runs:
            continue
        step = protocol.stats(r["step_ms"] for r in runs)
        row = {
            "compressor": c,
            "step_ms": step,
            "ring_bytes": runs[0]["ring_bytes"],
            "bytes_sent": runs[0]["counters"]["bytes_sent"],
        }
        if base and c != "none":
            overhead = step["median"] - base["median"]
            saved = by["none"][0]["ring_bytes"] - row["ring_bytes"]
            row["overhead_ms"] = overhead
            row["ratio_bytes_sent"] = by["none"][0]["counters"]["bytes_sent"] / max(
                row["bytes_sent"], 1
            )
            # Sending `saved` bytes at this rate takes as long as compressing.
            row["break_even_mbit"] = (
                saved * 8 / (overhead / 1000) / 1e6 if overhead > 0 else float("inf")
            )
        rows.append(row)
    return rows


def _print(rows):
    print(
        f"{'compressor':<10}{'step ms (min-max)':>22}{'overhead ms':>12}"
        f"{'ring KB/step':>14}{'bytes_sent x':>14}{'pays below':>16}"
    )
    for r in rows:
        s = r["step_ms"]
        over = f"{r['overhead_ms']:.1f}" if "overhead_ms" in r else "-"
        ratio = f"{r['ratio_bytes_sent']:.0f}" if "ratio_bytes_sent" in r else "-"
        be = f"{r['break_even_mbit']:.0f} Mbit/s" if "break_even_mbit" in r else "-"
        print(
            f"{r['compressor']:<10}"
            f"{s['median']:>9.1f} ({s['min']:.1f}-{s['max']:.1f})"
            f"{over:>12}{r['ring_bytes'] / 1024:>14.1f}{ratio:>14}{be:>16}"
        )


def main(argv=None) -> int:
    status = cli.parse(PROG, __doc__, FLAGS, argv)
    if status is not None:
        return status
    if FLAGS.measure:
        protocol.print_result(_measure(FLAGS.measure))
        return 0
    # Written after every run: a bad path must fail first (os.access, used
    # here before, says yes to root even for /proc).
    why = protocol.check_output(FLAGS.output, "output")
    if why:
        return cli.error(PROG, why)
    results = []
    for rep in range(FLAGS.repeats):
        for name in FLAGS.compressors:
            label = f"{name} run {rep + 1}"
            print(f"[{time.strftime('%H:%M:%S')}] {label}", file=sys.stderr, flush=True)
            r = protocol.measure_in_subprocess(
                "distopt.benchmarks.compression_cost",
                [
                    f"--measure={name}",
                    f"--replicas={FLAGS.replicas}",
                    f"--steps={FLAGS.steps}",
                ],
                label,
            )
            if r:
                results.append(r)
    if protocol.no_results(PROG, results):
        return 1
    rows = _summary(results)
    _print(rows)
    return protocol.write_json(PROG, FLAGS.output, {"runs": results, "summary": rows})


if __name__ == "__main__":
    sys.exit(main())
