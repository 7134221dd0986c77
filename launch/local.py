#!/usr/bin/env python3
r"""Runs a multi-worker ``distopt.train`` job on this machine.

    python launch/local.py --workers=2 -- --model=lenet --train_steps=200 \
        --model_dir=runs/local_2w

Starts ``--workers`` processes of ``python -m distopt.train
--strategy=multi_worker <trainer flags>``, each with a ``TF_CONFIG`` naming
every worker on a free port of ``--host`` (loopback by default) and its own
index. Their output is streamed with a ``[worker i]`` prefix. When one worker
fails, the others are killed at once and the launcher exits with that
worker's status; it exits 0 only if every worker does. SIGTERM or Ctrl-C to
the launcher is forwarded to the workers, which save a checkpoint and exit
42; the launcher then exits 42.

The trainer flags after ``--`` come after the launcher's own
``--strategy=multi_worker``, and absl lets the last one win: another
``--strategy`` there (or in a ``--flagfile``) would make every worker a
separate single-host trainer. The workers' environment names the strategy
the launcher gives them (``DISTOPT_LAUNCHER_STRATEGY``), and the trainer,
which has parsed its flags as absl does, refuses another one before it
writes anything. A ``--command`` whose program cannot be found is refused
before any worker starts.

Network: TensorFlow's gRPC server listens on every interface whatever
TF_CONFIG says (``"0.0.0.0:"`` is hard-coded in its ``grpc_server_lib``), so
by default (``--network=private``) the launcher re-runs itself in a network
namespace of its own (``unshare --user --map-root-user --net``, no root
needed) where the only interface is loopback: the workers reach each other
on 127.0.0.1 and nothing outside this launch can reach them. That namespace
has no other network, so a remote ``--model_dir`` (``gs://``...),
``--download`` or a ``--host`` other than loopback selects
``--network=host`` by itself, saying so; where unprivileged namespaces are
disabled the launcher says so and runs on the host's network.

Rate-limited links: with ``--link_rate=RATE`` (``20mbit``, ``1gbit``...)
every worker runs in a network namespace of its own, joined to a bridge by
a veth pair whose two ends are limited to RATE by a token bucket (its upload
and its download), and TF_CONFIG names the workers' own addresses
(10.23.0.1, 10.23.0.2, ...). The bytes each worker sent and received through
its link are said at the end (``--link_stats=PATH`` writes them as JSON).
See ``launch/links.py``; ``launch/link_probe.py`` measures such links.

Standard library only, so it runs before (and without) the package import:
the ports and TF_CONFIG come from ``distopt/cluster.py`` of this checkout, and
``--link_stats`` is checked and written by its ``distopt/output_files.py``,
each loaded by its path.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_sibling(path: str, name: str):
    """A standard-library-only module of this checkout, loaded by its path.

    Not ``import distopt``: the package's ``__init__`` imports TensorFlow,
    which the launcher does not need.

    Args:
      path: the module's file, relative to the checkout.
      name: the name it gets (not a name ``import`` would find).
    """
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_cluster = _load_sibling("distopt/cluster.py", "_distopt_cluster")
#: ``free_ports(count)``: distinct free localhost ports.
free_ports = _cluster.free_ports
#: ``tf_config(ports, index)``: the TF_CONFIG of worker ``index``.
tf_config = _cluster.localhost_tf_config
#: ``launch/links.py`` (``--link_rate``).
links_lib = _load_sibling("launch/links.py", "_distopt_links")
#: ``--link_stats``: checked by creating an entry, written whole or not at
#: all (the tools' own ``distopt/output_files.py``, rather than a copy).
output_files = _load_sibling("distopt/output_files.py", "_distopt_output_files")


def _stream(prefix: str, pipe, out, lock: threading.Lock) -> None:
    for line in iter(pipe.readline, ""):
        with lock:
            out.write(f"{prefix}{line}")
            out.flush()
    pipe.close()


# TensorFlow's coordination service reports a peer that has exited: the
# leader's service that a worker "stopped sending heartbeats", a worker's
# heartbeat thread that it "Failed to send RPC to coordination service"
# (Connection refused). After a job ends, each worker's interpreter takes 2 to
# 7 s to tear TensorFlow down (measured here), and its heartbeat thread runs
# until the end, so in about 1 launch of 5 one of these is logged after every
# worker has finished. TensorFlow 2.21 has no public call that stops the
# coordination agent before exit, so no order of exits in the trainer avoids
# it. The launcher holds these lines back and drops them only if every worker
# exits 0 (saying so); otherwise they are printed before the exit status.
_PEER_GONE = (
    "Failed to send RPC to coordination service",
    "(stopped sending heartbeats)",
)
# The lines TensorFlow continues such a message with.
_PEER_GONE_MORE = (
    "Additional GRPC error information from remote target",
    ":UNKNOWN:Error received from peer",
    "/job:",
    "The tasks have crashed.",
)


class _HoldPeerGone:
    """A worker's output stream that holds back a peer-gone report (`_PEER_GONE`).

    Args:
        out: Where every other line goes.
        prefix: The worker's prefix (``[worker i] ``), which `_stream` adds.
    """

    def __init__(self, out, prefix: str):
        self.out, self.prefix = out, prefix
        self.held: list[str] = []
        self._holding = False

    def write(self, text: str) -> None:
        line = text.removeprefix(self.prefix)
        if line.startswith("E0000") and any(p in line for p in _PEER_GONE):
            self._holding = True
        elif not line.startswith(_PEER_GONE_MORE):
            self._holding = False
        if self._holding:
            self.held.append(text)
        else:
            self.out.write(text)

    def flush(self) -> None:
        self.out.flush()

    def report(self, succeeded: bool, say) -> None:
        """After the run: drops the held lines (saying so) or prints them."""
        if self.held and succeeded:
            say(
                f"{self.prefix.strip('[] ')}: held back TensorFlow's "
                f"{len(self.held)}-line report of a peer that had exited; every "
                "worker succeeded"
            )
        elif self.held:
            self.out.write("".join(self.held))


# The trainer's exit status after a stop notice (checkpoint saved); see
# distopt/trainer_faults.py. Kept here as a number: the launcher does not
# import distopt.
EXIT_PREEMPTED = 42


def _signal_all(procs: list[subprocess.Popen], sig: int) -> None:
    """Sends ``sig`` to every live worker's process group."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass


def _kill_all(procs: list[subprocess.Popen]) -> None:
    """SIGKILLs every live worker's process group and reaps them."""
    _signal_all(procs, signal.SIGKILL)
    for p in procs:
        p.wait()


class _StopRequest:
    """SIGTERM/SIGINT to the launcher, recorded for the monitoring loop."""

    def __init__(self):
        self.signum = None

    def __call__(self, signum, frame):
        del frame
        self.signum = self.signum or signum


def launch(
    num_workers: int,
    command: list[str],
    *,
    grace_seconds: float = 25.0,
    host: str = "127.0.0.1",
    out=None,
    stop_request: _StopRequest | None = None,
    links=None,
    link_stats: str | None = None,
) -> int:
    """Runs ``command`` as ``num_workers`` workers; returns the exit status.

    A stop notice to the launcher (SIGTERM, SIGINT: see ``stop_request``) is
    forwarded to every worker as SIGTERM; the trainers then save a checkpoint
    at the same step and exit 42, and the launcher waits up to
    ``grace_seconds`` for them. A worker that fails (any other non-zero
    status) has the others killed at once: their peer is gone, so they could
    only wait for a collective to time out; the last checkpoint is what
    counts. A worker that exits 42 on its own (a notice sent to it directly)
    has the others given ``grace_seconds`` to save and exit too.

    Args:
      num_workers: number of worker processes.
      command: the program and arguments of every worker.
      grace_seconds: how long workers get to exit after a stop notice.
      host: the address every worker's TF_CONFIG names (loopback by default).
      out: where prefixed output goes (default stdout).
      stop_request: set by the launcher's signal handlers.
      links: a ``links.Links`` (``--link_rate``): worker i runs in its
        namespace and TF_CONFIG names the workers' own addresses instead of
        ``host``; each worker's bytes through its link are said at the end.
      link_stats: with ``links``, a JSON file to write those counters to.

    Returns:
      0 if every worker exited 0, 42 if they stopped on a notice, 127 (126)
      if a worker's program was not found (could not be run), else the
      status of the first that failed (128 + signal number for a signal).
    """
    stop_request = stop_request or _StopRequest()
    ports = free_ports(num_workers)
    workers = _Workers(out or sys.stdout)
    env = _worker_env()
    workers.say(_announcement(num_workers, command, host, ports, links))
    status = 0
    try:
        for i in range(num_workers):
            argv, cluster = _worker_command(i, command, ports, host, links)
            workers.start(i, argv, {**env, "TF_CONFIG": cluster})
        status = _watch(workers, stop_request, grace_seconds)
    except KeyboardInterrupt:  # Library use, without `main`'s handlers.
        status = 130
    except _CouldNotStart as e:  # `main` checks the program; library use not.
        workers.say(str(e))
        status = e.status
    finally:
        # However the launch ended, even while starting, no worker outlives it.
        workers.kill()
    workers.report(status == 0)
    if links is not None:
        _report_links(links, workers.say, link_stats)
    workers.say(f"exit status {status}")
    return status


