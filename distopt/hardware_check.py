r"""Checks, on the accelerators of this machine, that N replicas compute what one does.

    python -m distopt.hardware_check                 # every GPU; else 4 virtual CPUs
    python -m distopt.hardware_check --cpu_devices=2 # CPU-only host: 2 virtual CPUs
    python -m distopt.hardware_check --tpu=local     # the cores of a TPU VM

The tests run these equivalences on virtual CPU devices; this program runs
them where collectives and kernels are the real ones: NCCL all-reduces
between GPUs (a `MirroredStrategy` with TensorFlow's default cross-device
ops, from `distribute.make_strategy`, so with collective keys of its own),
or a `TPUStrategy`. Each check compares against an
independent reference, either the same program on one device (the default
strategy) or a NumPy simulation in float64:

* every step, mean: N replicas equal one device on the N batches together
  (Adam, and heavy-ball momentum);
* weighted mean over uneven per-replica batches equals one device's mean
  over all the examples;
* `Accumulate(k)` equals one device on a k-times-larger batch;
* `LocalSGD(k)` (with a warm-up step) matches NumPy, replica by replica,
  at a period boundary and between averages;
* `Hierarchical(k, group_size=2)` (groups of 1 with fewer than 4 devices,
  or an odd count) matches NumPy, replica by replica;
* a checkpoint saved on N replicas restores on one device with every
  variable, slot and counter identical;
* every replica's copy of every variable and slot is bit-identical wherever
  it must be (the synchronous modes; within a replica group; after an
  average).

Under `TPUStrategy` the periodic modes are rejected by design (one
replicated program holds one copy of each variable): the program checks
that building each of them raises ValueError, and runs the synchronous
checks only.

Devices. With `--tpu`, that TPU. Otherwise every physical GPU, or, with a
single GPU, that GPU split into `--split_gpu` logical GPUs (TensorFlow then
uses RING collectives between them, not NCCL). With no GPU, `--cpu_devices`
logical CPUs, configured before TensorFlow initialises its devices (the
first line of output says so; `CUDA_VISIBLE_DEVICES=-1` forces this run on
a GPU machine). The loss is written with elementwise ops only, so TF32 or
bfloat16 matmul passes cannot blur the comparisons.

It prints one progress line per check, then a table (check, devices,
result, max error), and exits 0 if every check passed, 1 if one failed,
2 on a usage error (a bad flag, a `--json` path that cannot be written, a
`--tpu` that cannot be reached), 3 if every check passed but `--json`
could not be written (a full disk). `--json=PATH` also writes the rows as
JSON.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Callable

from absl import flags

from distopt import cli, output_files, quiet

# Flags live in their own FlagValues: the module is importable next to other
# absl programs (tests, notebooks) without clashing.
_FLAGS = flags.FlagValues()
flags.DEFINE_integer(
    "cpu_devices",
    4,
    "With no GPU and no --tpu: the number of virtual CPU devices (>= 2).",
    flag_values=_FLAGS,
)
flags.DEFINE_string(
    "tpu",
    "",
    "Run on this TPU (a name, a grpc:// address, or 'local' on a TPU VM) "
    "with TPUStrategy.",
    flag_values=_FLAGS,
)
flags.DEFINE_integer(
    "split_gpu",
    2,
    "With exactly one physical GPU: split it into this many logical GPUs "
    "(>= 2), each with --gpu_memory_mb of memory.",
    flag_values=_FLAGS,
)
flags.DEFINE_integer(
    "gpu_memory_mb",
    2048,
    "Memory of each logical GPU when one GPU is split (--split_gpu).",
    flag_values=_FLAGS,
)
flags.DEFINE_string(
    "json", "", "Also write the rows, as JSON, to this file.", flag_values=_FLAGS
)

if __name__ == "__main__":
    # --help at once, not after TensorFlow's import.
    cli.exit_if_help(__doc__, _FLAGS)
    # TensorFlow's start-up lines held: the first line of output says what
    # was found (see quiet.py).
    quiet.import_tensorflow_for_tool()

import numpy as np
import tensorflow as tf

from distopt import distribute, optimizers
from distopt import sync as sync_lib

#: The model: y = x w + b on DIM_IN inputs, DIM_OUT outputs.
DIM_IN, DIM_OUT = 3, 2
#: Rows of each replica's (padded) batch.
MAX_BATCH = 6
#: allclose tolerances: a float32 run against another order of summation
#: (one device) or against float64 (NumPy), over a few steps.
RTOL, ATOL = 1e-5, 1e-5
#: A reference that moves the weights less than this is no evidence.
MIN_MOVE = 1e-2


@dataclasses.dataclass
class Platform:
    """Where the checks run.

    Attributes:
        strategy: The N-replica strategy.
        kind: "CPU", "GPU" or "TPU".
        notice: The first line of output: what was found and what runs.
        devices: The devices column of the table, e.g. "4 GPU".
    """

    strategy: tf.distribute.Strategy
    kind: str
    notice: str
    devices: str

    @property
    def num_replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    @property
    def is_tpu(self) -> bool:
        return self.kind == "TPU"


@dataclasses.dataclass
class Row:
    """One check's outcome: a row of the table.

    Attributes:
        key: A stable identifier (tests select rows by it).
        check: What was compared with what.
        devices: The devices it ran on.
        passed: Whether it held.
        max_error: The largest absolute difference from the reference, or
            None where no number applies.
        detail: Why it failed, or what else was verified.
    """

    key: str
    check: str
    devices: str
    passed: bool
    max_error: float | None
    detail: str = ""


class UsageError(ValueError):
    """The flags cannot give a run: fewer than 2 replicas, or no such TPU."""


# --- Devices ---------------------------------------------------------------------


def make_platform(
    tpu: str = "", cpu_devices: int = 4, split_gpu: int = 2, gpu_memory_mb: int = 2048
) -> Platform:
    """Finds the accelerators and creates the strategy the checks run under.

    Call before TensorFlow initialises its devices (for `cpu_devices` and
    `split_gpu`); after that, existing logical devices are used if there are
    enough.

    Args:
        tpu: A TPU to run on with `TPUStrategy`; empty for GPUs or CPUs.
        cpu_devices: Virtual CPU devices when there is no GPU.
        split_gpu: Logical GPUs to make of a single physical GPU.
        gpu_memory_mb: Memory of each such logical GPU.

    Returns:
        The `Platform`.

    Raises:
        UsageError: fewer than 2 replicas would result, or `tpu` cannot be
            resolved or reached.
    """
    if tpu:
        strategy = _tpu_strategy(tpu)
        n = strategy.num_replicas_in_sync
        return Platform(
            strategy,
            "TPU",
            f"TPU {tpu!r}: {n} cores under TPUStrategy; synchronous checks only "
            "(the periodic modes are rejected under TPUStrategy by design).",
            f"{n} TPU",
        )
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) >= 2:
        strategy = distribute.make_strategy("mirrored", cross_device_ops="default")
        n = strategy.num_replicas_in_sync
        return Platform(
            strategy,
            "GPU",
            f"{n} GPUs: MirroredStrategy() with its default cross-device ops "
            "(NCCL all-reduce between physical GPUs).",
            f"{n} GPU",
        )
    if len(gpus) == 1:
        if split_gpu < 2:
            raise UsageError(
                f"split_gpu: one GPU found; it must be split into >= 2 logical "
                f"GPUs to compare replicas, got {split_gpu}."
            )
        names = _logical_devices(
            "GPU",
            gpus[0],
            split_gpu,
            tf.config.LogicalDeviceConfiguration(memory_limit=gpu_memory_mb),
        )
        strategy = distribute.make_strategy(
            "mirrored", devices=names, cross_device_ops="default"
        )
        return Platform(
            strategy,
            "GPU",
            f"1 GPU split into {split_gpu} logical GPUs of {gpu_memory_mb} MB "
            "(--split_gpu): MirroredStrategy with its default cross-device ops, "
            "which are RING collectives between logical GPUs, not NCCL.",
            f"{split_gpu} GPU (1 split)",
        )
    if cpu_devices < 2:
        raise UsageError(f"cpu_devices: must be >= 2, got {cpu_devices}.")
    try:
        names = distribute.logical_cpu_devices(cpu_devices)
    except ValueError as e:
        raise UsageError(str(e)) from None
    strategy = distribute.make_strategy(
        "mirrored", devices=names, cross_device_ops="default"
    )
    return Platform(
        strategy,
        "CPU",
        f"No GPU or TPU found: running on {cpu_devices} virtual CPU devices "
        "(--cpu_devices), MirroredStrategy with its default cross-device ops "
        "(RING collectives). This checks the library, not an accelerator.",
        f"{cpu_devices} CPU",
    )


def _tpu_strategy(tpu: str) -> tf.distribute.Strategy:
    """A `TPUStrategy` over `tpu`.

    Raises:
        UsageError: naming the flag, when `tpu` cannot be resolved or
            reached. The resolver fails in many ways (URLError from a name
            lookup, ValueError, the Cloud API's HttpError, tf.errors from
            connecting), none of them a check's result.
    """
    try:
        return distribute.make_strategy("tpu", tpu=tpu)
    except Exception as e:  # noqa: BLE001  See above.
        first = (str(e).strip().splitlines() or [""])[0]
        raise UsageError(
            f"--tpu={tpu}: no such TPU, or it cannot be reached "
            f"({type(e).__name__}: {first})"
        ) from None


def _logical_devices(kind, physical, count, config) -> list[str]:
    try:
        tf.config.set_logical_device_configuration(physical, [config] * count)
    except RuntimeError:
        pass  # Already initialised (a test process): use what exists.
    logical = tf.config.list_logical_devices(kind)
    if len(logical) < count:
        raise UsageError(
            f"{count} logical {kind} devices requested, but TensorFlow already "
            f"initialised {len(logical)}; run in a fresh process."
        )
    return [d.name for d in logical[:count]]


# --- The workload ------------------------------------------------------------------


def make_data(num_steps, num_replicas, seed, uneven=False):
    """Batches `x[s, r]`, `y[s, r]` (padded to MAX_BATCH rows) and counts `n[s, r]`."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_steps, num_replicas, MAX_BATCH, DIM_IN))
    w_true = rng.normal(size=(DIM_IN, DIM_OUT))
    y = x @ w_true + 0.1 * rng.normal(size=(*x.shape[:3], DIM_OUT))
    if uneven:
        n = rng.integers(1, MAX_BATCH + 1, size=(num_steps, num_replicas))
    else:
        n = np.full((num_steps, num_replicas), MAX_BATCH)
    return x.astype(np.float32), y.astype(np.float32), n.astype(np.int32)


