"""Bad paths and flags on the command line: one line each, the right exit
status, no traceback, before any work, nothing created.

``train.main`` runs in this process with ``train_lib.train`` and the data
loader replaced by spies, so each case shows that the check came before any
work (no strategy, no data read); one subprocess checks the real command line.
"""

import datetime
import json
import os
import shutil

import pytest
from absl import flags
from conftest import run_python
from urllib3.util.retry import Retry

from distopt import data, preflight, train, train_lib


def _tree(root):
    """Every path under ``root``, to show that nothing was created."""
    return sorted(
        os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files
    )


@pytest.fixture
def cli(monkeypatch, capsys, tmp_path):
    """Runs ``train.main`` on flags; returns (exit status, stderr lines, work)."""
    work = []
    monkeypatch.setattr(train_lib, "train", lambda config: work.append(config))
    monkeypatch.setattr(data, "load_source", lambda *a, **k: work.append("data"))
    monkeypatch.setattr(data, "load_mnist_idx", lambda *a, **k: work.append("data"))
    monkeypatch.chdir(tmp_path)  # A default run directory would appear here.

    def run(*args):
        flags.FLAGS.unparse_flags()
        status = 0
        try:
            train.main(train.parse_flags(["train", *args]))
        except SystemExit as e:
            status = e.code
        finally:
            flags.FLAGS.unparse_flags()
        return status, capsys.readouterr().err.splitlines(), work

    return run


@pytest.fixture
def mnist_copy(tmp_path):
    directory = tmp_path / "mnist"
    directory.mkdir()
    for name in data.MNIST_SHA256:
        shutil.copy(os.path.join(data.bundled_dir(), name), directory / name)
        os.chmod(directory / name, 0o644)
    return directory


def _cases(tmp_path, mnist_copy):
    """(flags, the error line's text) for each kind of bad path."""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    os.remove(mnist_copy / "train-labels-idx1-ubyte.gz")
    missing = tmp_path / "missing"
    return {
        "model_dir_is_a_file": (
            [f"--model_dir={a_file}"],
            f"--model_dir={a_file} is a file, not a directory",
        ),
        "model_dir_under_a_file": (
            [f"--model_dir={a_file}/run"],
            f"--model_dir={a_file}/run cannot be created: {a_file} is a file",
        ),
        "mnist_data_dir_missing": (
            [f"--data_dir={missing}"],
            f"--data_dir={missing} does not exist",
        ),
        "tfds_data_dir_missing": (
            ["--dataset=fashion_mnist", f"--data_dir={missing}", "--download"],
            f"--data_dir={missing} does not exist",
        ),
        "data_dir_is_a_file": (
            [f"--data_dir={a_file}"],
            f"--data_dir={a_file} is not a directory",
        ),
        "data_dir_lacks_one_mnist_file": (
            [f"--data_dir={mnist_copy}"],
            f"--data_dir={mnist_copy} lacks the MNIST files train-labels-idx1-ubyte.gz",
        ),
        "mnist_data_dir_empty": (
            [f"--data_dir={empty}"],
            "holds neither the MNIST IDX files",
        ),
        "tfds_data_not_prepared": (
            ["--dataset=fashion_mnist", f"--data_dir={empty}"],
            "holds no prepared TFDS data for fashion_mnist; pass --download",
        ),
        "bundled_with_data_dir": (
            ["--data_source=bundled", f"--data_dir={empty}"],
            "is not used with --data_source=bundled",
        ),
    }