#: The strategy the launcher gives every worker of the trainer.
STRATEGY = "multi_worker"


def _worker_env() -> dict[str, str]:
    """The environment every worker starts with (before its ``TF_CONFIG``)."""
    env = dict(os.environ)
    # Workers import distopt from this checkout even when it is not installed.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p
    )
    env.setdefault("PYTHONUNBUFFERED", "1")
    # The trainer refuses a later --strategy that undoes the launcher's
    # (distopt/train.py; absl lets the last setting win).
    env["DISTOPT_LAUNCHER_STRATEGY"] = STRATEGY
    return env


def _announcement(num_workers, command, host, ports, links) -> str:
    """The launcher's first line: where the workers listen, and what they run."""
    if links is None:
        return f"{num_workers} workers on {host} ports {ports}: {shlex.join(command)}"
    where = ", ".join(f"{a}:{p}" for a, p in zip(links.addresses, ports))
    return f"{num_workers} workers at {where}: {shlex.join(command)}"


def _worker_command(i, command, ports, host, links) -> tuple[list[str], str]:
    """Worker ``i``'s argv and ``TF_CONFIG``.

    With ``links`` the worker runs inside its own namespace and TF_CONFIG
    names every worker's own address; otherwise all share ``host``.
    """
    if links is None:
        return command, tf_config(ports, i, host=host)
    return links.command(i, command), links_lib.tf_config(links.addresses, ports, i)


class _CouldNotStart(Exception):
    """A worker's program could not be run (not found, not executable...).

    Args:
        i: The worker's index.
        program: What it was to run.
        error: Why it could not (from ``subprocess.Popen``).
    """

    def __init__(self, i: int, program: str, error: OSError):
        super().__init__(
            f"worker {i} could not start {program}: {error.strerror or error}"
        )
        # The shell's statuses: 127 "command not found", 126 "cannot execute".
        self.status = 127 if isinstance(error, FileNotFoundError) else 126


class _Workers:
    """The worker processes, the threads relaying their output, and its filters.

    Every line, the workers' and the launcher's own (`say`), is written under
    one lock so that lines from different threads never interleave.

    Args:
        out: Where the prefixed output goes.
    """

    def __init__(self, out):
        self.out = out
        self.lock = threading.Lock()
        self.procs: list[subprocess.Popen] = []
        self.threads: list[threading.Thread] = []
        self.streams: list[_HoldPeerGone] = []

    def say(self, text: str) -> None:
        """Writes a ``[launcher]`` line."""
        with self.lock:
            self.out.write(f"[launcher] {text}\n")
            self.out.flush()

    def start(self, i: int, argv: list[str], env: dict[str, str]) -> None:
        """Starts worker ``i`` and a thread relaying its output.

        Raises:
          _CouldNotStart: its program could not be run.
        """
        try:
            proc = subprocess.Popen(
                argv,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
                # Own process group: stopping a worker stops its children too.
                start_new_session=True,
            )
        except OSError as e:
            raise _CouldNotStart(i, argv[0], e) from e
        # Recorded at once, so that `kill` stops it if what follows fails.
        self.procs.append(proc)
        prefix = f"[worker {i}] "
        stream = _HoldPeerGone(self.out, prefix)
        self.streams.append(stream)
        t = threading.Thread(
            target=_stream, args=(prefix, proc.stdout, stream, self.lock)
        )
        t.start()
        self.threads.append(t)

    def kill(self) -> None:
        """SIGKILLs every live worker, then waits for their output to drain."""
        _kill_all(self.procs)
        for t in self.threads:
            t.join()

    def report(self, succeeded: bool) -> None:
        """Drops or prints each worker's held-back peer-gone lines."""
        for stream in self.streams:
            stream.report(succeeded, self.say)