def initial_params():
    rng = np.random.default_rng(1)
    return (
        rng.normal(size=(DIM_IN, DIM_OUT)).astype(np.float32),
        rng.normal(size=(DIM_OUT,)).astype(np.float32),
    )


def loss(w, b, x, y, n):
    """Mean over the first n rows of 0.5 * ||x w + b - y||^2, elementwise ops only."""
    mask = tf.cast(tf.range(tf.shape(x)[0]) < n, x.dtype)
    pred = tf.reduce_sum(x[:, :, None] * w[None], axis=1) + b
    err = pred - y
    return 0.5 * tf.reduce_sum(mask[:, None] * err**2) / tf.cast(n, x.dtype)


def numpy_grads(w, b, x, y, n):
    """The gradient of `loss`, in float64."""
    x, y = x[:n].astype(np.float64), y[:n].astype(np.float64)
    err = x @ w + b - y
    return x.T @ err / n, err.mean(axis=0)


def one_device_batches(x, y, n, group):
    """Each step's replica batches (valid rows only) together, `group` steps at a time."""
    steps, replicas = n.shape
    rows = group * replicas * MAX_BATCH
    xs, ys, ns = [], [], []
    for s0 in range(0, steps, group):
        keep = [(s, r) for s in range(s0, s0 + group) for r in range(replicas)]
        bx = np.concatenate([x[s, r, : n[s, r]] for s, r in keep])
        by = np.concatenate([y[s, r, : n[s, r]] for s, r in keep])
        ns.append([len(bx)])
        xs.append(np.pad(bx, ((0, rows - len(bx)), (0, 0)))[None])
        ys.append(np.pad(by, ((0, rows - len(by)), (0, 0)))[None])
    return np.stack(xs), np.stack(ys), np.array(ns, np.int32)


