"""Rate-limited links between localhost workers (``local.py --link_rate``).

Each worker gets a network namespace of its own, like a host with one network
card behind a switch::

    worker i's namespace              the launcher's namespace
    lo, eth0 10.23.0.(i+1)/24 <-veth-> wk<i> -- br0 (bridge) -- wk<j> <-veth-> ...
    eth0: tbf RATE (upload)            wk<i>: tbf RATE (download)

A token bucket (``tc qdisc ... tbf``) on the egress of both ends of every veth
pair limits the worker's upload (egress of its ``eth0``) and its download
(egress of the bridge's ``wk<i>``) to RATE each, independently, so several
peers sending to one worker share its download as they would share a NIC.
Traffic of a worker to its own address stays on its loopback, unlimited.

This runs inside the launcher's private user + network namespace
(``unshare --user --map-root-user --net``), where the launcher is root of a
user namespace of its own: no privileges on the machine are needed and
nothing outside sees the links. Each worker's namespace is held by a small
process (``unshare --net cat``) whose standard input is a pipe from the
launcher: the launcher closing it, or dying, ends the holder. Workers enter
their namespace with ``nsenter --net=/proc/<holder>/ns/net``, which
``exec``s the worker's command (same process, same signals).

Standard library only, like ``local.py``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # typing.Self is Python 3.11's; distopt supports 3.10.
    from typing import Self

#: The rate units accepted, in bits per second (SI, as tc's: 1kbit = 1000 bit/s).
RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
#: Said by every rate error, and in ``--help``.
RATE_FORMS = (
    "a number followed by bit, kbit, mbit or gbit (per second, SI: "
    "1mbit = 1000000 bit/s), e.g. 20mbit, 2.5mbit, 1gbit"
)
#: The slowest rate accepted: below it a single full-size packet takes seconds.
MIN_RATE = 10**5
#: Worker i is 10.23.0.(i+1) on a /24; the bridge has no address.
SUBNET = "10.23.0"
MAX_WORKERS = 250
#: How long a packet may wait in a token bucket's queue before it is dropped:
#: the size of the switch buffer, as rate x latency bytes.
QUEUE_LATENCY = "100ms"
#: The tools the links are built with (``unshare`` is the launcher's own).
TOOLS = ("ip", "tc", "nsenter", "unshare")


class LinkError(RuntimeError):
    """A link could not be built; the message says which command failed."""


def parse_rate(text: str) -> int:
    """Parses a link rate such as ``100mbit`` into bits per second.

    Accepts a decimal number (``20``, ``2.5``) followed by one of the units
    of ``RATE_UNITS``, case-insensitive, with no space. tc's byte units
    (``bps``, ``mbps``: bytes per second) and bare numbers are rejected:
    they are easy to misread by a factor of 8.

    Args:
      text: the rate as given on the command line.

    Returns:
      The rate in bits per second.

    Raises:
      ValueError: ``text`` is not of an accepted form or is below
        ``MIN_RATE``; the message names the accepted forms.
    """
    match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)([a-z]+)", text.strip().lower())
    if not match or match.group(2) not in RATE_UNITS:
        raise ValueError(f"{text!r} is not a rate: expected {RATE_FORMS}")
    bits = round(float(match.group(1)) * RATE_UNITS[match.group(2)])
    if bits < MIN_RATE:
        raise ValueError(f"{text!r} is below the minimum of {MIN_RATE // 1000}kbit")
    return bits


def format_rate(bits_per_second: int) -> str:
    """The shortest exact tc form of a rate, e.g. ``100mbit``."""
    for unit in ("gbit", "mbit", "kbit"):
        if bits_per_second % RATE_UNITS[unit] == 0:
            return f"{bits_per_second // RATE_UNITS[unit]}{unit}"
    return f"{bits_per_second}bit"


def burst_bytes(bits_per_second: int) -> int:
    """The token bucket's size: 1 ms at the rate, at least 16 KiB.

    A real card never sends faster than its rate, so the bucket is kept
    small: a big one lets a short message (a small tensor's all-reduce) pass
    at memory speed. It must still hold several full packets, and what the
    rate brings in while the qdisc waits for its timer on a loaded host, or
    the link would run below its rate; 16 KiB is 11 packets of 1514 bytes.
    """
    return max(16 * 1024, bits_per_second // 8 // 1000)


def missing_tools() -> list[str]:
    """The tools of ``TOOLS`` not found on ``PATH``."""
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def unavailable() -> str | None:
    """Why links cannot be built on this machine, or None if they can.

    Builds a bridge, a veth pair and a token bucket in a throwaway user +
    network namespace, so that a kernel without them (or with unprivileged
    user namespaces disabled) is found before any worker starts.
    """
    missing = missing_tools()
    if missing:
        return f"{', '.join(missing)} not found on PATH (iproute2, util-linux)"
    trial = (
        "ip link add br0 type bridge && ip link add wk0 type veth peer name eth0 "
        "&& ip link set wk0 master br0 && "
        "tc qdisc add dev eth0 root tbf rate 1mbit burst 16k latency 100ms"
    )
    argv = ["unshare", "--user", "--map-root-user", "--net", "sh", "-c", trial]
    try:
        done = subprocess.run(
            argv, check=False, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError) as e:
        return f"{shlex.join(argv)}: {e}"
    if done.returncode != 0:
        what = (done.stderr or done.stdout).strip().replace("\n", "; ")
        return f"no user + network namespace with veth, bridge and tbf here: {what}"
    return None


def tf_config(addresses: list[str], ports: list[int], index: int) -> str:
    """The ``TF_CONFIG`` of worker ``index`` when each worker has its address.

    The same JSON as ``distopt.cluster.localhost_tf_config``, with one
    address per worker instead of one host for all.
    """
    return json.dumps(
        {
            "cluster": {"worker": [f"{a}:{p}" for a, p in zip(addresses, ports)]},
            "task": {"type": "worker", "index": index},
        }
    )


def _run(argv: list[str], stdin: str | None = None) -> None:
    """Runs a set-up command; raises ``LinkError`` naming it if it fails."""
    try:
        done = subprocess.run(
            argv,
            input=stdin,
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise LinkError(f"{shlex.join(argv)}: {e}") from e
    if done.returncode != 0:
        what = (done.stderr or done.stdout).strip().replace("\n", "; ")
        raise LinkError(f"{shlex.join(argv)}: {what}")


def _start_holder() -> subprocess.Popen:
    """Starts a process in a new network namespace and waits until it is in.

    ``unshare`` enters the namespace before ``exec``ing ``cat``; until then
    ``/proc/<pid>/ns/net`` is still the launcher's, so this waits for it to
    differ. ``cat`` reads the pipe from the launcher until it is closed.
    """
    holder = subprocess.Popen(
        ["unshare", "--net", "cat"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        # Not in the launcher's process group: a Ctrl-C at the terminal goes
        # to the launcher, which stops the workers before the holders.
        start_new_session=True,
    )
    own = os.readlink("/proc/self/ns/net")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if holder.poll() is not None:
            raise LinkError(f"unshare --net: {holder.stderr.read().decode().strip()}")
        try:
            if os.readlink(f"/proc/{holder.pid}/ns/net") != own:
                return holder
        except OSError:
            pass  # Between fork and exec: not readable yet.
        time.sleep(0.005)
    holder.kill()
    holder.wait()
    raise LinkError("unshare --net: no new network namespace after 10 s")


class Links:
    """The workers' namespaces, veth pairs, bridge and token buckets.

    Built by ``build``; ``close`` (or leaving a ``with`` block) ends the
    holders, and with them the namespaces once their workers are gone. The
    bridge and the launcher-side veths live in the launcher's namespace and
    vanish with it.

    Attributes:
      rate: the limit of every link, each way, in bits per second.
      addresses: worker i's IPv4 address, in worker order.
    """

    def __init__(self, rate: int):
        self.rate = rate
        self.addresses: list[str] = []
        self._holders: list[subprocess.Popen] = []

    def netns(self, index: int) -> str:
        """The path of worker ``index``'s network namespace."""
        return f"/proc/{self._holders[index].pid}/ns/net"

    def command(self, index: int, argv: list[str]) -> list[str]:
        """``argv`` run in worker ``index``'s namespace (``nsenter`` execs it)."""
        return ["nsenter", f"--net={self.netns(index)}", "--", *argv]

    def counters(self) -> list[dict[str, int]]:
        """What each worker's link has carried so far, from its token buckets.

        Read from the statistics of the two ``tbf`` qdiscs of each link
        (``tc -s qdisc``): the upload's on the worker's ``eth0``, the
        download's on the bridge's ``wk<i>``. They count what the limit
        counts: whole Ethernet frames (headers included, no preamble or
        checksum), one per TCP segment even when the kernel passes segments
        in 64 KiB batches, which the interfaces' own counters
        (``/proc/net/dev``) count as one frame with one set of headers.

        Returns:
          Per worker: ``tx_bytes``, ``tx_packets``, ``tx_drops`` (its upload),
          ``rx_bytes``, ``rx_packets``, ``rx_drops`` (its download); drops
          are packets that found the queue full, not in the bytes.
        """
        down = {q.get("dev"): q for q in _tbf_stats(["tc", "-s", "-j", "qdisc"])}
        result = []
        for i in range(len(self._holders)):
            show = ["tc", "-s", "-j", "qdisc", "show", "dev", "eth0"]
            (up,) = _tbf_stats(self.command(i, show))
            dn = down[f"wk{i}"]
            result.append({f"tx_{k}": up[k] for k in ("bytes", "packets", "drops")})
            result[-1].update({f"rx_{k}": dn[k] for k in ("bytes", "packets", "drops")})
        return result

    def close(self) -> None:
        """Ends the holders and deletes the bridge and its ports (idempotent).

        The launcher's namespace would delete them as it ends; deleting them
        here lets one process build links again (the probe, a benchmark).
        """
        for holder in self._holders:
            holder.stdin.close()  # EOF: cat exits.
            try:
                holder.wait(timeout=5)
            except subprocess.TimeoutExpired:
                holder.kill()
                holder.wait()
            holder.stderr.close()
        # Deleting wk<i> deletes its pair; -force: on past what is gone.
        ports = "".join(f"link del wk{i}\n" for i in range(len(self._holders)))
        subprocess.run(
            ["ip", "-force", "-batch", "-"],
            input=ports + "link del br0\n",
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tbf_stats(argv: list[str]) -> list[dict]:
    """The ``tbf`` qdiscs in the JSON of a ``tc -s -j qdisc`` command."""
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise LinkError(f"{shlex.join(argv)}: {done.stderr.strip()}")
    return [q for q in json.loads(done.stdout) if q.get("kind") == "tbf"]


def build(num_workers: int, rate: int) -> Links:
    """Builds a rate-limited link for each of ``num_workers`` workers.

    Must run where this process is root of its own user and network
    namespace (inside the launcher's ``unshare``). Everything is built
    before it returns; if any step fails, what was built is undone (the
    holders end; the bridge and veths go with the launcher's namespace).

    Args:
      num_workers: how many workers, 1 to ``MAX_WORKERS``.
      rate: the limit of every link, each way, in bits per second.

    Returns:
      The links, to be closed after the workers exit.

    Raises:
      LinkError: a command failed; the message names it and says why.
    """
    if not 1 <= num_workers <= MAX_WORKERS:
        raise LinkError(f"1 to {MAX_WORKERS} workers, got {num_workers}")
    links = Links(rate)
    try:
        for i in range(num_workers):
            links._holders.append(_start_holder())
            links.addresses.append(f"{SUBNET}.{i + 1}")
        tbf = (
            f"root tbf rate {rate}bit burst {burst_bytes(rate)} latency {QUEUE_LATENCY}"
        )
        _disable_ipv6_here()
        # No multicast snooping: the bridge would send IGMP queries of its own.
        bridge = ["link add br0 type bridge mcast_snooping 0", "link set br0 up"]
        for i in range(num_workers):
            pid = links._holders[i].pid
            bridge.append(f"link add wk{i} type veth peer name eth0 netns {pid}")
            bridge.append(f"link set wk{i} master br0 up")
        _run(["ip", "-batch", "-"], "\n".join(bridge) + "\n")
        _run(
            ["tc", "-batch", "-"],
            "".join(f"qdisc add dev wk{i} {tbf}\n" for i in range(num_workers)),
        )
        for i, address in enumerate(links.addresses):
            _configure_worker_side(links, i, address, tbf)
    except BaseException:
        links.close()
        raise
    return links


def _disable_ipv6_here() -> None:
    """No IPv6 on the devices created from now on in this namespace.

    The workers use IPv4; without this the bridge and its ports would send
    IPv6 neighbour discovery and multicast reports, a few hundred bytes in
    every worker's counters. A kernel without IPv6 has nothing to disable.
    """
    path = "/proc/sys/net/ipv6/conf/default/disable_ipv6"
    if os.path.exists(path):
        with open(path, "w") as f:
            f.write("1")


def _configure_worker_side(links: Links, index: int, address: str, tbf: str) -> None:
    """Addresses and limits worker ``index``'s end, inside its namespace."""
    # addrgenmode none: no IPv6 link-local address, so no neighbour
    # discovery chatter in the byte counters; the workers use IPv4.
    setup = [
        "link set lo up",
        "link set eth0 addrgenmode none",
        f"addr add {address}/24 dev eth0",
        "link set eth0 up",
    ]
    _run(links.command(index, ["ip", "-batch", "-"]), "\n".join(setup) + "\n")
    _run(links.command(index, ["tc", "qdisc", "add", "dev", "eth0", *tbf.split()]))
