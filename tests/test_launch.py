"""Tests of launch/: the localhost multi-worker launcher and the job scripts."""

import json
import os
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
        "--train_steps=20",
        "--log_every=10",
        "--eval_steps=2",
        "--checkpoint_every=10",
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
    assert metrics["num_replicas"] == 2 and metrics["train_steps"] == 20
    assert metrics["strategy"] == "multi_worker"
    # Only the chief writes model_dir; the other worker's checkpoints went to
    # a temporary directory that is gone.
    assert sorted(os.listdir(model_dir / "checkpoints")) == [
        "checkpoint",
        "ckpt-10.data-00000-of-00001",
        "ckpt-10.index",
        "ckpt-20.data-00000-of-00001",
        "ckpt-20.index",
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


def local_launcher():
    """``launch/local.py`` as a module."""
    sys.path.insert(0, os.path.join(REPO, "launch"))
    try:
        import local
    finally:
        sys.path.pop(0)
    return local


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
