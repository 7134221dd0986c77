"""Test accuracy and gradient bytes of each compressor against no compression.

    python -m distopt.benchmarks.compression_accuracy [--models=mlp,lenet]
        [--replicas=2,4] [--seeds=0,1,2] [--train_steps=1000]
        [--compressors=none,powersgd,topk,onebit,onebit_adam]
        [--warmup_steps=100] [--frozen_epsilon=1e-4] [--optimizer=adam]
        [--learning_rate=1e-3]
        [--output=FILE]

Each run is the real trainer (`python -m distopt.train --strategy=mirrored
--virtual_devices=R`) in a fresh process: Adam at 1e-3 (`--optimizer`,
`--learning_rate`), global batch 128, the same steps and seed for every
contender, so the only difference is the compressor: PowerSGD rank 2, TopK
1%, OneBit, each with error feedback; `onebit_adam` and `topk_adam` are
1-bit Adam's recipe with OneBit or TopK (`--warmup_steps` uncompressed
steps, then Adam's variance frozen and the compressor on, Adam's epsilon
`--frozen_epsilon`; `none_eps` is uncompressed Adam with that epsilon, the
control). Per model x
replicas x compressor it prints the test accuracy over the seeds (median,
min-max), the difference of the median to no compression in points, and
the gradient bytes each replica sends per step over the whole run (the
optimizer's `bytes_sent` counter / steps, warm-up included) with the ratio
to no compression. Runs alternate (each seed is one round over every cell).
The runs' directories are temporary: a failed run's is kept and named at the
end, the others are removed.

Default run: about 110-190 min on this 2-core host (LeNet dominates);
`--models=mlp --replicas=2 --seeds=0 --train_steps=100` takes about 1 min.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile

from absl import flags

from distopt import cli
from distopt.benchmarks import protocol

# Its own FlagValues, parsed by distopt.cli: --help exits 0, a bad flag is one
# line and exit status 2 (absl's app.run exits 1 after --help).
FLAGS = flags.FlagValues()
flags.DEFINE_list("models", ["mlp", "lenet"], "Models to train.", flag_values=FLAGS)
flags.DEFINE_list(
    "replicas", ["2", "4"], "Replica counts (logical CPU devices).", flag_values=FLAGS
)
flags.DEFINE_list(
    "seeds", ["0", "1", "2"], "Seeds; one round of every cell each.", flag_values=FLAGS
)
flags.DEFINE_list(
    "compressors",
    ["none", "powersgd", "topk", "onebit", "onebit_adam"],
    "Contenders.",
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "train_steps", 1000, "Steps of every run.", lower_bound=1, flag_values=FLAGS
)
#: `distopt.optimizers.names()`, the trainer's --optimizer names (a test
#: keeps them equal): importing the registry imports TensorFlow, which this
#: process, only starting trainers, does not otherwise need (seconds).
OPTIMIZERS = (
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "gradient_descent",
    "heun",
    "lamb",
    "lars",
    "lion",
    "momentum",
    "rmsprop",
    "sam",
)
# An unknown name (or a learning rate of 0) failed every run, one by one.
flags.DEFINE_enum(
    "optimizer",
    "adam",
    OPTIMIZERS,
    "The trainer's --optimizer of every run (momentum: heavy ball, 0.9).",
    flag_values=FLAGS,
)
flags.DEFINE_float(
    "learning_rate",
    1e-3,
    "The trainer's --learning_rate (finite and > 0).",
    flag_values=FLAGS,
)
flags.register_validator(
    "learning_rate",
    lambda value: math.isfinite(value) and value > 0,
    message="the trainer's --learning_rate must be finite and > 0",
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "warmup_steps",
    100,
    "onebit_adam, topk_adam: uncompressed steps before Adam's variance is "
    "frozen and compression starts.",
    lower_bound=0,
    flag_values=FLAGS,
)
flags.DEFINE_float(
    "frozen_epsilon",
    1e-4,
    "onebit_adam, topk_adam, none_eps: Adam's epsilon.",
    lower_bound=0.0,
    flag_values=FLAGS,
)
flags.DEFINE_string(
    "output", "", "Also write the runs and the table as JSON here.", flag_values=FLAGS
)

PROG = "distopt.benchmarks.compression_accuracy"
#: The trainer's --batch_size of every run: global, split over the replicas.
BATCH_SIZE = 128

#: Contender -> (--compression, --compression_args, Adam's change): "" none;
#: "epsilon": epsilon `--frozen_epsilon`; "frozen": 1-bit Adam's recipe
#: (Tang et al. 2021), that epsilon and, after `--warmup_steps` uncompressed
#: steps that estimate Adam's variance, the variance frozen (the update
#: becomes linear in the gradient, as error feedback assumes) and the
#: compressor on. The larger epsilon: a frozen v near zero (an input pixel
#: that is almost always 0) would otherwise turn the compressor's uniform
#: magnitudes into huge steps (at 1e-7 the MLP diverged within 150 steps of
#: the warm-up's end, 2026-12-04). `none_eps` is the uncompressed control.
#: A warm-up of W of S steps sends 1/(W/S + (1 - W/S) x the compressed
#: fraction) of the bytes.
COMPRESSORS = {
    "none": (None, "", ""),
    "powersgd": ("powersgd", "rank=2", ""),
    "topk": ("topk", "fraction=0.01", ""),
    "onebit": ("onebit", "", ""),
    "onebit_adam": ("onebit", "", "frozen"),
    "topk_adam": ("topk", "fraction=0.01", "frozen"),
    "none_eps": (None, "", "epsilon"),
}
protocol.check_items(FLAGS, "compressors", list(COMPRESSORS))
protocol.check_items(FLAGS, "models", ["mlp", "lenet"])
protocol.check_items(FLAGS, "replicas", minimum=1)


def _check_replicas(values) -> bool:
    """Every --replicas count splits the global batch, as the trainer needs.

    One that does not failed every run of it, one by one, each after
    starting a trainer.
    """
    for value in values or ():
        try:
            replicas = int(value)
        except ValueError:
            continue  # check_items says so.
        if replicas >= 1 and BATCH_SIZE % replicas:
            raise flags.ValidationError(
                f"{value!r} does not divide the global batch of {BATCH_SIZE} "
                "(the trainer needs the same batch on each replica)"
            )
    return True


flags.register_validator("replicas", _check_replicas, flag_values=FLAGS)
protocol.check_items(FLAGS, "seeds", minimum=0)


def _contender_flags(name) -> list[str]:
    """The trainer flags of contender `name`."""
    compression, args, adam = COMPRESSORS[name]
    optimizer_args = [f"epsilon={FLAGS.frozen_epsilon}"] if adam else []
    if adam == "frozen":
        optimizer_args.append(f"freeze_variance_step={FLAGS.warmup_steps}")
        args = ",".join(filter(None, [args, f"start_step={FLAGS.warmup_steps}"]))
    out = [f"--compression={compression}"] if compression else []
    if args:
        out.append(f"--compression_args={args}")
    if optimizer_args:
        out.append(f"--optimizer_args={','.join(optimizer_args)}")
    return out


def run_once(model, replicas, compressor, seed, workdir) -> dict | None:
    """One trainer run; its test accuracy and bytes sent per step."""
    model_dir = os.path.join(workdir, f"{model}_{replicas}_{compressor}_{seed}")
    cmd = [
        sys.executable,
        "-m",
        "distopt.train",
        f"--model={model}",
        "--strategy=mirrored",
        f"--virtual_devices={replicas}",
        f"--optimizer={FLAGS.optimizer}",
        f"--learning_rate={FLAGS.learning_rate}",
        f"--batch_size={BATCH_SIZE}",
        f"--train_steps={FLAGS.train_steps}",
        f"--seed={seed}",
        "--eval_every=0",
        "--checkpoint_every=0",
        f"--model_dir={model_dir}",
        *_contender_flags(compressor),
    ]
    proc = protocol.run_child(cmd)
    path = os.path.join(model_dir, "metrics.json")
    if proc.returncode != 0 or not os.path.exists(path):
        print(f"{model_dir} failed (kept):\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    with open(path) as f:
        m = json.load(f)
    # Its checkpoints and summaries, up to 80 MB a run: they were all left
    # in the temporary directory.
    shutil.rmtree(model_dir, ignore_errors=True)
    return {
        "model": model,
        "replicas": int(replicas),
        "compressor": compressor,
        "seed": int(seed),
        "accuracy": m["test_accuracy"],
        "bytes_per_step": m["communication_bytes_sent"] / m["train_steps"],
    }


def table(runs) -> list[dict]:
    """One row per model x replicas x compressor, against no compression."""
    rows = []
    cells = sorted({(r["model"], r["replicas"]) for r in runs})
    for model, replicas in cells:
        base = None
        for name in COMPRESSORS:
            rs = [
                r
                for r in runs
                if (r["model"], r["replicas"], r["compressor"])
                == (model, replicas, name)
            ]
            if not rs:
                continue
            acc = protocol.stats([100 * r["accuracy"] for r in rs])
            sent = protocol.stats([r["bytes_per_step"] for r in rs])["median"]
            if name == "none":
                base = (acc["median"], sent)
            rows.append(
                {
                    "model": model,
                    "replicas": replicas,
                    "compressor": name,
                    "accuracy": acc,
                    "points_vs_none": acc["median"] - base[0] if base else None,
                    "bytes_per_step": sent,
                    "fewer_bytes": base[1] / sent if base and sent else None,
                }
            )
    return rows


def print_table(rows) -> None:
    print(
        f"{'model':6} {'R':>2} {'compressor':10} {'accuracy % median (min-max)':>30}"
        f" {'vs none':>8} {'bytes/step':>11} {'x fewer':>8}"
    )
    for r in rows:
        a = r["accuracy"]
        diff = "" if r["points_vs_none"] is None else f"{r['points_vs_none']:+.2f}"
        fewer = "" if r["fewer_bytes"] is None else f"{r['fewer_bytes']:.1f}"
        print(
            f"{r['model']:6} {r['replicas']:>2} {r['compressor']:10} "
            f"{a['median']:>12.2f} ({a['min']:.2f}-{a['max']:.2f}, n={a['n']})"
            f" {diff:>8} {r['bytes_per_step']:>11.0f} {fewer:>8}"
        )


def _run_all(workdir) -> list[dict]:
    """Every run, each in its own directory under ``workdir``."""
    runs = []
    for seed in FLAGS.seeds:
        for model in FLAGS.models:
            for replicas in FLAGS.replicas:
                for name in FLAGS.compressors:
                    r = run_once(model, replicas, name, seed, workdir)
                    print(f"{model} R={replicas} {name} seed {seed}: {r}", flush=True)
                    if r:
                        runs.append(r)
    return runs


def _remove_unless_failed(workdir) -> None:
    """Removes ``workdir``, or says where the failed runs' directories are.

    A successful run's directory goes as soon as its metrics are read; a
    failed one's stays, for its logs and checkpoints (its stderr's tail alone
    may not say why).
    """
    if os.listdir(workdir):
        print(f"{PROG}: the failed runs' directories are in {workdir}", file=sys.stderr)
    else:
        os.rmdir(workdir)


def main(argv=None) -> int:
    status = cli.parse(PROG, __doc__, FLAGS, argv)
    if status is not None:
        return status
    why = protocol.check_output(FLAGS.output, "output")
    if why:
        return cli.error(PROG, why)
    workdir = tempfile.mkdtemp(prefix="compression_accuracy_")
    try:
        runs = _run_all(workdir)
    except BaseException:
        # Stopped (run_children's SIGTERM or SIGINT exit, a KeyboardInterrupt)
        # or broken: nothing in it is wanted.
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    _remove_unless_failed(workdir)
    if protocol.no_results(PROG, runs):
        return 1
    rows = table(runs)
    print_table(rows)
    return protocol.write_json(PROG, FLAGS.output, {"runs": runs, "table": rows})


if __name__ == "__main__":
    sys.exit(main())
