r"""Trains MLP or LeNet-5 on MNIST (or a TFDS image dataset) under any strategy.

    python -m distopt.train --flagfile=configs/lenet_mnist.cfg
    python -m distopt.train --model=mlp --epochs=10 --strategy=mirrored \
        --virtual_devices=2 --model_dir=runs/mlp

Works offline from a fresh clone (MNIST is bundled). Resumes automatically
from the latest checkpoint in --model_dir. Writes TensorBoard scalars there,
and model_dir/metrics.json at the end. See launch/README.md for multi-worker,
Slurm, Kubernetes and TPU runs.
"""

import time

# The user's clock starts here, the interpreter's first milliseconds: the time
# to the first step counts from it (the OS process may be older: a shell that
# exec'd Python after other work).
_STARTED = time.time()

import glob
import logging as std_logging
import os
import re
import shutil
import sys

from absl import app, flags, logging

from distopt import quiet, stop_notice

# No TensorFlow yet: the flags are checked and the run directory is created
# first (see main). These two modules import none.
from distopt.trainer import config as config_lib
from distopt.trainer import paths

FLAGS = flags.FLAGS
_DEFAULTS = config_lib.TrainConfig()

# What to train.
flags.DEFINE_string("model", _DEFAULTS.model, "Model: mlp or lenet.")
flags.DEFINE_string(
    "model_args",
    "",
    "More model constructor arguments, key=value,... (e.g. "
    "conv2_padding=SAME for lenet); a list in brackets, e.g. "
    "hidden=[256,128] for the mlp's hidden layer widths (quote it in zsh).",
)
flags.DEFINE_string(
    "dataset",
    _DEFAULTS.dataset,
    "Dataset name. mnist is bundled (offline); any other name (e.g. "
    "fashion_mnist) is read through TensorFlow Datasets.",
)
flags.DEFINE_string(
    "data_dir",
    None,
    "Directory holding the four MNIST IDX .gz files, or prepared TFDS data "
    "(then TFDS is used). It must exist. Default: the bundled MNIST files for "
    "mnist, TFDS's data directory for other datasets.",
)
flags.DEFINE_boolean(
    "download",
    False,
    "Let TensorFlow Datasets download and prepare a dataset that --data_dir "
    "(or TFDS's data directory) does not hold yet. Off: such a run stops with "
    "an error before any work.",
)
flags.DEFINE_enum(
    "data_source",
    _DEFAULTS.data_source,
    ["auto", "bundled", "tfds"],
    "Where to read data: auto (see --data_dir), bundled (the IDX files "
    "shipped with distopt) or tfds (TensorFlow Datasets; see --download).",
)
flags.DEFINE_enum(
    "input",
    _DEFAULTS.input,
    ["auto", "memory", "dataset"],
    "How training batches reach the replicas: memory (the split is copied "
    "once to every replica's device and each step gathers its batch there; "
    "in-memory data such as bundled MNIST, single-host strategies only), "
    "dataset (a tf.data pipeline) or auto (memory where it applies).",
)

# Where to run.
flags.DEFINE_string(
    "strategy",
    _DEFAULTS.strategy,
    "Distribution strategy: default, one_device, mirrored (all local GPUs, or "
    "--virtual_devices CPUs), multi_worker (TF_CONFIG or Slurm) or tpu.",
)
flags.DEFINE_integer(
    "virtual_devices",
    0,
    "Split the host CPU into this many logical devices (CPU-only hosts). "
    f"0: {config_lib.DEFAULT_CPU_VIRTUAL_DEVICES}. --strategy=mirrored only.",
)
flags.DEFINE_string(
    "tpu", "", "TPU for --strategy=tpu: a name, grpc:// address or 'local'."
)
flags.DEFINE_float(
    "communication_timeout",
    _DEFAULTS.communication_timeout,
    "multi_worker: seconds before any one collective fails. 0 (the default): "
    "no limit; a dead or hung worker still stops the job within about 15 s "
    "(TensorFlow's heartbeats). A limit parks one thread per collective for "
    "that long: long runs then exhaust the threads a process may have.",
)
flags.DEFINE_integer(
    "slurm_port_base",
    _DEFAULTS.slurm_port_base,
    "multi_worker under Slurm: first port of the workers' servers on each node.",
)

