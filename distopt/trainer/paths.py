"""The trainer's paths: its own run directory, and checks before any work.

No TensorFlow at import. ``python -m distopt.train`` creates the run
directory of a run without ``--model_dir`` (:func:`create_run_dir`) before
it loads TensorFlow, and checks ``--model_dir`` and ``--data_dir``
(:func:`check_paths`) before it creates a strategy, reads data or writes
anything, so that a bad path is one line a second in, not a traceback after
the data loaded and the model was built.

The checks try the real operation (create and remove a probe entry, list a
directory) rather than ask ``os.access``, which says yes to root for any
directory, even on a read-only or virtual filesystem (``/proc``, ``/sys``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import socket

from distopt import made_dirs, output_files

RUNS_ROOT = "runs"
# Attempts at a fresh name before giving up (each after another run took one).
_NAME_ATTEMPTS = 100


class RunDirError(OSError):
    """The run directory could not be created."""


@dataclasses.dataclass
class RunDir:
    """A run directory this process created, with the parents it created."""

    path: str
    created: list[str]

    def discard(self) -> None:
        """Removes what :func:`create_run_dir` created, if still empty.

        For a run that stops on a bad flag after its directory was made:
        nothing of it is left behind.
        """
        made_dirs.remove_if_empty(self.created)


def _host() -> str:
    """This host's name, short and safe in a path."""
    name = socket.gethostname().split(".")[0] or "host"
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name)[:24]


def run_dir_name(
    model: str,
    dataset: str,
    *,
    root: str = RUNS_ROOT,
    now: datetime.datetime | None = None,
) -> str:
    """The name of a new run directory: ``<root>/<model>_<dataset>_<time>_<host>-<pid>``."""
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    return os.path.join(root, f"{model}_{dataset}_{stamp}_{_host()}-{os.getpid()}")


def create_run_dir(
    model: str,
    dataset: str,
    *,
    root: str = RUNS_ROOT,
    now: datetime.datetime | None = None,
) -> RunDir:
    """Creates a new run directory, named by :func:`run_dir_name`.

    The name holds the host and the process id, so that runs started in the
    same second, here or on another host sharing the filesystem, get
    different names; ``os.mkdir`` creates it atomically, and a name that
    exists anyway (another run took it first) is never used: a suffix
    ``-2``, ``-3``... is tried instead. The run never resumes a directory it
    did not create.

    Raises:
      RunDirError: the directory cannot be created (one line, naming it).
    """
    base = run_dir_name(model, dataset, root=root, now=now)
    created = _make_parents(root)
    for attempt in range(1, _NAME_ATTEMPTS + 1):
        path = base if attempt == 1 else f"{base}-{attempt}"
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        except FileNotFoundError:
            # The root went away (another run that failed removed it, empty).
            created += _make_parents(root)
            continue
        except OSError as e:
            RunDir("", created).discard()
            raise RunDirError(
                f"cannot create the run directory {path}: {e.strerror or e}; "
                "pass --model_dir"
            ) from None
        return RunDir(path, [*created, path])
    raise RunDirError(
        f"cannot find a free run directory name {base}-N; pass --model_dir"
    )


def _make_parents(root: str) -> list[str]:
    """Creates ``root`` and its missing parents; returns those it created."""
    try:
        return made_dirs.make_dirs(root)
    except NotADirectoryError as e:
        raise RunDirError(
            f"cannot create the run directory: {e.filename} is not a directory"
        ) from None
    except OSError as e:
        raise RunDirError(
            f"cannot create the run directory under {e.filename}: "
            f"{e.strerror or e}; pass --model_dir"
        ) from None


def writes_model_dir(strategy: str) -> bool:
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


def check_model_dir(
    model_dir: str, *, writes: bool = True, flag_name: str = "model_dir"
) -> list[str]:
    """Checks that ``model_dir`` is, or can become, a directory this run can use.

    Args:
      model_dir: the ``--model_dir`` value (or the new run directory).
      writes: whether this process writes there (else it must only be
        readable, if it exists).
      flag_name: the flag the messages name (``output_dir`` for compare).

    Returns:
      One line per problem; empty when the directory is usable.
    """
    if "://" in model_dir:
        return []  # gs://, s3://...: only the storage system can tell.
    flag = f"--{flag_name}={model_dir}"
    if os.path.islink(model_dir) and not os.path.exists(model_dir):
        target = os.readlink(model_dir)
        return [f"{flag} is a symbolic link to {target}, which does not exist"]
    if too_long := _name_too_long(model_dir):
        return [f"{flag}: {too_long}"]
    if os.path.exists(model_dir):
        if not os.path.isdir(model_dir):
            return [f"{flag} is a file, not a directory"]
        if writes and (misplaced := _misplaced_entry(model_dir)):
            return [f"{flag} holds {misplaced}: move it away"]
        if not writes:
            try:
                os.listdir(model_dir)
            except OSError as e:
                return [f"{flag} is not readable ({e.strerror or e})"]
            return []
        why = output_files.probe(model_dir)
        return [f"{flag} is not writable ({why})"] if why else []
    if not writes:
        return []  # The chief creates it.
    # The run creates it: the nearest existing ancestor must take a new entry
    # (makedirs would fail there after all the start-up work).
    parent = os.path.dirname(os.path.abspath(model_dir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return [f"{flag} cannot be created: {parent} is a file, not a directory"]
    why = output_files.probe(parent)
    return (
        [f"{flag} cannot be created: {parent} is not writable ({why})"] if why else []
    )


# What a run keeps in its model_dir, as (path, is a directory): an entry of
# the other kind failed late (the lock as "another trainer races", the
# checkpoints directory at the first save, after all the training).
# distopt.checkpoints.LOCK_FILE and trainer.checkpointing.CHECKPOINT_SUBDIR
# (both import TensorFlow; tests/test_preflight.py checks they agree).
RUN_LAYOUT = (("LOCK", False), ("checkpoints", True), ("checkpoints/checkpoint", False))


def _misplaced_entry(model_dir: str) -> str | None:
    """The first entry of ``RUN_LAYOUT`` of the wrong kind, described, or None."""
    for name, is_dir in RUN_LAYOUT:
        path = os.path.join(model_dir, name)
        if os.path.lexists(path) and os.path.isdir(path) != is_dir:
            kind = "a file" if is_dir else "a directory"
            return f"{kind} named {name}, where the run keeps its {name} " + (
                "directory" if is_dir else "file"
            )
    return None


def _name_too_long(path: str) -> str | None:
    """Why a component of ``path`` is too long for its filesystem, or None."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        return None
    for name in os.path.abspath(path).split(os.sep):
        if (size := len(os.fsencode(name))) > limit:
            return (
                f"a name in it is {size} bytes long; the filesystem takes at "
                f"most {limit}"
            )
    return None


def check_paths(config) -> list[str]:
    """Every path problem of a :class:`~distopt.trainer.config.TrainConfig`.

    Reads the data directory's listing (this imports TensorFlow).

    Returns:
      One line per problem (each names its flag); empty if all is well.
    """
    from distopt import data  # Needs TensorFlow: imported when checking.

    problems = check_model_dir(
        config.model_dir, writes=writes_model_dir(config.strategy)
    )
    problems += data.check_data_dir(
        config.dataset, config.data_dir, config.data_source, config.download
    )
    return problems