def _watch(workers: _Workers, stop_request: _StopRequest, grace_seconds: float) -> int:
    """Polls the workers until the launch is over; returns its exit status.

    Forwards a stop notice to the workers (once), stops watching at the first
    real failure, and gives the workers ``grace_seconds`` after a notice (the
    launcher's, or one a worker answered with 42 on its own) before giving up
    on them. The caller kills whatever still runs.

    Args:
      workers: the started workers.
      stop_request: set by the launcher's signal handlers.
      grace_seconds: how long workers get to exit after a stop notice.

    Returns:
      As `launch`: 0 if every worker exited 0, else the first failure's
      status; when the grace period runs out, 42 if some worker had exited 42,
      else 137 (128 + SIGKILL).
    """
    procs, say = workers.procs, workers.say
    deadline = None  # Set once the workers were told to stop.
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            failed = [c for c in codes if c != 0]
            return _status(failed[0]) if failed else 0
        if stop_request.signum and deadline is None:
            name = signal.Signals(stop_request.signum).name
            say(f"{name}: forwarding SIGTERM to the workers")
            _signal_all(procs, signal.SIGTERM)
            deadline = time.time() + grace_seconds
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        preempted = [c == EXIT_PREEMPTED for _, c in failed]
        if failed and not all(preempted):
            # A real failure: the others' peer is gone, so waiting is useless.
            i, code = next((i, c) for i, c in failed if c != EXIT_PREEMPTED)
            say(f"worker {i} failed with status {code}; stopping the others")
            return _status(code)
        if failed and deadline is None:
            say(
                f"worker {failed[0][0]} stopped on a notice; waiting "
                f"{grace_seconds:g} s for the others"
            )
            deadline = time.time() + grace_seconds
        if deadline is not None and time.time() > deadline:
            say(f"workers still running after {grace_seconds:g} s: killing them")
            return EXIT_PREEMPTED if failed else 128 + signal.SIGKILL
        time.sleep(0.05)


def _report_links(links, say, path: str | None) -> None:
    """Says each worker's bytes through its link; writes them to ``path``."""
    try:
        counters = links.counters()
    except links_lib.LinkError as e:
        say(f"no link counters: {e}")
        return
    for i, c in enumerate(counters):
        say(
            f"worker {i} sent {c['tx_bytes']} bytes, received {c['rx_bytes']} "
            f"bytes through its {links_lib.format_rate(links.rate)} link"
        )
    if path:
        _write_link_stats(links, counters, path, say)


def _write_link_stats(links, counters, path: str, say) -> None:
    """Writes ``--link_stats`` whole or not at all; a failure is one line.

    The workers have finished by now: a full disk must not turn their
    success into a traceback (nor leave a truncated file), so the launch's
    exit status stays theirs.
    """
    stats = {
        "link_rate": links_lib.format_rate(links.rate),
        "rate_bits_per_second": links.rate,
        "workers": [
            {"index": i, "address": a, **c}
            for i, (a, c) in enumerate(zip(links.addresses, counters))
        ],
    }
    try:
        output_files.write_json(path, stats)
    except OSError as e:
        say(
            f"--link_stats: the link stats could not be written to {path} "
            f"({e.strerror or e}); the exit status is still the workers'"
        )


#: Set in the re-run launcher: it already runs in its own network namespace.
_IN_PRIVATE_NETWORK_ENV = "DISTOPT_LAUNCH_PRIVATE_NETWORK"
_UNSHARE = ["unshare", "--user", "--map-root-user", "--net"]


def _why_host_network(host: str, trainer_flags: list[str]) -> str | None:
    """Why this launch needs the host's network, or None if it does not."""
    if host not in ("127.0.0.1", "localhost"):
        return f"--host={host} is not loopback"
    for flag in trainer_flags:
        if "://" in flag:
            return f"{flag} is remote"
        if flag in ("--download", "--download=true"):
            return "--download needs the network"
    return None


