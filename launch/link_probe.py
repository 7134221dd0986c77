#!/usr/bin/env python3
r"""Measures the links that ``local.py --link_rate`` builds.

    python launch/link_probe.py --link_rate=100mbit [--seconds=3] [--json]

Builds the launcher's links (``links.build``, the same namespaces, bridge and
token buckets) for two workers, then runs a bulk TCP transfer from worker
0's namespace to worker 1's, then back, then both at once, each for
``--seconds`` after a warm-up (TCP's slow start and the bucket's initial
burst are left out).
The receiver reports the payload it read in that window; the token buckets'
counters (``Links.counters``, what ``local.py --link_stats`` reports) give
the bytes of whole Ethernet frames per byte of payload over the transfer,
about 1514/1448 = 1.046 for full-size TCP segments, so the rate on the wire
is the payload rate times that.

Like ``local.py``, it re-runs itself in a user + network namespace of its
own (no root needed); ``probe()`` runs it from Python and returns the
result. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import links as links_lib  # A sibling file, not a package: after the path.

#: Set in the re-run probe: it already runs in its own namespace.
_INSIDE_ENV = "DISTOPT_LINK_PROBE_NAMESPACE"
PORT = 5201

# Runs in the receiving worker's namespace: accepts one connection, skips
# the warm-up, then counts the payload it reads for `seconds`.
_RECEIVER = r"""
import json, socket, sys, time
address, port, warmup, seconds = sys.argv[1], int(sys.argv[2]), *map(float, sys.argv[3:5])
server = socket.create_server((address, port))
print("listening", flush=True)
conn, _ = server.accept()
buf = bytearray(1 << 20)
total = conn.recv_into(buf)
start = time.monotonic() + warmup
while time.monotonic() < start:
    total += conn.recv_into(buf)
t0, window = time.monotonic(), 0
while time.monotonic() < t0 + seconds:
    n = conn.recv_into(buf)
    if not n:
        break
    window += n
t1 = time.monotonic()
conn.close()
result = {"window_bytes": window, "total_bytes": total + window, "seconds": t1 - t0}
print(json.dumps(result))
"""

# Runs in the sending worker's namespace: sends until the receiver closes.
_SENDER = r"""
import socket, sys
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
chunk = bytes(1 << 20)
try:
    while True:
        conn.sendall(chunk)
except (BrokenPipeError, ConnectionResetError):
    pass
"""


def measure(
    links: links_lib.Links,
    pairs: list[tuple[int, int]],
    seconds: float = 3.0,
    warmup: float = 0.5,
) -> list[dict]:
    """Bulk transfers between workers' namespaces, all at the same time.

    Args:
      links: built by ``links.build``, in this process's namespace.
      pairs: ``(sender, receiver)`` worker indices, one transfer each.
      seconds: how long the measured window lasts.
      warmup: how long each receiver reads before its window opens.

    Returns:
      Per pair: ``from``, ``to``, ``seconds``; ``payload_bits_per_second``
      (read by the receiver in its window); ``frame_bytes_per_payload_byte``,
      the sender's upload bytes (``Links.counters``) over the payload of the
      whole transfer; ``wire_bits_per_second``, the product of the two;
      ``sent_bytes``/``received_bytes``, the sender's upload and the
      receiver's download counters over the transfer, and
      ``download_drops``, the frames the receiver's download queue dropped
      (full). A sender's upload also carries the acknowledgements of what
      it receives at the time.
    """
    python = [sys.executable, "-c"]
    before = links.counters()
    procs, results = [], []
    try:
        for k, (_, receiver) in enumerate(pairs):
            args = [links.addresses[receiver], str(PORT + k), str(warmup), str(seconds)]
            procs.append(
                subprocess.Popen(
                    links.command(receiver, [*python, _RECEIVER, *args]),
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
            if procs[-1].stdout.readline().strip() != "listening":
                raise RuntimeError(f"receiver in worker {receiver}'s namespace failed")
        for k, (sender, receiver) in enumerate(pairs):
            args = [links.addresses[receiver], str(PORT + k)]
            procs.append(
                subprocess.Popen(links.command(sender, [*python, _SENDER, *args]))
            )
        results = [json.loads(rx.stdout.read()) for rx in procs[: len(pairs)]]
        for p in procs:
            p.wait(timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    # The sender's last frames may still wait in the receiver's download
    # queue: let it drain (a frame waits at most QUEUE_LATENCY, then is
    # sent or dropped) before reading what went through.
    time.sleep(0.3)
    after = links.counters()
    return [_rates(before, after, pair, r) for pair, r in zip(pairs, results)]


def _rates(before: list[dict], after: list[dict], pair, result: dict) -> dict:
    """One transfer's figures (see ``measure``) from the counters around it."""
    sender, receiver = pair
    sent = after[sender]["tx_bytes"] - before[sender]["tx_bytes"]
    received = after[receiver]["rx_bytes"] - before[receiver]["rx_bytes"]
    drops = after[receiver]["rx_drops"] - before[receiver]["rx_drops"]
    payload_rate = 8 * result["window_bytes"] / result["seconds"]
    overhead = sent / result["total_bytes"]
    return {
        "from": sender,
        "to": receiver,
        "seconds": result["seconds"],
        "payload_bits_per_second": payload_rate,
        "frame_bytes_per_payload_byte": overhead,
        "wire_bits_per_second": payload_rate * overhead,
        "sent_bytes": sent,
        "received_bytes": received,
        "download_drops": drops,
    }


