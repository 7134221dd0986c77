"""Directories a run creates, and their removal if the run wrote nothing.

A run refused after it made its directories (a bad flag found once the run
directory exists, a batch larger than the data found after the lock) must
leave nothing behind: a stray empty directory, or one holding only a lock,
binds nothing but confuses the next user. Both the trainer's own run
directory (:mod:`distopt.trainer.paths`) and the run lock
(:class:`distopt.checkpoints.RunLock`) record what they created with
:func:`make_dirs` and undo it with :func:`remove_if_empty`. No TensorFlow.
"""

from __future__ import annotations

import errno
import os


def make_dirs(path: str) -> list[str]:
    """Creates `path` and its missing parents; returns those it created.

    Like ``os.makedirs(path, exist_ok=True)``, but the caller learns which
    directories are its own (shallowest first), so that it removes only
    those. A directory another process creates meanwhile is not counted.
    After a failure, what this call created is removed again.

    Raises:
      NotADirectoryError: `path` or a parent exists and is not a directory
        (its ``filename`` names it).
      OSError: a directory cannot be created (its ``filename`` names it).
    """
    missing = []
    path = os.path.abspath(path)
    while not os.path.isdir(path):
        if os.path.lexists(path):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
        missing.append(path)
        path = os.path.dirname(path)
    created = []
    for path in reversed(missing):
        try:
            os.mkdir(path)
        except FileExistsError:
            if not os.path.isdir(path):  # A file appeared there meanwhile.
                remove_if_empty(created)
                raise NotADirectoryError(
                    errno.ENOTDIR, os.strerror(errno.ENOTDIR), path
                ) from None
            continue  # Another run made it a moment ago: not ours to remove.
        except OSError:
            remove_if_empty(created)
            raise
        created.append(path)
    return created


def remove_if_empty(created: list[str]) -> None:
    """Removes the directories of `created` (shallowest first), deepest first.

    Stops at the first one that is not empty (or is gone): it and its
    parents hold something of someone's, and stay.
    """
    for directory in reversed(created):
        try:
            os.rmdir(directory)
        except OSError:
            return