# Optimization.
flags.DEFINE_string(
    "optimizer",
    _DEFAULTS.optimizer,
    "Optimizer name: adagrad, adam, adamax, adamw, gradient_descent, heun, lamb, lars, "
    "lion, momentum, rmsprop or sam. heun and sam evaluate the loss twice per "
    "step. sam wraps a base optimizer: --optimizer_args=base_optimizer=NAME "
    "(default adam), with --rho (the perturbation radius) and "
    "perturbation=replica|aggregated as SAM's own arguments and all other "
    "hyperparameters (--learning_rate included) the base optimizer's.",
)
flags.DEFINE_float("learning_rate", _DEFAULTS.learning_rate, "Peak learning rate.")
flags.DEFINE_enum(
    "lr_schedule",
    _DEFAULTS.lr_schedule,
    list(config_lib.LR_SCHEDULES),
    "Learning-rate schedule (over the whole run unless --decay_steps).",
)
flags.DEFINE_integer(
    "warmup_steps", 0, "Linear learning-rate warmup from 0 over this many updates."
)
flags.DEFINE_integer(
    "decay_steps",
    0,
    "exponential: steps per decay_rate factor; cosine: steps from peak to the "
    "end. 0: the whole run (after warmup).",
)
flags.DEFINE_float(
    "decay_rate", _DEFAULTS.decay_rate, "exponential: factor per decay_steps."
)
flags.DEFINE_list("lr_boundaries", [], "piecewise: update counts where lr changes.")
flags.DEFINE_list(
    "lr_values", [], "piecewise: learning rates (one more than boundaries)."
)
# Optimizer hyperparameters: passed on only when set, so each optimizer keeps
# its own defaults.
_HYPER_FLOATS = {
    "beta_1": "adam, adamw, lamb, lion: first-moment decay.",
    "beta_2": "adam, adamw, lamb, lion: second-moment decay.",
    "epsilon": "adam, adamw, lamb, rmsprop, adagrad: numerical stabiliser.",
    "momentum": "momentum, rmsprop, lars: momentum coefficient.",
    "weight_decay": "Decoupled weight decay (adamw default 0.004; lars: its own).",
    "rho": "rmsprop: decay of the squared-gradient average; sam: the "
    "perturbation radius.",
    "initial_accumulator_value": "adagrad: initial accumulator value.",
    "eta": "lars: trust coefficient.",
}
for _name, _help in _HYPER_FLOATS.items():
    flags.DEFINE_float(_name, None, _help + " Unset: the optimizer's default.")
_HYPER_BOOLS = {
    "nesterov": "momentum: Nesterov momentum.",
    "amsgrad": "adam: the AMSGrad variant.",
    "centered": "rmsprop: centered variant.",
}
for _name, _help in _HYPER_BOOLS.items():
    flags.DEFINE_boolean(_name, None, _help + " Unset: the optimizer's default.")
flags.DEFINE_string(
    "optimizer_args",
    "",
    "More optimizer constructor arguments, key=value,... (e.g. clipvalue=1.0). "
    "use_ema=true[,ema_momentum=0.999] keeps a moving average of the weights, "
    "which becomes the weights at the end of the run (saved and evaluated), "
    "as in Keras's fit.",
)
flags.DEFINE_float(
    "global_clipnorm", None, "Clip the aggregated gradient to this global norm."
)
flags.DEFINE_boolean(
    "skip_nonfinite",
    False,
    "Same as --on_nonfinite=skip (kept for old command lines).",
)
flags.DEFINE_enum(
    "on_nonfinite",
    _DEFAULTS.on_nonfinite,
    list(config_lib.ON_NONFINITE),
    "A NaN or Inf loss or gradient: stop (end the run with exit status 3, "
    "keeping the last good checkpoint), skip (skip the step on every replica; "
    "stop after --max_skipped_steps in a row) or ignore (train on).",
)
flags.DEFINE_integer(
    "max_skipped_steps",
    _DEFAULTS.max_skipped_steps,
    "--on_nonfinite=skip: this many skipped steps in a row end the run as "
    "diverged (exit status 3).",
)

