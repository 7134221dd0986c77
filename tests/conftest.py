"""Test set-up: 4 logical CPU devices stand in for GPUs.

The CPU must be split before TensorFlow initialises its devices, so it is
split here, once per test process, at import.
"""

import gc
import logging as std_logging
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from distopt import quiet

# TensorFlow's C++ start-up block ignores TF_CPP_MIN_LOG_LEVEL in 2.21; held
# back here so that it does not trail pytest's summary (xdist's controller
# loads this file too).
quiet.import_tensorflow()

import numpy as np
import pytest
import tensorflow as tf
from forkserver import ForkServer

from distopt import distribute

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_DEVICES = 4
distribute.logical_cpu_devices(NUM_DEVICES)

# The imports' objects (TensorFlow's are most of a worker's heap) live as
# long as the process: out of the collector's sight, each full collection
# walks only what the tests made. Of test_compression and test_sharded,
# serially, the collector's time fell from 6.8 s to 4.3 s of 117 CPU-s
# (2026-12-07, three alternating runs each, BUILD_NOTES.md).
gc.freeze()


def mirrored(num_replicas: int) -> tf.distribute.MirroredStrategy:
    """MirroredStrategy over the first `num_replicas` virtual CPUs."""
    return distribute.make_strategy("mirrored", num_cpu_devices=num_replicas)


def local_copies(strategy, value):
    """Every local replica's copy of a variable or value, as NumPy arrays."""
    return [np.asarray(x) for x in strategy.experimental_local_results(value)]


def assert_replicas_identical(strategy, variables):
    """Every replica's copy of every variable is bit-identical."""
    for v in variables:
        copies = local_copies(strategy, v)
        for c in copies[1:]:
            np.testing.assert_array_equal(c, copies[0], err_msg=f"{v.name} diverged")


@pytest.fixture(autouse=True)
def _log_levels_restored():
    """Puts absl's and TensorFlow's logger levels back after each test.

    absl sets its logger's level from ``--verbosity`` when a test parses the
    command line (and leaves it at WARNING), and the trainer's ``error:``
    exit raises TensorFlow's: a later test in the same process that checks
    an INFO line through ``caplog`` then saw none (test_compression's
    "still owed" notes after test_train, under xdist).
    """
    loggers = [std_logging.getLogger(name) for name in ("absl", "tensorflow")]
    levels = [logger.level for logger in loggers]
    yield
    for logger, level in zip(loggers, levels):
        logger.setLevel(level)


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_in_pytests_base(tmp_path_factory):
    """``TMPDIR``, for this process and all it starts, in pytest's base.

    A process killed on purpose (the fault tests' SIGKILLs) never runs
    TensorFlow's ``atexit`` removal of its autograph files: about 36 were left
    in /tmp by each run of the suite (2026-12-08). pytest removes its bases
    after three runs.
    """
    path = tmp_path_factory.mktemp("tmpdir", numbered=False)
    os.environ["TMPDIR"] = str(path)
    tempfile.tempdir = None  # Read from TMPDIR again.


@pytest.fixture(params=["default", "one_device", "mirrored2", "mirrored4"])
def strategy(request):
    """The strategies every optimizer must agree under."""
    name = request.param
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        return distribute.make_strategy("one_device")
    return mirrored(int(name[-1]))


#: This test process's fork server (started on first use; see forkserver.py).
FORK_SERVER = ForkServer()
#: Set (to anything) to start every process as a new interpreter instead: to
#: tell a fork server problem from the test's, or to measure what it saves.
NO_FORK = bool(os.environ.get("DISTOPT_TESTS_NO_FORK"))


def python_env(**extra):
    """This process's environment, quiet for TensorFlow, with ``extra`` set."""
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def start_python(
    args, *, stdout, stderr=subprocess.STDOUT, env=None, fresh=False, **kwargs
):
    """Starts ``python *args`` forked from TensorFlow already imported.

    For tests of what a process does (exit codes, signals, files, several
    at once), not of how an interpreter starts: see forkserver.py. ``fresh``:
    a new interpreter instead (as is everything with ``NO_FORK``). Returns a
    ``Popen``-like object; ``kwargs`` are ``cwd`` (default: the repository)
    and ``start_new_session``.
    """
    kwargs.setdefault("cwd", REPO)
    env = python_env() if env is None else env
    if fresh or NO_FORK:
        return subprocess.Popen(
            [sys.executable, *args],
            stdout=stdout,
            stderr=stderr,
            env=env,
            text=True,
            **kwargs,
        )
    return FORK_SERVER.popen(args, stdout=stdout, stderr=stderr, env=env, **kwargs)


def run_python(*args, timeout, tf_log_level="2", forked=False, env=None):
    """Runs ``python *args`` in the repository root, quietly for TensorFlow.

    Args:
      *args: the interpreter's arguments (a script, ``-m module`` or ``-c
        code``, and its flags).
      timeout: seconds before ``subprocess.TimeoutExpired``.
      tf_log_level: the ``TF_CPP_MIN_LOG_LEVEL`` it runs with; None: unset,
        as for a user who never set it.
      forked: fork it from the fork server (TensorFlow imported already,
        about 3 CPU-s less a run; see forkserver.py) instead of a new
        interpreter. Only with ``tf_log_level="2"``.
      env: extra environment variables.

    Returns:
      The ``subprocess.CompletedProcess``, with stdout and stderr as text; a
      non-zero exit status is the caller's to check.
    """
    env = {
        **{k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"},
        **(env or {}),
    }
    if tf_log_level is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = tf_log_level
    if forked and not NO_FORK:
        if tf_log_level != "2":
            raise ValueError("forked: TensorFlow was imported at log level 2")
        return FORK_SERVER.run(list(args), cwd=REPO, env=env, timeout=timeout)
    return subprocess.run(
        [sys.executable, *args],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


#: Modules whose tests start processes or train for many steps, in rough order
#: of cost. They run first so that, under xdist, the suite does not end with
#: one worker busy on a 30 s test while the other idles. Module order only:
#: a module's tests stay together, so a worker builds its module-scoped
#: fixtures once (worksteal may still hand a module's tail to another worker).
EXPENSIVE_FIRST = (
    "test_faults.py",
    "test_multi_worker.py",
    "test_hardware_check.py",
    "test_readme.py",
    "test_keras_wrap.py",
    "test_launch.py",
    "test_train.py",
    "test_strategies.py",
    "test_sync.py",
)


@pytest.hookimpl(optionalhook=True)  # `-p no:xdist -o addopts=` runs without it.
def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker more than the CPUs, at most 4.

    Many tests wait on subprocesses, sleeps between a run's chunks, or
    files; one extra worker fills that idle time. On 2 cores, 3 workers ran
    the suite in 260 s against 305 s for 2 (2026-12-01).
    """
    del config
    return min(4, (os.cpu_count() or 1) + 1)


def pytest_collection_modifyitems(config, items):
    """Orders the expensive modules first (stable within each module)."""

    def rank(item):
        name = os.path.basename(str(item.path))
        return (
            EXPENSIVE_FIRST.index(name)
            if name in EXPENSIVE_FIRST
            else len(EXPENSIVE_FIRST)
        )

    items.sort(key=rank)
