"""The trainer's library: strategies, input, model, optimizer, the loop.

``distopt.train`` is the command line over this module; tests and the
benchmark call it directly. The entry point is :func:`train`, which takes a
:class:`TrainConfig` and returns the final metrics. The steps it strings
together are public so they can be tested one by one.

Order matters in :func:`train`: everything that can fail on bad input
(names, batch divisibility, data checksums, a ``model_dir`` from another
model) is checked before the first byte is written to ``model_dir``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import time
from typing import Any

import numpy as np
import tensorflow as tf
from absl import logging
from tensorflow.core.framework import summary_pb2

from distopt import aggregation as aggregation_lib
from distopt import checkpoints as checkpoints_lib
from distopt import data as data_lib
from distopt import models as models_lib
from distopt import optimizers as optimizers_lib
from distopt import sync as sync_lib
from distopt import trainer_faults
from distopt.optimizers import schedules

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")
LR_SCHEDULES = ("constant", "exponential", "piecewise", "cosine")
MIXED_PRECISION = ("none", "bfloat16", "float16")
# Two replicas is the smallest count that exercises cross-replica aggregation,
# and on a small CPU host more logical devices only share the same cores.
DEFAULT_CPU_VIRTUAL_DEVICES = 2
RUN_CONFIG_FILE = "run_config.json"
METRICS_FILE = "metrics.json"
CHECKPOINT_SUBDIR = "checkpoints"
# A checkpoint of another model or dataset cannot be resumed: refuse it.
IDENTITY_KEYS = ("model", "dataset")
# --optimizer=sam: these --optimizer_args are SAM's (see optimizers.SAM); every
# other one is its base optimizer's. The default base is the trainer's default
# optimizer, whose default learning rate the trainer's defaults are tuned for.
SAM_ARGS = ("base_optimizer", "rho", "perturbation")
SAM_DEFAULT_BASE = "adam"


class ConfigError(ValueError):
    """A flag value or combination is invalid."""


class ModelDirError(ValueError):
    """``model_dir`` holds a run that this configuration cannot resume."""


@dataclasses.dataclass
class TrainConfig:
    """Everything :func:`train` needs; the flags of ``distopt.train`` map 1:1.

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
    communication_timeout: float = 600.0
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
    skip_nonfinite: bool = False
    on_nonfinite: str = "stop"
    max_skipped_steps: int = 20
    steps_per_loop: int = 50
    # None: XLA where it is the faster path (see resolve_jit_compile).
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


# --- Validation ---------------------------------------------------------------


def validate_config(config: TrainConfig) -> None:
    """Checks names and numbers that need no TensorFlow state.

    Raises:
      ConfigError: naming the bad value, and the valid names where there is a
        list of them.
    """

    def choice(what, value, valid):
        if value not in valid:
            plural = "strategies" if what == "strategy" else f"{what}s"
            raise ConfigError(
                f"Unknown {what} {value!r}; valid {plural}: {list(valid)}"
            )

    choice("strategy", config.strategy, STRATEGIES)
    choice("model", config.model, models_lib.names())
    choice("optimizer", config.optimizer, optimizers_lib.names())
    choice("aggregation", config.aggregation, aggregation_lib.names())
    choice("sync", config.sync, sync_lib.names())
    choice("lr_schedule", config.lr_schedule, LR_SCHEDULES)
    choice("mixed_precision", config.mixed_precision, MIXED_PRECISION)
    if config.mixed_precision == "float16" and config.sync in (
        "local_sgd",
        "diloco",
        "hierarchical",
    ):
        raise ConfigError(
            f"--mixed_precision=float16 needs loss scaling, which needs a "
            f"synchronous --sync (every_step or accumulate), got {config.sync}"
        )
    choice("data_source", config.data_source, data_lib.SOURCES)
    choice("input", config.input, data_lib.INPUTS)
    choice("on_nonfinite", config.on_nonfinite, trainer_faults.ON_NONFINITE)
    if config.skip_nonfinite and config.on_nonfinite == "ignore":
        raise ConfigError(
            "--skip_nonfinite means --on_nonfinite=skip; it contradicts "
            "--on_nonfinite=ignore"
        )
    for name in (
        "batch_size",
        "steps_per_loop",
        "log_every",
        "sync_period",
        "max_skipped_steps",
    ):
        if getattr(config, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(config, name)}")
    if config.train_steps <= 0 and config.epochs <= 0:
        raise ConfigError(
            "Set --train_steps or --epochs (--train_steps wins if both are set; got "
            f"train_steps={config.train_steps}, epochs={config.epochs})"
        )
    if config.strategy == "tpu" and not config.tpu:
        raise ConfigError("--strategy=tpu needs --tpu (a TPU name, or 'local' on a VM)")
    _check_loss_optimizer(config)
    if config.lr_schedule == "piecewise" and (
        len(config.lr_values) != len(config.lr_boundaries) + 1
    ):
        raise ConfigError(
            "--lr_schedule=piecewise needs --lr_boundaries and one more "
            f"--lr_values; got {list(config.lr_boundaries)} and "
            f"{list(config.lr_values)}"
        )


def _check_loss_optimizer(config: TrainConfig) -> None:
    """Rejects the sync modes that SAM and Heun (``minimize``) cannot follow."""
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


# --- Strategies ---------------------------------------------------------------