# Distribution of the update.
flags.DEFINE_string(
    "aggregation",
    _DEFAULTS.aggregation,
    "How replicas' gradients combine: mean, sum or weighted_mean (by each "
    "replica's example count; exact for uneven batches).",
)
flags.DEFINE_string(
    "sync",
    _DEFAULTS.sync,
    "When replicas communicate: every_step, accumulate (k micro-steps per "
    "update), local_sgd (average weights every k steps), diloco (outer "
    "Nesterov step every k) or hierarchical.",
)
flags.DEFINE_integer(
    "sync_period", _DEFAULTS.sync_period, "k for every --sync except every_step."
)
flags.DEFINE_string(
    "compression",
    "",
    "Compress the gradients each replica sends, with error feedback: powersgd, "
    "topk or onebit (distopt.compression); empty for none.",
)
flags.DEFINE_string(
    "compression_args",
    "",
    "The compressor's arguments, key=value,... (powersgd: rank=2,start_step=100; "
    "topk: fraction=0.01).",
)
flags.DEFINE_boolean(
    "shard_optimizer_state",
    False,
    "Keep 1/N of every optimizer slot on each of N replicas (ZeRO stage 1); "
    "every_step and accumulate only.",
)
flags.DEFINE_string(
    "sync_args",
    "",
    "More sync-mode arguments, key=value,... (e.g. warmup_steps=100, "
    "average_slots=true; diloco: outer_learning_rate=0.7,outer_momentum=0.9).",
)

# Length and batch.
flags.DEFINE_integer(
    "batch_size", _DEFAULTS.batch_size, "Global batch size (over all replicas)."
)
flags.DEFINE_float(
    "epochs", _DEFAULTS.epochs, "Epochs to train (--train_steps overrides it)."
)
flags.DEFINE_integer("train_steps", 0, "Steps to train in total (or --epochs).")
flags.DEFINE_boolean(
    "drop_remainder",
    _DEFAULTS.drop_remainder,
    "Drop each epoch's last partial training batch (always on TPU).",
)

# Speed.
flags.DEFINE_integer(
    "steps_per_loop",
    _DEFAULTS.steps_per_loop,
    "Training steps per tf.function call (a tf.range loop over the iterator).",
)
flags.DEFINE_boolean(
    "jit_compile", _DEFAULTS.jit_compile, "Compile with XLA (default: not on CPU)."
)
flags.DEFINE_enum(
    "mixed_precision",
    _DEFAULTS.mixed_precision,
    list(config_lib.MIXED_PRECISION),
    "bfloat16: compute in bfloat16, keep float32 variables and loss. float16: "
    "the same in float16, with dynamic loss scaling (overflowing steps are "
    "skipped on every replica).",
)

# Reproducibility.
flags.DEFINE_integer("seed", _DEFAULTS.seed, "Seed for initialisation and shuffling.")
flags.DEFINE_boolean(
    "deterministic",
    False,
    "TensorFlow op determinism for this run only (slower).",
)

# Output.
flags.DEFINE_string(
    "model_dir",
    None,
    "Where checkpoints, TensorBoard scalars and metrics.json go; an existing "
    "run there is resumed. Default: a new directory per run, "
    "runs/<model>_<dataset>_<YYYYmmdd-HHMMSS>_<host>-<pid>.",
)
flags.DEFINE_integer(
    "log_every", _DEFAULTS.log_every, "Steps between progress lines and scalars."
)
flags.DEFINE_integer(
    "eval_every", 0, "Steps between test-set evaluations (0: at the end only)."
)
flags.DEFINE_integer(
    "eval_steps", 0, "Evaluate on this many global batches only (0: all)."
)
flags.DEFINE_integer("eval_batch_size", 0, "Global evaluation batch (0: --batch_size).")
flags.DEFINE_integer(
    "checkpoint_every",
    _DEFAULTS.checkpoint_every,
    "Steps between checkpoints (also one at the end). 0: at the end only.",
)
flags.DEFINE_integer(
    "keep_checkpoints", _DEFAULTS.keep_checkpoints, "Checkpoints to keep (>= 1)."
)
flags.DEFINE_float(
    "target_accuracy",
    None,
    "Stop at the first evaluation (every --eval_every steps, on the replicas' "
    "average) whose test accuracy reaches this fraction, in (0, 1]; "
    "metrics.json then records the step, the training seconds without "
    "evaluations and the bytes each worker sent, with status target_reached "
    "(completed if the steps ran out first).",
)


def _numbers(name: str, kind) -> tuple:
    """A list flag's items as numbers of ``kind``."""
    try:
        return tuple(kind(item) for item in FLAGS[name].value)
    except ValueError as e:
        raise config_lib.ConfigError(f"--{name}: {e}") from None