CASES = [
    "model_dir_is_a_file",
    "model_dir_under_a_file",
    "mnist_data_dir_missing",
    "tfds_data_dir_missing",
    "data_dir_is_a_file",
    "data_dir_lacks_one_mnist_file",
    "mnist_data_dir_empty",
    "tfds_data_not_prepared",
    "bundled_with_data_dir",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_path_is_one_line_exit_2_before_any_work(cli, tmp_path, mnist_copy, case):
    args, message = _cases(tmp_path, mnist_copy)[case]
    before = _tree(tmp_path)
    status, lines, work = cli(*args)
    assert status == 2
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert message in lines[0]
    assert work == []  # Neither the run nor the data loader was called.
    assert _tree(tmp_path) == before  # Nothing created (no runs/, no data_dir).


def test_unwritable_model_dir(cli, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # Root may write anywhere, so permission bits cannot show this here:
    # os.access answers for a user without write permission on `locked`.
    monkeypatch.setattr(
        preflight.os,
        "access",
        lambda path, mode: (
            real_access(path, mode)
            and not (mode & os.W_OK and os.path.abspath(path) == str(locked))
        ),
    )
    for model_dir, message in [
        (locked, f"--model_dir={locked} is not writable"),
        (locked / "new", f"cannot be created: {locked} is not writable"),
    ]:
        status, lines, work = cli(f"--model_dir={model_dir}")
        assert status == 2 and len(lines) == 1 and message in lines[0], lines
        assert work == []
    assert os.listdir(locked) == []


def test_every_problem_is_reported_at_once(cli, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    status, lines, work = cli(
        f"--model_dir={a_file}", f"--data_dir={tmp_path / 'missing'}"
    )
    assert status == 2 and work == []
    assert lines == [
        f"error: --model_dir={a_file} is a file, not a directory",
        f"error: --data_dir={tmp_path / 'missing'} does not exist",
    ]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--no_such_flag=1"], "Unknown command line flag 'no_such_flag'"),
        (["--batch_size=many"], "batch_size"),
        (["--strategy=horovod"], "valid strategies: ['default'"),
        (["--epochs=0"], "Set --train_steps or --epochs"),
        (["stray"], "unexpected arguments: ['stray']"),
    ],
)
def test_bad_flag_is_one_line_exit_2(cli, args, message):
    status, lines, work = cli(*args)
    assert status == 2 and work == []
    assert len(lines) == 1 and message in lines[0], lines


def test_default_run_directory_is_new_per_run(cli, tmp_path):
    status, lines, work = cli("--train_steps=1")
    assert status == 0 and lines == []
    (config,) = work
    assert config.model_dir.startswith(os.path.join("runs", "lenet_mnist_"))
    assert config.epochs == 1 and config.train_steps == 1
    stamp = "20261201-150000"
    first = preflight.default_model_dir("lenet", "mnist", root=str(tmp_path))
    assert first != preflight.default_model_dir("mlp", "mnist", root=str(tmp_path))
    os.makedirs(tmp_path / f"lenet_mnist_{stamp}")
    now = datetime.datetime(2026, 12, 1, 15, 0, 0)
    again = preflight.default_model_dir("lenet", "mnist", root=str(tmp_path), now=now)
    assert again == str(tmp_path / f"lenet_mnist_{stamp}-2")


def test_run_time_failure_is_one_line_exit_1(cli, tmp_path, mnist_copy, monkeypatch):
    # Corrupt data is found while reading, after the checks: a run-time
    # failure. The real train() and loader run here.
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    with open(mnist_copy / "t10k-labels-idx1-ubyte.gz", "r+b") as f:
        f.truncate(100)
    model_dir = tmp_path / "run"
    status, lines, _ = cli(
        f"--data_dir={mnist_copy}", "--train_steps=1", f"--model_dir={model_dir}"
    )
    assert status == 1
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "t10k-labels-idx1-ubyte.gz is corrupt" in errors[0]
    assert not any("Traceback" in line for line in lines)
    assert not model_dir.exists()


def test_command_line_prints_each_problem_once_without_traceback(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    proc = run_python(
        "-m",
        "distopt.train",
        f"--model_dir={a_file}",
        "--dataset=fashion_mnist",
        f"--data_dir={tmp_path / 'nonexistent'}",
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"error: --model_dir={a_file} is a file, not a directory",
        f"error: --data_dir={tmp_path / 'nonexistent'} does not exist",
    ]
    assert os.listdir(tmp_path) == ["a_file"]


def test_download_without_network_fails_fast_with_one_line(cli, tmp_path, monkeypatch):
    """--download with no network: one line, exit 1, no retrying for minutes."""
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    # A proxy that refuses every connection stands in for a missing network.
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    target = tmp_path / "tfds"
    target.mkdir()
    # Count urllib3's back-off sleeps (and skip them): TFDS alone retries each
    # file 10 times, with back-off, for minutes.
    sleeps = []
    monkeypatch.setattr(Retry, "sleep", lambda self, *a, **k: sleeps.append(self))
    status, lines, _ = cli(
        "--dataset=fashion_mnist",
        f"--data_dir={target}",
        "--download",
        "--train_steps=1",
        f"--model_dir={tmp_path / 'run'}",
    )
    assert status == 1
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, lines
    assert "Downloading 'fashion_mnist' through TensorFlow Datasets" in errors[0]
    assert "Check the network" in errors[0]
    assert not any("Traceback" in line for line in lines)
    # 4 files; TFDS on its own would retry each 10 times (40 sleeps).
    assert 1 <= len(sleeps) <= 8
    assert not (tmp_path / "run").exists()


def test_only_the_chief_must_be_able_to_write_model_dir(tmp_path, monkeypatch):
    worker = {"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker"}}
    for index, writes in [(0, True), (1, False)]:
        worker["task"]["index"] = index
        monkeypatch.setenv("TF_CONFIG", json.dumps(worker))
        assert preflight._writes_model_dir("multi_worker") is writes
    assert preflight._writes_model_dir("mirrored")  # TF_CONFIG is not read.
    # A worker that does not write needs no writable parent.
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert preflight.check_model_dir(str(a_file / "run"), writes=False) == []
    assert preflight.check_model_dir(str(a_file / "run"), writes=True)
    monkeypatch.delenv("TF_CONFIG")
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert not preflight._writes_model_dir("multi_worker")