class Run:
    """The model and an optimizer under a strategy, with a compiled step.

    Args:
        strategy: The strategy (the default strategy for one device).
        make_optimizer: Builds the optimizer, in the strategy's scope.
        weighted: Pass each replica's example count as `weight=`.
    """

    def __init__(self, strategy, make_optimizer, weighted=False):
        self.strategy = strategy
        w0, b0 = initial_params()
        with strategy.scope():
            self.params = [tf.Variable(w0, name="w"), tf.Variable(b0, name="b")]
            self.opt = make_optimizer()
            # As the trainer does: an optimizer built inside `step` would
            # create variables there, and TensorFlow would trace it twice.
            self.opt.build(self.params)
        params, opt = self.params, self.opt

        def replica_fn(xs, ys, ns):
            rid = tf.distribute.get_replica_context().replica_id_in_sync_group
            xr, yr, nr = xs[rid], ys[rid], ns[rid]
            with tf.GradientTape() as tape:
                value = loss(params[0], params[1], xr, yr, nr)
            grads = tape.gradient(value, params)
            opt.apply_gradients(grads, params, weight=nr if weighted else None)

        @tf.function
        def step(xs, ys, ns):
            strategy.run(replica_fn, args=(xs, ys, ns))

        self._step = step

    def steps(self, x, y, n) -> Run:
        """Runs `len(x)` steps; `x[s, r]` is replica r's batch at step s."""
        for s in range(len(x)):
            self._step(tf.constant(x[s]), tf.constant(y[s]), tf.constant(n[s]))
        return self

    def copies(self, variable) -> list[np.ndarray]:
        """Every local replica's copy of `variable`."""
        return [
            np.asarray(c) for c in self.strategy.experimental_local_results(variable)
        ]

    def state(self) -> list[tf.Variable]:
        """The parameters and their slots."""
        return self.params + [
            s for p in self.params for s in self.opt.slots(p).values()
        ]


