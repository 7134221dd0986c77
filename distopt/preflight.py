"""Checks of the trainer's paths before any work starts.

``distopt.train`` calls :func:`check_paths` after parsing its flags and before
it creates a strategy, reads data or writes anything, so that a bad
``--model_dir`` or ``--data_dir`` is one line a second in, not a traceback
after the data loaded and the model was built. Nothing here reads data or
creates a file or directory.
"""

from __future__ import annotations

import datetime
import json
import os

from distopt import data as data_lib

RUNS_ROOT = "runs"


def default_model_dir(
    model: str,
    dataset: str,
    *,
    root: str = RUNS_ROOT,
    now: datetime.datetime | None = None,
) -> str:
    """A new run directory, ``<root>/<model>_<dataset>_<YYYYmmdd-HHMMSS>``.

    Every run without ``--model_dir`` gets its own directory, so that a default
    run never resumes (or refuses) a run of another configuration. A run
    started in the same second as another gets a ``-2``, ``-3``... suffix.
    The directory is not created here.
    """
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    base = os.path.join(root, f"{model}_{dataset}_{stamp}")
    path, n = base, 1
    while os.path.lexists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def _writes_model_dir(strategy: str) -> bool:
    """Whether this process writes ``--model_dir``, from the environment only.

    Under ``multi_worker`` only the chief writes (the others save into a
    temporary directory); it is known here from ``TF_CONFIG`` or Slurm,
    before TensorFlow builds the cluster.
    """
    if strategy != "multi_worker":
        return True
    if "TF_CONFIG" in os.environ:
        try:
            tf_config = json.loads(os.environ["TF_CONFIG"])
            task = tf_config.get("task", {})
            cluster = tf_config.get("cluster", {})
        except (ValueError, AttributeError):
            return True  # TensorFlow reports a malformed TF_CONFIG itself.
        if task.get("type") == "chief":
            return True
        return (
            task.get("type") == "worker"
            and int(task.get("index", 0)) == 0
            and "chief" not in cluster
        )
    if "SLURM_PROCID" in os.environ:
        return os.environ["SLURM_PROCID"] == "0"
    return True


def check_model_dir(model_dir: str, *, writes: bool = True) -> list[str]:
    """Checks that ``model_dir`` is, or can become, a writable directory.

    Args:
      model_dir: the ``--model_dir`` value (or the default run directory).
      writes: whether this process writes there (else it must only be
        readable, if it exists).

    Returns:
      One line per problem; empty when the directory is usable.
    """
    if "://" in model_dir:
        return []  # gs://, s3://...: only the storage system can tell.
    flag = f"--model_dir={model_dir}"
    if os.path.exists(model_dir):
        if not os.path.isdir(model_dir):
            return [f"{flag} is a file, not a directory"]
        needed = os.R_OK | os.X_OK | (os.W_OK if writes else 0)
        if not os.access(model_dir, needed):
            return [f"{flag} is not {'writable' if writes else 'readable'}"]
        return []
    if not writes:
        return []  # The chief creates it.
    # The run creates it: the nearest existing ancestor must be a writable
    # directory (makedirs would fail there after all the start-up work).
    parent = os.path.dirname(os.path.abspath(model_dir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return [f"{flag} cannot be created: {parent} is a file, not a directory"]
    if not os.access(parent, os.W_OK | os.X_OK):
        return [f"{flag} cannot be created: {parent} is not writable"]
    return []


def check_paths(config) -> list[str]:
    """Every path problem of a :class:`distopt.train_lib.TrainConfig`.

    Returns:
      One line per problem (each names its flag); empty if all is well.
    """
    problems = check_model_dir(
        config.model_dir, writes=_writes_model_dir(config.strategy)
    )
    problems += data_lib.check_data_dir(
        config.dataset, config.data_dir, config.data_source, config.download
    )
    return problems