def config_from_flags() -> config_lib.TrainConfig:
    """Maps the parsed flags onto a TrainConfig."""
    optimizer_args = {
        name: FLAGS[name].value
        for name in (*_HYPER_FLOATS, *_HYPER_BOOLS)
        if FLAGS[name].value is not None
    }
    optimizer_args.update(config_lib.parse_kv(FLAGS.optimizer_args, "optimizer_args"))
    return config_lib.TrainConfig(
        model=FLAGS.model,
        model_args=config_lib.parse_kv(FLAGS.model_args, "model_args"),
        dataset=FLAGS.dataset,
        # `--flag=~/x` reaches us unexpanded (the shell expands `~` only at
        # a word's start, a flagfile never): the user's home, not `./~`.
        data_dir=FLAGS.data_dir and os.path.expanduser(FLAGS.data_dir),
        data_source=FLAGS.data_source,
        input=FLAGS.input,
        download=FLAGS.download,
        strategy=FLAGS.strategy,
        virtual_devices=FLAGS.virtual_devices,
        tpu=FLAGS.tpu,
        communication_timeout=FLAGS.communication_timeout,
        slurm_port_base=FLAGS.slurm_port_base,
        optimizer=FLAGS.optimizer,
        optimizer_args=optimizer_args,
        learning_rate=FLAGS.learning_rate,
        lr_schedule=FLAGS.lr_schedule,
        warmup_steps=FLAGS.warmup_steps,
        decay_steps=FLAGS.decay_steps,
        decay_rate=FLAGS.decay_rate,
        lr_boundaries=_numbers("lr_boundaries", int),
        lr_values=_numbers("lr_values", float),
        batch_size=FLAGS.batch_size,
        epochs=FLAGS.epochs,
        train_steps=FLAGS.train_steps,
        drop_remainder=FLAGS.drop_remainder,
        aggregation=FLAGS.aggregation,
        sync=FLAGS.sync,
        sync_period=FLAGS.sync_period,
        sync_args=config_lib.parse_kv(FLAGS.sync_args, "sync_args"),
        global_clipnorm=FLAGS.global_clipnorm,
        compression=FLAGS.compression,
        compression_args=config_lib.parse_kv(
            FLAGS.compression_args, "compression_args"
        ),
        shard_optimizer_state=FLAGS.shard_optimizer_state,
        skip_nonfinite=FLAGS.skip_nonfinite,
        on_nonfinite=FLAGS.on_nonfinite,
        max_skipped_steps=FLAGS.max_skipped_steps,
        steps_per_loop=FLAGS.steps_per_loop,
        jit_compile=FLAGS.jit_compile,
        mixed_precision=FLAGS.mixed_precision,
        seed=FLAGS.seed,
        deterministic=FLAGS.deterministic,
        # Without --model_dir, main() creates a new run directory.
        model_dir=os.path.expanduser(FLAGS.model_dir or ""),
        eval_every=FLAGS.eval_every,
        eval_steps=FLAGS.eval_steps,
        eval_batch_size=FLAGS.eval_batch_size,
        log_every=FLAGS.log_every,
        checkpoint_every=FLAGS.checkpoint_every,
        keep_checkpoints=FLAGS.keep_checkpoints,
        target_accuracy=FLAGS.target_accuracy,
    )


# Exit statuses: 2 for bad flags (a value, a combination, a path), 1 for a
# run-time failure (corrupt data, no network for --download, a write that
# failed). trainer_faults documents 3 (diverged) and 42 (preempted).
EXIT_BAD_FLAGS = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130  # A second Ctrl-C, as a shell reports SIGINT.


def _fail(messages, status):
    """Prints each problem as one ``error:`` line on stderr, then exits."""
    for message in messages:
        # One line each, even for messages that quote a multi-line TF error.
        print("error: " + " ".join(str(message).split()), file=sys.stderr)
    sys.stderr.flush()
    # The error is the last line: objects freed at exit (a checkpoint that
    # failed to restore) would otherwise log TensorFlow warnings after it.
    std_logging.getLogger("tensorflow").setLevel(std_logging.ERROR)
    raise SystemExit(status)