def probe(link_rate: str, seconds: float = 3.0, timeout: float = 120) -> dict:
    """Runs this probe in a namespace of its own and returns its result.

    Args:
      link_rate: the rate, as ``local.py --link_rate`` takes it.
      seconds: the measured window of each direction.
      timeout: seconds before the probe is killed.

    Returns:
      What ``--json`` prints: ``link_rate``, ``rate_bits_per_second``,
      ``directions`` (0 to 1, then 1 to 0) and ``duplex`` (both at once);
      see ``measure``.

    Raises:
      RuntimeError: the probe failed; the message has its output.
    """
    argv = [sys.executable, os.path.abspath(__file__)]
    argv += [f"--link_rate={link_rate}", f"--seconds={seconds}", "--json"]
    done = subprocess.run(
        argv, check=False, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"link probe failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def _run_inside(rate: int, seconds: float) -> dict:
    """Builds two workers' links here and measures them.

    Each direction alone (``directions``), then both at once (``duplex``,
    as a ring all-reduce uses them: each worker sends and receives).
    """
    with links_lib.build(2, rate) as links:
        directions = [measure(links, [pair], seconds)[0] for pair in ((0, 1), (1, 0))]
        duplex = measure(links, [(0, 1), (1, 0)], seconds)
    return {
        "link_rate": links_lib.format_rate(rate),
        "rate_bits_per_second": rate,
        "directions": directions,
        "duplex": duplex,
    }


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are the probe's: one ``error:`` line, exit 2
    (argparse prints its usage block first), as ``local.py``'s."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def _seconds(text: str) -> float:
    """``--seconds``: a finite number > 0.

    0, a negative number or nan measured nothing and printed 0.0 Mbit/s
    with exit status 0; inf would never end.

    Raises:
      argparse.ArgumentTypeError: ``text`` is not such a number.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Runs the probe with command-line ``argv``; returns the exit status."""
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        # Ctrl-C: the transfers were killed and the links closed on the way
        # out (``measure``, ``build``'s context). One line, not a traceback,
        # and the shell's status for SIGINT.
        print("interrupted: nothing measured", file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    parser = _Parser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--link_rate", required=True, help=links_lib.RATE_FORMS)
    parser.add_argument(
        "--seconds",
        type=_seconds,
        default=3.0,
        help="The measured window of each transfer (> 0).",
    )
    parser.add_argument("--json", action="store_true", help="Print JSON only.")
    args = parser.parse_args(argv)
    try:
        rate = links_lib.parse_rate(args.link_rate)
    except ValueError as e:
        print(f"error: --link_rate: {e}", file=sys.stderr)
        return 2
    if not os.environ.get(_INSIDE_ENV):
        why = links_lib.unavailable()
        if why:
            print(f"error: --link_rate: {why}", file=sys.stderr)
            return 2
        env = {**os.environ, _INSIDE_ENV: "1"}
        unshare = ["unshare", "--user", "--map-root-user", "--net"]
        os.execvpe(unshare[0], [*unshare, sys.executable, __file__, *argv], env)
    try:
        result = _run_inside(rate, args.seconds)
    except links_lib.LinkError as e:
        print(f"error: --link_rate: could not build the links: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
        return 0
    for d in result["directions"] + result["duplex"]:
        print(
            f"worker {d['from']} -> {d['to']} at {result['link_rate']}"
            f"{' (both ways at once)' if d in result['duplex'] else ''}: "
            f"{d['wire_bits_per_second'] / 1e6:.1f} Mbit/s on the wire, "
            f"{d['payload_bits_per_second'] / 1e6:.1f} Mbit/s of payload "
            f"over {d['seconds']:.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
