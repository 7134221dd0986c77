"""Checkpoints that survive real clusters: a run lock, atomic saves, fallback.

Four things the trainer needs beyond ``tf.train.CheckpointManager``:

* :class:`RunLock`: one trainer per ``model_dir``. Two trainers saving into
  the same directory overwrite each other's checkpoints and both report
  success; the second one refuses instead.
* :class:`CheckpointWriter`: a save either completes or leaves the directory
  as it was (the previous checkpoint still the latest, no ``ckpt-N_temp``
  directory, no half-written ``ckpt-N`` files) and fails with one line.
* :func:`remove_temporaries`: what a save killed mid-way left (a
  ``ckpt-N_temp`` directory) is removed at the next start.
* :func:`newest_loadable`: a latest checkpoint that does not load
  (truncated, a flipped bit, a missing file) is moved aside with a WARNING and
  the newest one that does load is used.

Public TensorFlow APIs only (``tf.train``, ``tf.io.gfile``), and none that is
deprecated.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import tempfile
import time

import tensorflow as tf
from absl import logging
from google.protobuf import text_format

from distopt import made_dirs

LOCK_FILE = "LOCK"
# Where checkpoints that failed to load are moved (inside the checkpoint
# directory), so that a user can inspect them; they are never deleted.
CORRUPT_SUBDIR = "corrupt"
_CKPT_INDEX = re.compile(r"^(?P<prefix>.+-(?P<step>\d+))\.index$")

# Test-only fault injection: DISTOPT_FAULT_SAVE_ERROR_AT=N makes the save at
# step N fail as a full disk does (after the temp directory was written).
# The tests use a real full tmpfs where the machine allows a mount.
# DISTOPT_FAULT_KILL_IN_SAVE_AT=N kills the process with SIGKILL in the save
# of step N, after it wrote the temporary files a sharded save writes first
# (``ckpt-N_temp/part-*``) and before they became ``ckpt-N``: what a
# ``kill -9`` during a save leaves.
_SAVE_ERROR_ENV = "DISTOPT_FAULT_SAVE_ERROR_AT"
_KILL_IN_SAVE_ENV = "DISTOPT_FAULT_KILL_IN_SAVE_AT"


class LockError(RuntimeError):
    """Another live trainer holds ``model_dir``."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the previous one is still the latest."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message, without TensorFlow's prefixes."""
    text = getattr(error, "message", None) or str(error) or type(error).__name__
    # TensorFlow prefixes op errors with "{{function_node ...}} ": noise here.
    text = re.sub(r"\{\{[^}]*\}\}\s*", "", text).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --- The run lock -------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Alive, owned by another user.
        return True
    return True