def _private_network_available() -> bool:
    try:
        probe = subprocess.run(
            [*_UNSHARE, "true"], capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


def _bring_loopback_up() -> None:
    """Sets ``lo`` up: a new network namespace starts with it down."""
    import fcntl
    import socket
    import struct

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(sock, siocgifflags, request))[1]
        if not flags & iff_up:  # Setting it needs the namespace's privileges.
            fcntl.ioctl(sock, siocsifflags, struct.pack("16sh", b"lo", flags | iff_up))


def _enter_private_network(argv: list[str], link_rate: int | None = None) -> None:
    """Re-runs this launcher in a loopback-only network namespace.

    ``exec`` keeps the process id, so a scheduler's signal to the launcher
    still reaches it. Returns (without exec) when already inside.
    """
    if os.environ.get(_IN_PRIVATE_NETWORK_ENV):
        _bring_loopback_up()
        if link_rate is None:
            what = "the workers see only loopback"
        else:
            what = (
                "each worker in a namespace of its own, its only link "
                f"{links_lib.format_rate(link_rate)} each way to a bridge"
            )
        print(
            f"[launcher] private network: {what} "
            "(--network=host to use this machine's)",
            flush=True,
        )
        return
    env = {**os.environ, _IN_PRIVATE_NETWORK_ENV: "1"}
    os.execvpe(
        _UNSHARE[0],
        [*_UNSHARE, sys.executable, os.path.abspath(__file__), *argv],
        env,
    )


def _status(code: int) -> int:
    """A worker's exit status as a process exit status (128 + signal)."""
    return code if code > 0 else 128 - code


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are the launcher's: one ``error:`` line, exit 2.

    argparse prints its usage block before the error; every other error of
    the launcher is one line (as distopt's tools, whose ``Parser`` in
    distopt/benchmarks/protocol.py the launcher cannot import).
    """

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    """The launcher's own flags (those before ``--``)."""
    parser = _Parser(
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
        default=25.0,
        help="Seconds the workers get to save and exit after a stop notice "
        "before SIGKILL (keep it under the scheduler's grace period).",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="Address of this machine in the workers' TF_CONFIG (default "
        "loopback). TensorFlow's gRPC server listens on all interfaces "
        "whatever this says: see --network.",
    )
    parser.add_argument(
        "--network",
        choices=("private", "host"),
        default="private",
        help="private (default): the workers run in a network namespace of "
        "their own where only loopback exists, so nothing outside this launch "
        "can reach their servers; host: the machine's network (needed for a "
        "remote --model_dir, --download, or --host other than loopback, "
        "which select it by themselves).",
    )
    parser.add_argument(
        "--link_rate",
        default=None,
        help="Give every worker a network namespace of its own, joined to a "
        "bridge by a link limited to this rate in each direction (its upload "
        "and its download, like one network card behind a switch); TF_CONFIG "
        f"names the workers' own addresses. A rate is {links_lib.RATE_FORMS}. "
        "Needs --network=private and the ip, tc and nsenter tools.",
    )
    parser.add_argument(
        "--link_stats",
        default=None,
        metavar="PATH",
        help="With --link_rate: write each worker's bytes and packets sent and "
        "received through its link (Ethernet frames, as the limit counts them) "
        "to this JSON file at the end.",
    )
    return parser


def _check_links(args, trainer_flags: list[str]) -> tuple[int | None, str | None]:
    """``--link_rate``'s rate in bits per second, or why it cannot be had.

    Everything is checked before the launcher enters its namespace and
    before anything starts; the last check builds throwaway links.

    Args:
      args: the launcher's parsed flags.
      trainer_flags: the flags after ``--``.

    Returns:
      ``(rate, None)`` (``rate`` None without ``--link_rate``), or
      ``(None, message)`` for a one-line error.
    """
    if args.link_rate is None:
        return None, "--link_stats needs --link_rate" if args.link_stats else None
    if args.link_stats:
        # Written after the run: a bad path must fail now, not after training.
        # By creating an entry there: os.access says yes to root even on a
        # read-only or virtual filesystem (/proc, /sys).
        why = output_files.check_file(args.link_stats, "link_stats")
        if why:
            return None, why
        # What is checked is what is written.
        args.link_stats = os.path.abspath(os.path.expanduser(args.link_stats))
    try:
        rate = links_lib.parse_rate(args.link_rate)
    except ValueError as e:
        return None, f"--link_rate: {e}"
    if args.network == "host":
        return None, (
            "--link_rate needs --network=private (the default): the links are "
            "built in the launcher's own network namespace"
        )
    why = _why_host_network(args.host, trainer_flags)
    if why:
        return None, f"--link_rate needs the private network, but {why}"
    if args.workers > links_lib.MAX_WORKERS:
        return None, f"--link_rate: at most {links_lib.MAX_WORKERS} workers"
    if not os.environ.get(_IN_PRIVATE_NETWORK_ENV):
        why = links_lib.unavailable()
        if why:
            return None, f"--link_rate: {why}"
    return rate, None


