"""A pytest plugin: host-busy CPU seconds and wall seconds per test.

Where the suite's CPU goes (BUILD_NOTES.md), serially, so that the host's
busy time around a test is that test's, its subprocesses and forked
children included (``RUSAGE_CHILDREN`` misses those of the fork server):

    PYTHONPATH=tests python -m pytest -q -p no:xdist -o addopts= -p cpuplug

writes ``cpu_main.json`` ({node id: [cpu s, wall s]}) to ``$CPUPLUG_OUT``
(default: the current directory). Anything else running on the host counts
too: run it alone.
"""

import json
import os
import time

import pytest

_ROWS = {}
_HZ = os.sysconf("SC_CLK_TCK")


def _busy_seconds() -> float:
    """The host's non-idle CPU time so far (every core), from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks[:8]) - idle) / _HZ


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    del nextitem
    cpu, wall = _busy_seconds(), time.time()
    yield
    _ROWS[item.nodeid] = (_busy_seconds() - cpu, time.time() - wall)


def pytest_sessionfinish(session):
    del session
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    out = os.environ.get("CPUPLUG_OUT", ".")
    with open(os.path.join(out, f"cpu_{worker}.json"), "w") as f:
        json.dump(_ROWS, f)