class RunLock:
    """``model_dir/LOCK``: the host and pid of the trainer writing there.

    Created atomically (a hard link of a complete file, or ``O_EXCL``), so of
    two trainers starting together exactly one gets it. A lock left by a
    process that is gone (same host, pid not alive), and an empty or damaged
    one, is stale and taken over with a WARNING; a lock held by a live process, or
    by another host (whose processes cannot be checked from here), makes the
    second trainer refuse. The lock is a local-filesystem guard: on
    ``gs://``-style storage ``O_EXCL`` does not exist and no lock is taken.
    """

    def __init__(self, model_dir: str):
        self.path = os.path.join(model_dir, LOCK_FILE)
        self._held = False
        #: The directories `acquire` made (`made_dirs`): removed again at
        #: `release` if still empty (a run refused after the lock, say for a
        #: batch larger than the data, leaves nothing).
        self._made = []

    def acquire(self) -> None:
        """Takes the lock.

        The lock file appears complete or not at all: its content is written
        to a file of its own, which is then hard-linked into place (``link``
        fails if the lock exists, like ``O_EXCL``). A full disk therefore
        leaves no empty lock behind to block the rerun.

        Raises:
          LockError: a live trainer (or one on another host) holds it, or the
            lock cannot be written (one line, naming the cause).
        """
        if "://" in self.path:
            logging.info("No run lock on %s (not a local filesystem)", self.path)
            return
        try:
            self._made = made_dirs.make_dirs(os.path.dirname(self.path) or ".")
            for _ in range(2):
                if self._create():
                    self._held = True
                    return
                self._take_over_if_stale()
        except OSError as e:
            raise LockError(
                f"Could not write the lock file {self.path}: "
                f"{e.strerror or type(e).__name__}; free space or fix the "
                "permissions, then rerun"
            ) from None
        raise LockError(f"Could not take the lock {self.path}: another trainer races")

    def _create(self) -> bool:
        """Creates the lock with this process's details; False if it exists."""
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        tmp = f"{self.path}.{socket.gethostname()}-{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(me, f)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return False
            except OSError:
                # No hard links on this filesystem: O_EXCL, written in place.
                return self._create_in_place(me)
            return True
        finally:
            _remove_quietly(tmp)

    def _create_in_place(self, me: dict) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
        except OSError:
            _remove_quietly(self.path)
            raise
        return True

    def _take_over_if_stale(self) -> None:
        holder = self._read()
        if holder is None:
            return  # Released a moment ago: try again.
        if not self._stale(holder):
            raise LockError(
                f"{os.path.dirname(self.path)} is in use by another trainer "
                f"(host {holder.get('host')}, pid {holder.get('pid')}; "
                f"{self.path}); use another --model_dir, or delete the lock "
                "file if that process is gone"
            )
        logging.warning(
            "Taking over the stale lock %s of host %s pid %s (%s)",
            self.path,
            holder.get("host"),
            holder.get("pid"),
            "no such process" if holder.get("pid") else "empty or damaged",
        )
        _remove_quietly(self.path)

    def _read(self) -> dict | None:
        """The holder's details; ``{"pid": None}`` if empty or damaged, None if gone.

        A lock written in place (no hard links) may be read while its holder
        writes it: it is read again for up to a second before it counts as
        damaged.
        """
        deadline = time.time() + 1.0
        while True:
            try:
                with open(self.path) as f:
                    holder = json.load(f)
                if isinstance(holder, dict) and "pid" in holder:
                    return holder
            except FileNotFoundError:
                return None
            except (OSError, ValueError):
                pass
            if time.time() > deadline:
                return {"host": "?", "pid": None}
            time.sleep(0.1)

    @staticmethod
    def _stale(holder: dict) -> bool:
        if holder.get("pid") is None:
            return True  # Empty or damaged: no trainer writes it any more.
        if holder.get("host") != socket.gethostname():
            return False
        if holder["pid"] == os.getpid():
            return True  # A previous train() in this process that did not release.
        return not _pid_alive(int(holder["pid"]))

    def release(self) -> None:
        """Removes the lock if this process holds it.

        A lock that cannot be removed (the directory became read-only) is
        reported as a WARNING and left: the next trainer finds it stale.
        """
        if self._held:
            self._held = False
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
            except OSError as e:
                logging.warning(
                    "Could not remove the lock %s (%s); the next run takes it over",
                    self.path,
                    e.strerror or type(e).__name__,
                )
                return
            made_dirs.remove_if_empty(self._made)  # Only if the run wrote nothing.


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


# --- Saving -------------------------------------------------------------------


def _remove_partial(directory: str, step: int) -> None:
    """Deletes what a failed save of ``ckpt-<step>`` left: temp dir and files.

    These files were being written by this save and never became a
    checkpoint (the ``checkpoint`` state file still names the previous one),
    so deleting them loses nothing.
    """
    prefix = os.path.join(directory, f"ckpt-{step}")
    for path in tf.io.gfile.glob(prefix + "_temp*") + tf.io.gfile.glob(prefix + ".*"):
        try:
            if tf.io.gfile.isdir(path):
                tf.io.gfile.rmtree(path)
            else:
                tf.io.gfile.remove(path)
        except (tf.errors.OpError, OSError) as e:
            logging.warning("Could not remove %s after a failed save: %s", path, e)


def remove_temporaries(directory: str) -> list[str]:
    """Deletes what saves killed mid-way left in ``directory``; returns it.

    ``ckpt-N_temp`` directories (a sharded save writes there, then merges
    into ``ckpt-N.*``) and ``checkpoint.tmp*`` state files never became a
    checkpoint, and no other trainer writes here (the caller holds the run
    lock), so deleting them loses nothing. A process killed with SIGKILL
    during a save leaves them; the next run removes them at its start.
    """
    removed = []
    patterns = ("ckpt-*_temp*", "checkpoint.tmp*")
    for pattern in patterns:
        for path in tf.io.gfile.glob(os.path.join(directory, pattern)):
            try:
                if tf.io.gfile.isdir(path):
                    tf.io.gfile.rmtree(path)
                else:
                    tf.io.gfile.remove(path)
            except (tf.errors.OpError, OSError) as e:
                logging.warning(
                    "Could not remove %s of an unfinished save: %s", path, e
                )
                continue
            removed.append(path)
    if removed:
        logging.info(
            "Removed %d leftover(s) of an unfinished save: %s",
            len(removed),
            ", ".join(os.path.basename(p) for p in removed),
        )
    return removed


