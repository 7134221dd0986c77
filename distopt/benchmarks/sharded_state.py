"""Memory and step time of sharded optimizer state (ZeRO-1) against unsharded.

    python -m distopt.benchmarks.sharded_state [--models=mlp,dense50m]
        [--devices=4] [--steps=10] [--repeats=3]

For each model, Adam with `shard_state=False` and `shard_state=True` train on
`--devices` logical CPUs (MirroredStrategy with ReductionToOneDevice, as the
trainer's CPU `mirrored`), each run in a fresh process, the two alternating,
`--repeats` times. Each run reports:

* the optimizer state per device, read from the variables'
  (`opt.state_bytes_per_device()`);
* the process's peak resident memory (`ru_maxrss`) before the optimizer is
  built and after the steps, and their difference: what training added;
* the median step time after 2 warm-up steps.

The summary gives medians and min-max over the repeats, the drop in peak
memory against the unsharded slot bytes x (1 - 1/N) (issue 24's measure), and
the step-time ratio sharded / unsharded.

Models: `mlp` (784-700-500-10, 0.9M parameters) and `dense50m` (four
3,584 x 3,584 layers after a 1,024 x 3,584 one, 55M parameters).

Default run: about 4-20 min on this 2-core host (dense50m dominates: about
2 s per step with 4 devices when the host is quiet; 20 min when loaded).
"""

from __future__ import annotations

import itertools
import resource
import sys
import time

from absl import flags

from distopt import cli
from distopt.benchmarks import protocol

# Its own FlagValues, parsed by distopt.cli: --help exits 0, a bad flag is one
# line and exit status 2 (absl's app.run exits 1 after --help).
FLAGS = flags.FlagValues()
flags.DEFINE_list(
    "models",
    ["mlp", "dense50m"],
    "Models to measure: mlp, dense50m.",
    flag_values=FLAGS,
)
# At least 2: sharding over 1 device saves nothing (its ideal saving, the
# summary's denominator, is 0).
flags.DEFINE_integer(
    "devices", 4, "Logical CPU devices (replicas).", lower_bound=2, flag_values=FLAGS
)
flags.DEFINE_integer(
    "steps",
    10,
    "Timed steps per run (after 2 warm-up steps).",
    lower_bound=1,
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "repeats",
    3,
    "Runs per contender (fresh processes, alternating).",
    lower_bound=1,
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "batch_size", 16, "Examples per replica per step.", lower_bound=1, flag_values=FLAGS
)
flags.DEFINE_string(
    "measure", "", "Internal: 'model,sharded' runs one measurement.", flag_values=FLAGS
)
flags.DEFINE_string(
    "output", "", "Also write the results as JSON to this file.", flag_values=FLAGS
)

PROG = "distopt.benchmarks.sharded_state"
LAYERS = {
    "mlp": [784, 700, 500, 10],
    "dense50m": [1024, 3584, 3584, 3584, 3584, 3584, 10],
}
protocol.check_items(FLAGS, "models", list(LAYERS))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _measure(model: str, sharded: bool) -> dict:
    """One run: build, train `--steps`, report memory and time."""
    from distopt import quiet

    quiet.import_tensorflow()
    import numpy as np
    import tensorflow as tf

    import distopt
    from distopt import distribute

    strategy = distribute.make_strategy("mirrored", num_cpu_devices=FLAGS.devices)
    sizes = LAYERS[model]
    rng = np.random.default_rng(0)
    with strategy.scope():
        weights = [
            tf.Variable(rng.normal(0, 0.02, (a, b)).astype(np.float32))
            for a, b in itertools.pairwise(sizes)
        ]
        opt = distopt.optimizers.Adam(1e-4, shard_state=sharded)
    n_params = sum(int(w.shape.num_elements()) for w in weights)
    x = tf.random.stateless_normal([FLAGS.batch_size, sizes[0]], (1, 2))
    y = tf.random.stateless_uniform([FLAGS.batch_size], (3, 4), 0, 10, tf.int32)

    def replica_step():
        with tf.GradientTape() as tape:
            h = x
            for w in weights[:-1]:
                h = tf.nn.relu(h @ w)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(y, h @ weights[-1])
            )
        opt.apply_gradients(tape.gradient(loss, weights), weights)

    step = tf.function(lambda: strategy.run(replica_step))
    rss_before = _peak_rss_mb()
    times = []
    for i in range(FLAGS.steps + 2):
        start = time.perf_counter()
        step()
        float(opt.iterations)  # Waits for the step.
        if i >= 2:
            times.append(time.perf_counter() - start)
    state = opt.state_bytes_per_device()
    return {
        "model": model,
        "sharded": sharded,
        "parameters": n_params,
        "state_bytes_per_device": state,
        "rss_before_mb": rss_before,
        "rss_peak_mb": _peak_rss_mb(),
        "step_ms": 1000 * float(np.median(times)),
    }


