"""The README's commands as a new user runs them, and what they print.

The first command and the trainer section's first command are read from
README.md, not copied, and run in a fresh
directory that holds only ``configs/`` (what a clone's root offers the second
command). What runs is the part after ``&&``: this test process already has
distopt importable (``PYTHONPATH`` stands in for ``pip install -e .``), and
``.ci/run`` runs the install part, verbatim, in a fresh virtual environment.
TensorFlow's log level is unset, as on a user's machine.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import tensorflow as tf
from conftest import REPO

# absl's prefix of a Python log line: "I1201 15:04:12.870570 140329 train.py:344] ".
ABSL_PREFIX = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ \S+:\d+\] ")
# A TensorFlow C++ log line ("E0000 00:00:... cuda_platform.cc:52] ...") or its
# start-up banner.
CPP_LINE = re.compile(r"^[IWEF]\d{4} .*\.(cc|h):\d+\]|absl::InitializeLog")


def readme_blocks(section=None):
    """The README's ``bash`` blocks, each a list of commands (comments dropped).

    Args:
      section: only the blocks after this ``## `` heading, up to the next one.
    """
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    if section:
        text = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [
        [
            line.strip()
            for line in block.splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
        for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL)
    ]


def _user_env():
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # conftest sets it; users do not.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return env


def _run(command, cwd, timeout):
    """Runs a README ``python ...`` command line with this interpreter."""
    argv = shlex.split(command)
    assert argv[0] == "python", command
    return subprocess.run(
        [sys.executable, *argv[1:]],
        cwd=cwd,
        env=_user_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A directory like a clone's root to the commands: it has ``configs/``."""
    root = tmp_path_factory.mktemp("clone")
    shutil.copytree(os.path.join(REPO, "configs"), root / "configs")
    return root


@pytest.fixture(scope="module")
def first_run(clone):
    """The README's first command, run once for every test below."""
    install, sep, train = readme_blocks()[0][0].partition(" && ")
    # The install part is .ci/run's (see the module docstring).
    assert (install, sep) == ("pip install -e .", " && ")
    assert train.startswith("python -m distopt.train"), train
    return _run(train, clone, timeout=600)


def _messages(stderr):
    return [ABSL_PREFIX.sub("", line) for line in stderr.splitlines()]


@pytest.mark.slow
def test_readme_first_command_trains_lenet_and_ends_with_the_accuracy(clone, first_run):
    assert first_run.returncode == 0, first_run.stderr[-4000:]
    (run_dir,) = (clone / "runs").iterdir()
    # <model>_<dataset>_<time>_<host>-<pid>: unique for runs started together.
    assert re.fullmatch(r"lenet_mnist_\d{8}-\d{6}_[A-Za-z0-9_-]+-\d+", run_dir.name)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["model"] == "lenet" and metrics["dataset"] == "mnist"
    # 2 virtual CPUs on a host without GPUs, else every GPU.
    gpus = len(tf.config.list_physical_devices("GPU"))
    assert metrics["strategy"] == "mirrored" and metrics["num_replicas"] == (gpus or 2)
    assert metrics["train_steps"] == 60000 // 128  # One epoch.
    assert metrics["test_examples"] == 10000
    assert metrics["test_accuracy"] > 0.97
    last = _messages(first_run.stderr)[-1]
    shown = re.match(r"Done: test accuracy (\d+\.\d\d)%", last)
    assert shown, last
    assert float(shown.group(1)) == round(100 * metrics["test_accuracy"], 2)


@pytest.mark.slow
def test_readme_first_command_prints_a_short_log_once(first_run):
    assert first_run.returncode == 0, first_run.stderr[-4000:]
    lines = first_run.stderr.splitlines()
    assert not [line for line in lines if CPP_LINE.search(line)], lines
    assert not [line for line in lines if "Reduce to" in line], lines
    messages = _messages(first_run.stderr)
    assert len(messages) == len(set(messages)), lines  # Nothing twice.
    assert len(lines) <= 25, lines
    assert first_run.stdout == ""


@pytest.mark.slow
def test_flagfile_command_runs_after_the_first_in_the_same_directory(clone, first_run):
    assert first_run.returncode == 0
    command = readme_blocks(section="The trainer")[0][0]
    assert command.startswith("python -m distopt.train --flagfile=configs/"), command
    # Shortened: the collision this guards against (a default run directory
    # that is also the config's) does not depend on the run's length.
    proc = _run(command + " --train_steps=20", clone, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    flagfile = command.split("--flagfile=")[1].split()[0]
    model_dir = re.search(
        r"^--model_dir=(\S+)", (clone / flagfile).read_text(), re.MULTILINE
    )
    metrics = json.loads((clone / model_dir.group(1) / "metrics.json").read_text())
    assert metrics["train_steps"] == 20 and metrics["start_step"] == 0
    assert len(list((clone / "runs").iterdir())) == 2