def _write_state(directory: str, chosen: str, paths: list[str]) -> None:
    """Rewrites the ``checkpoint`` state file: ``chosen`` latest, ``paths`` kept.

    The state file is a text ``CheckpointState`` proto. It is built with the
    public ``generate_checkpoint_state_proto`` and replaced in one rename, as
    ``CheckpointManager`` does; ``update_checkpoint_state`` would do the same
    but prints a deprecation notice.
    """
    if os.path.isabs(directory):
        # Relative to it, as CheckpointManager writes them: the run directory
        # can then be moved. (generate_checkpoint_state_proto does this itself
        # for a directory that is not absolute, as gs:// is.)
        chosen = os.path.relpath(chosen, directory)
        paths = [os.path.relpath(p, directory) for p in paths]
    # Timestamps after `last_preserved_timestamp` (0), oldest first: without
    # them CheckpointManager takes every listed checkpoint for one kept by
    # `keep_checkpoint_every_n_hours` and never deletes it.
    now = time.time()
    state = tf.compat.v1.train.generate_checkpoint_state_proto(
        directory,
        chosen,
        all_model_checkpoint_paths=paths,
        all_model_checkpoint_timestamps=[
            now - len(paths) + i for i in range(len(paths))
        ],
        last_preserved_timestamp=0.0,
    )
    path = os.path.join(directory, "checkpoint")
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with tf.io.gfile.GFile(tmp, "w") as f:
            f.write(text_format.MessageToString(state))
        tf.io.gfile.rename(tmp, path, overwrite=True)
    finally:
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.remove(tmp)


class CheckpointWriter:
    """Atomic checkpoint saves; the MultiWorkerMirrored pattern for non-chiefs.

    Saving a distributed variable is collective, so every worker saves; only
    the chief writes into ``directory``, the others into a temporary
    directory that is deleted right after.

    A save writes ``ckpt-N`` next to the previous checkpoints and only then
    records it in the ``checkpoint`` state file (``CheckpointManager`` does
    that with an atomic rename). If writing fails (a full disk, a lost
    mount), what the save wrote is deleted and :class:`CheckpointSaveError`
    names the problem in one line; the previous checkpoint stays the latest.
    """

    def __init__(self, checkpoint, directory, chief, worker_id, keep):
        self.chief = chief
        if not chief:
            directory = tempfile.mkdtemp(prefix=f"distopt_worker{worker_id}_")
        self.directory = directory
        self._checkpoint = checkpoint
        self.manager = tf.train.CheckpointManager(
            checkpoint, directory, max_to_keep=keep
        )

    def save(self, step: int) -> str:
        """Saves ``ckpt-<step>``.

        Returns:
          The checkpoint's path prefix.

        Raises:
          CheckpointSaveError: nothing new is on disk, the latest is unchanged.
        """
        # Read first: a save that fails at its state file has already made
        # itself the manager's latest, and its files are deleted below.
        previous = self.manager.latest_checkpoint
        try:
            if os.environ.get(_KILL_IN_SAVE_ENV) == str(step):
                self._checkpoint.write(
                    os.path.join(
                        self.directory, f"ckpt-{step}_temp", "part-00000-of-00001"
                    )
                )
                os.kill(os.getpid(), signal.SIGKILL)
            if os.environ.get(_SAVE_ERROR_ENV) == str(step):
                tf.io.gfile.makedirs(os.path.join(self.directory, f"ckpt-{step}_temp"))
                raise tf.errors.ResourceExhaustedError(
                    None, None, "No space left on device (injected)"
                )
            path = self.manager.save(checkpoint_number=step)
        except (tf.errors.OpError, OSError) as e:
            _remove_partial(self.directory, step)
            if not self.chief:
                shutil.rmtree(self.directory, ignore_errors=True)
            raise CheckpointSaveError(
                f"Could not save the checkpoint of step {step} in {self.directory}: "
                f"{type(e).__name__}: {first_line(e)}. The latest checkpoint is "
                f"still {previous or 'none'}; free space and rerun to resume"
            ) from None
        if self.chief:
            logging.info("Saved checkpoint %s", path)
        else:
            shutil.rmtree(self.directory, ignore_errors=True)
        return path


# --- Restoring ----------------------------------------------------------------


