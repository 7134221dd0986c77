"""Localhost clusters: free ports and the TF_CONFIG of each worker.

Used by ``launch/local.py``, the multi-worker benchmark and the tests that
start worker processes on this machine.

Standard library only: ``launch/local.py`` loads this file by its path, so
that the launcher runs without importing the ``distopt`` package (whose
``__init__`` imports TensorFlow) and without it being installed.
"""

from __future__ import annotations

import json
import socket


def free_ports(count: int) -> list[int]:
    """Returns ``count`` distinct TCP ports on localhost that are free right now.

    All sockets are held open until every port is chosen, so the ports are
    distinct; another process could still take one before a worker binds it.

    Args:
      count: how many ports, >= 0.

    Returns:
      The port numbers.

    Raises:
      ValueError: ``count`` is negative.
    """
    if count < 0:
        raise ValueError(f"count: must be >= 0, got {count!r}")
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("localhost", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def localhost_tf_config(ports: list[int], index: int, host: str = "localhost") -> str:
    """The ``TF_CONFIG`` of worker ``index`` in a cluster of localhost ports.

    Args:
      ports: one port per worker, in worker order.
      index: this worker's index into ``ports``.
      host: the address every worker is reached at.

    Returns:
      The JSON string to put in the worker's ``TF_CONFIG`` environment variable.

    Raises:
      ValueError: ``index`` is not an index into ``ports``.
    """
    if not 0 <= index < len(ports):
        raise ValueError(
            f"index: must be in [0, {len(ports)}) for {len(ports)} ports, got {index!r}"
        )
    return json.dumps(
        {
            "cluster": {"worker": [f"{host}:{p}" for p in ports]},
            "task": {"type": "worker", "index": index},
        }
    )