def _help_requested(argv) -> bool:
    """Prints the help for ``--help`` (this module's flags) or ``--helpfull``."""
    asked = [a for a in argv[1:] if a in ("-h", "--help", "--helpshort", "--helpfull")]
    if not asked:
        return False
    print(__doc__)
    if "--helpfull" in asked:
        print(FLAGS.get_help())
    else:
        module = next(
            name
            for name, module_flags in FLAGS.flags_by_module_dict().items()
            if any(f.name == "model_dir" for f in module_flags)
        )
        print(FLAGS.module_help(module))
        print("\nAll flags (absl's too): --helpfull")
    return True


def parse_flags(argv):
    """absl's flag parsing: help exits 0, a bad flag is one line and exit 2."""
    if _help_requested(argv):
        raise SystemExit(0)
    try:
        return FLAGS(argv)
    except flags.CantOpenFlagFileError as e:
        cause = e.__context__  # absl's "ERROR:: Unable to open flagfile: ...".
        if isinstance(cause, OSError) and cause.filename is not None:
            e = f"--flagfile={cause.filename}: cannot open it ({cause.strerror})"
        _fail([e], EXIT_BAD_FLAGS)
    except flags.Error as e:
        _fail([e], EXIT_BAD_FLAGS)


def _checked_config() -> config_lib.TrainConfig:
    """The flags as a config, every number in range (no TensorFlow needed)."""
    try:
        if FLAGS["model_dir"].present and not FLAGS.model_dir:
            # `--model_dir=$OUT` with OUT unset: a new run directory each
            # time would never resume.
            raise config_lib.ConfigError(
                "--model_dir: empty (an unset variable?); give a directory, "
                "or omit the flag for a new run directory"
            )
        # An explicit --on_nonfinite=stop looks like the default in the
        # config: checked here, where absl knows it was given.
        given = FLAGS["on_nonfinite"].present and FLAGS.on_nonfinite
        if FLAGS.skip_nonfinite and given and given != "skip":
            raise config_lib.ConfigError(
                "--skip_nonfinite means --on_nonfinite=skip; it contradicts "
                f"--on_nonfinite={FLAGS.on_nonfinite}"
            )
        config = config_from_flags()
        _check_launched_strategy(config.strategy)
        config_lib.check_flags(config)
    except config_lib.ConfigError as e:
        _fail([e], EXIT_BAD_FLAGS)
    return config


def _check_launched_strategy(strategy: str) -> None:
    """Under ``launch/local.py``, the strategy it gives the workers, or ConfigError.

    The user's flags (or flagfile) come after the launcher's ``--strategy``,
    and absl lets the last one win: another made every worker a separate
    trainer of one ``--model_dir``. Checked here, where absl has parsed them.
    """
    launched = os.environ.get("DISTOPT_LAUNCHER_STRATEGY")
    if launched and strategy != launched:
        raise config_lib.ConfigError(
            f"--strategy={strategy}: launch/local.py runs every worker with "
            f"--strategy={launched}; drop the later --strategy (or give "
            f"--strategy={launched} after the --flagfile that sets it)"
        )


def _claim_run_dir(config) -> paths.RunDir | None:
    """Without --model_dir: creates this run's own directory, atomically.

    Before TensorFlow loads (a second or more), so that the name is taken the
    moment the run starts. A worker that does not write gets the name only.
    """
    if FLAGS.model_dir:
        return None
    if not paths.writes_model_dir(config.strategy):
        config.model_dir = paths.run_dir_name(config.model, config.dataset)
        return None
    try:
        run_dir = paths.create_run_dir(config.model, config.dataset)
    except paths.RunDirError as e:
        _fail([e], EXIT_BAD_FLAGS)
    config.model_dir = run_dir.path
    return run_dir


def _import_tensorflow() -> None:
    # Its C++ start-up block is held back (--verbosity=1 prints it), and
    # Keras's matplotlib import is skipped (0.5-0.6 s; the trainer never
    # plots, and a later `import matplotlib` works as usual).
    quiet.import_tensorflow(hide_modules=("matplotlib",))
    quiet.configure_logging(FLAGS.verbosity)