def candidates(directory: str) -> list[str]:
    """Checkpoint prefixes in ``directory``, newest (highest step) first.

    From the files on disk as well as the ``checkpoint`` state file, so that a
    latest checkpoint with a missing or damaged file is still seen (and can
    be moved aside) rather than silently skipped.
    """
    directory = _canonical(directory)
    found = {}
    for path in tf.io.gfile.glob(os.path.join(directory, "ckpt-*.index")):
        match = _CKPT_INDEX.match(os.path.basename(path))
        if match:
            found[os.path.join(directory, match["prefix"])] = int(match["step"])
    try:
        state = _state_paths(directory)
    except (tf.errors.OpError, ValueError):  # A damaged state file.
        state = None
    for path in state[1] if state else ():
        match = re.search(r"-(\d+)$", path)
        if match:
            found.setdefault(path, int(match[1]))
    return sorted(found, key=found.get, reverse=True)


def verify(path: str) -> None:
    """Reads every tensor of checkpoint ``path``, which checks their checksums.

    Raises:
      Exception: a missing, truncated or damaged file (``tf.errors.OpError``,
        ``IndexError`` for a short read, ``ValueError``, ...).
    """
    reader = tf.train.load_checkpoint(path)
    for name in reader.get_variable_to_shape_map():
        reader.get_tensor(name)


def move_aside(path: str) -> str:
    """Moves checkpoint ``path``'s files into ``corrupt/<name>-<time>/``."""
    directory, name = os.path.split(path)
    target = os.path.join(directory, CORRUPT_SUBDIR, f"{name}-{int(time.time())}")
    tf.io.gfile.makedirs(target)
    for file in tf.io.gfile.glob(path + ".*"):
        tf.io.gfile.rename(file, os.path.join(target, os.path.basename(file)), True)
    return target


def _canonical(path: str) -> str:
    """``path`` absolute and normalised; on remote storage (``gs://``) as is.

    The restore takes its directory through this once, at its entry: the
    checkpoints found on disk and those the state file names then have one
    spelling each, whatever the directory's spelling and the process's cwd.
    """
    return path if "://" in path else os.path.abspath(path)


def _state_paths(directory: str) -> tuple[str, list[str]] | None:
    """The state file's latest checkpoint and listed ones; None without one.

    ``get_checkpoint_state`` has joined the file's relative paths to
    ``directory`` already: joined again, a relative directory was doubled
    (``rel/checkpoints/rel/checkpoints/ckpt-30``), and a damaged latest
    checkpoint was not moved aside. Absolute ones (the file written with
    another spelling of the directory) are only normalised.

    Raises:
      tf.errors.OpError, ValueError: a damaged state file.
    """
    state = tf.train.get_checkpoint_state(directory)
    if state is None:
        return None
    listed = [_canonical(p) for p in state.all_model_checkpoint_paths]
    return _canonical(state.model_checkpoint_path), listed


def _state_lists(directory: str, chosen: str | None, found: list[str]) -> bool:
    """Whether the state file names ``chosen`` latest and all of ``found``.

    It does not after a user deleted or truncated it, or a kill between a
    save's last file and its rename: the checkpoints it misses would be
    restored from but never deleted (CheckpointManager deletes only what the
    state file lists).
    """
    try:
        state = _state_paths(directory)
    except (tf.errors.OpError, ValueError):  # A damaged state file.
        return False
    if state is None:
        return chosen is None
    latest, listed = state
    return latest == chosen and set(listed) >= set(found)


def newest_loadable(directory: str, *, chief: bool) -> str | None:
    """The newest checkpoint in ``directory`` whose every tensor reads back.

    Each newer one that fails is reported in one WARNING line and, on the
    chief, moved aside (never deleted) and dropped from the ``checkpoint``
    state file, so that the next save does not list it.

    Returns:
      The checkpoint path (absolute), or None if there is none (a fresh run).
    """
    directory = _canonical(directory)  # See _state_paths.
    bad = []
    chosen = None
    found = candidates(directory)
    for path in found:
        try:
            verify(path)
        # The checkpoint reader translates TensorFlow's status codes into
        # assorted Python errors (IndexError for a short read, ValueError,
        # tf.errors.*): any of them means this checkpoint does not load.
        except Exception as e:  # noqa: BLE001
            bad.append(path)
            where = move_aside(path) if chief else "left for the chief to move"
            logging.warning(
                "Checkpoint %s does not load (%s: %s); moved aside to %s, "
                "falling back to the previous one",
                path,
                type(e).__name__,
                first_line(e),
                where,
            )
            continue
        chosen = path
        break
    if chief and (bad or not _state_lists(directory, chosen, found)):
        remaining = [p for p in reversed(found) if p not in bad]
        if chosen:
            _write_state(directory, chosen, remaining)
        elif tf.io.gfile.exists(os.path.join(directory, "checkpoint")):
            tf.io.gfile.remove(os.path.join(directory, "checkpoint"))
    if bad and not chosen:
        logging.warning("No checkpoint in %s loads: starting from step 0", directory)
    return chosen
