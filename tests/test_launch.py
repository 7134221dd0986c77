"""Tests of launch/: the localhost multi-worker launcher and the job scripts."""

import json
import os
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


def test_tf_config_and_ports():
    sys.path.insert(0, os.path.join(REPO, "launch"))
    try:
        import local
    finally:
        sys.path.pop(0)
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
