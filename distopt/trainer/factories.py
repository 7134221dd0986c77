"""Model, learning-rate schedule and optimizer from a :class:`TrainConfig`.

Call the builders inside ``strategy.scope()``. :func:`optimizer_kwargs` is
the one place where flags become optimizer arguments: a new optimizer flag
is one line there.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import tensorflow as tf

from distopt import aggregation as aggregation_lib
from distopt import models as models_lib
from distopt import optimizers as optimizers_lib
from distopt import sync as sync_lib
from distopt.optimizers import schedules
from distopt.trainer.config import (
    ConfigError,
    TrainConfig,
    make_compression,
    nonfinite_policy,
)
from distopt.trainer.strategy import communication_options, resolve_jit_compile

# --optimizer=sam: these --optimizer_args are SAM's (see optimizers.SAM); every
# other one is its base optimizer's. The default base is the trainer's default
# optimizer, whose default learning rate the trainer's defaults are tuned for.
SAM_ARGS = ("base_optimizer", "rho", "perturbation")
SAM_DEFAULT_BASE = "adam"
# Optimizer arguments set by a trainer flag of the same name, not through
# --optimizer_args: an error about one names that flag.
FLAG_ARGS = ("global_clipnorm",)


def build_model(
    name: str,
    source=None,
    *,
    seed=0,
    mixed_precision="none",
    jit_compile=None,
    model_args=None,
):
    """Builds a model for ``source``'s image shape and classes (MNIST if None).

    Call inside ``strategy.scope()``. ``jit_compile`` (None: by the current
    strategy's device type, see :func:`resolve_jit_compile`) picks the
    faster of the model's equivalent implementations, e.g. LeNet's pooling.

    Raises:
      ConfigError: a ``model_args`` key or value the model does not take.
    """
    if source is None:
        shape, classes = (28, 28, 1), 10
    else:
        shape, classes = source.image_shape, source.num_classes
    dtype = {"bfloat16": tf.bfloat16, "float16": tf.float16}.get(
        mixed_precision, tf.float32
    )
    try:
        return models_lib.build_model(
            name,
            shape,
            classes,
            seed=seed,
            compute_dtype=dtype,
            jit_compile=resolve_jit_compile(jit_compile, compute_dtype=dtype),
            model_args=model_args,
        )
    except TypeError as e:
        raise _model_args_error(name, model_args, e) from e
    except ValueError as e:  # The model names the bad value.
        # Only --model_args reach a model's own checks (the name is checked
        # before): the flag to fix is that one.
        flag = " --model_args" if model_args else ""
        message = str(e)
        if hint := _list_hint(name, model_args):
            message = f"{message.rstrip('.')}; {hint}."
        raise ConfigError(f"--model={name}{flag}: {message}") from e


def _list_hint(name: str, model_args) -> str:
    """How to write a list, if a list argument of ``name`` was given something else.

    ``hidden=256,128`` split at the comma and ``hidden=256:128`` is a str:
    the error then shows the bracket syntax that gives a list.
    """
    if name not in models_lib.MODELS:
        return ""  # An unknown model: its own message says so.
    params = inspect.signature(models_lib.MODELS[name]).parameters
    for key, value in (model_args or {}).items():
        default = params[key].default if key in params else None
        if isinstance(default, tuple) and not isinstance(value, (list, tuple)):
            return f"write a list in brackets: --model_args={key}=[a,b]"
    return ""


def _model_args_error(name: str, model_args, error: TypeError) -> ConfigError:
    """The ConfigError for a TypeError from ``name``'s constructor.

    A key the constructor has no parameter for is "does not take"; a key it
    has, given a value of the wrong type, names that ``--model_args`` entry
    (Python's own message, e.g. "Value after * must be an iterable", names
    neither).
    """
    model_args = model_args or {}
    taken = inspect.signature(models_lib.MODELS[name]).parameters
    unknown = sorted(set(model_args) - set(taken))
    if unknown:
        return ConfigError(f"--model={name} does not take one of {unknown}: {error}")
    given = ",".join(f"{k}={v}" for k, v in model_args.items())
    return ConfigError(f"--model={name} --model_args={given}: a bad value: {error}")


class Warmup:
    """Linear warmup from 0 over ``warmup_steps``, then ``schedule(step)``."""

    def __init__(self, schedule, warmup_steps):
        self.schedule, self.warmup_steps = schedule, warmup_steps

    def __call__(self, step):
        t = tf.cast(step, tf.float32)
        after = tf.cast(self.schedule(step), tf.float32)
        return tf.where(t < self.warmup_steps, after * t / self.warmup_steps, after)


def make_schedule(config: TrainConfig, total_updates: int):
    """The learning-rate schedule of ``config``, over ``total_updates`` updates.

    ``decay_steps`` defaults to the whole run. ``warmup_steps`` is linear from
    zero for every schedule (built into cosine, wrapped around the others).
    """
    lr = config.learning_rate
    warmup = config.warmup_steps
    decay_steps = config.decay_steps or max(1, total_updates - warmup)
    if config.lr_schedule == "cosine":
        return schedules.CosineDecay(lr, decay_steps, warmup_steps=warmup)
    if config.lr_schedule == "exponential":
        schedule = schedules.ExponentialDecay(lr, decay_steps, config.decay_rate)
    elif config.lr_schedule == "piecewise":
        schedule = schedules.PiecewiseConstant(config.lr_boundaries, config.lr_values)
    else:
        schedule = schedules.Constant(lr) if warmup else lr
    return Warmup(schedule, warmup) if warmup else schedule


def make_sync(config: TrainConfig):
    """The sync mode of ``--sync``, ``--sync_period`` and ``--sync_args``.

    Raises:
      ConfigError: an argument the sync mode does not take.
    """
    kwargs = dict(config.sync_args)
    if config.sync != "every_step":
        kwargs.setdefault("k", config.sync_period)
    if config.sync == "diloco" and (
        "outer_learning_rate" in kwargs or "outer_momentum" in kwargs
    ):
        kwargs["outer_optimizer"] = _outer_optimizer(kwargs)
    try:
        return sync_lib.get(config.sync, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--sync={config.sync} does not take {kwargs}: {e}") from e


#: DiLoCo's default outer Nesterov momentum (Douillard et al. 2023).
OUTER_LEARNING_RATE, OUTER_MOMENTUM = 0.7, 0.9


def _outer_optimizer(kwargs: dict):
    """DiLoCo's outer Nesterov momentum, from (and popping) ``kwargs``'s outer_*.

    Raises:
      ConfigError: a bad outer_learning_rate or outer_momentum, named as in
        --sync_args (the momentum optimizer names its own ``momentum``).
    """
    try:
        return optimizers_lib.get(
            "momentum",
            learning_rate=kwargs.pop("outer_learning_rate", OUTER_LEARNING_RATE),
            momentum=kwargs.pop("outer_momentum", OUTER_MOMENTUM),
            nesterov=True,
            name="outer_momentum",
        )
    except (TypeError, ValueError) as e:
        # Its messages start with the argument's name: "momentum: must be...".
        raise ConfigError(f"--sync=diloco --sync_args: outer_{e}") from e


def optimizer_kwargs(config: TrainConfig, total_steps: int) -> dict[str, Any]:
    """The optimizer's constructor arguments: one entry per flag that sets one."""
    # Schedules count applied updates: one per k steps when accumulating.
    accumulating = config.sync == "accumulate"
    updates = total_steps // config.sync_period if accumulating else total_steps
    kwargs = dict(config.optimizer_args)
    kwargs.update(
        learning_rate=make_schedule(config, max(1, updates)),
        aggregation=aggregation_lib.get(config.aggregation),
        sync=make_sync(config),
        global_clipnorm=config.global_clipnorm,
        compression=make_compression(config),
        shard_state=config.shard_optimizer_state,
        # The optimizer skips (on every replica) only under the skip policy:
        # the check costs throughput (see optimizers/base.py), and "stop"
        # reads the loss and the weights instead.
        skip_nonfinite=nonfinite_policy(config) == "skip",
    )
    if config.strategy == "multi_worker":
        kwargs["communication_options"] = communication_options(
            config.communication_timeout
        )
    if config.mixed_precision == "float16":
        # float16 gradients underflow without it; overflowing steps are
        # skipped on every replica and halve the scale.
        kwargs["loss_scale"] = "dynamic"
    return kwargs


def make_optimizer(config: TrainConfig, total_steps: int):
    """Builds the optimizer, its aggregation and its sync mode from ``config``.

    Call inside ``strategy.scope()``.

    Raises:
      ConfigError: unknown names, or a hyperparameter the optimizer or sync
        mode does not take.
    """
    kwargs = optimizer_kwargs(config, total_steps)
    try:
        if config.optimizer == "sam":
            # SAM's own arguments; all others (the learning rate, aggregation
            # and sync included) build its base optimizer.
            sam_args = {k: kwargs.pop(k) for k in SAM_ARGS if k in kwargs}
            base = sam_args.pop("base_optimizer", SAM_DEFAULT_BASE)
            return optimizers_lib.get("sam", base_optimizer=base, **sam_args, **kwargs)
        return optimizers_lib.get(config.optimizer, **kwargs)
    except TypeError as e:
        # Python names the first argument it did not expect: that one, not
        # every argument given (`--nesterov --amsgrad` named both for
        # momentum, which takes nesterov).
        unknown = re.findall(r"unexpected keyword argument '(\w+)'", str(e))
        raise ConfigError(
            f"--optimizer={config.optimizer} does not take one of "
            f"{unknown or sorted(config.optimizer_args)}: {e}"
        ) from e
    except ValueError as e:  # The optimizer names the bad hyperparameter.
        raise _optimizer_error(config, e) from e


def _optimizer_error(config: TrainConfig, error: ValueError) -> ConfigError:
    """The ConfigError for the optimizer's ``"name: problem"`` ValueError.

    An argument of :data:`FLAG_ARGS` is named as its flag: the user never
    gave it in --optimizer_args. SAM prefixes its base optimizer's errors
    with "base_optimizer: ", hence the search of every prefix.
    """
    parts = str(error).split(": ")
    for i, name in enumerate(parts[:-1]):
        if name in FLAG_ARGS:
            return ConfigError(f"--{name}: " + ": ".join(parts[i + 1 :]))
    return ConfigError(f"--optimizer={config.optimizer}: {error}")


def check_arguments(config: TrainConfig) -> None:
    """Refuses what the model, optimizer and sync mode would, before the run.

    The run builds them only after the strategy and the data exist (seconds,
    and a run directory logged): this builds them once beforehand with the
    same factories, so that each argument keeps the one check of its own
    constructor. They are built in a throwaway graph: eagerly, their
    variables (and :func:`resolve_jit_compile`'s device query) would
    initialise TensorFlow's devices, after which the strategy can no longer
    split the CPU into logical devices. The image shape is MNIST's: no
    argument check depends on it, and the data is not read yet.

    Raises:
      ConfigError: what :func:`build_model` or :func:`make_optimizer` raise.
    """
    with tf.Graph().as_default():
        build_model(
            config.model,
            seed=config.seed,
            mixed_precision=config.mixed_precision,
            jit_compile=bool(config.jit_compile),  # Not None: no device query.
            model_args=config.model_args,
        )
        # The step count only sizes the schedule; the run's is not known yet.
        make_optimizer(config, max(1, config.train_steps or 1))