def _summary(results: list[dict], devices: int) -> list[dict]:
    rows = []
    for model in FLAGS.models:
        runs = {
            s: [r for r in results if r["model"] == model and r["sharded"] == s]
            for s in (False, True)
        }
        if not runs[False] or not runs[True]:
            continue
        added = {
            s: protocol.stats(r["rss_peak_mb"] - r["rss_before_mb"] for r in runs[s])
            for s in runs
        }
        state = {s: max(runs[s][0]["state_bytes_per_device"].values()) for s in runs}
        step = {s: protocol.stats(r["step_ms"] for r in runs[s]) for s in runs}
        # The slots' bytes on all devices, of which sharding keeps 1/N.
        slots_mb = devices * state[False] / 2**20
        saved = added[False]["median"] - added[True]["median"]
        rows.append(
            {
                "model": model,
                "parameters": runs[False][0]["parameters"],
                "state_mb_per_device": {str(s): state[s] / 2**20 for s in state},
                "added_rss_mb": {str(s): added[s] for s in added},
                "rss_drop_mb": saved,
                "rss_drop_over_ideal": saved / (slots_mb * (1 - 1 / devices)),
                "step_ms": {str(s): step[s] for s in step},
                "step_ratio_sharded": step[True]["median"] / step[False]["median"],
            }
        )
    return rows


def _print(rows):
    print(
        f"{'model':<10}{'params':>11}{'state/dev MB':>22}{'RSS added MB (min-max)':>46}"
        f"{'drop/ideal':>11}{'step ms':>26}{'ratio':>7}"
    )
    for r in rows:
        st = r["state_mb_per_device"]
        a = r["added_rss_mb"]
        s = r["step_ms"]
        fmt = lambda x: f"{x['median']:.0f} ({x['min']:.0f}-{x['max']:.0f})"
        print(
            f"{r['model']:<10}{r['parameters']:>11,}"
            f"{st['False']:>10.1f} ->{st['True']:>8.1f}"
            f"{fmt(a['False']):>22} ->{fmt(a['True']):>20}"
            f"{r['rss_drop_over_ideal']:>11.2f} "
            f"{fmt(s['False']):>12} ->{fmt(s['True']):>12}{r['step_ratio_sharded']:>7.2f}"
        )


def main(argv=None) -> int:
    status = cli.parse(PROG, __doc__, FLAGS, argv)
    if status is not None:
        return status
    if FLAGS.measure:
        model, sharded = FLAGS.measure.split(",")
        protocol.print_result(_measure(model, sharded == "1"))
        return 0
    why = protocol.check_output(FLAGS.output, "output")
    if why:
        return cli.error(PROG, why)
    results = []
    for rep in range(FLAGS.repeats):
        for model in FLAGS.models:
            for sharded in (False, True):
                label = f"{model} sharded={sharded} run {rep + 1}"
                print(
                    f"[{time.strftime('%H:%M:%S')}] {label}",
                    file=sys.stderr,
                    flush=True,
                )
                r = protocol.measure_in_subprocess(
                    "distopt.benchmarks.sharded_state",
                    [
                        f"--measure={model},{int(sharded)}",
                        f"--devices={FLAGS.devices}",
                        f"--steps={FLAGS.steps}",
                        f"--batch_size={FLAGS.batch_size}",
                    ],
                    label,
                )
                if r:
                    results.append(r)
    if protocol.no_results(PROG, results):
        return 1
    rows = _summary(results, FLAGS.devices)
    _print(rows)
    return protocol.write_json(PROG, FLAGS.output, {"runs": results, "summary": rows})


if __name__ == "__main__":
    sys.exit(main())