def configure_virtual_devices(num_devices: int) -> list[str]:
    """Splits the host CPU into ``num_devices`` logical devices.

    Must run before TensorFlow initialises its devices. If they already are
    (a test process, a notebook) and there are at least ``num_devices``
    logical CPUs, the first ones are used.

    Returns:
      The names of the logical CPU devices to use.

    Raises:
      ConfigError: too few logical CPUs exist and it is too late to make more.
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices
        )
    except RuntimeError:
        pass  # Devices already initialised: check below that enough exist.
    logical = tf.config.list_logical_devices("CPU")
    if len(logical) < num_devices:
        raise ConfigError(
            f"--virtual_devices={num_devices}: TensorFlow already initialised "
            f"{len(logical)} logical CPU device(s); set it before any TF op runs"
        )
    return [d.name for d in logical[:num_devices]]


def make_strategy(
    name: str,
    *,
    virtual_devices: int = 0,
    tpu: str = "",
    communication_timeout: float | None = None,
    slurm_port_base: int = 8888,
) -> tf.distribute.Strategy:
    """Creates a ``tf.distribute`` strategy by name.

    Args:
      name: one of ``STRATEGIES``.
      virtual_devices: on a CPU-only host, the number of logical CPU devices
        for ``mirrored`` (0: ``DEFAULT_CPU_VIRTUAL_DEVICES``). Ignored when
        GPUs are present.
      tpu: the TPU for ``tpu`` (a name, a grpc:// address, or "local").
      communication_timeout: seconds before a collective of ``multi_worker``
        fails, so that a dead peer errors out instead of hanging the job.
      slurm_port_base: ``multi_worker`` under Slurm: first port on each node.

    Returns:
      The strategy. What it runs on is logged.

    Raises:
      ConfigError: unknown name (listing the valid ones).
    """
    if name not in STRATEGIES:
        raise ConfigError(
            f"Unknown strategy {name!r}; valid strategies: {list(STRATEGIES)}"
        )
    if name == "default":
        strategy = tf.distribute.get_strategy()
    elif name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        strategy = tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    elif name == "mirrored":
        if tf.config.list_physical_devices("GPU"):
            if virtual_devices:
                logging.warning("--virtual_devices ignored: mirroring over the GPUs")
            strategy = tf.distribute.MirroredStrategy()
        else:
            n = virtual_devices or DEFAULT_CPU_VIRTUAL_DEVICES
            logging.info(
                "mirrored on a CPU-only host: %d logical CPU devices (%s)",
                n,
                "--virtual_devices"
                if virtual_devices
                else "default; set --virtual_devices",
            )
            # Not the default RING collectives: every MirroredStrategy in a
            # process starts from the same collective group and instance keys,
            # so a second train() in one process whose collectives come in
            # another order fails ("Shape mismatch in the collective
            # instance"). Reducing onto one device keeps no such state.
            strategy = tf.distribute.MirroredStrategy(
                devices=configure_virtual_devices(n),
                cross_device_ops=tf.distribute.ReductionToOneDevice(),
            )
    elif name == "multi_worker":
        strategy = _multi_worker_strategy(communication_timeout, slurm_port_base)
    else:
        strategy = _tpu_strategy(tpu)
    try:
        devices = list(strategy.extended.worker_devices)
    except RuntimeError:  # The default strategy has no device list.
        devices = ["the default device"]
    logging.info(
        "Strategy %s: %d replica(s) in sync; local devices %s",
        name,
        strategy.num_replicas_in_sync,
        ", ".join(devices),
    )
    return strategy


def communication_options(timeout: float | None):
    """Collective options with a timeout (None: wait forever)."""
    return tf.distribute.experimental.CommunicationOptions(
        timeout_seconds=timeout or None
    )


def make_cluster_resolver(slurm_port_base: int = 8888):
    """The cluster of a multi-worker run: TF_CONFIG, else Slurm, else None.

    Args:
      slurm_port_base: first port of the workers' servers on each Slurm node.

    Returns:
      A cluster resolver, or None for a single local worker.
    """
    if "TF_CONFIG" in os.environ:
        logging.info("multi_worker: cluster from TF_CONFIG")
        return tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if "SLURM_PROCID" in os.environ:
        logging.info("multi_worker: cluster from Slurm (SLURM_* variables)")
        gpus = len(tf.config.list_physical_devices("GPU"))
        if gpus:
            return tf.distribute.cluster_resolver.SlurmClusterResolver(
                port_base=slurm_port_base, gpus_per_node=gpus
            )
        # CPU nodes: the resolver divides GPUs among tasks and fails on zero
        # (range step 0), so give it a GPU count it never exhausts and tell it
        # not to touch CUDA_VISIBLE_DEVICES.
        return tf.distribute.cluster_resolver.SlurmClusterResolver(
            port_base=slurm_port_base,
            gpus_per_node=1024,
            gpus_per_task=1,
            auto_set_gpu=False,
        )
    logging.warning("multi_worker: no TF_CONFIG and no Slurm job: one local worker")
    return None


def _multi_worker_strategy(timeout, slurm_port_base=8888):
    # On a CPU host each worker is one device: N workers, N replicas.
    return tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=make_cluster_resolver(slurm_port_base),
        communication_options=communication_options(timeout),
    )


def _tpu_strategy(tpu):
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the one worker that writes checkpoints, summaries and metrics."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or isinstance(
        resolver, tf.distribute.cluster_resolver.TPUClusterResolver
    ):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if not task_type or task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and not has_chief


def _worker_id(strategy) -> int:
    resolver = getattr(strategy, "cluster_resolver", None)
    return int(getattr(resolver, "task_id", 0) or 0) if resolver else 0


def resolve_jit_compile(jit_compile: bool | None, strategy=None) -> bool:
    """Whether to XLA-compile the model's step: ``jit_compile``, or by device.

    An explicit True or False wins. None (the default) picks by the device
    type the strategy runs on: XLA on GPUs and TPUs, none on CPUs. On CPU the
    plain TensorFlow kernels (with ``max_pool2d`` pooling) were as fast as
    XLA for the bare LeNet and MLP steps, and the trainer ran faster without
    XLA (LeNet 2.1-2.2x, MLP mirrored 1.2x, MLP default the same; BUILD_NOTES.md,
    2026-12-01), with less compiling before the first step. The optimizer's own update kernels are unaffected (they take
    the optimizer's ``jit_compile``).

    Args:
      jit_compile: True, False or None (pick by device type).
      strategy: the strategy (default: the current one).
    """
    if jit_compile is not None:
        return bool(jit_compile)
    strategy = strategy or tf.distribute.get_strategy()
    return _is_tpu(strategy) or _runs_on_gpu(strategy)


def _runs_on_gpu(strategy) -> bool:
    try:
        devices = strategy.extended.worker_devices
    except RuntimeError:  # The default strategy: TF places ops on GPU:0 if any.
        return bool(tf.config.list_logical_devices("GPU"))
    return any(tf.DeviceSpec.from_string(d).device_type == "GPU" for d in devices)


def _is_tpu(strategy) -> bool:
    return isinstance(strategy, tf.distribute.TPUStrategy)


# --- Data, model, optimizer ---------------------------------------------------


def check_batch_size(global_batch_size: int, num_replicas: int) -> None:
    """Raises ConfigError unless the global batch splits evenly over replicas."""
    if global_batch_size % num_replicas:
        raise ConfigError(
            f"Global batch size {global_batch_size} is not divisible by the "
            f"{num_replicas} replicas in sync; use a multiple of {num_replicas}"
        )


def resolve_input(
    config: TrainConfig, strategy: tf.distribute.Strategy, source: data_lib.Source
) -> str:
    """How training batches reach the replicas: "memory" or "dataset".

    ``--input=auto`` takes the in-memory feed wherever it applies (an
    in-memory source under a single-host strategy): it runs no input
    pipeline, which on small models is most of the gap to a bare step.

    Raises:
      ConfigError: ``--input=memory`` where it does not apply.
    """
    if config.input == "dataset":
        return "dataset"
    why_not = data_lib.can_feed_from_memory(strategy, source)
    if config.input == "memory" and why_not:
        raise ConfigError(f"--input=memory: {why_not}; use --input=dataset or auto")
    return "dataset" if why_not else "memory"


def make_train_feed(
    strategy: tf.distribute.Strategy,
    source: data_lib.Source,
    config: TrainConfig,
    kind: str,
    start_step: int = 0,
):
    """The training feed of :func:`make_train_loop`: in memory, or ``tf.data``.

    Args:
      kind: "memory" or "dataset" (:func:`resolve_input`).
      start_step: where a ``tf.data`` pipeline starts (the in-memory feed
        reads the step from the step variable).

    Raises:
      ConfigError: the in-memory feed has no whole batch per epoch.
    """
    check_batch_size(config.batch_size, strategy.num_replicas_in_sync)
    if kind == "memory":
        try:
            feed = data_lib.InMemoryFeed(
                strategy,
                source,
                config.batch_size,
                seed=config.seed,
                drop_remainder=config.drop_remainder,
            )
        except ValueError as e:
            raise ConfigError(f"--batch_size={config.batch_size}: {e}") from e
        logging.info(
            "Input: in memory, on the replicas' devices (%d examples, %d steps "
            "per epoch; --input=dataset for tf.data)",
            feed.num_examples,
            feed.steps_per_epoch,
        )
        return feed
    # TPUs need static shapes, so never a partial batch there.
    drop = config.drop_remainder or _is_tpu(strategy)
    train_fn = data_lib.make_dataset_fn(
        source,
        "train",
        config.batch_size,
        training=True,
        seed=config.seed,
        drop_remainder=drop,
        start_step=start_step,
    )
    logging.info("Input: tf.data pipeline (--input=%s)", config.input)
    return data_lib.DatasetFeed(
        strategy.distribute_datasets_from_function(train_fn, _input_options(strategy))
    )


def _input_options(strategy):
    # On CPUs the batches are in the devices' memory already: skip the
    # per-replica prefetch copies (LeNet on 2 virtual CPUs: 1.2-1.4x faster).
    if not _is_tpu(strategy) and not _runs_on_gpu(strategy):
        return tf.distribute.InputOptions(experimental_fetch_to_device=False)
    return None


def make_eval_dataset(
    strategy: tf.distribute.Strategy, source: data_lib.Source, config: TrainConfig
):
    """The distributed test dataset and the number of steps of one pass."""
    eval_batch = config.eval_batch_size or config.batch_size
    check_batch_size(eval_batch, strategy.num_replicas_in_sync)
    test_fn = data_lib.make_dataset_fn(
        source,
        "test",
        eval_batch,
        training=False,
        max_steps=config.eval_steps or None,
    )
    contexts = []

    def capture_context(input_context):
        contexts.append(input_context)
        return test_fn(input_context)

    test = strategy.distribute_datasets_from_function(
        capture_context, _input_options(strategy)
    )
    # Known up front (the pass is padded to whole batches), so evaluation can
    # run a fixed-length loop instead of checking every replica for the end
    # of data at every step.
    test_steps = data_lib.eval_steps(
        source.num_examples["test"],
        eval_batch,
        contexts[0].num_input_pipelines,
        config.eval_steps or None,
    )
    return test, test_steps


def make_datasets(
    strategy: tf.distribute.Strategy,
    source: data_lib.Source,
    config: TrainConfig,
    start_step: int = 0,
):
    """Distributed ``tf.data`` train and test datasets.

    Returns:
      (train, test, test_steps): ``tf.distribute.DistributedDataset`` s and
      the number of steps of one pass over test. Train is infinite and starts
      where ``start_step`` left off; test is one padded pass.
    """
    train = make_train_feed(strategy, source, config, "dataset", start_step)
    test, test_steps = make_eval_dataset(strategy, source, config)
    return train.dataset, test, test_steps


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
            jit_compile=resolve_jit_compile(jit_compile),
            model_args=model_args,
        )
    except TypeError as e:
        raise ConfigError(
            f"--model={name} does not take one of {sorted(model_args or {})}: {e}"
        ) from e
    except ValueError as e:  # The model names the bad value.
        raise ConfigError(f"--model={name}: {e}") from e


class _Warmup:
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
    return _Warmup(schedule, warmup) if warmup else schedule


def make_optimizer(config: TrainConfig, total_steps: int, strategy=None):
    """Builds the optimizer, its aggregation and its sync mode from ``config``.

    Call inside ``strategy.scope()``.

    Raises:
      ConfigError: unknown names, or a hyperparameter the optimizer or sync
        mode does not take.
    """
    sync_kwargs = dict(config.sync_args)
    if config.sync != "every_step":
        sync_kwargs.setdefault("k", config.sync_period)
    if config.sync == "diloco" and (
        "outer_learning_rate" in sync_kwargs or "outer_momentum" in sync_kwargs
    ):
        sync_kwargs["outer_optimizer"] = optimizers_lib.get(
            "momentum",
            learning_rate=sync_kwargs.pop("outer_learning_rate", 0.7),
            momentum=sync_kwargs.pop("outer_momentum", 0.9),
            nesterov=True,
            name="outer_momentum",
        )
    try:
        sync = sync_lib.get(config.sync, **sync_kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"--sync={config.sync} does not take {sync_kwargs}: {e}"
        ) from e
    # Schedules count applied updates: one per k steps when accumulating.
    updates = (
        total_steps // config.sync_period
        if config.sync == "accumulate"
        else total_steps
    )
    kwargs = dict(config.optimizer_args)
    if config.strategy == "multi_worker":
        kwargs["communication_options"] = communication_options(
            config.communication_timeout
        )
    kwargs.update(
        learning_rate=make_schedule(config, max(1, updates)),
        aggregation=aggregation_lib.get(config.aggregation),
        sync=sync,
        global_clipnorm=config.global_clipnorm,
        # The optimizer skips (on every replica) only under the skip policy:
        # the check costs throughput (see optimizers/base.py), and "stop"
        # reads the loss and the weights instead.
        skip_nonfinite=nonfinite_policy(config) == "skip",
    )
    if config.mixed_precision == "float16":
        # float16 gradients underflow without it; overflowing steps are
        # skipped on every replica and halve the scale.
        kwargs["loss_scale"] = "dynamic"
    try:
        if config.optimizer == "sam":
            # SAM's own arguments; all others (the learning rate, aggregation
            # and sync included) build its base optimizer.
            sam_args = {k: kwargs.pop(k) for k in SAM_ARGS if k in kwargs}
            base = sam_args.pop("base_optimizer", SAM_DEFAULT_BASE)
            return optimizers_lib.get("sam", base_optimizer=base, **sam_args, **kwargs)
        return optimizers_lib.get(config.optimizer, **kwargs)
    except TypeError as e:
        raise ConfigError(
            f"--optimizer={config.optimizer} does not take one of "
            f"{sorted(config.optimizer_args)}: {e}"
        ) from e
    except ValueError as e:  # The optimizer names the bad hyperparameter.
        raise ConfigError(f"--optimizer={config.optimizer}: {e}") from e


class _Sums(tf.Module):
    """Per-replica running sums (loss, correct, count) of one metric stream.

    On-read-synchronised variables: each replica adds to its own copy with no
    communication; reading in cross-replica context sums over replicas (and
    workers). Not checkpointed.
    """

    def __init__(self, name):
        super().__init__(name=name)
        self.vars = {
            key: tf.Variable(
                0.0,
                trainable=False,
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.SUM,
                name=key,
            )
            for key in ("loss", "correct", "count")
        }

    def add(self, loss, correct, count):
        self.vars["loss"].assign_add(loss)
        self.vars["correct"].assign_add(correct)
        self.vars["count"].assign_add(count)

    def result(self) -> dict[str, float]:
        """Reads and resets; returns mean loss, accuracy and example count."""
        values = {k: float(v.read_value()) for k, v in self.vars.items()}
        for v in self.vars.values():
            v.assign(0.0)
        n = max(values["count"], 1.0)
        return {
            "loss": values["loss"] / n,
            "accuracy": values["correct"] / n,
            "examples": values["count"],
        }


def _loss_and_metrics(model, images, labels, mask=None, training=False):
    logits = model(images, training=training)
    per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
    hits = tf.cast(
        tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32
    )
    if mask is None:
        count = tf.cast(tf.shape(labels)[0], tf.float32)
    else:
        per_example, hits, count = per_example * mask, hits * mask, tf.reduce_sum(mask)
    return tf.reduce_sum(per_example), tf.reduce_sum(hits), count


def make_train_loop(
    strategy, model, optimizer, sums, step, *, jit_compile=None, guard=None, feed=None
):
    """The compiled training loop: ``loop(inputs, num_steps)``.

    Runs ``num_steps`` steps in one ``tf.function`` (a ``tf.range`` loop), so
    Python runs once per loop, not per step. ``feed`` says where each step's
    batch comes from (``data.InMemoryFeed`` or ``data.DatasetFeed``; None:
    ``inputs`` is a distributed iterator); ``inputs`` is ``feed.inputs()``.
    Each replica computes its local mean loss and gradients and hands them to
    the optimizer with its example count, which ``weighted_mean`` needs to
    stay exact when a partial batch splits unevenly.

    ``jit_compile=None`` decides by device type (:func:`resolve_jit_compile`).
    With ``jit_compile`` the forward and backward pass is one XLA program (the
    optimizer's update kernels are XLA already); under a single-replica
    strategy the whole step, update included, is. Under a multi-replica
    strategy the optimizer's cross-replica ``merge_call`` stays outside XLA.
    On TPU, ``strategy.run`` compiles everything anyway.

    Optimizers that evaluate the loss themselves (``needs_loss``: SAM, Heun)
    get ``optimizer.minimize(loss_fn, variables)`` instead; they call
    ``loss_fn`` more than once per step, and the metrics are those of the
    first call, at the parameters the step starts from, as with
    ``apply_gradients``. Under a multi-replica strategy the forward pass is
    then the XLA program (the optimizer differentiates it).
    """
    jit_compile = resolve_jit_compile(jit_compile, strategy)
    variables = model.trainable_variables
    needs_loss = getattr(optimizer, "needs_loss", False)

    def forward(images, labels):
        return _loss_and_metrics(model, images, labels, training=True)

    def grads_and_metrics(images, labels):
        with tf.GradientTape() as tape:
            loss_sum, correct, count = forward(images, labels)
            # The local mean: aggregation across replicas is the optimizer's job.
            loss = loss_sum / tf.maximum(count, 1.0)
            # Loss scaling (float16); the optimizer divides it out again.
            scaled = optimizer.scale_loss(loss)
        return tape.gradient(scaled, variables), loss_sum, correct, count

    def step_fn(images, labels):
        grads, loss_sum, correct, count = grads_and_metrics(images, labels)
        optimizer.apply_gradients(grads, variables, weight=count)
        sums.add(loss_sum, correct, count)
        if guard is not None:
            guard.watch_loss(loss_sum)

    def minimize_step_fn(images, labels):
        first = []

        def loss_fn():
            loss_sum, correct, count = forward(images, labels)
            if not first:
                first.append((loss_sum, correct, count))
            return loss_sum / tf.maximum(count, 1.0)

        count = tf.cast(tf.shape(labels)[0], tf.float32)
        optimizer.minimize(loss_fn, variables, weight=count)
        sums.add(*first[0])
        if guard is not None:
            guard.watch_loss(first[0][0])

    if needs_loss:
        step_fn = minimize_step_fn
    # Not for a single-worker multi_worker cluster (an elastic resume on one
    # worker): its optimizer still merge_calls, which cannot run inside the
    # nested compiled function.
    whole_step = (
        jit_compile
        and strategy.num_replicas_in_sync == 1
        and not _is_tpu(strategy)
        and not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    )
    if whole_step:
        step_fn = tf.function(step_fn, jit_compile=True)
    elif jit_compile and not _is_tpu(strategy):
        if needs_loss:
            forward = tf.function(forward, jit_compile=True)
        else:
            grads_and_metrics = tf.function(grads_and_metrics, jit_compile=True)

    feed = feed or data_lib.DatasetFeed(None)

    def replica_step(*args):
        step_fn(*feed.replica_batch(*args))

    counting_skips = guard is not None and guard.policy == "skip"

    @tf.function
    def loop(inputs, num_steps):
        skipped = tf.constant(0, tf.int64)  # Autograph: defined before the loop.
        first = tf.identity(step)
        state = feed.start(first)
        for i in tf.range(num_steps):
            if counting_skips:
                skipped = optimizer.skipped_steps.read_value()
            args, state = feed.next(inputs, state, first + i)
            strategy.run(replica_step, args=args)
            if counting_skips:
                guard.count_skips(skipped)
        if guard is not None:
            strategy.run(guard.watch_weights, args=(variables,))
        step.assign_add(tf.cast(num_steps, tf.int64))

    return loop


def make_eval_loop(strategy, model, sums, *, jit_compile=None):
    """The compiled evaluation: ``evaluate(iterator, num_steps)`` fills ``sums``.

    The test set comes padded to whole batches with a 0/1 mask (static shapes
    for XLA and TPUs); summing masked losses and hits over replicas gives the
    exact test metrics however the last batch falls.
    """

    def metrics(images, labels, mask):
        return _loss_and_metrics(model, images, labels, mask)

    if resolve_jit_compile(jit_compile, strategy) and not _is_tpu(strategy):
        metrics = tf.function(metrics, jit_compile=True)

    def replica_step(batch):
        sums.add(*metrics(*batch))

    @tf.function
    def evaluate(iterator, num_steps):
        for _ in tf.range(num_steps):
            strategy.run(replica_step, args=(next(iterator),))

    return evaluate


# --- model_dir ----------------------------------------------------------------


def run_identity(config: TrainConfig) -> dict[str, Any]:
    """What ``model_dir/run_config.json`` stores: the full config."""
    return dataclasses.asdict(config)


def check_model_dir(model_dir: str, config: TrainConfig) -> str | None:
    """Checks, without writing, that ``model_dir`` can hold this run.

    Returns:
      The latest checkpoint path to resume from, or None for a fresh run.

    Raises:
      ModelDirError: the directory holds a run of another model or dataset.
    """
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, CHECKPOINT_SUBDIR))
    path = os.path.join(model_dir, RUN_CONFIG_FILE)
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as f:
            stored = json.load(f)
        for key in IDENTITY_KEYS:
            if stored.get(key) != getattr(config, key):
                raise ModelDirError(
                    f"{model_dir} holds a run with {key}={stored.get(key)!r} "
                    f"(see {path}), not {key}={getattr(config, key)!r}. Nothing "
                    "was written; use another --model_dir, or delete this one."
                )
        # Through JSON, so that tuples compare equal to the stored lists.
        current = json.loads(json.dumps(run_identity(config), default=list))
        changed = {
            k: (stored[k], v)
            for k, v in current.items()
            if k in stored and stored[k] != v
        }
        if changed and latest:
            logging.info("Resuming with changed settings (old, new): %s", changed)
    return latest


def restore(checkpoint: tf.train.Checkpoint, path: str, model_dir: str) -> None:
    """Restores ``path`` and checks it matches the model exactly.

    Raises:
      ModelDirError: the checkpoint's variables do not fit this model (another
        architecture, or a model_dir with no run_config.json).
    """
    try:
        checkpoint.restore(path).assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.InvalidArgumentError) as e:
        # TensorFlow's message prints every unmatched variable with its
        # values; the names are what says which setting changed.
        names = re.findall(r"<tf\.Variable '([^']+)'", str(e))
        detail = (
            f"{len(names)} variable(s) of this run are not in it: "
            f"{', '.join(names[:8])}{', ...' if len(names) > 8 else ''}"
            if names
            else str(e)[:500]
        )
        raise ModelDirError(
            f"The checkpoint {path} in {model_dir} does not match this model: "
            f"{detail}. Nothing was written; use another --model_dir."
        ) from e


# --- The run ------------------------------------------------------------------


def resolve_train_steps(config: TrainConfig, num_train_examples: int) -> int:
    """``--train_steps`` if set (it overrides a config file's ``--epochs``),
    else ``--epochs`` worth of global batches."""
    if config.train_steps:
        return config.train_steps
    return max(1, int(config.epochs * num_train_examples) // config.batch_size)


# tf.summary.scalar lives in the tensorboard package, which TensorFlow does not
# require; this writes the same event (TensorBoard's "scalars" plugin) with
# core TensorFlow only.
_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
    data_class=summary_pb2.DATA_CLASS_SCALAR,
)


def write_scalars(writer, step: int, values: dict[str, float]) -> None:
    """Writes TensorBoard scalars ``values`` at ``step`` with ``writer``."""
    with writer.as_default(step=step):
        for name, value in values.items():
            tf.summary.write(
                name, tf.constant(value, tf.float32), metadata=_SCALAR_METADATA
            )


def _format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def process_start_time() -> float | None:
    """Wall-clock time this process started (Linux), else None.

    ``python -m distopt.train`` imports TensorFlow (through the package's
    ``__init__``) before the script's first line runs, so only the OS knows
    when the user pressed enter.
    """
    try:
        with open("/proc/self/stat") as f:
            # Field 22, after the parenthesised command name: start time in
            # clock ticks since boot.
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


def _seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    tf.random.set_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


@dataclasses.dataclass
class _Run:
    """What :func:`train` sets up once and the loop then works on."""

    config: TrainConfig
    strategy: tf.distribute.Strategy
    chief: bool
    source: Any
    total_steps: int
    model: Any
    optimizer: Any
    step: tf.Variable
    train_sums: _Sums
    eval_sums: _Sums
    checkpoint: tf.train.Checkpoint
    guard: trainer_faults.NonfiniteGuard
    t0: float
    start_time: float
    lock: checkpoints_lib.RunLock | None = None
    signals: trainer_faults.StopSignals | None = None
    start_step: int = 0
    resumed_from: str | None = None
    input: str = "dataset"

    def close(self):
        if self.lock:
            self.lock.release()


def _setup(config, strategy, start_time, signals) -> _Run:
    """Checks the input and builds strategy, model, optimizer and checkpoint.

    Writes nothing. Installs ``signals`` as soon as the strategy exists.
    """
    t0 = time.time()
    start_time = start_time or process_start_time() or t0
    validate_config(config)
    _seed_everything(config.seed, config.deterministic)
    if strategy is None:
        # First TF device use: virtual devices must be configured before it.
        strategy = make_strategy(
            config.strategy,
            virtual_devices=config.virtual_devices,
            tpu=config.tpu,
            communication_timeout=config.communication_timeout,
            slurm_port_base=config.slurm_port_base,
        )
    # Right after the strategy, whose coordination service (multi_worker)
    # installs a log-only SIGTERM handler: ours replaces it, so that a notice
    # during the set-up is not lost; it stops the run after its first step.
    signals.install()
    check_batch_size(config.batch_size, strategy.num_replicas_in_sync)
    check_model_dir(config.model_dir, config)

    source = data_lib.load_source(
        config.dataset, config.data_dir, config.data_source, download=config.download
    )
    total_steps = resolve_train_steps(config, source.num_examples["train"])
    input_kind = resolve_input(config, strategy, source)

    with strategy.scope():
        model = build_model(
            config.model,
            source,
            seed=config.seed,
            mixed_precision=config.mixed_precision,
            # TPUs compile everything with XLA, whatever the flag says.
            jit_compile=True if _is_tpu(strategy) else config.jit_compile,
            model_args=config.model_args,
        )
        optimizer = make_optimizer(config, total_steps, strategy)
        optimizer.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        train_sums, eval_sums = _Sums("train_sums"), _Sums("eval_sums")
        guard = trainer_faults.NonfiniteGuard(
            nonfinite_policy(config), config.max_skipped_steps, optimizer
        )
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step)
    return _Run(
        config=config,
        strategy=strategy,
        chief=is_chief(strategy),
        source=source,
        total_steps=total_steps,
        model=model,
        optimizer=optimizer,
        step=step,
        train_sums=train_sums,
        eval_sums=eval_sums,
        checkpoint=checkpoint,
        guard=guard,
        t0=t0,
        start_time=start_time,
        signals=signals,
        input=input_kind,
    )


def _resume(run: _Run) -> None:
    """Locks ``model_dir`` (chief) and restores the newest checkpoint that loads.

    A latest checkpoint that fails to load is moved aside with a WARNING (see
    :func:`checkpoints.newest_loadable`).

    Raises:
      checkpoints.LockError: another trainer writes this ``model_dir``.
      ModelDirError: the checkpoint does not fit this model.
    """
    config = run.config
    if run.chief:
        run.lock = checkpoints_lib.RunLock(config.model_dir)
        run.lock.acquire()
    directory = os.path.join(config.model_dir, CHECKPOINT_SUBDIR)
    latest = checkpoints_lib.newest_loadable(directory, chief=run.chief)
    if latest:
        restore(run.checkpoint, latest, config.model_dir)
        # Local SGD / DiLoCo: each replica's own weights and slots, saved by
        # snapshot_replicas() below, go back to their replica (on another
        # replica count, every replica starts from their average).
        run.optimizer.restore_replicas(run.model.trainable_variables)
    run.resumed_from = latest
    run.start_step = int(run.step.numpy())
    logging.info(
        "Model %s (%d parameters), %s optimizer, aggregation %s, sync %s; "
        "global batch %d over %d replica(s); %s step %d of %d",
        config.model,
        models_lib.parameter_count(run.model),
        config.optimizer,
        config.aggregation,
        config.sync
        if config.sync == "every_step"
        else f"{config.sync} k={config.sync_period}",
        config.batch_size,
        run.strategy.num_replicas_in_sync,
        "resuming at" if latest else "starting at",
        run.start_step,
        run.total_steps,
    )


def nonfinite_policy(config: TrainConfig) -> str:
    """``--on_nonfinite``, with ``--skip_nonfinite`` meaning ``skip``."""
    return "skip" if config.skip_nonfinite else config.on_nonfinite


def train(
    config: TrainConfig,
    *,
    strategy: tf.distribute.Strategy | None = None,
    start_time: float | None = None,
) -> dict[str, Any]:
    """Trains and evaluates; writes checkpoints, summaries and metrics.json.

    Resumes from the newest checkpoint in ``config.model_dir`` that loads.
    Only the chief writes to ``model_dir``, and only one trainer at a time
    (a lock file). SIGTERM or SIGINT stops the run after the current chunk
    of at most ``steps_per_loop`` steps, with a checkpoint there.

    Args:
      config: the run.
      strategy: use this strategy instead of creating ``config.strategy``
        (tests and benchmarks that already initialised TensorFlow).
      start_time: ``time.time()`` at process start, for time to first step
        (default: :func:`process_start_time`, else the call to ``train``).

    Returns:
      The metrics also written to ``model_dir/metrics.json`` (``status``
      ``"completed"``).

    Raises:
      ConfigError, ModelDirError, data.DataError: bad input; nothing was
        written to ``model_dir`` then.
      checkpoints.LockError: another trainer holds ``model_dir``.
      checkpoints.CheckpointSaveError: a save failed; the previous
        checkpoint is still the latest.
      trainer_faults.Preempted: a stop notice; a checkpoint was saved and
        ``metrics.json`` says ``"preempted"``.
      trainer_faults.Diverged: a non-finite loss or gradient under
        ``on_nonfinite="stop"`` (or too many skipped steps in a row); the
        last checkpoint is the last good one, ``metrics.json`` says
        ``"diverged"``.
    """
    signals = trainer_faults.StopSignals()
    try:
        run = _setup(config, strategy, start_time, signals)
        try:
            _resume(run)
            return _train_loop(run)
        finally:
            run.close()
    finally:
        signals.uninstall()


def _train_loop(run: _Run) -> dict[str, Any]:
    """Trains from ``run.start_step`` to the end, a stop notice or divergence."""
    config, strategy, chief = run.config, run.strategy, run.chief
    model, optimizer, step = run.model, run.optimizer, run.step
    start_step, total_steps = run.start_step, run.total_steps

    # Every check passed: from here on we write.
    if chief:
        tf.io.gfile.makedirs(config.model_dir)
        with tf.io.gfile.GFile(
            os.path.join(config.model_dir, RUN_CONFIG_FILE), "w"
        ) as f:
            json.dump(run_identity(config), f, indent=2, default=list)
        train_writer = tf.summary.create_file_writer(
            os.path.join(config.model_dir, "train")
        )
        eval_writer = tf.summary.create_file_writer(
            os.path.join(config.model_dir, "eval")
        )
    else:
        train_writer = eval_writer = tf.summary.create_noop_writer()
    saver = checkpoints_lib.CheckpointWriter(
        run.checkpoint,
        os.path.join(config.model_dir, CHECKPOINT_SUBDIR),
        chief,
        _worker_id(strategy),
        config.keep_checkpoints,
    )

    feed = make_train_feed(strategy, run.source, config, run.input, start_step)
    # The test pipeline is built at the first evaluation, not before the
    # first step; its batch size is checked now, before anything runs.
    check_batch_size(
        config.eval_batch_size or config.batch_size, strategy.num_replicas_in_sync
    )
    test_data = []
    inputs = feed.inputs()
    train_loop = make_train_loop(
        strategy,
        model,
        optimizer,
        run.train_sums,
        step,
        jit_compile=config.jit_compile,
        guard=run.guard,
        feed=feed,
    )
    eval_loop = make_eval_loop(
        strategy, model, run.eval_sums, jit_compile=config.jit_compile
    )
    agree = trainer_faults.make_agreement(strategy)
    variables = model.trainable_variables

    def synchronize():
        # Local SGD / DiLoCo replicas diverge by design: average them before
        # anything reads "the" model. The optimizer needs the strategy in scope.
        with strategy.scope():
            optimizer.synchronize(variables)

    def stop_agreed():
        stops, _ = agree(
            tf.constant(1.0 if run.signals.requested else 0.0), run.guard.bad
        )
        return float(stops) > 0

    def evaluate(at_step):
        """The test metrics, or None when a stop notice cut the pass short.

        The pass runs in chunks of ``steps_per_loop`` batches with a stop
        agreement between them: a large test set must not outlast the grace
        period a scheduler gives after SIGTERM.
        """
        synchronize()
        t = time.time()
        if not test_data:
            test_data.extend(make_eval_dataset(strategy, run.source, config))
        test_ds, test_steps = test_data
        test_iterator, done = iter(test_ds), 0
        while done < test_steps:
            run.signals.maybe_inject(at_step)
            n = min(config.steps_per_loop, test_steps - done)
            eval_loop(test_iterator, tf.constant(n, tf.int64))
            done += n
            if done < test_steps and stop_agreed():
                run.eval_sums.result()  # Drops the partial sums.
                logging.warning(
                    "Evaluation at step %d cut short by a stop notice (%d of %d "
                    "batches)",
                    at_step,
                    done,
                    test_steps,
                )
                return None
        result = run.eval_sums.result()
        logging.info(
            "eval step %d: loss %.4f, accuracy %.2f%% on %d examples (%.1f s)",
            at_step,
            result["loss"],
            100 * result["accuracy"],
            result["examples"],
            time.time() - t,
        )
        write_scalars(
            eval_writer,
            at_step,
            {"loss": result["loss"], "accuracy": result["accuracy"]},
        )
        return result

    last_saved = [run.start_step if run.resumed_from else None]

    def save(at_step):
        # Keeps every replica's copy in the checkpoint without averaging, so
        # checkpointing does not change a local SGD / DiLoCo run.
        with strategy.scope():
            optimizer.snapshot_replicas(variables)
        saver.save(at_step)
        last_saved[0] = at_step

    timing = {"first_step": None, "steps": 0, "seconds": 0.0}

    def finish(status, final_step, result=None):
        train_writer.flush()
        eval_writer.flush()
        result = result or {}
        metrics = {
            "status": status,
            "test_accuracy": result.get("accuracy"),
            "test_loss": result.get("loss"),
            "test_examples": int(result["examples"]) if result else None,
            "train_steps": final_step,
            "start_step": start_step,
            "examples_per_second": (
                timing["steps"] * config.batch_size / timing["seconds"]
                if timing["seconds"]
                else None
            ),
            "wall_seconds": time.time() - run.t0,
            "seconds_to_first_step": timing["first_step"],
            "skipped_steps": int(optimizer.skipped_steps.numpy()),
            "num_replicas": strategy.num_replicas_in_sync,
            "global_batch_size": config.batch_size,
            "model": config.model,
            "dataset": config.dataset,
            "data_source": run.source.origin,
            "input": run.input,
            "strategy": config.strategy,
            "optimizer": config.optimizer,
            "aggregation": config.aggregation,
            "sync": config.sync,
            "sync_period": config.sync_period,
            "last_checkpoint_step": last_saved[0],
        }
        if chief:
            _write_json_atomically(
                os.path.join(config.model_dir, METRICS_FILE), metrics
            )
        return metrics

    def preempt(at_step, when=""):
        if last_saved[0] != at_step:
            save(at_step)
        finish(trainer_faults.STATUS_PREEMPTED, at_step)
        raise trainer_faults.Preempted(
            f"Stopped by {run.signals.requested or 'a stop notice to another worker'}"
            f" at step {at_step} of {total_steps}{when}; saved a checkpoint there. "
            "Rerun the same command to resume"
        )

    # The loop runs in chunks of at most steps_per_loop steps, cut at every
    # log, eval and checkpoint boundary. The first chunk is one step, so time
    # to first step (tracing and compilation included) is measured on its own
    # and kept out of the throughput. Stop notices and divergence are read
    # between chunks: a chunk is what "the current step" means for them.
    current = start_step
    window_start, window_steps = time.time(), 0
    boundaries = [config.log_every, config.eval_every, config.checkpoint_every]
    while current < total_steps:
        n = min(config.steps_per_loop, total_steps - current)
        for every in boundaries:
            if every > 0:
                n = min(n, every - current % every)
        if timing["first_step"] is None:
            n = 1
        run.signals.maybe_inject(current)
        t = time.time()
        train_loop(inputs, tf.constant(n, tf.int64))
        current += n
        if timing["first_step"] is None:
            int(step.numpy())  # Wait for the step to finish.
            timing["first_step"] = time.time() - run.start_time
            logging.info("First step done %.1f s after start", timing["first_step"])
            window_start, window_steps = time.time(), 0
        else:
            timing["steps"] += n
            timing["seconds"] += time.time() - t
            window_steps += n
        if delay := trainer_faults.chunk_delay():
            time.sleep(delay)

        # One agreement per chunk: every worker stops (or diverges) together.
        stops, bad = agree(
            tf.constant(1.0 if run.signals.requested else 0.0), run.guard.bad
        )
        diverged = run.guard.diverged(float(bad))
        if diverged:
            finish(trainer_faults.STATUS_DIVERGED, current)
            raise trainer_faults.Diverged(
                f"Training diverged: {diverged} in steps {current - n + 1}-{current}"
                f"; {_kept(last_saved[0])}. Lower --learning_rate, add "
                "--global_clipnorm, or see --on_nonfinite"
            )

        if current % config.log_every == 0 or current == total_steps:
            result = run.train_sums.result()
            elapsed = time.time() - window_start
            rate = window_steps * config.batch_size / elapsed if window_steps else 0.0
            steps_per_second = window_steps / elapsed if window_steps else 0.0
            eta = (
                (total_steps - current) / steps_per_second if steps_per_second else 0.0
            )
            lr = float(optimizer.learning_rate_value())
            skipped = int(optimizer.skipped_steps.numpy())
            logging.info(
                "step %d/%d: loss %.4f, accuracy %.2f%%, %.0f examples/s, "
                "lr %.3g, ETA %s",
                current,
                total_steps,
                result["loss"],
                100 * result["accuracy"],
                rate,
                lr,
                _format_seconds(eta),
            )
            write_scalars(
                train_writer,
                current,
                {
                    "loss": result["loss"],
                    "accuracy": result["accuracy"],
                    "learning_rate": lr,
                    "examples_per_second": rate,
                    "skipped_steps": skipped,
                },
            )
            window_start, window_steps = time.time(), 0
        if float(stops) > 0:
            preempt(current)
        if (
            config.eval_every
            and current % config.eval_every == 0
            and current < total_steps
            and evaluate(current) is None
        ):
            preempt(current)
        if config.checkpoint_every and current % config.checkpoint_every == 0:
            save(current)

    final_step = int(step.numpy())
    averaged = optimizer.use_ema and final_step > 0
    if averaged:
        # As at the end of Keras's fit: the moving average becomes the weights
        # that are saved and evaluated. Idempotent (the average is not
        # changed), so a resumed final phase repeats it harmlessly.
        with strategy.scope():
            optimizer.finalize_variable_values(variables)
        logging.info("Weights set to their moving average (use_ema)")
    if averaged or (final_step > start_step and last_saved[0] != final_step):
        save(final_step)
    result = evaluate(final_step)
    if result is None:
        preempt(final_step, " during the final evaluation")
    skipped = int(optimizer.skipped_steps.numpy())
    if skipped:
        logging.warning(
            "%d step(s) were skipped for a non-finite gradient (--on_nonfinite=skip)",
            skipped,
        )
    metrics = finish(trainer_faults.STATUS_COMPLETED, final_step, result)
    logging.info(
        "Done: test accuracy %.2f%%, test loss %.4f, %d steps, %s examples/s, %.1f s",
        100 * metrics["test_accuracy"],
        metrics["test_loss"],
        final_step,
        f"{metrics['examples_per_second']:.0f}"
        if metrics["examples_per_second"]
        else "n/a",
        metrics["wall_seconds"],
    )
    return metrics


def _kept(saved_step):
    if saved_step is None:
        return "no checkpoint was written"
    return f"the checkpoint of step {saved_step}, the last good one, is kept"


def _write_json_atomically(path: str, value) -> None:
    """Strict JSON (NaN and Infinity as null), replaced in one rename."""
    text = json.dumps(trainer_faults.strict_json(value), indent=2, allow_nan=False)
    tmp = f"{path}.tmp-{os.getpid()}"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(text)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def parse_kv(text: str) -> dict[str, Any]:
    """Parses ``"a=1,b=0.5,c=true,d=name"`` into typed values.

    Raises:
      ConfigError: an item is not ``key=value``.
    """
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"Expected key=value, got {item!r} in {text!r}")
        out[key.strip()] = _typed(value.strip())
    return out


def _typed(value: str):
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value
