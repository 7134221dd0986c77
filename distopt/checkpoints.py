"""Checkpoints that survive real clusters: a run lock, atomic saves, fallback.

Three things the trainer needs beyond ``tf.train.CheckpointManager``:

* :class:`RunLock`: one trainer per ``model_dir``. Two trainers saving into
  the same directory overwrite each other's checkpoints and both report
  success; the second one refuses instead.
* :class:`CheckpointWriter`: a save either completes or leaves the directory
  as it was (the previous checkpoint still the latest, no ``ckpt-N_temp``
  directory, no half-written ``ckpt-N`` files) and fails with one line.
* :func:`restore_newest_loadable`: a latest checkpoint that does not load
  (truncated, a flipped bit, a missing file) is moved aside with a WARNING and
  the newest one that does load is used.

Public TensorFlow APIs only (``tf.train``, ``tf.io.gfile``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import time

import tensorflow as tf
from absl import logging

LOCK_FILE = "LOCK"
# Where checkpoints that failed to load are moved (inside the checkpoint
# directory), so that a user can inspect them; they are never deleted.
CORRUPT_SUBDIR = "corrupt"
_CKPT_INDEX = re.compile(r"^(?P<prefix>.+-(?P<step>\d+))\.index$")

# Test-only fault injection: DISTOPT_FAULT_SAVE_ERROR_AT=N makes the save at
# step N fail as a full disk does (after the temp directory was written).
# The tests use a real full tmpfs where the machine allows a mount.
_SAVE_ERROR_ENV = "DISTOPT_FAULT_SAVE_ERROR_AT"


class LockError(RuntimeError):
    """Another live trainer holds ``model_dir``."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the previous one is still the latest."""


def _first_line(error: BaseException) -> str:
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

    Created with ``O_EXCL``, so of two trainers starting together exactly one
    gets it. A lock left by a process that is gone (same host, pid not alive)
    is stale and taken over with a WARNING; a lock held by a live process, or
    by another host (whose processes cannot be checked from here), makes the
    second trainer refuse. The lock is a local-filesystem guard: on
    ``gs://``-style storage ``O_EXCL`` does not exist and no lock is taken.
    """

    def __init__(self, model_dir: str):
        self.path = os.path.join(model_dir, LOCK_FILE)
        self._held = False

    def acquire(self) -> None:
        """Takes the lock.

        Raises:
          LockError: a live trainer (or one on another host) holds it.
        """
        if "://" in self.path:
            logging.info("No run lock on %s (not a local filesystem)", self.path)
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if not self._stale(holder):
                    raise LockError(
                        f"{os.path.dirname(self.path)} is in use by another trainer "
                        f"(host {holder.get('host')}, pid {holder.get('pid')}; "
                        f"{self.path}); use another --model_dir, or delete the lock "
                        "file if that process is gone"
                    ) from None
                logging.warning(
                    "Taking over the stale lock %s of host %s pid %s (no such process)",
                    self.path,
                    holder.get("host"),
                    holder.get("pid"),
                )
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._held = True
            return
        raise LockError(f"Could not take the lock {self.path}: another trainer races")

    def _read(self) -> dict:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            # Being written by its holder right now, or damaged: a damaged
            # file older than a minute is stale, a fresh one is not.
            try:
                age = time.time() - os.stat(self.path).st_mtime
            except OSError:
                age = 0.0
            return {"host": "?", "pid": None, "damaged_age": age}

    @staticmethod
    def _stale(holder: dict) -> bool:
        if holder.get("pid") is None:
            return holder.get("damaged_age", 0.0) > 60
        if holder.get("host") != socket.gethostname():
            return False
        if holder["pid"] == os.getpid():
            return True  # A previous train() in this process that did not release.
        return not _pid_alive(int(holder["pid"]))

    def release(self) -> None:
        """Removes the lock if this process holds it."""
        if self._held:
            self._held = False
            try:
                os.remove(self.path)
            except FileNotFoundError:
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
        try:
            if os.environ.get(_SAVE_ERROR_ENV) == str(step):
                tf.io.gfile.makedirs(os.path.join(self.directory, f"ckpt-{step}_temp"))
                raise tf.errors.ResourceExhaustedError(
                    None, None, "No space left on device (injected)"
                )
            path = self.manager.save(checkpoint_number=step)
        except (tf.errors.OpError, OSError) as e:
            _remove_partial(self.directory, step)
            previous = self.manager.latest_checkpoint
            if not self.chief:
                shutil.rmtree(self.directory, ignore_errors=True)
            raise CheckpointSaveError(
                f"Could not save the checkpoint of step {step} in {self.directory}: "
                f"{type(e).__name__}: {_first_line(e)}. The latest checkpoint is "
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
    found = {}
    for path in tf.io.gfile.glob(os.path.join(directory, "ckpt-*.index")):
        match = _CKPT_INDEX.match(os.path.basename(path))
        if match:
            found[os.path.join(directory, match["prefix"])] = int(match["step"])
    try:
        state = tf.train.get_checkpoint_state(directory)
    except (tf.errors.OpError, ValueError):  # A damaged state file.
        state = None
    for path in state.all_model_checkpoint_paths if state else ():
        path = path if os.path.isabs(path) else os.path.join(directory, path)
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


def newest_loadable(directory: str, *, chief: bool) -> str | None:
    """The newest checkpoint in ``directory`` whose every tensor reads back.

    Each newer one that fails is reported in one WARNING line and, on the
    chief, moved aside (never deleted) and dropped from the ``checkpoint``
    state file, so that the next save does not list it.

    Returns:
      The checkpoint path, or None if there is none (a fresh run).
    """
    bad = []
    chosen = None
    for path in candidates(directory):
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
                _first_line(e),
                where,
            )
            continue
        chosen = path
        break
    if bad and chief:
        remaining = [p for p in reversed(candidates(directory)) if p not in bad]
        if chosen:
            tf.compat.v1.train.update_checkpoint_state(
                directory, chosen, all_model_checkpoint_paths=remaining
            )
        elif tf.io.gfile.exists(os.path.join(directory, "checkpoint")):
            tf.io.gfile.remove(os.path.join(directory, "checkpoint"))
    if bad and not chosen:
        logging.warning("No checkpoint in %s loads: starting from step 0", directory)
    return chosen
