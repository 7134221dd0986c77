"""Result files of the tools: checked before the work, written whole or not at all.

A benchmark or study runs for minutes to hours and writes its results at the
end. A path that cannot be written must be one line naming the flag before
any work (not a traceback after it), and a write that fails (a full disk)
must leave the previous file intact and no truncated one: each file is
written to a temporary name beside it and renamed into place.

The checks try the real operation (create and remove a probe entry) rather
than ask ``os.access``, which says yes to root for any directory, even on a
read-only or virtual filesystem (``/proc``, ``/sys``). No TensorFlow.
"""

from __future__ import annotations

import json
import os
import uuid


def probe(directory: str) -> str | None:
    """Creates and removes an entry in ``directory``; None, or why it failed."""
    entry = os.path.join(
        directory, f".distopt-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    )
    try:
        os.mkdir(entry)
    except OSError as e:
        return e.strerror or type(e).__name__
    try:
        os.rmdir(entry)
    except OSError as e:
        return f"a probe entry {entry} could not be removed: {e.strerror or e}"
    return None


def check_file(path: str, flag: str) -> str | None:
    """Why ``--flag=path`` cannot be written as a file; None if it can.

    Its directory must exist (the tools do not create a mistyped tree) and
    take a new entry; ``path`` itself must not be a directory.
    """
    where = f"--{flag}={path}"
    full = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(full):
        return f"{where} is a directory"
    parent = os.path.dirname(full)
    if not os.path.isdir(parent):
        return f"{where}: the directory {parent} does not exist"
    why = probe(parent)
    return f"{where}: {parent} is not writable ({why})" if why else None


def write_atomically(path: str, data: str | bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file and a rename.

    Raises:
      OSError: it could not be written; ``path`` is as it was, and no
        temporary file is left.
    """
    tmp = os.path.join(
        os.path.dirname(os.path.abspath(path)),
        f".{os.path.basename(path)}.tmp-{os.getpid()}",
    )
    try:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass  # Never created.
        # A failed write or fsync names no file; the temporary is internal.
        e.filename = path
        raise


def write_json(path: str, value) -> None:
    """``value`` as indented JSON in ``path``, written whole or not at all."""
    write_atomically(path, json.dumps(value, indent=2) + "\n")


def why(error: OSError) -> str:
    """One line for a failed write: the path and the system's reason."""
    name = error.filename or "a result file"
    return f"could not write {name}: {error.strerror or error}"
