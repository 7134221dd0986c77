"""Tests of launch/: the localhost multi-worker launcher and the job scripts."""

import importlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO, run_python

LAUNCHER = os.path.join(REPO, "launch", "local.py")


def _launch(*args, timeout=300):
    return run_python(LAUNCHER, *args, timeout=timeout)


@pytest.mark.slow
def test_two_workers_train_and_write_metrics(tmp_path):
    model_dir = tmp_path / "mw"
    proc = _launch(
        "--workers=2",
        "--",
        f"--flagfile={REPO}/configs/multi_worker.cfg",
        "--model=mlp",
        "--train_steps=200",
        "--log_every=100",
        "--eval_steps=2",
        "--checkpoint_every=100",
        "--nojit_compile",  # The launcher is under test, not XLA: less CPU.
        f"--model_dir={model_dir}",
    )
    assert proc.returncode == 0, proc.stdout[-5000:]
    out = proc.stdout
    assert "[worker 0]" in out and "[worker 1]" in out
    assert "multi_worker: cluster from TF_CONFIG" in out
    assert "[launcher] exit status 0" in out
    # No TensorFlow start-up noise, nor a report of a peer that had exited.
    assert "E0000" not in out and "W0000" not in out and "cuda" not in out
    with open(model_dir / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["num_replicas"] == 2 and metrics["train_steps"] == 200
    assert metrics["strategy"] == "multi_worker"
    # TensorFlow parks a thread per collective for a collective timeout's
    # length: with one (it was 300 s in this config) 200 steps leave about a
    # thousand; a 4-worker run died at the 32768 threads limit.
    assert metrics["threads_at_end"] < 400, metrics["threads_at_end"]
    # Only the chief writes model_dir; the other worker's checkpoints went to
    # a temporary directory that is gone.
    assert sorted(os.listdir(model_dir / "checkpoints")) == [
        "checkpoint",
        "ckpt-100.data-00000-of-00001",
        "ckpt-100.index",
        "ckpt-200.data-00000-of-00001",
        "ckpt-200.index",
    ]


FAKE_WORKER = """
import json, os, sys, time
index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
with open(os.path.join(sys.argv[1], f"pid{index}"), "w") as f:
    f.write(str(os.getpid()))
print(f"worker {index} up", flush=True)
if index == 1:
    time.sleep(1)
    sys.exit(3)
time.sleep(120)
"""


def test_a_failing_worker_stops_the_others_and_fails_the_launch(tmp_path):
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    start = time.time()
    proc = _launch(
        "--workers=2",
        f"--command={sys.executable} {script}",
        "--grace_seconds=5",
        "--",
        str(tmp_path),
        timeout=60,
    )
    assert proc.returncode == 3
    assert time.time() - start < 30
    assert "[worker 0] worker 0 up" in proc.stdout
    assert "[worker 1] worker 1 up" in proc.stdout
    assert "worker 1 failed with status 3" in proc.stdout
    pid = int((tmp_path / "pid0").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# What TensorFlow's coordination service printed after successful 2-worker
# launches here (1 in 5): worker 1's heartbeat to worker 0, which had exited.
PEER_GONE_LINES = [
    (
        "E0000 00:00:1796403648.879038   26516 base_collective_executor.cc:252] "
        "BaseCollectiveExecutor::StartAbort UNAVAILABLE: Failed to send RPC to "
        "coordination service. Either the leader task was preempted/died/restarted "
        "unexpectedly or this task is experiencing network issues."
    ),
    (
        "Additional GRPC error information from remote target "
        "/job:worker/replica:0/task:0 while calling "
        "/tensorflow.CoordinationService/Heartbeat:"
    ),
    (
        ':UNKNOWN:Error received from peer  {grpc_status:14, grpc_message:"failed '
        'to connect to all addresses; Connection refused"}'
    ),
]

PEER_GONE_WORKER = """
import json, os, sys
index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
print(f"worker {index} done", flush=True)
if index == 1:
    with open(sys.argv[1]) as f:
        print(f.read(), end="", flush=True)
    print("a line of its own", flush=True)
    sys.exit(int(sys.argv[2]))
"""


@pytest.mark.parametrize("status", [0, 5])
def test_peer_gone_lines_are_dropped_only_when_every_worker_succeeds(tmp_path, status):
    script = tmp_path / "worker.py"
    script.write_text(PEER_GONE_WORKER)
    lines = tmp_path / "lines.txt"
    lines.write_text("".join(line + "\n" for line in PEER_GONE_LINES))
    proc = _launch(
        "--workers=2",
        f"--command={sys.executable} {script}",
        "--network=host",
        "--",
        str(lines),
        str(status),
        timeout=60,
    )
    assert proc.returncode == status
    out = proc.stdout
    assert "[worker 1] worker 1 done" in out
    assert "[worker 1] a line of its own" in out  # not mistaken for the message
    shown = [f"[worker 1] {line}" in out for line in PEER_GONE_LINES]
    if status == 0:
        assert "E0000" not in out and not any(shown), out
        assert "worker 1: held back TensorFlow's 3-line report" in out
    else:
        assert all(shown), out
        assert out.index(PEER_GONE_LINES[0]) < out.index("exit status 5")


def launch_module(name):
    """``launch/<name>.py`` as a module (the directory is not a package)."""
    sys.path.insert(0, os.path.join(REPO, "launch"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def local_launcher():
    """``launch/local.py`` as a module."""
    return launch_module("local")


def test_tf_config_and_ports():
    local = local_launcher()
    ports = local.free_ports(3)
    assert len(set(ports)) == 3
    config = json.loads(local.tf_config(ports, 2))
    assert config["cluster"]["worker"] == [f"localhost:{p}" for p in ports]
    assert config["task"] == {"type": "worker", "index": 2}


@pytest.mark.parametrize("script", ["slurm.sbatch", "tpu_vm.sh"])
def test_job_scripts_are_valid_bash_running_the_trainer(script):
    path = os.path.join(REPO, "launch", script)
    subprocess.run(["bash", "-n", path], check=True)
    with open(path) as f:
        text = f.read()
    assert "-m distopt.train" in text
    assert ("--strategy=tpu" in text) == (script == "tpu_vm.sh")


def test_kubernetes_job_sets_tf_config():
    with open(os.path.join(REPO, "launch", "k8s_job.yaml")) as f:
        text = f.read()
    assert "kind: Job" in text and "completionMode: Indexed" in text
    assert "TF_CONFIG" in text and "JOB_COMPLETION_INDEX" in text
    assert "--strategy=multi_worker" in text
    assert "clusterIP: None" in text


# A stand-in worker: it listens on 0.0.0.0 like TensorFlow's gRPC server
# (whose "0.0.0.0:" is hard-coded), checks that it reaches its peer on
# 127.0.0.1, and stays up until the test has tried to reach it from outside.
LISTENING_WORKER = r"""
import json, os, socket, sys, time
cluster = json.loads(os.environ["TF_CONFIG"])
index = cluster["task"]["index"]
addresses = cluster["cluster"]["worker"]
port = int(addresses[index].rsplit(":", 1)[1])
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", port))
server.listen()
out = sys.argv[1]
peer_port = int(addresses[1 - index].rsplit(":", 1)[1])
deadline = time.time() + 30
while True:
    try:
        socket.create_connection(("127.0.0.1", peer_port), timeout=1).close()
        break
    except OSError:
        assert time.time() < deadline, "peer not reachable on loopback"
        time.sleep(0.1)
with open(f"{out}/ready-{index}", "w") as f:
    json.dump({"port": port, "interfaces": open("/proc/net/dev").read()}, f)
while not os.path.exists(f"{out}/done") and time.time() < deadline:
    time.sleep(0.1)
"""


def _reachable_from_here(port):
    """Whether a connection from this process to ``port`` is accepted, on
    loopback or on this machine's own address."""
    hosts = ["127.0.0.1"]
    try:
        hosts.append(socket.gethostbyname(socket.gethostname()))
    except OSError:
        pass  # No address for this host's name: loopback is the one to try.
    for host in hosts:
        try:
            socket.create_connection((host, port), timeout=2).close()
            return True
        except OSError:
            pass
    return False


@pytest.mark.parametrize("network", ["private", "host"])
def test_workers_are_reachable_only_from_inside_the_launch(tmp_path, network):
    """--network=private (the default): the workers reach each other on
    loopback, while their servers, listening on 0.0.0.0 as TensorFlow's do,
    are out of reach of everything else on the machine. --network=host is
    the contrast: the same servers are reachable from outside.
    """
    if network == "private" and not local_launcher()._private_network_available():
        pytest.skip("unprivileged user namespaces are disabled on this machine")
    script = tmp_path / "listening_worker.py"
    script.write_text(LISTENING_WORKER)
    args = [LAUNCHER, "--workers=2", f"--command={sys.executable} {script} {tmp_path}"]
    if network == "host":
        args.append("--network=host")
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 60
        while not all((tmp_path / f"ready-{i}").exists() for i in range(2)):
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "workers not ready"
            time.sleep(0.1)
        time.sleep(0.2)  # The ready files are written in one go; let them land.
        ready = [json.loads((tmp_path / f"ready-{i}").read_text()) for i in range(2)]
        reachable = [_reachable_from_here(r["port"]) for r in ready]
        interfaces = [
            line.split(":")[0].strip()
            for line in ready[0]["interfaces"].splitlines()[2:]
        ]
    finally:
        (tmp_path / "done").write_text("")
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    if network == "private":
        assert reachable == [False, False], out
        assert interfaces == ["lo"], interfaces
        assert "[launcher] private network: the workers see only loopback" in out
    else:
        assert reachable == [True, True], out


def test_remote_paths_and_downloads_select_the_host_network():
    local = local_launcher()
    assert local._why_host_network("127.0.0.1", ["--model_dir=runs/a"]) is None
    assert "remote" in local._why_host_network("127.0.0.1", ["--model_dir=gs://b/r"])
    assert "--download" in local._why_host_network("127.0.0.1", ["--download"])
    assert "not loopback" in local._why_host_network("10.0.0.2", [])


# --link_rate (issue 23): every worker in a network namespace of its own,
# behind a rate-limited link to a bridge (launch/links.py).


@pytest.fixture(scope="module")
def links_lib():
    """``launch/links.py`` as the launcher loads it."""
    return local_launcher().links_lib


@pytest.fixture(scope="module")
def links_here(links_lib):
    """Skips, saying why, where the links cannot be built."""
    why = links_lib.unavailable()
    if why:
        pytest.skip(f"no rate-limited links on this machine: {why}")


@pytest.mark.parametrize(
    "text, bits",
    [
        ("20mbit", 20_000_000),
        ("100mbit", 100_000_000),
        ("1gbit", 1_000_000_000),
        ("2.5mbit", 2_500_000),
        ("100kbit", 100_000),
        ("300000bit", 300_000),
        ("10Gbit", 10_000_000_000),
    ],
)
def test_parse_rate(links_lib, text, bits):
    assert links_lib.parse_rate(text) == bits


@pytest.mark.parametrize(
    "text",
    # Bare numbers and tc's byte units (mbps = megabytes/s) are refused:
    # a factor of 8 away from what a reader assumes.
    ["", "100", "100mbps", "1 gbit", "-1mbit", "fast", "1e9bit", "mbit", "1tbit"],
)
def test_parse_rate_rejects_other_forms_naming_the_accepted_ones(links_lib, text):
    with pytest.raises(ValueError, match="bit, kbit, mbit or gbit"):
        links_lib.parse_rate(text)


def test_parse_rate_rejects_rates_below_the_minimum(links_lib):
    with pytest.raises(ValueError, match="below the minimum of 100kbit"):
        links_lib.parse_rate("0.05mbit")


def test_format_rate_and_tf_config(links_lib):
    assert [links_lib.format_rate(r) for r in (10**9, 2_500_000, 150_500)] == [
        "1gbit",
        "2500kbit",
        "150500bit",
    ]
    # The same JSON as distopt.cluster's, one address per worker.
    ports = [1111, 2222]
    assert links_lib.tf_config(["h", "h"], ports, 1) == local_launcher().tf_config(
        ports, 1, host="h"
    )


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--link_rate=100mbps"], "--link_rate: '100mbps' is not a rate: expected"),
        (
            ["--link_rate=1gbit", "--network=host"],
            "--link_rate needs --network=private",
        ),
        (["--link_rate=1gbit", "--host=192.0.2.1"], "not loopback"),
        (["--link_rate=1gbit", "--", "--model_dir=gs://b/r"], "gs://b/r is remote"),
        (["--link_stats=links.json"], "--link_stats needs --link_rate"),
        # Written after the run: these failed with a traceback after training.
        (
            ["--link_rate=1gbit", "--link_stats=/nonexistent/x.json"],
            "--link_stats=/nonexistent/x.json: the directory /nonexistent does not",
        ),
        (["--link_rate=1gbit", "--link_stats=/tmp"], "--link_stats=/tmp is a dir"),
        # os.access says yes to root there; creating an entry does not.
        (["--link_rate=1gbit", "--link_stats=/proc/x.json"], "/proc is not writable"),
        (["--link_rate=1gbit", "--link_stats=/sys/x.json"], "/sys is not writable"),
    ],
)
def test_link_flag_errors_are_one_line_and_start_nothing(flags, says):
    proc = _launch("--workers=2", f"--command={sys.executable} -c pass", *flags)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""  # Not a line from the launcher: nothing started.
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert says in proc.stderr


@pytest.mark.parametrize(
    "flag, says",
    [
        ("--workers=0", "error: --workers must be >= 1"),
        ("--grace_seconds=-1", "error: --grace_seconds must be >= 0, got -1.0"),
        ("--grace_seconds=nan", "error: --grace_seconds must be >= 0, got nan"),
        ("--workers=x", "error: argument --workers: invalid int value: 'x'"),
        ("--no_such_flag", "error: unrecognized arguments: --no_such_flag"),
    ],
)
def test_bad_launcher_flags_are_one_error_line(flag, says):
    # argparse printed its usage block (4 lines) before the error line.
    proc = _launch("--workers=2", flag, "--command=true")
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr == says + "\n"


# The trainer flags after `--` come after the launcher's --strategy=multi_worker
# and absl lets the last win: each worker trained alone on the same
# --model_dir, and worker 1 failed on its lock after worker 0 had written it.
def test_a_later_strategy_is_refused_by_every_worker_before_it_writes(tmp_path):
    model_dir = tmp_path / "run"
    proc = _launch(
        "--workers=2", "--", f"--model_dir={model_dir}", "--strategy=default"
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert (
        "] error: --strategy=default: launch/local.py runs every worker with "
        "--strategy=multi_worker; drop the later --strategy" in proc.stdout
    )
    assert "in use by another trainer" not in proc.stdout
    assert not model_dir.exists()


@pytest.mark.parametrize(
    "flags,refused",
    [
        (["--strategy", "mirrored"], "mirrored"),
        (["--flagfile=configs/lenet_mnist.cfg"], "default"),  # It sets default.
        (["--flagfile=configs/multi_worker.cfg", "--strategy=tpu"], "tpu"),
        (["--flagfile=configs/lenet_mnist.cfg", "--strategy=multi_worker"], None),
        (["--strategy=default", "--strategy", "multi_worker"], None),  # Last wins.
    ],
)
def test_the_trainer_under_the_launcher_takes_its_strategy_only(flags, refused):
    """As absl parsed them, flagfiles included (run as a worker is, alone)."""
    proc = run_python(
        "-m",
        "distopt.train",
        "--strategy=multi_worker",
        *flags,
        "--train_steps=-1",  # Any run that passes is stopped by this flag.
        env={"DISTOPT_LAUNCHER_STRATEGY": "multi_worker"},
        timeout=120,
        forked=True,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    if refused:
        assert line.startswith(f"error: --strategy={refused}: launch/local.py runs")
    else:
        assert "--train_steps" in line


def test_with_command_the_launcher_sets_no_trainer_flag():
    # --command runs the user's own program: its flags are the user's.
    proc = _launch("--workers=2", "--command=true", "--", "--strategy=default")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "command, says",
    [
        ("/nonexistent/prog", "--command: /nonexistent/prog does not exist"),
        ("no-such-program-here -x", "--command: no-such-program-here is not a prog"),
        ("/tmp", "--command: /tmp is a directory"),
        ("./README.md", "--command: ./README.md is not executable"),
        ("python 'x", "--command=python 'x: No closing quotation"),
        (" ", "--command is empty"),
    ],
)
def test_a_command_that_cannot_run_is_refused_before_any_worker(command, says):
    # Popen's FileNotFoundError was a traceback, exit 1.
    proc = _launch("--workers=2", f"--command={command}", "--", "--train_steps=5")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"error: {says}")


class _FakeLinks:
    """What `launch` uses of a ``links.Links``, without namespaces: the
    workers run as they are."""

    rate, addresses = 20_000_000, ["127.0.0.1", "127.0.0.1"]

    def command(self, index, argv):
        return argv

    def counters(self):
        return [{"tx_bytes": 10, "rx_bytes": 20}] * 2


@pytest.mark.parametrize(
    "full, program, status", [(False, "true", 0), (True, "true", 0), (True, "false", 1)]
)
def test_link_stats_on_a_full_disk_are_one_line_and_keep_the_status(
    tmp_path, monkeypatch, full, program, status
):
    # The file was opened (truncated) first, then the write's OSError was a
    # traceback and exit status 1 after the workers had succeeded.
    if full:

        def no_space(fd):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "fsync", no_space)
    path, out = tmp_path / "links.json", io.StringIO()
    got = local_launcher().launch(
        2, [program], links=_FakeLinks(), link_stats=str(path), out=out
    )
    lines = out.getvalue().splitlines()
    assert got == status and lines[-1] == f"[launcher] exit status {status}", lines
    said = [x for x in lines if x.startswith("[launcher] --link_stats")]
    if full:
        assert os.listdir(tmp_path) == []  # Neither the file nor a temporary.
        (line,) = said
        assert line == (
            f"[launcher] --link_stats: the link stats could not be written to "
            f"{path} (No space left on device); the exit status is still the "
            "workers'"
        )
    else:
        assert said == [] and os.listdir(tmp_path) == ["links.json"]
        assert json.loads(path.read_text())["workers"][1]["rx_bytes"] == 20


def test_a_worker_that_cannot_start_stops_the_launch(tmp_path):
    # Library use, without main's check of the program: one line, not a
    # traceback, and the shell's status for a program not found.
    out = io.StringIO()
    status = local_launcher().launch(2, [str(tmp_path / "prog")], out=out)
    assert status == 127, out.getvalue()
    assert f"worker 0 could not start {tmp_path / 'prog'}: No such file" in (
        out.getvalue()
    )


PROBE = os.path.join(REPO, "launch", "link_probe.py")


def link_probe_module():
    """``launch/link_probe.py`` as a module."""
    return launch_module("link_probe")


@pytest.mark.parametrize(
    "seconds, says",
    [
        ("0", "must be a finite number > 0, got 0"),
        ("-1", "must be a finite number > 0, got -1"),
        ("nan", "must be a finite number > 0, got nan"),
        ("inf", "must be a finite number > 0, got inf"),
        ("x", "not a number: 'x'"),
    ],
)
def test_link_probe_needs_a_positive_finite_window(seconds, says):
    # 0, -1 and nan "measured" 0.0 Mbit/s over 0.0 s, with exit status 0.
    proc = run_python(PROBE, "--link_rate=20mbit", f"--seconds={seconds}", timeout=60)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr == f"error: argument --seconds: {says}\n"


def test_link_probe_interrupted_is_one_line_and_status_130(monkeypatch, capsys):
    # Ctrl-C was a 20-line traceback. Already "inside": no namespace, no exec.
    link_probe = link_probe_module()
    monkeypatch.setenv(link_probe._INSIDE_ENV, "1")

    def interrupted(rate, seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(link_probe, "_run_inside", interrupted)
    try:
        status = link_probe.main(["--link_rate=20mbit"])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped link_probe.main")
    assert status == 130
    assert capsys.readouterr() == ("", "interrupted: nothing measured\n")


@pytest.mark.parametrize("rate", ["20mbit", "100mbit", "1gbit"])
def test_link_probe_measures_the_rate_each_way(links_here, rate):
    """A bulk TCP transfer between two workers' namespaces, each way alone
    and both ways at once (the links are full duplex, as a NIC's).

    The rate is the kernel's token bucket, not our code's speed, so it is
    checked with a tolerance: the frames each way within 15% of the rate at
    20mbit and 100mbit (the limit counts frames; TCP payload is 95.6% of
    them); at 1gbit only not above it (a loaded 2-core host may not fill a
    gigabit). Both ways at once, only not above it either: each link then
    also carries the other transfer's acknowledgements, and on this shared
    2-core machine such runs measured 0.80 to 0.95 of the rate in payload.
    """
    result = link_probe_module().probe(rate, seconds=3)
    limit = result["rate_bits_per_second"]
    for figures in (result["directions"], result["duplex"]):
        assert [(d["from"], d["to"]) for d in figures] == [(0, 1), (1, 0)]
    for d in result["directions"]:
        if limit < 10**9:
            assert d["wire_bits_per_second"] >= 0.85 * limit, d
    for d in result["directions"] + result["duplex"]:
        for kind in ("wire", "payload"):
            assert d[f"{kind}_bits_per_second"] <= 1.15 * limit, (kind, d)
        # Whole frames per payload byte, as counted by the token buckets:
        # 1514 per 1448 for full-size segments (1.046), plus the handshake
        # (and, both ways at once, the other transfer's acknowledgements).
        assert 1.0 < d["frame_bytes_per_payload_byte"] < 1.1, d
        # The receiver's download carried what the sender's upload did,
        # unless its queue overflowed (which tbf counts).
        assert d["received_bytes"] <= d["sent_bytes"], d
        assert d["received_bytes"] == d["sent_bytes"] or d["download_drops"], d


def test_a_failed_link_setup_leaves_nothing_running(links_here):
    """tc refuses the last step (a bad queue latency); the namespaces'
    holder processes are gone when ``build`` raises."""
    snippet = """
import os, sys
sys.path.insert(0, "launch")
import links
links.QUEUE_LATENCY = "not-a-time"
try:
    links.build(3, 10**8)
except links.LinkError as e:
    print("LinkError:", e)
tid = os.getpid()
print("children:", open(f"/proc/self/task/{tid}/children").read().split())
"""
    proc = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--net",
            sys.executable,
            "-c",
            snippet,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "LinkError: tc -batch -:" in proc.stdout, proc.stdout
    assert "children: []" in proc.stdout, proc.stdout


# A stand-in worker: records what it sees (TF_CONFIG, its interfaces, the
# other processes in its network namespace: its holder), then fails (worker
# 1, with "fail") or waits for SIGTERM and exits 42 like the trainer.
LINKED_WORKER = r"""
import json, os, signal, sys, time
cluster = json.loads(os.environ["TF_CONFIG"])
index = cluster["task"]["index"]
out, mode = sys.argv[1], sys.argv[2]
signal.signal(signal.SIGTERM, lambda *a: sys.exit(42))
netns = os.readlink("/proc/self/ns/net")
others = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        if int(pid) != os.getpid() and os.readlink(f"/proc/{pid}/ns/net") == netns:
            others.append(int(pid))
    except OSError:
        pass
devices = [line.split(":")[0].strip() for line in open("/proc/net/dev").readlines()[2:]]
seen = {"pid": os.getpid(), "others": others, "devices": devices,
        "workers": cluster["cluster"]["worker"]}
with open(f"{out}/seen{index}.tmp", "w") as f:
    json.dump(seen, f)
os.rename(f"{out}/seen{index}.tmp", f"{out}/seen{index}")
print(f"worker {index} up", flush=True)
if index == 1 and mode == "fail":
    while not os.path.exists(f"{out}/seen0"):  # Worker 0 has seen it all.
        time.sleep(0.05)
    sys.exit(3)
time.sleep(120)
"""


@pytest.mark.parametrize("mode", ["fail", "sigterm"])
def test_links_keep_the_launchers_failure_and_signal_behaviour(
    tmp_path, links_here, mode
):
    """With --link_rate: a failing worker still stops the others at once and
    SIGTERM is still forwarded (exit 42); the workers run in namespaces of
    their own (lo and eth0 only, their own addresses in TF_CONFIG), and
    nothing of the launch is left running after it exits."""
    script = tmp_path / "linked_worker.py"
    script.write_text(LINKED_WORKER)
    proc = subprocess.Popen(
        [
            sys.executable,
            LAUNCHER,
            "--workers=2",
            "--link_rate=100mbit",
            f"--link_stats={tmp_path / 'links.json'}",
            f"--command={sys.executable} {script} {tmp_path} {mode}",
            "--grace_seconds=20",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 60
        while not all((tmp_path / f"seen{i}").exists() for i in range(2)):
            assert proc.poll() is None or mode == "fail", proc.stdout.read()
            assert time.time() < deadline, "workers not up"
            time.sleep(0.1)
        if mode == "sigterm":
            proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    seen = [json.loads((tmp_path / f"seen{i}").read_text()) for i in range(2)]
    if mode == "fail":
        assert proc.returncode == 3, out
        assert "worker 1 failed with status 3; stopping the others" in out
    else:
        assert proc.returncode == 42, out
        assert "[launcher] SIGTERM: forwarding SIGTERM to the workers" in out
    ports = [w["workers"][i].rsplit(":", 1)[1] for i, w in enumerate(seen)]
    assert seen[0]["workers"] == [f"10.23.0.{i + 1}:{p}" for i, p in enumerate(ports)]
    for i, w in enumerate(seen):
        assert w["workers"] == seen[0]["workers"]
        assert sorted(w["devices"]) == ["eth0", "lo"], w
        assert len(w["others"]) == 1, w  # The namespace's holder, nothing else.
        assert f"[launcher] worker {i} sent " in out
    stats = json.loads((tmp_path / "links.json").read_text())
    assert [w["address"] for w in stats["workers"]] == ["10.23.0.1", "10.23.0.2"]
    for pid in [w["pid"] for w in seen] + [w["others"][0] for w in seen]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.slow
def test_two_workers_train_through_100mbit_links(tmp_path, links_here):
    model_dir, stats = tmp_path / "mw", tmp_path / "links.json"
    proc = _launch(
        "--workers=2",
        "--link_rate=100mbit",
        f"--link_stats={stats}",
        "--",
        f"--flagfile={REPO}/configs/multi_worker.cfg",
        "--model=mlp",
        "--train_steps=20",
        "--log_every=10",
        "--eval_steps=2",
        "--nojit_compile",
        f"--model_dir={model_dir}",
    )
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert "each worker in a namespace of its own" in proc.stdout
    with open(model_dir / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["num_replicas"] == 2 and metrics["train_steps"] == 20
    workers = json.loads(stats.read_text())["workers"]
    # The MLP's gradient: 784-700-500-10, float32. A ring all-reduce of 2
    # workers (TensorFlow's on CPU) has each send all of it every step, so
    # the traffic went through the links only if each upload carried at
    # least that (frame headers and the first broadcast come on top).
    gradient_bytes = 4 * (784 * 700 + 700 + 700 * 500 + 500 + 500 * 10 + 10)
    for w in workers:
        assert w["tx_bytes"] >= 20 * gradient_bytes, workers


@pytest.mark.parametrize(
    "host, says",
    [
        # TEST-NET-1 (RFC 5737): never this machine's.
        ("192.0.2.1", "is not an address of this machine"),
        ("no-such-host.invalid", "does not resolve"),
    ],
)
def test_a_host_the_workers_cannot_reach_is_refused(host, says):
    # Before the check, the workers waited for each other until killed.
    proc = _launch("--workers=2", f"--host={host}", "--command=true", timeout=60)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"error: --host={host} {says}")
