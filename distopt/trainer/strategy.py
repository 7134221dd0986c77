"""The trainer's strategy: which one a config asks for, and what it runs on.

Strategies are made by :func:`distopt.distribute.make_strategy`; this module
adds what only the trainer needs: the flags' defaults (2 logical CPUs for
``mirrored`` on a CPU host), the replica count where the flags fix it before
any device exists, the cluster of a ``multi_worker`` run (TF_CONFIG or Slurm),
the log line, the chief, and the XLA default by device type.
"""

from __future__ import annotations

import os

import tensorflow as tf
from absl import logging

from distopt import distribute
from distopt.trainer.config import (
    DEFAULT_CPU_VIRTUAL_DEVICES,
    ConfigError,
    TrainConfig,
    replica_group_size,
)


def make_strategy(
    name: str,
    *,
    virtual_devices: int = 0,
    tpu: str = "",
    communication_timeout: float | None = None,
    slurm_port_base: int = 8888,
) -> tf.distribute.Strategy:
    """Creates the strategy of ``--strategy=name`` and logs what it runs on.

    Args:
      name: one of ``distribute.STRATEGY_KINDS``.
      virtual_devices: on a CPU-only host, the number of logical CPU devices
        for ``mirrored`` (0: ``DEFAULT_CPU_VIRTUAL_DEVICES``). Ignored, with a
        warning, when GPUs are present.
      tpu: the TPU for ``tpu`` (a name, a grpc:// address, or "local").
      communication_timeout: seconds before a collective of ``multi_worker``
        fails, so that a dead peer errors out instead of hanging the job.
      slurm_port_base: ``multi_worker`` under Slurm: first port on each node.

    Raises:
      ConfigError: an unknown name (listing the valid ones), or too few
        logical CPUs.
    """
    if name not in distribute.STRATEGY_KINDS:
        raise ConfigError(
            f"Unknown strategy {name!r}; valid strategies: "
            f"{list(distribute.STRATEGY_KINDS)}"
        )
    kwargs = {}
    if name == "mirrored":
        kwargs = _mirrored_devices(virtual_devices)
    elif name == "multi_worker":
        kwargs = {
            "cluster_resolver": make_cluster_resolver(slurm_port_base),
            "communication_options": communication_options(communication_timeout),
        }
    elif name == "tpu":
        kwargs = {"tpu": tpu}
    try:
        strategy = distribute.make_strategy(name, **kwargs)
    except ValueError as e:
        raise ConfigError(f"--strategy={name}: {e}") from e
    _log_devices(name, strategy)
    return strategy


def cpu_replicas(name: str, virtual_devices: int) -> int | None:
    """The replicas of ``--strategy=name``, where known before devices exist.

    Only ``mirrored`` on a host without GPUs: it splits the CPU into exactly
    ``virtual_devices`` logical devices (0: ``DEFAULT_CPU_VIRTUAL_DEVICES``).
    With GPUs, ``mirrored`` takes every GPU and ignores ``virtual_devices``;
    the other strategies count their devices or workers once they exist.
    Lists the physical devices only, so the CPU can still be split after.

    Returns:
      The replica count, or None where only the built strategy knows it.
    """
    if name != "mirrored" or tf.config.list_physical_devices("GPU"):
        return None
    return virtual_devices or DEFAULT_CPU_VIRTUAL_DEVICES


def batch_splits(batch_size: int, num_replicas: int) -> bool:
    """Whether a global batch splits evenly over the replicas.

    The rule of the run's checks of ``--batch_size`` and ``--eval_batch_size``
    once the strategy exists, and of :func:`check_replica_flags_before_devices`
    before it does.
    """
    return batch_size % num_replicas == 0


def check_replica_flags_before_devices(config: TrainConfig) -> None:
    """Refuses the flags that the replicas of :func:`cpu_replicas` cannot take.

    ``--batch_size`` and ``--eval_batch_size`` must split over the replicas
    and ``--sync=hierarchical``'s ``group_size`` must divide them: the run's
    own checks once the strategy exists, found here before TensorFlow makes
    the logical CPUs. Thousands of them take tens of seconds to make, only
    for the run to stop at one of those checks. Only what the run would
    refuse is refused: the same rules, on the same replica count.

    Raises:
      ConfigError: the first flag refused, naming it and ``--virtual_devices``.
    """
    n = cpu_replicas(config.strategy, config.virtual_devices)
    refused = None if n is None else _refused_on_replicas(config, n)
    if refused is None:
        return
    value, advice = refused
    v = config.virtual_devices
    devices = f"--virtual_devices={v}" if v else f"the {n} logical CPUs"
    default = "" if v else f" (--virtual_devices=0 means {n})"
    raise ConfigError(
        f"{value} {devices}, the replicas of --strategy=mirrored on this "
        f"CPU-only host{default}; use {advice}"
    )