# --- NumPy references ---------------------------------------------------------------


def numpy_periodic(x, y, n, k, lr, warmup=0, group=1):
    """Gradient descent on R replicas in float64, replica by replica.

    Warm-up steps average all replicas' gradients. After them, groups of
    `group` consecutive replicas average their gradients every step, and
    every k steps all replicas' weights are averaged.

    Returns:
        The list of replicas' `(w, b)`.
    """
    steps, replicas = n.shape
    w0, b0 = initial_params()
    state = [(w0.astype(np.float64), b0.astype(np.float64))] * replicas
    for s in range(steps):
        grads = [
            numpy_grads(*state[r], x[s, r], y[s, r], n[s, r]) for r in range(replicas)
        ]
        size = replicas if s < warmup else group
        new = []
        for r in range(replicas):
            g0 = r - r % size
            members = range(g0, g0 + size)
            gw = np.mean([grads[m][0] for m in members], axis=0)
            gb = np.mean([grads[m][1] for m in members], axis=0)
            new.append((state[r][0] - lr * gw, state[r][1] - lr * gb))
        state = new
        if s >= warmup and (s + 1 - warmup) % k == 0:
            avg = tuple(np.mean([st[i] for st in state], axis=0) for i in range(2))
            state = [avg] * replicas
    return state


# --- Comparisons ---------------------------------------------------------------------


class _Mismatch(AssertionError):
    pass


class Check:
    """What one check has compared so far: the largest error (None: nothing)."""

    def __init__(self):
        self.max_error = None

    def close(self, label, got: list[np.ndarray], want, *, exact=False, ids=None):
        """Every copy in `got` is within tolerance of `want` (bit-equal if exact).

        Args:
            label: What is compared, for the message.
            got: Replicas' copies.
            want: The reference value.
            exact: Require bit equality instead of `allclose`.
            ids: The replica index of each copy (default 0, 1, ...).
        """
        want = np.asarray(want, np.float64)
        for r, g in zip(ids or range(len(got)), got):
            g = np.asarray(g, np.float64)
            err = float(np.max(np.abs(g - want))) if g.size else 0.0
            # A NaN is kept (and fails below): max() would drop it.
            self.max_error = err if np.isnan(err) else max(self.max_error or 0.0, err)
            bad = (
                not np.array_equal(g, want)
                if exact
                else not np.allclose(g, want, rtol=RTOL, atol=ATOL)
            )
            if bad:
                raise _Mismatch(
                    f"{label}, replica {r}: max |error| {err:.3g} "
                    + ("(must be 0)" if exact else f"(rtol {RTOL:g}, atol {ATOL:g})")
                )

    def moved(self, label, want, start):
        """The reference changed `start` measurably (the check is not vacuous)."""
        move = float(np.max(np.abs(np.asarray(want) - np.asarray(start))))
        if move < MIN_MOVE:
            raise _Mismatch(f"{label}: the reference moved only {move:.3g}")


