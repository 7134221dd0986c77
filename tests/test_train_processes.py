"""The trainer as people start it: several at once, behind a shell, or again
in a process that already ran other strategies (a notebook, a sweep).
"""

import json
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import REPO, run_python, start_python

QUICK = (
    "--model=mlp",
    "--train_steps=2",
    "--batch_size=32",
    "--eval_steps=1",
    "--checkpoint_every=0",
    "--nojit_compile",
)


def _env():
    return {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}


@pytest.mark.slow
def test_four_trainers_started_together_get_four_run_directories(tmp_path):
    # Forked from the fork server (see forkserver.py): four processes that
    # start within milliseconds of each other, without four imports.
    procs = [
        start_python(
            ["-m", "distopt.train", *QUICK],
            cwd=tmp_path,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for _ in range(4)
    ]
    logs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [log[-1500:] for log in logs]
    named = sorted(re.search(r"Run directory (\S+)", log).group(1) for log in logs)
    runs = sorted(os.path.join("runs", d) for d in os.listdir(tmp_path / "runs"))
    assert named == runs and len(set(runs)) == 4
    for run in runs:
        with open(tmp_path / run / "metrics.json") as f:
            assert json.load(f)["status"] == "completed"


@pytest.mark.slow
def test_two_launchers_started_together_get_two_run_directories(tmp_path):
    launcher = os.path.join(REPO, "launch", "local.py")
    procs = [
        subprocess.Popen(
            [sys.executable, launcher, "--workers=2", "--", *QUICK],
            cwd=tmp_path,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [log[-1500:] for log in logs]
    # Only each launch's chief writes a run directory: two, both complete.
    runs = sorted(os.listdir(tmp_path / "runs"))
    assert len(runs) == 2, runs
    for run in runs:
        with open(tmp_path / "runs" / run / "metrics.json") as f:
            assert json.load(f)["status"] == "completed"


@pytest.mark.slow
def test_time_to_first_step_counts_from_the_interpreter_not_the_shell(tmp_path):
    """A shell that works 5 s before it starts Python does not inflate it.

    Python starts at least 5 s after the test launched the shell, and the
    first step ends before the process does; so the figure is at most the
    process's life minus 5 s. Counted from the OS process (which the shell
    started), it would include the sleep.
    """
    model_dir = tmp_path / "run"
    command = " ".join(
        [sys.executable, "-m", "distopt.train", *QUICK, f"--model_dir={model_dir}"]
    )
    launched = time.time()
    proc = subprocess.run(
        ["bash", "-c", f"sleep 5 && exec {command}"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    ended = time.time()
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(model_dir / "metrics.json") as f:
        first_step = json.load(f)["seconds_to_first_step"]
    assert 0 < first_step <= ended - launched - 5
    assert f"First step done {first_step:.1f} s after start" in proc.stderr


# A notebook's session: the user's Keras fit on a MirroredStrategy with
# TensorFlow's default cross-device ops (RING collectives between CPUs), then
# the trainer's library entry point, three times, with local SGD (whose
# snapshots before each save reduce eagerly): on the trainer's own strategy,
# then twice on strategies with collectives of their own.
_SESSION = textwrap.dedent(
    """
    import sys
    from distopt import quiet
    quiet.import_tensorflow()
    import keras
    import tensorflow as tf
    from distopt import distribute
    from distopt.trainer import config as config_lib
    from distopt.trainer import run as run_lib

    devices = distribute.logical_cpu_devices(2)
    users = tf.distribute.MirroredStrategy(devices)
    with users.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        model.compile("sgd", "mse")
    model.fit(tf.ones([64, 4]), tf.ones([64, 2]), batch_size=16, verbose=0)

    root = sys.argv[1]
    for i, strategy in enumerate([
        None,
        distribute.make_strategy("mirrored", devices=devices, cross_device_ops="default"),
        distribute.make_strategy("mirrored", devices=devices, cross_device_ops="default"),
    ]):
        config = config_lib.TrainConfig(
            model="mlp", strategy="mirrored", virtual_devices=2, sync="local_sgd",
            sync_period=3, train_steps=8, checkpoint_every=4, steps_per_loop=4,
            batch_size=32, eval_steps=1, jit_compile=False,
            model_dir=f"{root}/run{i}",
        )
        metrics = run_lib.train(config, strategy=strategy)
        print("run", i, metrics["status"], metrics["num_replicas"], flush=True)
    """
)


@pytest.mark.slow
def test_the_entry_point_again_after_a_keras_fit_in_the_same_process(tmp_path):
    # Forked (see forkserver.py): the session is what one process does after
    # `import tensorflow`; no TensorFlow runtime exists before it starts.
    # Its runs go to tmp_path (each ~63 MB; a mkdtemp() left 187 MB in /tmp).
    proc = run_python("-c", _SESSION, str(tmp_path), timeout=600, forked=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [
        "run 0 completed 2",
        "run 1 completed 2",
        "run 2 completed 2",
    ]
    assert "Shape mismatch" not in proc.stderr
