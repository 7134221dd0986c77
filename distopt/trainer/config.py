"""What a run is: :class:`TrainConfig`, and the checks of its values.

No TensorFlow here (the registries of names and the compressors are
imported inside :func:`check_names` and :func:`make_compression`):
``python -m distopt.train`` checks every flag's range with
:func:`check_flags`, and creates its run directory, before TensorFlow loads.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from distopt.checks import INT64_LIMIT, INT64_MAX

LR_SCHEDULES = ("constant", "exponential", "piecewise", "cosine")
MIXED_PRECISION = ("none", "bfloat16", "float16")
ON_NONFINITE = ("stop", "skip", "ignore")
# Two replicas is the smallest count that exercises cross-replica aggregation,
# and on a small CPU host more logical devices only share the same cores.
DEFAULT_CPU_VIRTUAL_DEVICES = 2
# The sync modes whose replicas diverge between averages.
DIVERGING_SYNC = ("local_sgd", "diloco", "hierarchical")
# distopt.compression's names (checked here, before TensorFlow is imported).
COMPRESSIONS = ("onebit", "powersgd", "topk")


class ConfigError(ValueError):
    """A flag value or combination is invalid."""


class ModelDirError(ValueError):
    """``model_dir`` holds a run that this configuration cannot resume."""


@dataclasses.dataclass
class TrainConfig:
    """Everything :func:`distopt.trainer.run.train` needs; the flags map 1:1.

    See ``distopt/train.py`` for the meaning of each field (the flag help).
    """

    model: str = "lenet"
    model_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    dataset: str = "mnist"
    data_dir: str | None = None
    data_source: str = "auto"
    download: bool = False
    input: str = "auto"
    strategy: str = "default"
    virtual_devices: int = 0
    tpu: str = ""
    communication_timeout: float = 0.0
    slurm_port_base: int = 8888
    optimizer: str = "adam"
    optimizer_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    decay_steps: int = 0
    decay_rate: float = 0.1
    lr_boundaries: tuple[int, ...] = ()
    lr_values: tuple[float, ...] = ()
    batch_size: int = 128
    # One epoch by default: `python -m distopt.train` alone trains a useful
    # model (LeNet-5 on MNIST, 97.6% on 2 replicas with seed 0, in memory).
    epochs: float = 1.0
    train_steps: int = 0
    drop_remainder: bool = True
    aggregation: str = "mean"
    sync: str = "every_step"
    sync_period: int = 8
    sync_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    global_clipnorm: float | None = None
    # "" (none), or a distopt.compression name, with its arguments.
    compression: str = ""
    compression_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    shard_optimizer_state: bool = False
    skip_nonfinite: bool = False
    on_nonfinite: str = "stop"
    max_skipped_steps: int = 20
    steps_per_loop: int = 50
    # None: XLA where it is the faster path (see strategy.resolve_jit_compile).
    jit_compile: bool | None = None
    mixed_precision: str = "none"
    seed: int = 0
    deterministic: bool = False
    model_dir: str = "runs/default"
    eval_every: int = 0
    eval_steps: int = 0
    eval_batch_size: int = 0
    log_every: int = 100
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    # Stop at the first evaluation (every eval_every steps) that reaches it.
    target_accuracy: float | None = None


# The largest value of every integer flag (and of the steps --epochs makes):
# the library's limit (`checks.INT64_MAX`), which no TensorFlow count exceeds.

# The smallest value of each integer flag; 0 means "off" or "the default"
# where it is allowed (see each flag's help). Each is at most INT64_MAX.
_AT_LEAST = {
    "batch_size": 1,
    "steps_per_loop": 1,
    "log_every": 1,
    "sync_period": 1,
    "max_skipped_steps": 1,
    "keep_checkpoints": 1,
    "train_steps": 0,
    "eval_every": 0,
    "eval_steps": 0,
    "eval_batch_size": 0,
    "checkpoint_every": 0,
    "warmup_steps": 0,
    "decay_steps": 0,
    "virtual_devices": 0,
}


def check_flags(config: TrainConfig) -> None:
    """Checks every number's range and the combinations that need no names.

    Raises:
      ConfigError: naming the flag and the value.
    """
    for name, lowest in _AT_LEAST.items():
        value = getattr(config, name)
        if value < lowest:
            raise ConfigError(f"--{name} must be >= {lowest}, got {value}")
        if value > INT64_MAX:
            raise ConfigError(f"--{name} must be <= {INT64_LIMIT}, got {value}")
    _check_floats(config)
    if config.train_steps == 0 and config.epochs == 0:
        raise ConfigError(
            "Set --train_steps or --epochs (--train_steps wins if both are set; got "
            f"train_steps={config.train_steps}, epochs={config.epochs})"
        )
    if config.train_steps:
        check_total_steps(config, config.train_steps)
    _check_strategy_flags(config)
    _check_flags_that_would_do_nothing(config)
    if config.strategy == "tpu" and not config.tpu:
        raise ConfigError("--strategy=tpu needs --tpu (a TPU name, or 'local' on a VM)")
    if config.target_accuracy is not None and not config.eval_every:
        raise ConfigError(
            "--target_accuracy needs --eval_every (the steps between the "
            "evaluations that check it)"
        )
    _check_combinations(config)


# The flags that only one --strategy reads: (flag, that strategy, what the
# others do not do with it).
_STRATEGY_FLAGS = (
    ("virtual_devices", "mirrored", "split the CPU"),
    ("tpu", "tpu", "connect to a TPU"),
)


def _check_strategy_flags(config: TrainConfig) -> None:
    """A flag of one strategy, set under another, is refused."""
    for flag, strategy, what in _STRATEGY_FLAGS:
        value = getattr(config, flag)
        if value and config.strategy != strategy:
            # An error, not a warning: whoever sets it expects that strategy
            # (several replicas, a TPU), and a run without it would report
            # another run's figures.
            raise ConfigError(
                f"--{flag}={value} applies to --strategy={strategy} only; "
                f"--strategy={config.strategy} does not {what}. Drop it, or "
                f"add --strategy={strategy}"
            )


# Flags that only some values of another flag read: (flag, that other flag,
# the values that read it). Set away from its default under another value,
# such a flag did nothing, without a word.
_READ_ONLY_UNDER = (
    ("decay_steps", "lr_schedule", ("exponential", "cosine")),
    ("decay_rate", "lr_schedule", ("exponential",)),
    ("max_skipped_steps", "on_nonfinite", ("skip",)),
    ("communication_timeout", "strategy", ("multi_worker",)),
    ("slurm_port_base", "strategy", ("multi_worker",)),
)


def _check_flags_that_would_do_nothing(config: TrainConfig) -> None:
    """A flag set where nothing reads it is refused, as a strategy's flag is.

    Whoever sets --decay_steps or --max_skipped_steps expects its effect; a
    run without it would be reported as one with it. A value equal to the
    default is let through: it changes nothing either way.
    """
    defaults = TrainConfig()
    readers = {"on_nonfinite": nonfinite_policy(config)}
    for flag, reader, values in _READ_ONLY_UNDER:
        value = getattr(config, flag)
        actual = readers.get(reader, getattr(config, reader))
        if value != getattr(defaults, flag) and actual not in values:
            raise ConfigError(
                f"--{flag}={value} applies to --{reader}={' or '.join(values)} "
                f"only; --{reader}={actual} does not read it. Drop it, or set "
                f"--{reader}"
            )
    if config.sync == "every_step" and config.sync_period != defaults.sync_period:
        raise ConfigError(
            f"--sync_period={config.sync_period} applies to a --sync other than "
            "every_step (accumulate, local_sgd, diloco, hierarchical); "
            "--sync=every_step communicates every step. Drop it, or set --sync"
        )


def _check_floats(config: TrainConfig) -> None:
    def need(ok, flag, value, rule):
        if not ok:
            raise ConfigError(f"--{flag} must be {rule}, got {value}")

    for flag in ("learning_rate", "decay_rate"):
        value = getattr(config, flag)
        need(math.isfinite(value) and value > 0, flag, value, "finite and > 0")
    # NumPy's and Python's generators take seeds in [0, 2**32).
    need(0 <= config.seed < 2**32, "seed", config.seed, "in [0, 2**32 - 1]")
    need(
        math.isfinite(config.epochs) and config.epochs >= 0,
        "epochs",
        config.epochs,
        "finite and >= 0",
    )
    need(
        config.communication_timeout >= 0,
        "communication_timeout",
        config.communication_timeout,
        ">= 0 (0: wait forever)",
    )
    need(
        0 < config.slurm_port_base < 65536,
        "slurm_port_base",
        config.slurm_port_base,
        "a port, 1-65535",
    )
    if config.global_clipnorm is not None:
        need(
            config.global_clipnorm > 0, "global_clipnorm", config.global_clipnorm, "> 0"
        )
    if config.target_accuracy is not None:
        need(
            0 < config.target_accuracy <= 1,
            "target_accuracy",
            config.target_accuracy,
            "in (0, 1] (a fraction: 0.97 for 97%)",
        )
    for value in config.lr_values:
        need(value >= 0, "lr_values", list(config.lr_values), "all >= 0")


# Optimizer arguments the trainer sets from flags of their own (see
# `factories.optimizer_kwargs`): in --optimizer_args they would be overwritten.
_OWN_FLAG = {
    "learning_rate": "--learning_rate (and --lr_schedule)",
    "aggregation": "--aggregation",
    "sync": "--sync (and --sync_period, --sync_args)",
    "global_clipnorm": "--global_clipnorm",
    "compression": "--compression (and --compression_args)",
    "shard_state": "--shard_optimizer_state",
    "skip_nonfinite": "--on_nonfinite=skip",
    "communication_options": "--communication_timeout",
}


def _check_optimizer_args(config: TrainConfig) -> None:
    """--optimizer_args may not set what another flag sets (it would be lost)."""
    for key in config.optimizer_args:
        owner = _OWN_FLAG.get(key)
        if key == "loss_scale" and config.mixed_precision == "float16":
            owner = "--mixed_precision=float16 (dynamic loss scaling)"
        if owner:
            raise ConfigError(
                f"--optimizer_args: {key} is set by {owner}; use that flag instead"
            )


def _check_schedule(config: TrainConfig) -> None:
    """--lr_boundaries and --lr_values: with --lr_schedule=piecewise, and in order."""
    piecewise = config.lr_schedule == "piecewise"
    if not piecewise and (config.lr_boundaries or config.lr_values):
        raise ConfigError(
            "--lr_boundaries and --lr_values apply to --lr_schedule=piecewise "
            f"only, got --lr_schedule={config.lr_schedule}"
        )
    if piecewise and len(config.lr_values) != len(config.lr_boundaries) + 1:
        raise ConfigError(
            "--lr_schedule=piecewise needs --lr_boundaries and one more "
            f"--lr_values; got {list(config.lr_boundaries)} and "
            f"{list(config.lr_values)}"
        )
    boundaries = list(config.lr_boundaries)
    if boundaries != sorted(boundaries) or (boundaries and boundaries[0] < 0):
        raise ConfigError(
            f"--lr_boundaries must be steps >= 0 in increasing order, got {boundaries}"
        )
    if boundaries and boundaries[-1] > INT64_MAX:
        raise ConfigError(f"--lr_boundaries must be <= {INT64_LIMIT}, got {boundaries}")


def _check_combinations(config: TrainConfig) -> None:
    """Flags that contradict each other, by name only."""
    _check_compression_and_sharding(config)
    _check_optimizer_args(config)
    if config.mixed_precision == "float16" and config.sync in DIVERGING_SYNC:
        raise ConfigError(
            f"--mixed_precision=float16 needs loss scaling, which needs a "
            f"synchronous --sync (every_step or accumulate), got {config.sync}"
        )
    if config.skip_nonfinite and config.on_nonfinite == "ignore":
        raise ConfigError(
            "--skip_nonfinite means --on_nonfinite=skip; it contradicts "
            "--on_nonfinite=ignore"
        )
    _check_schedule(config)
    if config.optimizer == "heun" and config.sync != "every_step":
        raise ConfigError(
            f"--optimizer=heun needs --sync=every_step, got --sync={config.sync}: "
            "its trial point uses the aggregated gradient of the very same step"
        )
    perturbation = config.optimizer_args.get("perturbation")
    if (
        config.optimizer == "sam"
        and perturbation == "aggregated"
        and config.sync not in ("every_step", "accumulate")
    ):
        raise ConfigError(
            f"--optimizer=sam with perturbation=aggregated cannot follow "
            f"--sync={config.sync}: the replicas' weights differ between "
            "averages, so an all-reduced gradient mixes gradients taken at "
            "different points (and communicates every step, which the sync "
            "mode exists to avoid); use perturbation=replica (the default) or "
            "--sync=every_step or accumulate"
        )


def check_names(config: TrainConfig) -> None:
    """Checks every name against its registry, and --compression_args.

    This imports TensorFlow.

    Raises:
      ConfigError: naming the bad value and listing the valid ones.
    """
    # The registries live with the code they name, which needs TensorFlow.
    from distopt import aggregation, data, distribute, models, optimizers, sync

    for what, value, valid in (
        ("strategy", config.strategy, distribute.STRATEGY_KINDS),
        ("model", config.model, models.names()),
        ("optimizer", config.optimizer, optimizers.names()),
        ("aggregation", config.aggregation, aggregation.names()),
        ("sync", config.sync, sync.names()),
        ("lr_schedule", config.lr_schedule, LR_SCHEDULES),
        ("mixed_precision", config.mixed_precision, MIXED_PRECISION),
        ("data_source", config.data_source, data.SOURCES),
        ("input", config.input, data.INPUTS),
        ("on_nonfinite", config.on_nonfinite, ON_NONFINITE),
    ):
        if value not in valid:
            plural = "strategies" if what == "strategy" else f"{what}s"
            raise ConfigError(
                f"Unknown {what} {value!r}; valid {plural}: {list(valid)}"
            )
    # A compressor's constructor checks its arguments and touches no device,
    # so a bad --compression_args fails here, before the strategy and data.
    make_compression(config)


def make_compression(config: TrainConfig):
    """The compressor of ``--compression`` and ``--compression_args``, or None.

    Raises:
      ConfigError: an argument the compressor does not take or accept.
    """
    if not config.compression:
        return None
    from distopt import compression

    try:
        return compression.get(config.compression, **config.compression_args)
    except ValueError as e:
        # The library's message names the argument; the flag replaces its prefix.
        message = str(e).removeprefix("compression_args: ")
        raise ConfigError(f"--compression_args: {message}") from None


def validate_config(config: TrainConfig) -> None:
    """:func:`check_flags`, then :func:`check_names`.

    Raises:
      ConfigError: the first problem, naming its flag.
    """
    check_flags(config)
    check_names(config)


def nonfinite_policy(config: TrainConfig) -> str:
    """``--on_nonfinite``, with ``--skip_nonfinite`` meaning ``skip``."""
    return "skip" if config.skip_nonfinite else config.on_nonfinite


def replica_group_size(config: TrainConfig) -> int | None:
    """``--sync_args=group_size`` of ``--sync=hierarchical``, to check against
    the devices of each worker; None where there is none to check.

    Only an integer is checked there: another value (``2.5``, a name) is
    refused by the sync mode's own argument check.
    """
    size = config.sync_args.get("group_size")
    if config.sync == "hierarchical" and isinstance(size, int):
        return size
    return None


def resolve_train_steps(config: TrainConfig, num_train_examples: int) -> int:
    """``--train_steps`` if set (it overrides a config file's ``--epochs``),
    else ``--epochs`` worth of global batches.

    Raises:
      ConfigError: --epochs makes more steps than TensorFlow's int64 step
        counter holds (known only here, with the size of the data).
    """
    if config.train_steps:
        return config.train_steps
    steps = max(1, int(config.epochs * num_train_examples) // config.batch_size)
    if steps > INT64_MAX:
        raise ConfigError(
            f"--epochs={config.epochs} is {steps} steps of --batch_size="
            f"{config.batch_size} over the {num_train_examples} train examples; "
            f"the steps must be <= {INT64_LIMIT}: lower --epochs"
        )
    return steps


def check_total_steps(config: TrainConfig, total_steps: int) -> None:
    """A run of ``total_steps`` applies at least one update.

    Raises:
      ConfigError: --sync=accumulate with fewer steps than one period (a
        run that ends at the initial weights and reports them as trained).
    """
    if config.sync == "accumulate" and total_steps < config.sync_period:
        raise ConfigError(
            f"--sync=accumulate --sync_period={config.sync_period} applies no "
            f"update in a run of {total_steps} steps; raise --train_steps (or "
            "--epochs) or lower --sync_period"
        )


def run_identity(config: TrainConfig) -> dict[str, Any]:
    """What ``model_dir/run_config.json`` stores: the full config."""
    return dataclasses.asdict(config)


def parse_kv(text: str, flag: str | None = None) -> dict[str, Any]:
    """Parses ``"a=1,b=0.5,c=true,d=name,e=[256,128]"`` into typed values.

    A value in brackets is a list (``hidden=[256,128]``: ``[256, 128]``), its
    items typed the same way; the brackets protect its commas from the split
    into ``key=value`` items. A list, not a tuple: it is the same after the
    round trip through ``run_config.json``.

    Args:
      text: The flag's value.
      flag: The flag's name, for the errors (``--model_args: ...``).

    Raises:
      ConfigError: an item is not ``key=value``, unbalanced brackets, or an
        empty list item (``[1,,2]``).
    """
    prefix = f"--{flag}: " if flag else ""
    out: dict[str, Any] = {}
    for item in filter(None, _split_top_level(text, prefix)):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            # "hidden=256,128": the comma ended the value.
            hint = "; a list goes in brackets: key=[a,b]" if out and not sep else ""
            raise ConfigError(
                f"{prefix}Expected key=value, got {item!r} in {text!r}{hint}"
            )
        out[key.strip()] = _typed(value.strip(), prefix, text)
    return out


def _split_top_level(text: str, prefix: str) -> list[str]:
    """``text``'s comma-separated items (stripped), not splitting inside [...]."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth < 0:
            raise ConfigError(f"{prefix}a ']' without its '[' in {text!r}")
        if char == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    if depth:
        raise ConfigError(f"{prefix}a '[' without its ']' in {text!r}")
    return [*items, text[start:].strip()]


def _typed(value: str, prefix: str = "", text: str = ""):
    if value.startswith("[") and value.endswith("]"):
        inner = value[1:-1].strip()
        items = _split_top_level(inner, prefix) if inner else []
        if "" in items:  # "[1,,2]" or "[1,]": a typo, not an empty string.
            raise ConfigError(f"{prefix}an empty list item in {value!r} of {text!r}")
        return [_typed(item, prefix, text) for item in items]
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _check_compression_and_sharding(config: TrainConfig) -> None:
    """--compression and --shard_optimizer_state against each other's flags."""
    if config.compression and config.compression not in COMPRESSIONS:
        raise ConfigError(
            f"--compression: unknown {config.compression!r}; valid: "
            f"{', '.join(COMPRESSIONS)} (or none)"
        )
    if config.compression_args and not config.compression:
        raise ConfigError("--compression_args needs --compression")
    if config.compression and config.sync in ("local_sgd", "hierarchical"):
        raise ConfigError(
            f"--compression compresses gradients; --sync={config.sync} sends "
            "weights (--sync=diloco compresses its outer gradient)"
        )
    if config.shard_optimizer_state and config.sync in DIVERGING_SYNC:
        raise ConfigError(
            f"--shard_optimizer_state needs a synchronous --sync (every_step or "
            f"accumulate); under {config.sync} each replica keeps its own slots"
        )