def must_agree(identity, label, run, variables, groups=None):
    """Records every replica's copy of `variables`, which must be identical.

    Args:
        identity: The list the identity row checks.
        label: The run, for messages.
        run: The `Run` the variables belong to.
        variables: Variables whose copies must agree now.
        groups: Lists of replica indices that must agree (default: all).
    """
    n = run.strategy.num_replicas_in_sync
    for v in variables:
        identity.append((f"{label}: {v.name}", run.copies(v), groups or [range(n)]))


def each_replica_matches(c, run, want, label=""):
    """Replica r's copy of each parameter equals `want[r]` (NumPy's), which moved.

    Args:
        c: The `Check` that records the errors.
        run: The `Run`.
        want: Per replica, the reference `(w, b)`.
        label: Prefixes each parameter's name in messages.
    """
    for i, v in enumerate(run.params):
        c.moved(v.name, want[0][i], initial_params()[i])
        for r, copy in enumerate(run.copies(v)):
            c.close(f"{label}{v.name}", [copy], want[r][i], ids=[r])


# --- The checks --------------------------------------------------------------------------


def check_every_step(platform, identity, c, name, **hyper):
    """N replicas, mean every step, equal batches == one device on all of them."""
    strategy, n = platform.strategy, platform.num_replicas
    x, y, cnt = make_data(4, n, seed=10)
    make = lambda: optimizers.get(name, **hyper)
    run = Run(strategy, make).steps(x, y, cnt)
    ref = Run(tf.distribute.get_strategy(), make).steps(
        *one_device_batches(x, y, cnt, 1)
    )
    for v, r, p0 in zip(run.params, ref.params, initial_params()):
        c.moved(v.name, r.numpy(), p0)
    for v, r in zip(run.state(), ref.state()):
        c.close(v.name, run.copies(v), r.numpy())
    must_agree(identity, f"every_step {name}", run, run.state())
    return f"4 steps; weights and {len(run.state()) - 2} slots"


def check_weighted_mean(platform, identity, c):
    """Weighted mean over uneven batches == one device's mean over all examples."""
    strategy, n = platform.strategy, platform.num_replicas
    x, y, cnt = make_data(4, n, seed=11, uneven=True)
    if len(set(cnt.ravel())) < 2:
        raise _Mismatch("the batches are not uneven")
    # The data tell the weighted mean from the plain mean of replica means.
    w0, b0 = initial_params()
    g = [numpy_grads(w0, b0, x[0, r], y[0, r], cnt[0, r])[0] for r in range(n)]
    if np.max(np.abs(np.mean(g, 0) - np.average(g, 0, cnt[0]))) < 100 * ATOL:
        raise _Mismatch("weighted and plain means coincide on this data")
    run = Run(
        strategy,
        lambda: optimizers.Adam(learning_rate=0.05, aggregation="weighted_mean"),
        weighted=True,
    ).steps(x, y, cnt)
    ref = Run(
        tf.distribute.get_strategy(), lambda: optimizers.Adam(learning_rate=0.05)
    ).steps(*one_device_batches(x, y, cnt, 1))
    for v, r, p0 in zip(run.params, ref.params, initial_params()):
        c.moved(v.name, r.numpy(), p0)
    for v, r in zip(run.state(), ref.state()):
        c.close(v.name, run.copies(v), r.numpy())
    must_agree(identity, "weighted_mean adam", run, run.state())
    return f"adam; batches of {cnt.min()} to {cnt.max()} examples"


