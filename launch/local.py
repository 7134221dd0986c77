#!/usr/bin/env python3
r"""Runs a multi-worker ``distopt.train`` job on this machine.

    python launch/local.py --workers=2 -- --model=lenet --train_steps=200 \
        --model_dir=runs/local_2w

Starts ``--workers`` processes of ``python -m distopt.train
--strategy=multi_worker <trainer flags>``, each with a ``TF_CONFIG`` naming
every worker on a free localhost port and its own index. Their output is
streamed with a ``[worker i]`` prefix. When one worker fails, the others are
stopped and the launcher exits with that worker's status; it exits 0 only if
every worker does.

Standard library only, so it runs before (and without) the package import:
the ports and TF_CONFIG come from ``distopt/cluster.py`` of this checkout,
loaded by its path.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_cluster_module():
    """``distopt/cluster.py`` of this checkout, without importing ``distopt``.

    The package's ``__init__`` imports TensorFlow, which the launcher does not
    need; ``cluster.py`` is standard library only.
    """
    path = os.path.join(REPO_ROOT, "distopt", "cluster.py")
    spec = importlib.util.spec_from_file_location("_distopt_cluster", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_cluster = _load_cluster_module()
#: ``free_ports(count)``: distinct free localhost ports.
free_ports = _cluster.free_ports
#: ``tf_config(ports, index)``: the TF_CONFIG of worker ``index``.
tf_config = _cluster.localhost_tf_config


def _stream(prefix: str, pipe, out, lock: threading.Lock) -> None:
    for line in iter(pipe.readline, ""):
        with lock:
            out.write(f"{prefix}{line}")
            out.flush()
    pipe.close()


def _stop(procs: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM every live worker's process group, then SIGKILL after ``grace``."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    for p in live:
        try:
            p.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def launch(
    num_workers: int,
    command: list[str],
    *,
    grace_seconds: float = 10.0,
    out=None,
) -> int:
    """Runs ``command`` as ``num_workers`` workers; returns the exit status.

    Args:
      num_workers: number of worker processes.
      command: the program and arguments of every worker.
      grace_seconds: how long a stopped worker gets before SIGKILL.
      out: where prefixed output goes (default stdout).

    Returns:
      0 if every worker exited 0, else the status of the first that failed
      (128 + signal number for a signal).
    """
    out = out or sys.stdout
    ports = free_ports(num_workers)
    lock = threading.Lock()
    env = dict(os.environ)
    # Workers import distopt from this checkout even when it is not installed.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p
    )
    env.setdefault("PYTHONUNBUFFERED", "1")
    procs, threads = [], []
    with lock:
        out.write(
            f"[launcher] {num_workers} workers on localhost ports {ports}: "
            f"{shlex.join(command)}\n"
        )
    try:
        for i in range(num_workers):
            proc = subprocess.Popen(
                command,
                env={**env, "TF_CONFIG": tf_config(ports, i)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
                # Own process group: stopping a worker stops its children too.
                start_new_session=True,
            )
            procs.append(proc)
            t = threading.Thread(
                target=_stream, args=(f"[worker {i}] ", proc.stdout, out, lock)
            )
            t.start()
            threads.append(t)
        status = 0
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, code = failed[0]
                status = code if code > 0 else 128 - code
                with lock:
                    out.write(
                        f"[launcher] worker {i} failed with status {code}; "
                        "stopping the others\n"
                    )
                break
            if all(c == 0 for c in codes):
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        status = 130
    finally:
        _stop(procs, grace_seconds)
        for t in threads:
            t.join()
    with lock:
        out.write(f"[launcher] exit status {status}\n")
    return status


def _interrupt(signum, frame):
    del signum, frame
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        split = argv.index("--")
        own, trainer_flags = argv[:split], argv[split + 1 :]
    else:
        own, trainer_flags = argv, []
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="Number of worker processes."
    )
    parser.add_argument(
        "--command",
        default=None,
        help="Program every worker runs, instead of "
        "'python -m distopt.train --strategy=multi_worker' (trainer flags are "
        "appended to it).",
    )
    parser.add_argument(
        "--grace_seconds",
        type=float,
        default=10.0,
        help="Seconds a stopped worker gets to exit before SIGKILL.",
    )
    args = parser.parse_args(own)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if args.command:
        command = shlex.split(args.command)
    else:
        command = [sys.executable, "-m", "distopt.train", "--strategy=multi_worker"]
    # SIGTERM to the launcher (a job scheduler's stop) stops the workers too.
    signal.signal(signal.SIGTERM, _interrupt)
    return launch(
        args.workers, command + trainer_flags, grace_seconds=args.grace_seconds
    )


if __name__ == "__main__":
    sys.exit(main())