def _refused_on_replicas(config: TrainConfig, n: int) -> tuple[str, str] | None:
    """The first flag the run would refuse on ``n`` replicas, or None.

    In the run's order of checks, as (the flag and how it fails, what to use).
    """
    if not batch_splits(config.batch_size, n):
        return (
            f"--batch_size={config.batch_size} is not divisible by",
            f"a --batch_size that is a multiple of {n}",
        )
    size = replica_group_size(config)
    if size is not None and not distribute.group_size_fits(size, n):
        return (
            f"--sync_args=group_size={size} does not divide",
            f"a group_size >= 1 that divides {n}",
        )
    # 0 evaluates in batches of --batch_size, checked above.
    if config.eval_batch_size and not batch_splits(config.eval_batch_size, n):
        return (
            f"--eval_batch_size={config.eval_batch_size} is not divisible by",
            f"an --eval_batch_size that is a multiple of {n}",
        )
    return None


def _mirrored_devices(virtual_devices: int) -> dict:
    """``make_strategy`` arguments of ``mirrored``: all GPUs, or logical CPUs."""
    n = cpu_replicas("mirrored", virtual_devices)
    if n is None:  # GPUs are present.
        if virtual_devices:
            logging.warning("--virtual_devices ignored: mirroring over the GPUs")
        # NCCL between GPUs: TensorFlow's default cross-device ops.
        return {"cross_device_ops": "default"}
    logging.info(
        "mirrored on a CPU-only host: %d logical CPU devices (%s)",
        n,
        "--virtual_devices" if virtual_devices else "default; set --virtual_devices",
    )
    # Reducing onto one device: as fast as RING collectives on this 2-core
    # host (BUILD_NOTES.md) and with no collective state at all.
    return {"num_cpu_devices": n, "cross_device_ops": "one_device"}


# The strategy's log line names up to this many local devices; more are
# summarized (5000 logical CPUs made one line of 244 KB).
MAX_LISTED_DEVICES = 8


def _log_devices(name: str, strategy: tf.distribute.Strategy) -> None:
    try:
        devices = list(strategy.extended.worker_devices)
    except RuntimeError:  # The default strategy has no device list.
        devices = ["the default device"]
    logging.info(
        "Strategy %s: %d replica(s) in sync; local devices %s",
        name,
        strategy.num_replicas_in_sync,
        describe_devices(devices),
    )


def describe_devices(devices: list[str]) -> str:
    """The devices by name, or for more than ``MAX_LISTED_DEVICES``, a summary.

    The summary gives the first and last device (of logical CPUs, the range)
    and the count.
    """
    if len(devices) <= MAX_LISTED_DEVICES:
        return ", ".join(devices)
    return f"{devices[0]} ... {devices[-1]} ({len(devices)} devices)"


def communication_options(timeout: float | None):
    """Collective options with a timeout (None or 0: wait forever)."""
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


def worker_id(strategy: tf.distribute.Strategy) -> int:
    """This worker's task id (0 outside a cluster)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    return int(getattr(resolver, "task_id", 0) or 0) if resolver else 0


def resolve_jit_compile(
    jit_compile: bool | None, strategy=None, compute_dtype=tf.float32
) -> bool:
    """Whether to XLA-compile the model's step: ``jit_compile``, or by device.

    An explicit True or False wins. None (the default) picks by the device
    type the strategy runs on: XLA on GPUs and TPUs, none on CPUs. On CPU the
    plain TensorFlow kernels (with ``max_pool2d`` pooling) were as fast as
    XLA for the bare LeNet and MLP steps, and the trainer ran faster without
    XLA (LeNet 2.1-2.2x, MLP mirrored 1.2x, MLP default the same;
    BUILD_NOTES.md, 2026-12-01), with less compiling before the first step.
    But not in float16: TensorFlow's CPU kernels for it are 60-300x slower
    than XLA's (a 128x784 by 784x700 matmul, bias and ReLU: 936 ms a call
    against 1.7 ms; the MLP trained at 63 examples/s, 2026-12-07), so a
    float16 model is compiled on CPUs too. The optimizer's own update
    kernels are unaffected (they take the optimizer's ``jit_compile``).

    Args:
      jit_compile: True, False or None (pick by device type).
      strategy: the strategy (default: the current one).
      compute_dtype: the model's compute dtype.
    """
    if jit_compile is not None:
        return bool(jit_compile)
    if tf.as_dtype(compute_dtype) == tf.float16:
        return True
    strategy = strategy or tf.distribute.get_strategy()
    return distribute.is_tpu(strategy) or runs_on_gpu(strategy)


def runs_on_gpu(strategy: tf.distribute.Strategy) -> bool:
    """Whether the strategy's replicas are GPUs."""
    try:
        devices = strategy.extended.worker_devices
    except RuntimeError:  # The default strategy: TF places ops on GPU:0 if any.
        return bool(tf.config.list_logical_devices("GPU"))
    return any(tf.DeviceSpec.from_string(d).device_type == "GPU" for d in devices)