def check_accumulate(platform, identity, c, k=3, updates=2):
    """Accumulate(k) == one device on a k-times-larger batch."""
    strategy, n = platform.strategy, platform.num_replicas
    x, y, cnt = make_data(k * updates, n, seed=12)
    run = Run(
        strategy,
        lambda: optimizers.Adam(learning_rate=0.05, sync=sync_lib.Accumulate(k)),
    ).steps(x, y, cnt)
    ref = Run(
        tf.distribute.get_strategy(), lambda: optimizers.Adam(learning_rate=0.05)
    ).steps(*one_device_batches(x, y, cnt, k))
    for v, r, p0 in zip(run.params, ref.params, initial_params()):
        c.moved(v.name, r.numpy(), p0)
    for v, r in zip(run.state(), ref.state()):
        c.close(v.name, run.copies(v), r.numpy())
    iterations = int(run.opt.iterations.numpy())
    if iterations != updates:
        raise _Mismatch(f"iterations {iterations}, want {updates}")
    must_agree(identity, f"accumulate({k}) adam", run, run.state())
    return f"adam; {k * updates} micro-steps, {updates} updates"


def check_local_sgd(platform, identity, c, k=3, warmup=1, lr=0.1):
    """LocalSGD(k, warmup) == NumPy, replica by replica."""
    strategy, n = platform.strategy, platform.num_replicas
    steps = warmup + k + 2
    x, y, cnt = make_data(steps, n, seed=13)
    run = Run(
        strategy,
        lambda: optimizers.GradientDescent(
            lr, sync=sync_lib.LocalSGD(k, warmup_steps=warmup)
        ),
    )
    # At a period boundary: averaged, so every copy equals NumPy's average.
    b = warmup + k
    run.steps(x[:b], y[:b], cnt[:b])
    want = numpy_periodic(x[:b], y[:b], cnt[:b], k, lr, warmup)
    for i, v in enumerate(run.params):
        c.close(f"step {b}: {v.name}", run.copies(v), want[0][i])
    must_agree(identity, f"local_sgd({k}) after an average", run, run.params)
    # Two local steps later: each replica its own way.
    run.steps(x[b:], y[b:], cnt[b:])
    want = numpy_periodic(x, y, cnt, k, lr, warmup)
    each_replica_matches(c, run, want, f"step {steps}: ")
    w = run.copies(run.params[0])
    if all(np.array_equal(a, w[0]) for a in w[1:]):
        raise _Mismatch("the replicas did not diverge between averages")
    return f"gradient descent; {steps} steps; every copy, at and between averages"


def hierarchical_group_size(n):
    """2 with at least 4 replicas (and an even count), else 1."""
    return 2 if n >= 4 and n % 2 == 0 else 1


def check_hierarchical(platform, identity, c, k=3, steps=5, lr=0.1):
    """Hierarchical(k, group_size) == NumPy, replica by replica."""
    strategy, n = platform.strategy, platform.num_replicas
    group = hierarchical_group_size(n)
    x, y, cnt = make_data(steps, n, seed=14)
    run = Run(
        strategy,
        lambda: optimizers.GradientDescent(
            lr, sync=sync_lib.Hierarchical(k, group_size=group)
        ),
    ).steps(x, y, cnt)
    want = numpy_periodic(x, y, cnt, k, lr, group=group)
    each_replica_matches(c, run, want)
    # Two steps after an average: the groups differ; within one, copies agree.
    w = run.copies(run.params[0])
    groups = [list(range(g, g + group)) for g in range(0, n, group)]
    if all(np.array_equal(w[g[0]], w[0]) for g in groups[1:]):
        raise _Mismatch("the replica groups did not diverge between averages")
    must_agree(identity, f"hierarchical groups of {group}", run, run.params, groups)
    return f"gradient descent; {steps} steps; every copy, between averages"


def check_checkpoint(platform, identity, c):
    """A checkpoint saved on N replicas restores on one device, identically."""
    strategy, n = platform.strategy, platform.num_replicas
    x, y, cnt = make_data(3, n, seed=15)
    make = lambda: optimizers.Adam(learning_rate=0.05)
    run = Run(strategy, make).steps(x, y, cnt)
    saved = run.state() + [_variable_of(run.opt.iterations)]
    must_agree(identity, "checkpointed adam", run, saved)
    with tempfile.TemporaryDirectory() as tmp:
        path = tf.train.Checkpoint(params=run.params, optimizer=run.opt).save(
            os.path.join(tmp, "ckpt")
        )
        # Fresh variables with other values, so that a no-op restore shows.
        w0, b0 = initial_params()
        params = [
            tf.Variable(np.full_like(w0, 7.0)),
            tf.Variable(np.full_like(b0, 7.0)),
        ]
        opt = make()
        opt.build(params)
        status = tf.train.Checkpoint(params=params, optimizer=opt).restore(path)
        status.assert_existing_objects_matched()
    restored = params + [s for p in params for s in opt.slots(p).values()]
    restored.append(_variable_of(opt.iterations))
    if len(restored) != len(saved):
        raise _Mismatch(f"{len(restored)} variables restored, {len(saved)} saved")
    for v, s in zip(restored, saved):
        c.close(f"restored {v.name}", [np.asarray(v)], run.copies(s)[0], exact=True)
    if int(opt.iterations.numpy()) != 3:
        raise _Mismatch(f"restored iterations {int(opt.iterations.numpy())}, want 3")
    return f"adam; {len(saved)} variables, slots and counters, bit for bit"