def _check_command(command: str) -> str | None:
    """Why ``--command``'s program could not be run, or None.

    Checked before any worker starts: ``subprocess.Popen`` failed with a
    traceback, and only once the workers before it were running.
    """
    try:
        words = shlex.split(command)
    except ValueError as e:  # An unclosed quote.
        return f"--command={command}: {e}"
    if not words:
        return "--command is empty"
    program = words[0]
    # What Popen runs: a path as it is, a bare name searched on PATH.
    if shutil.which(program):
        return None
    if os.sep not in program:
        return f"--command: {program} is not a program on PATH"
    if not os.path.exists(program):
        return f"--command: {program} does not exist"
    if os.path.isdir(program):
        return f"--command: {program} is a directory"
    return f"--command: {program} is not executable"


def _check_host(host: str) -> str | None:
    """Why the workers could not be reached at ``host``, or None.

    Every worker's TF_CONFIG names ``host``: an address that is not this
    machine's (or a name that does not resolve) would leave the workers
    waiting for each other until killed. Binding a socket to it says, at
    once, whether it is one of this machine's addresses.
    """
    try:
        family, kind, _, _, address = socket.getaddrinfo(
            host, 0, type=socket.SOCK_STREAM
        )[0]
        with socket.socket(family, kind) as s:
            s.bind(address)
    except socket.gaierror as e:
        return f"--host={host} does not resolve ({e.strerror or e})"
    except OSError as e:
        return (
            f"--host={host} is not an address of this machine ({e.strerror or e}): "
            "the workers, all started here, could not reach each other there"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        split = argv.index("--")
        own, trainer_flags = argv[:split], argv[split + 1 :]
    else:
        own, trainer_flags = argv, []
    parser = _parser()
    args = parser.parse_args(own)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if not args.grace_seconds >= 0:  # NaN too.
        parser.error(f"--grace_seconds must be >= 0, got {args.grace_seconds}")
    # The cheap check first: the last of `_check_links` builds links.
    error = _check_command(args.command) if args.command is not None else None
    rate, error = (None, error) if error else _check_links(args, trainer_flags)
    error = error or _check_host(args.host)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.network == "private":
        why = _why_host_network(args.host, trainer_flags)
        if why:
            print(f"[launcher] --network=host: {why}", flush=True)
        elif os.environ.get(_IN_PRIVATE_NETWORK_ENV) or _private_network_available():
            _enter_private_network(argv, rate)
        else:
            print(
                "[launcher] WARNING: no private network namespace here (unprivileged "
                "user namespaces are disabled): the workers' gRPC servers listen on "
                "every interface of this machine",
                flush=True,
            )
    if args.command is not None:
        command = shlex.split(args.command)
    else:
        command = [sys.executable, "-m", "distopt.train", f"--strategy={STRATEGY}"]
    # SIGTERM or Ctrl-C to the launcher (a job scheduler's stop) is forwarded
    # to the workers, which save a checkpoint and exit.
    stop_request = _StopRequest()
    signal.signal(signal.SIGTERM, stop_request)
    signal.signal(signal.SIGINT, stop_request)
    links = None
    if rate is not None:
        # All of it before any worker starts; a failure leaves nothing behind.
        try:
            links = links_lib.build(args.workers, rate)
        except links_lib.LinkError as e:
            print(
                f"error: --link_rate: could not build the links: {e}", file=sys.stderr
            )
            return 2
    try:
        return launch(
            args.workers,
            command + trainer_flags,
            grace_seconds=args.grace_seconds,
            host=args.host,
            stop_request=stop_request,
            links=links,
            link_stats=args.link_stats,
        )
    finally:
        if links is not None:
            links.close()


if __name__ == "__main__":
    sys.exit(main())