def _check_names_and_paths(config, run_dir) -> None:
    """The checks that need TensorFlow's registries; all problems at once."""
    # TensorFlow is loaded by now, with no device made yet.
    from distopt.trainer import factories, inputs
    from distopt.trainer import strategy as strategy_lib

    try:
        config_lib.check_names(config)
        # Here, not in the run: a strategy of thousands of logical CPUs takes
        # tens of seconds to make before the run's own checks refuse a batch
        # size, evaluation batch size or replica group size it cannot take.
        strategy_lib.check_replica_flags_before_devices(config)
        # And a --batch_size larger than the bundled MNIST's training split.
        inputs.check_batch_before_data(config)
        # Likewise --optimizer_args, --model_args, --sync_args and the
        # hyperparameter flags: their constructors' checks, before the run
        # directory is announced and the strategy and data are made.
        factories.check_arguments(config)
        problems = paths.check_paths(config)
    except config_lib.ConfigError as e:
        problems = [e]
    if problems:
        if run_dir:
            run_dir.discard()  # Nothing of a run that never started is left.
        _fail(problems, EXIT_BAD_FLAGS)


def _train(config, run_dir) -> None:
    """Runs the trainer; each way it can end is an exit status and one line."""
    from distopt import checkpoints, data, trainer_faults
    from distopt.trainer import checkpointing
    from distopt.trainer import run as run_lib

    try:
        run_lib.train(config, start_time=_STARTED)
    except (config_lib.ConfigError, config_lib.ModelDirError) as e:
        _fail([e], EXIT_BAD_FLAGS)
    except data.DataError as e:
        _fail([e], EXIT_FAILURE)
    except trainer_faults.Preempted as e:
        # Not a failure: the checkpoint and metrics.json are written. Exit
        # codes are documented in trainer_faults and README.md. A further
        # notice while tf.data tears down (seconds) must not kill it.
        stop_notice.ignore()
        logging.warning("%s", _naming_the_run_dir(str(e), config, run_dir))
        raise SystemExit(e.exit_code) from None
    except trainer_faults.Diverged as e:
        _fail([e], e.exit_code)
    except (
        checkpoints.LockError,
        checkpoints.CheckpointSaveError,
        checkpointing.WriteError,
    ) as e:
        _fail([_naming_the_run_dir(str(e), config, run_dir)], EXIT_FAILURE)


def _naming_the_run_dir(message: str, config, run_dir) -> str:
    """`message`, its "rerun ... to resume" naming the run's own directory.

    Without --model_dir, the same command would start a new run directory
    instead of resuming this one (a preemption, a save that found the disk
    full).
    """
    from distopt import trainer_faults

    if not run_dir:
        return message
    message = message.replace(
        trainer_faults.RERUN_TO_RESUME,
        f"Rerun with --model_dir={config.model_dir} to resume",
    )
    return re.sub(
        r"\brerun to (resume|finish)\b",
        lambda m: f"rerun with --model_dir={config.model_dir} to {m[1]}",
        message,
    )


def main(argv):
    """Checks every flag and path, then trains; errors are one line each."""
    if len(argv) > 1:
        _fail([f"unexpected arguments: {argv[1:]}"], EXIT_BAD_FLAGS)
    stop_notice.install()  # Until the trainer's own handler takes over.
    try:
        _checked_run()
    finally:
        stop_notice.uninstall()


def _checked_run():
    """Checks, then imports TensorFlow and trains (see :func:`main`)."""
    config = _checked_config()
    run_dir = _claim_run_dir(config)
    try:
        _import_tensorflow()
        _check_names_and_paths(config, run_dir)
        if run_dir:
            logging.info(
                "Run directory %s (--model_dir to resume a run)", config.model_dir
            )
        _train(config, run_dir)
    except KeyboardInterrupt:
        _interrupted(config, run_dir)
    finally:
        if run_dir:
            run_dir.discard()  # Only if the run wrote nothing: a failed start.


def _interrupted(config, run_dir) -> None:
    """A second Ctrl-C (stop_notice, trainer_faults): one line, exit 130.

    A run directory this process made that holds no checkpoint yet (its
    run_config.json, event files) is removed: nothing there resumes.
    """
    stop_notice.ignore()  # More Ctrl-Cs change nothing now.
    saved = glob.glob(os.path.join(config.model_dir, "checkpoints", "ckpt-*.index"))
    if run_dir and not saved:
        shutil.rmtree(run_dir.path, ignore_errors=True)
        paths.RunDir("", run_dir.created[:-1]).discard()  # runs/, if it made it.
    message = "interrupted (a second Ctrl-C)"
    if saved:  # No trainer_faults here: TensorFlow may be half imported.
        rerun = (
            f"with --model_dir={config.model_dir}" if run_dir else "the same command"
        )
        message += f"; the last checkpoint is kept: rerun {rerun} to resume"
    _fail([message], EXIT_INTERRUPTED)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