def _variable_of(counter):
    """The variable of an optimizer counter (`distopt.counter.Counter`, or a variable)."""
    return getattr(counter, "variable", counter)


def check_identity(platform, identity, c):
    """Every replica's copy identical where it must be (bit for bit)."""
    del platform
    if not identity:
        raise _Mismatch("nothing to compare")
    for label, copies, groups in identity:
        for g in groups:
            g = list(g)
            c.close(label, [copies[i] for i in g], copies[g[0]], exact=True, ids=g)
    runs = len({label.split(":")[0] for label, _, _ in identity})
    return f"{len(identity)} variables, slots and counters of {runs} runs"


def check_tpu_rejects_periodic(platform, identity, c):
    """Building a periodic mode under TPUStrategy raises ValueError."""
    del identity, c
    modes = {
        "local_sgd": lambda: sync_lib.LocalSGD(3),
        "diloco": lambda: sync_lib.DiLoCo(3),
        "hierarchical": lambda: sync_lib.Hierarchical(3),
    }
    for name, mode in modes.items():
        with platform.strategy.scope():
            var = tf.Variable([1.0, 2.0])
            opt = optimizers.GradientDescent(0.1, sync=mode())
            try:
                opt.build([var])
            except ValueError as e:
                if "TPUStrategy" not in str(e):
                    raise _Mismatch(f"{name}: a ValueError, but not this one: {e}")
                continue
        raise _Mismatch(f"{name}: built under {type(platform.strategy).__name__}")
    return "local_sgd, diloco, hierarchical: ValueError at build"


def checks(platform) -> list[tuple[str, str, Callable]]:
    """The `(key, title, fn)` of every check this platform runs, in order."""
    n = platform.num_replicas
    group = hierarchical_group_size(n)
    out = [
        (
            "every_step_adam",
            f"every step, mean, adam: {n} replicas == 1 device",
            lambda p, i, c: check_every_step(p, i, c, "adam", learning_rate=0.05),
        ),
        (
            "every_step_momentum",
            f"every step, mean, momentum with an EMA: {n} replicas == 1 device",
            # The moving average overwrites the weights at the 2nd update.
            lambda p, i, c: check_every_step(
                p,
                i,
                c,
                "momentum",
                learning_rate=0.1,
                momentum=0.9,
                use_ema=True,
                ema_overwrite_frequency=2,
            ),
        ),
        (
            "weighted_mean",
            "weighted mean, uneven batches == 1 device, all examples",
            check_weighted_mean,
        ),
        (
            "accumulate",
            "accumulate(3) == 1 device, 3x larger batch",
            check_accumulate,
        ),
    ]
    if platform.is_tpu:
        out.append(
            (
                "tpu_rejects_periodic",
                "periodic modes rejected under TPUStrategy",
                check_tpu_rejects_periodic,
            )
        )
    else:
        out += [
            ("local_sgd", "local_sgd(3), 1 warm-up step == NumPy", check_local_sgd),
            (
                "hierarchical",
                f"hierarchical(3, group_size={group}) == NumPy",
                check_hierarchical,
            ),
        ]
    out += [
        (
            "checkpoint",
            f"checkpoint on {n} replicas restores on 1 device",
            check_checkpoint,
        ),
        (
            "replicas_identical",
            "every replica's copy identical where it must be",
            check_identity,
        ),
    ]
    return out


#: Every key `checks` can return (tests parametrize over them).
CHECK_KEYS = (
    "every_step_adam",
    "every_step_momentum",
    "weighted_mean",
    "accumulate",
    "local_sgd",
    "hierarchical",
    "tpu_rejects_periodic",
    "checkpoint",
    "replicas_identical",
)


def run_checks(platform, out=sys.stdout) -> list[Row]:
    """Runs every check of `platform`, printing progress; returns the rows."""
    identity: list = []  # See `must_agree`.
    todo = checks(platform)
    rows = []
    for i, (key, title, fn) in enumerate(todo, start=1):
        print(f"[{i}/{len(todo)}] {title} ...", file=out, flush=True)
        devices = platform.devices + (" -> 1" if key == "checkpoint" else "")
        t0 = time.perf_counter()
        c = Check()
        try:
            detail = fn(platform, identity, c)
            row = Row(key, title, devices, True, c.max_error, detail)
        except _Mismatch as e:
            row = Row(key, title, devices, False, c.max_error, str(e))
        except Exception as e:  # noqa: BLE001  A crash is a failed check.
            first = (str(e).strip().splitlines() or [""])[0]
            row = Row(
                key, title, devices, False, c.max_error, f"{type(e).__name__}: {first}"
            )
        elapsed = time.perf_counter() - t0
        verdict = "ok" if row.passed else "FAILED"
        error = "" if row.max_error is None else f", max error {row.max_error:.2g}"
        print(
            f"      {verdict}{error} ({elapsed:.1f} s): {row.detail}",
            file=out,
            flush=True,
        )
        rows.append(row)
    return rows


def format_table(rows: list[Row]) -> str:
    """The rows as a fixed-width table: check, devices, result, max error."""
    header = ("check", "devices", "result", "max error")
    body = [
        (
            r.check,
            r.devices,
            "passed" if r.passed else "FAILED",
            "-" if r.max_error is None else f"{r.max_error:.2e}",
        )
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(4)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [line(header), line(["-" * w for w in widths])]
    out += [line(b) for b in body]
    return "\n".join(out)


def exit_status(rows: list[Row]) -> int:
    """0 if every row passed (and there is one), else 1."""
    return 0 if rows and all(r.passed for r in rows) else 1


#: The exit status when every check passed but `--json` could not be written:
#: not 1, which says a check failed.
EXIT_NOT_WRITTEN = 3

PROG = "distopt.hardware_check"


def write_report(path: str, platform, rows: list[Row], status: int) -> int:
    """Writes the rows to `path` as JSON, whole or not at all.

    Returns:
        `status` (from `exit_status`), or `EXIT_NOT_WRITTEN` if the file
        could not be written and every check passed; the failure is one
        line on stderr.
    """
    report = {
        "notice": platform.notice,
        "kind": platform.kind,
        "num_replicas": platform.num_replicas,
        "rows": [dataclasses.asdict(r) for r in rows],
    }
    try:
        output_files.write_json(path, report)
    except OSError as e:
        cli.error(PROG, f"--json: could not write {path}: {e.strerror or e}")
        return status or EXIT_NOT_WRITTEN
    return status


def main(argv=None) -> int:
    """Runs the program with command-line `argv`; returns the exit status."""
    status = cli.parse(PROG, __doc__, _FLAGS, argv)
    if status is not None:
        return status
    # Written after the checks: a path that cannot be written fails now.
    why = _FLAGS.json and output_files.check_file(_FLAGS.json, "json")
    if why:
        return cli.error(PROG, why)
    try:
        t0 = time.perf_counter()
        platform = make_platform(
            _FLAGS.tpu, _FLAGS.cpu_devices, _FLAGS.split_gpu, _FLAGS.gpu_memory_mb
        )
    except UsageError as e:
        return cli.error(PROG, e)
    print(platform.notice, flush=True)
    rows = run_checks(platform)
    print()
    print(format_table(rows))
    status = exit_status(rows)
    failed = [r.check for r in rows if not r.passed]
    print(
        f"\n{len(rows) - len(failed)}/{len(rows)} checks passed on "
        f"{platform.devices} in {time.perf_counter() - t0:.1f} s"
        + (f"; FAILED: {'; '.join(failed)}" if failed else ".")
    )
    if _FLAGS.json:
        return write_report(_FLAGS.json, platform, rows, status)
    return status


if __name__ == "__main__":
    sys.exit(main())
