"""Bad paths and flags on the command line: one line each, the right exit
status, no traceback, before any work, nothing created.

``train.main`` runs in this process with ``trainer.run.train`` and the data
loader replaced by spies, so each case shows that the check came before any
work (no strategy, no data read); one subprocess checks the real command line.
"""

import dataclasses
import datetime
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import types

import pytest
import tensorflow as tf
from absl import flags
from conftest import REPO, run_python
from urllib3.util.retry import Retry

from distopt import data, train
from distopt.trainer import config as config_lib
from distopt.trainer import inputs, paths
from distopt.trainer import run as run_lib


def _tree(root):
    """Every path under ``root``, to show that nothing was created."""
    return sorted(
        os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files
    )


@pytest.fixture
def cli(monkeypatch, capsys, tmp_path, request):
    """Runs ``train.main`` on flags; returns (exit status, stderr lines, work)."""
    work = []
    monkeypatch.setattr(run_lib, "train", lambda config, **_: work.append(config))
    monkeypatch.setattr(data, "load_source", lambda *a, **k: work.append("data"))
    monkeypatch.setattr(data, "load_mnist_idx", lambda *a, **k: work.append("data"))
    monkeypatch.chdir(tmp_path)  # A default run directory would appear here.
    # An `error:` exit silences TensorFlow's logger for the process's end:
    # here the process goes on.
    tf_logger = logging.getLogger("tensorflow")
    request.addfinalizer(lambda level=tf_logger.level: tf_logger.setLevel(level))

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
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "unmounted" / "scratch")
    long_name = tmp_path / ("r" * 300)
    layouts = {}
    for name, entry, is_dir in (
        ("lock", "LOCK", True),
        ("checkpoints", "checkpoints", False),
        ("state", "checkpoints/checkpoint", True),
    ):
        layouts[name] = tmp_path / f"run_{name}"
        (layouts[name] / entry).parent.mkdir(parents=True)
        if is_dir:
            (layouts[name] / entry).mkdir()
        else:
            (layouts[name] / entry).write_text("")
    return {
        # These failed late: at the lock ("Not a directory; free space...",
        # "File name too long", "another trainer races") or, for the
        # checkpoints directory, at the first save, after all the training.
        "model_dir_is_a_dangling_link": (
            [f"--model_dir={dangling}"],
            (
                f"--model_dir={dangling} is a symbolic link to "
                f"{tmp_path}/unmounted/scratch, which does not exist"
            ),
        ),
        "model_dir_name_too_long": (
            [f"--model_dir={long_name}"],
            "a name in it is 300 bytes long; the filesystem takes at most 255",
        ),
        "lock_is_a_directory": (
            [f"--model_dir={layouts['lock']}"],
            "holds a directory named LOCK, where the run keeps its LOCK file",
        ),
        "checkpoints_is_a_file": (
            [f"--model_dir={layouts['checkpoints']}"],
            (
                "holds a file named checkpoints, where the run keeps its checkpoints "
                "directory"
            ),
        ),
        "checkpoint_state_is_a_directory": (
            [f"--model_dir={layouts['state']}"],
            (
                "holds a directory named checkpoints/checkpoint, where the run keeps "
                "its checkpoints/checkpoint file"
            ),
        ),
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
    "model_dir_is_a_dangling_link",
    "model_dir_name_too_long",
    "lock_is_a_directory",
    "checkpoints_is_a_file",
    "checkpoint_state_is_a_directory",
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


def test_the_layout_checked_first_is_the_runs():
    from distopt import checkpoints
    from distopt.trainer import checkpointing

    assert paths.RUN_LAYOUT == (
        (checkpoints.LOCK_FILE, False),
        (checkpointing.CHECKPOINT_SUBDIR, True),
        (f"{checkpointing.CHECKPOINT_SUBDIR}/checkpoint", False),
    )


@pytest.mark.parametrize("model_dir", ["/proc/nope", "/sys/nope", "/proc/1/nope"])
def test_model_dir_on_a_virtual_filesystem_as_root(cli, model_dir):
    # os.access says yes to root here; creating an entry says no.
    status, lines, work = cli(f"--model_dir={model_dir}")
    assert status == 2, lines
    assert len(lines) == 1 and lines[0].startswith(
        f"error: --model_dir={model_dir} "
    ), lines
    assert "cannot be created" in lines[0] and "is not writable" in lines[0]
    assert work == []
    assert not os.path.exists(model_dir)


def _in_mount_namespace(script):
    """Runs ``sh -c script`` as root of a new user and mount namespace."""
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=240,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    return proc


def _namespaces_or_skip(tmp_path):
    if not shutil.which("unshare"):
        pytest.skip("no unshare(1) here: cannot mount a filesystem for the test")
    probe = tmp_path / "probe"
    probe.mkdir()
    proc = _in_mount_namespace(f"mount -t tmpfs -o size=1m tmpfs {probe}")
    if proc.returncode:
        pytest.skip(f"user and mount namespaces unavailable: {proc.stderr.strip()}")


def test_unwritable_model_dir_on_a_read_only_mount(tmp_path):
    # Root may write anywhere that is mounted writable, so permission bits
    # cannot show this: a read-only tmpfs does.
    _namespaces_or_skip(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    python = f"{sys.executable} -m distopt.train --train_steps=1"
    proc = _in_mount_namespace(
        f"mount -t tmpfs -o size=1m,ro tmpfs {locked} && "
        f"{python} --model_dir={locked}; echo status=$?; "
        f"{python} --model_dir={locked}/new; echo status=$?"
    )
    assert proc.stdout.split() == ["status=2", "status=2"], proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        f"error: --model_dir={locked} is not writable (Read-only file system)",
        (
            f"error: --model_dir={locked}/new cannot be created: {locked} is not "
            "writable (Read-only file system)"
        ),
    ]
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
        # A sweep's `--model_dir=$OUT` with OUT unset: a new run directory
        # each time, so a preempted job never resumed.
        pytest.param(["--model_dir="], "error: --model_dir: empty", id="empty_dir"),
        pytest.param(  # It ran as skip, silently.
            ["--on_nonfinite=stop", "--skip_nonfinite"],
            "error: --skip_nonfinite means --on_nonfinite=skip; it contradicts "
            "--on_nonfinite=stop",
            id="stop_and_skip",
        ),
        # Not absl's "ERROR:: Unable to open flagfile: [Errno 2] ...".
        pytest.param(
            ["--flagfile=nope.cfg"],
            "error: --flagfile=nope.cfg: cannot open it (No such file or directory)",
            id="no_flagfile",
        ),
    ],
)
def test_bad_flag_is_one_line_exit_2(cli, args, message):
    status, lines, work = cli(*args)
    assert status == 2 and work == []
    assert len(lines) == 1 and message in lines[0], lines


def test_default_run_directory_is_new_per_run(cli, tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(
        run_lib,
        "train",
        lambda config, **_: started.append((config, os.listdir(config.model_dir))),
    )
    status, lines, _ = cli("--train_steps=1")
    assert status == 0 and lines == []
    ((config, contents),) = started
    assert config.model_dir.startswith(os.path.join("runs", "lenet_mnist_"))
    assert config.model_dir.endswith(f"-{os.getpid()}")
    assert config.epochs == 1 and config.train_steps == 1
    # Created by the command line before the run started, empty; a run that
    # wrote nothing there (this one) leaves nothing behind.
    assert contents == []
    assert not os.path.exists(config.model_dir)
    # Two runs in the same second and the same process id (as on two hosts
    # of the same name, or a paused run whose name another run took): the
    # second never gets the directory the first created.
    now = datetime.datetime(2026, 12, 1, 15, 0, 0)
    root = str(tmp_path / "r")
    first = paths.create_run_dir("lenet", "mnist", root=root, now=now)
    second = paths.create_run_dir("lenet", "mnist", root=root, now=now)
    assert first.path != second.path and second.path == first.path + "-2"
    assert "lenet_mnist_20261201-150000_" in first.path
    assert os.path.isdir(first.path) and os.path.isdir(second.path)
    other = paths.create_run_dir("mlp", "mnist", root=root, now=now)
    assert "mlp_mnist_20261201-150000_" in other.path


def test_a_run_directory_under_a_file_is_one_line(cli, tmp_path):
    (tmp_path / "runs").write_text("a file where the runs go")
    status, lines, work = cli("--train_steps=1")
    assert status == 2 and work == [], lines
    assert lines == [
        (
            f"error: cannot create the run directory: {tmp_path / 'runs'} is not "
            "a directory"
        )
    ]


def test_a_run_time_config_error_leaves_no_run_directory(cli, tmp_path, monkeypatch):
    # Found once the strategy exists (the group size against its one device;
    # only mirrored on a CPU-only host is counted before), after the run
    # directory was created: it is removed again.
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    status, lines, _ = cli(
        "--model=mlp",
        "--strategy=one_device",
        "--sync=hierarchical",
        "--sync_args=group_size=2",
    )
    assert status == 2
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "must divide the 1 devices" in errors[0], lines
    assert _tree(tmp_path) == before


def test_a_bad_name_leaves_no_run_directory(cli, tmp_path):
    # The run directory is created before TensorFlow loads; the names are
    # checked after: a bad one removes what was created.
    before = _tree(tmp_path)
    status, lines, work = cli("--strategy=horovod")
    assert status == 2 and work == []
    assert len(lines) == 1 and "valid strategies" in lines[0], lines
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("when", ["importing", "running", "saved"])
def test_a_second_ctrl_c_is_one_line_and_leaves_no_empty_run(cli, tmp_path, when):
    """Ctrl-C twice: stop_notice (TensorFlow loading) or the trainer's handler
    raise KeyboardInterrupt. It was a traceback, leaving the run directory
    (with run_config.json and event files, no checkpoint) behind."""

    def interrupted(config=None, **_):
        if config is not None:  # The run wrote its files, a checkpoint if saved.
            os.makedirs(os.path.join(config.model_dir, "checkpoints"))
            open(os.path.join(config.model_dir, "run_config.json"), "w").close()
            if when == "saved":
                open(
                    os.path.join(config.model_dir, "checkpoints", "ckpt-1.index"), "w"
                ).close()
        raise KeyboardInterrupt

    module = train if when == "importing" else run_lib
    name = "_import_tensorflow" if when == "importing" else "train"
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(module, name, interrupted)
            status, lines, _ = cli("--model=mlp", "--train_steps=1")
        # The command line ends: further Ctrl-Cs are ignored to its exit.
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt (a traceback) out of the command line")
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert status == 130
    if when != "saved":
        assert lines == ["error: interrupted (a second Ctrl-C)"]
        assert _tree(tmp_path) == []  # No runs/ either.
    else:
        (run,) = os.listdir(tmp_path / "runs")
        rerun = f"rerun with --model_dir={os.path.join('runs', run)} to resume"
        kept = "error: interrupted (a second Ctrl-C); the last checkpoint is kept"
        assert lines == [f"{kept}: {rerun}"]


@pytest.mark.parametrize(
    "flag,message",
    [
        ("--train_steps=-5", "--train_steps must be >= 0, got -5"),
        ("--eval_every=-1", "--eval_every must be >= 0, got -1"),
        ("--eval_steps=-3", "--eval_steps must be >= 0, got -3"),
        ("--checkpoint_every=-1", "--checkpoint_every must be >= 0, got -1"),
        ("--warmup_steps=-10", "--warmup_steps must be >= 0, got -10"),
        ("--keep_checkpoints=0", "--keep_checkpoints must be >= 1, got 0"),
        ("--eval_batch_size=-4", "--eval_batch_size must be >= 0, got -4"),
        ("--decay_steps=-1", "--decay_steps must be >= 0, got -1"),
        ("--learning_rate=-1", "--learning_rate must be finite and > 0, got -1.0"),
        ("--learning_rate=0", "--learning_rate must be finite and > 0, got 0.0"),
        ("--epochs=-1", "--epochs must be finite and >= 0, got -1.0"),
        ("--epochs=inf", "--epochs must be finite and >= 0, got inf"),
        ("--epochs=nan", "--epochs must be finite and >= 0, got nan"),
        (
            "--train_steps=9223372036854775808",
            (
                "--train_steps must be <= 2**63 - 1 (TensorFlow's int64), got "
                "9223372036854775808"
            ),
        ),
        (
            "--sync_period=9999999999999999999",
            "--sync_period must be <= 2**63 - 1 (TensorFlow's int64)",
        ),
        (
            "--keep_checkpoints=99999999999999999999",
            "--keep_checkpoints must be <= 2**63 - 1 (TensorFlow's int64)",
        ),
        ("--decay_rate=0", "--decay_rate must be finite and > 0, got 0.0"),
        ("--decay_rate=inf", "--decay_rate must be finite and > 0, got inf"),
        ("--seed=-1", "--seed must be in [0, 2**32 - 1], got -1"),
        ("--seed=99999999999", "--seed must be in [0, 2**32 - 1], got 99999999999"),
        ("--global_clipnorm=-1", "--global_clipnorm must be > 0, got -1.0"),
        ("--communication_timeout=-1", "--communication_timeout must be >= 0"),
        ("--slurm_port_base=70000", "--slurm_port_base must be a port"),
        ("--target_accuracy=1.5", "--target_accuracy must be in (0, 1]"),
        ("--target_accuracy=0", "--target_accuracy must be in (0, 1]"),
        ("--virtual_devices=-2", "--virtual_devices must be >= 0, got -2"),
        (
            "--virtual_devices=64",
            "--virtual_devices=64 applies to --strategy=mirrored only",
        ),
        (
            "--tpu=foo",
            (
                "--tpu=foo applies to --strategy=tpu only; --strategy=default does "
                "not connect to a TPU. Drop it, or add --strategy=tpu"
            ),
        ),
        # Flags that nothing reads under the other flags' values: each did
        # nothing, without a word.
        (
            "--decay_steps=100",
            (
                "--decay_steps=100 applies to --lr_schedule=exponential or cosine "
                "only; --lr_schedule=constant does not read it. Drop it, or set "
                "--lr_schedule"
            ),
        ),
        ("--max_skipped_steps=5", "--max_skipped_steps=5 applies to --on_nonfinite"),
        (
            "--communication_timeout=30",
            "--communication_timeout=30.0 applies to --strategy=multi_worker only",
        ),
        (
            "--sync_period=4",
            (
                "--sync_period=4 applies to a --sync other than every_step "
                "(accumulate, local_sgd, diloco, hierarchical); --sync=every_step "
                "communicates every step. Drop it, or set --sync"
            ),
        ),
    ],
)
def test_out_of_range_number_is_one_line_exit_2_nothing_created(
    cli, tmp_path, flag, message
):
    before = _tree(tmp_path)
    extra = ["--eval_every=10"] if flag.startswith("--target_accuracy") else []
    status, lines, work = cli(flag, *extra)
    assert status == 2 and work == []
    assert lines == [f"error: {message}"] or (
        len(lines) == 1 and lines[0].startswith(f"error: {message}")
    ), lines
    assert _tree(tmp_path) == before  # No run directory either.


INT64_MAX = 2**63 - 1


@pytest.mark.parametrize("name", sorted(config_lib._AT_LEAST))
def test_every_integer_flag_fits_int64(name):
    # One rule for every integer flag: TensorFlow counts in int64.
    # Where every integer flag is read (see test_a_flag_is_taken_where_it_is_read).
    read = {"lr_schedule": "exponential", "on_nonfinite": "skip", "sync": "local_sgd"}
    fits = config_lib.TrainConfig(strategy="mirrored", **read, **{name: INT64_MAX})
    config_lib.check_flags(fits)
    over = dataclasses.replace(fits, **{name: INT64_MAX + 1})
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.check_flags(over)
    assert str(e.value) == (
        f"--{name} must be <= 2**63 - 1 (TensorFlow's int64), got {INT64_MAX + 1}"
    )


@pytest.mark.parametrize(
    "flag, value, reader",
    [
        ("decay_steps", 100, {"lr_schedule": "exponential"}),
        ("decay_steps", 100, {"lr_schedule": "cosine"}),
        ("decay_rate", 0.5, {"lr_schedule": "exponential"}),
        ("max_skipped_steps", 5, {"on_nonfinite": "skip"}),
        ("max_skipped_steps", 5, {"skip_nonfinite": True}),
        ("communication_timeout", 30.0, {"strategy": "multi_worker"}),
        ("slurm_port_base", 9000, {"strategy": "multi_worker"}),
        ("sync_period", 4, {"sync": "local_sgd"}),
        ("sync_period", 4, {"sync": "accumulate"}),
    ],
)
def test_a_flag_is_taken_where_it_is_read_and_refused_elsewhere(flag, value, reader):
    # It did nothing under the default --lr_schedule, --on_nonfinite,
    # --strategy or --sync, without a word.
    config_lib.check_flags(config_lib.TrainConfig(**reader, **{flag: value}))
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.check_flags(config_lib.TrainConfig(**{flag: value}))
    assert str(e.value).startswith(f"--{flag}={value} applies to "), e.value
    # The default value is no setting: a flagfile may spell it out anywhere.
    default = getattr(config_lib.TrainConfig(), flag)
    config_lib.check_flags(config_lib.TrainConfig(**{flag: default}))


def test_lr_boundaries_fit_int64():
    config = config_lib.TrainConfig(
        lr_schedule="piecewise", lr_boundaries=(5, INT64_MAX), lr_values=(1, 0.1, 0.01)
    )
    config_lib.check_flags(config)
    config.lr_boundaries = (5, INT64_MAX + 1)
    with pytest.raises(config_lib.ConfigError, match=r"--lr_boundaries must be <= 2"):
        config_lib.check_flags(config)


def test_epochs_whose_steps_overflow_int64_are_a_config_error():
    # Known only with the data's size, in the run (which exits 2 on it).
    config = config_lib.TrainConfig(train_steps=0, epochs=1e30, batch_size=128)
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.resolve_train_steps(config, 60000)
    assert str(e.value) == (
        "--epochs=1e+30 is 468750000000000028531585053622272 steps of "
        "--batch_size=128 over the 60000 train examples; the steps must be <= "
        "2**63 - 1 (TensorFlow's int64): lower --epochs"
    )
    # The limit itself: 2**63 steps are one too many, 2**62 fit.
    config = config_lib.TrainConfig(train_steps=0, epochs=float(2**63), batch_size=1)
    with pytest.raises(config_lib.ConfigError, match="--epochs="):
        config_lib.resolve_train_steps(config, 1)
    config.epochs = float(2**62)
    assert config_lib.resolve_train_steps(config, 1) == 2**62
    config = config_lib.TrainConfig(train_steps=0, epochs=1.0, batch_size=128)
    assert config_lib.resolve_train_steps(config, 60000) == 468


@pytest.mark.parametrize(
    "eval_batch_size,replicas,examples,refused",
    [
        (0, 1, 10000, None),  # --batch_size's, left to the run
        (10000, 1, 10000, None),
        (10001, 1, 10000, "use at most 10000: one batch evaluates them all"),
        (99999999999, 2, 10000, "use at most 10000: one batch evaluates them all"),
        # Whole replica batches: 10002 is the smallest one holding all 10001.
        (10002, 2, 10001, None),
        (
            10004,
            2,
            10001,
            (
                "use at most 10002 (the smallest multiple of the 2 replicas that "
                "holds them): one batch evaluates them all"
            ),
        ),
    ],
)
def test_eval_batch_larger_than_the_test_set_is_refused(
    eval_batch_size, replicas, examples, refused
):
    # Evaluation pads to whole batches: a larger one is padding only (and at
    # 99999999999, std::bad_alloc after the training). The run checks it
    # with the training batch, before the first step (test_train.py's
    # test_input_refused_after_the_lock_leaves_no_directory).
    config = config_lib.TrainConfig(eval_batch_size=eval_batch_size)
    source = types.SimpleNamespace(num_examples={"train": 60000, "test": examples})
    if refused is None:
        inputs.check_eval_batch_size(config, source, replicas)
        return
    with pytest.raises(config_lib.ConfigError) as e:
        inputs.check_eval_batch_size(config, source, replicas)
    assert str(e.value) == (
        f"--eval_batch_size={eval_batch_size} is larger than the {examples} test "
        f"examples; {refused}"
    )


@pytest.mark.parametrize(
    "flags_,message",
    [
        (
            ["--virtual_devices=5000"],
            (
                "--batch_size=128 is not divisible by --virtual_devices=5000, the "
                "replicas of --strategy=mirrored on this CPU-only host; use a "
                "--batch_size that is a multiple of 5000"
            ),
        ),
        (
            ["--virtual_devices=3", "--batch_size=100"],
            "--batch_size=100 is not divisible by --virtual_devices=3, the replicas",
        ),
        (
            ["--batch_size=127"],
            (
                "--batch_size=127 is not divisible by the 2 logical CPUs, the "
                "replicas of --strategy=mirrored on this CPU-only host "
                "(--virtual_devices=0 means 2); use a --batch_size that is a "
                "multiple of 2"
            ),
        ),
        (
            ["--virtual_devices=3", "--batch_size=96", "--eval_batch_size=100"],
            (
                "--eval_batch_size=100 is not divisible by --virtual_devices=3, "
                "the replicas of --strategy=mirrored on this CPU-only host; use "
                "an --eval_batch_size that is a multiple of 3"
            ),
        ),
        (
            ["--virtual_devices=4", "--sync=hierarchical", "--sync_args=group_size=3"],
            (
                "--sync_args=group_size=3 does not divide --virtual_devices=4, the "
                "replicas of --strategy=mirrored on this CPU-only host; use a "
                "group_size >= 1 that divides 4"
            ),
        ),
        (
            ["--sync=hierarchical", "--sync_args=group_size=0"],
            (
                "--sync_args=group_size=0 does not divide the 2 logical CPUs, the "
                "replicas of --strategy=mirrored on this CPU-only host "
                "(--virtual_devices=0 means 2); use a group_size >= 1 that divides 2"
            ),
        ),
    ],
    ids=[
        "5000_devices",
        "3_devices",
        "default_2_devices",
        "eval_batch",
        "group_size",
        "group_size_0",
    ],
)
def test_batch_size_the_virtual_devices_cannot_split_is_refused_first(
    cli, tmp_path, flags_, message
):
    # It was refused by the run, after TensorFlow had made the devices: 30 s
    # for 5000 of them. So were an evaluation batch and a hierarchical group
    # size that the devices cannot take (the evaluation batch after the data
    # had loaded and the model was built).
    _assert_refused_first(cli, tmp_path, ["--strategy=mirrored", *flags_], message)


@pytest.mark.parametrize(
    "flags_,gpus",
    [
        (["--strategy=mirrored", "--virtual_devices=3", "--batch_size=96"], 0),
        # With GPUs, mirrored takes every GPU: --virtual_devices says nothing.
        (["--strategy=mirrored", "--virtual_devices=3"], 4),
        (["--strategy=mirrored", "--batch_size=127"], 1),
        (["--strategy=one_device", "--batch_size=127"], 0),
        # What the run takes passes the early check too.
        (
            [
                "--strategy=mirrored",
                "--virtual_devices=3",
                "--batch_size=96",
                "--eval_batch_size=99",
            ],
            0,
        ),
        (
            [
                "--strategy=mirrored",
                "--virtual_devices=4",
                "--sync=hierarchical",
                "--sync_args=group_size=2",
            ],
            0,
        ),
        (["--strategy=mirrored", "--eval_batch_size=127"], 1),
        (["--strategy=mirrored", "--sync=hierarchical", "--sync_args=group_size=3"], 4),
    ],
    ids=[
        "divisible",
        "gpus_with_virtual_devices",
        "gpus_by_default",
        "one_device",
        "eval_batch_divisible",
        "group_size_divides",
        "gpus_eval_batch",
        "gpus_group_size",
    ],
)
def test_batch_size_is_left_to_the_run_where_the_replicas_are_unknown(
    cli, monkeypatch, flags_, gpus
):
    listed = tf.config.list_physical_devices
    fake_gpus = [
        tf.config.PhysicalDevice(f"/physical_device:GPU:{i}", "GPU")
        for i in range(gpus)
    ]
    monkeypatch.setattr(
        tf.config,
        "list_physical_devices",
        lambda kind=None: fake_gpus if kind == "GPU" else listed(kind),
    )
    status, lines, work = cli(*flags_, "--train_steps=1")
    assert status == 0 and lines == [] and len(work) == 1, lines


@pytest.mark.parametrize(
    "flags_,message",
    [
        (["--compression=gzip"], "--compression: unknown 'gzip'; valid: onebit"),
        (["--compression_args=rank=2"], "--compression_args needs --compression"),
        (
            ["--compression=topk", "--sync=local_sgd"],
            "--compression compresses gradients; --sync=local_sgd sends weights",
        ),
        (
            ["--compression=onebit", "--sync=hierarchical"],
            "--compression compresses gradients; --sync=hierarchical sends",
        ),
        (
            ["--shard_optimizer_state", "--sync=diloco"],
            "--shard_optimizer_state needs a synchronous --sync",
        ),
        (
            ["--compression=powersgd", "--compression_args=rank=0"],
            "--compression_args: rank: must be an integer >= 1, got 0 (in PowerSGD).",
        ),
        (
            ["--compression=topk", "--compression_args=frac=0.1"],
            (
                "--compression_args: frac: not an argument of 'topk', which "
                "takes error_feedback, error_feedback_decay, fraction,"
            ),
        ),
    ],
    ids=[
        "unknown",
        "args_alone",
        "local_sgd",
        "hierarchical",
        "sharded_diloco",
        "bad_rank",
        "unknown_argument",
    ],
)
def test_compression_and_sharding_flags_are_checked_first(
    cli, tmp_path, flags_, message
):
    _assert_refused_first(cli, tmp_path, flags_, message)


def _assert_refused_first(cli, tmp_path, flags_, message):
    """One ``error: message`` line, exit 2, no work, nothing created."""
    before = _tree(tmp_path)
    status, lines, work = cli(*flags_)
    assert status == 2 and work == []
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), lines
    assert _tree(tmp_path) == before


@pytest.mark.parametrize(
    "flags_,message",
    [
        (
            ["--optimizer_args=global_clipnorm=1.0"],
            (
                "--optimizer_args: global_clipnorm is set by --global_clipnorm; use "
                "that flag instead"
            ),
        ),
        (
            ["--optimizer_args=clipvalue=1,learning_rate=5"],
            (
                "--optimizer_args: learning_rate is set by --learning_rate (and "
                "--lr_schedule)"
            ),
        ),
        (
            ["--optimizer_args=skip_nonfinite=true"],
            "--optimizer_args: skip_nonfinite is set by --on_nonfinite=skip",
        ),
        (
            ["--mixed_precision=float16", "--optimizer_args=loss_scale=128"],
            "--optimizer_args: loss_scale is set by --mixed_precision=float16",
        ),
        (
            [
                "--lr_schedule=piecewise",
                "--lr_boundaries=5,3",
                "--lr_values=1e-3,1e-4,1e-5",
            ],
            "--lr_boundaries must be steps >= 0 in increasing order, got [5, 3]",
        ),
        (
            ["--lr_values=1e-3"],
            (
                "--lr_boundaries and --lr_values apply to --lr_schedule=piecewise "
                "only, got --lr_schedule=constant"
            ),
        ),
        (
            ["--sync=accumulate", "--sync_period=1000", "--train_steps=20"],
            (
                "--sync=accumulate --sync_period=1000 applies no update in a run of "
                "20 steps"
            ),
        ),
    ],
    ids=[
        "clipnorm_in_args",
        "lr_in_args",
        "skip_in_args",
        "loss_scale_in_args",
        "boundaries_order",
        "values_alone",
        "no_update",
    ],
)
def test_flags_that_would_be_lost_or_fail_late_are_refused_first(
    cli, tmp_path, flags_, message
):
    # Each was silently dropped, or a traceback after TensorFlow and the data.
    _assert_refused_first(cli, tmp_path, flags_, message)


@pytest.mark.parametrize("strategy", ["default", "one_device", "mirrored"])
def test_a_batch_larger_than_the_bundled_mnist_is_refused_first(
    cli, tmp_path, strategy
):
    # The in-memory feed refused it, in these words, after the strategy, the
    # data and the model were made.
    flags_ = [f"--strategy={strategy}", "--batch_size=70000", "--epochs=1"]
    message = (
        "--batch_size=70000: global batch 70000 is larger than the 60000 train "
        "examples, and the remainder is dropped"
    )
    _assert_refused_first(cli, tmp_path, flags_, message)


@pytest.mark.parametrize(
    "flags_",
    [
        ["--batch_size=60000"],
        ["--batch_size=70000", "--nodrop_remainder"],  # One short batch an epoch.
        # tf.data batches each replica's 35000 apart (one per epoch).
        ["--strategy=mirrored", "--batch_size=70000", "--input=dataset"],
    ],
)
def test_a_batch_the_bundled_mnist_holds_is_not_refused_first(cli, flags_):
    status, lines, work = cli("--model_dir=run", *flags_)
    assert status == 0 and lines == [] and len(work) == 1, lines


def test_the_bundled_mnist_train_size_is_its_files():
    labels = os.path.join(data.bundled_dir(), data.MNIST_FILES["train"][1])
    assert inputs.BUNDLED_TRAIN_EXAMPLES == len(data.read_idx(labels))


def test_a_home_relative_model_dir_is_the_users_home(cli, tmp_path, monkeypatch):
    # `--model_dir=~/x`: no shell expands it; it made a directory named `~`.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    status, lines, work = cli("--model_dir=~/runs/x", "--train_steps=1")
    assert status == 0 and lines == []
    assert work[0].model_dir == str(tmp_path / "home" / "runs" / "x")
    assert not os.path.exists(tmp_path / "~")


def test_target_accuracy_needs_eval_every(cli):
    status, lines, work = cli("--target_accuracy=0.9")
    assert status == 2 and work == []
    assert lines == [
        (
            "error: --target_accuracy needs --eval_every (the steps between the "
            "evaluations that check it)"
        )
    ]


def test_learning_rate_error_is_the_only_line_and_needs_no_tensorflow(tmp_path):
    """The first thing printed is the error; TensorFlow is never imported."""
    script = (
        "import runpy, sys\n"
        "sys.argv = ['train', '--learning_rate=-1']\n"
        "try:\n"
        "    runpy.run_module('distopt.train', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    print(e.code, 'tensorflow' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    assert proc.stdout.split() == ["2", "False"], proc.stderr
    assert proc.stderr.splitlines() == [
        "error: --learning_rate must be finite and > 0, got -1.0"
    ]
    assert os.listdir(tmp_path) == []


def test_run_directory_is_created_before_tensorflow_loads(tmp_path):
    script = (
        "import os, runpy, sys\n"
        "from distopt import quiet\n"
        "def spy(*args, **kwargs):\n"
        "    print('runs:', len(os.listdir('runs')), 'tf:', 'tensorflow' in sys.modules)\n"
        "    raise SystemExit(0)\n"
        "quiet.import_tensorflow = spy\n"
        "sys.argv = ['train', '--model=mlp', '--train_steps=1']\n"
        "runpy.run_module('distopt.train', run_name='__main__')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    assert proc.stdout.split() == ["runs:", "1", "tf:", "False"], proc.stderr


@pytest.mark.parametrize("flag", ["--help", "--helpfull", "-h"])
def test_help_exits_0(flag):
    proc = run_python("-m", "distopt.train", flag, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--model_dir" in proc.stdout and "--target_accuracy" in proc.stdout
    assert proc.stderr == ""
    # --helpfull lists absl's own flags too.
    assert ("--verbosity" in proc.stdout) == (flag == "--helpfull")


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


@pytest.mark.parametrize("model_dir", [False, True])
def test_a_failed_save_names_the_run_directory_to_resume(cli, monkeypatch, model_dir):
    # Without --model_dir, "rerun" (the same command) would start a new run
    # directory: the line names the one that holds the checkpoint.
    from distopt import checkpoints
    from distopt.trainer import checkpointing

    failures = iter(
        [
            checkpoints.CheckpointSaveError(
                "Could not save ... The latest checkpoint is still ckpt-10; "
                "free space and rerun to resume"
            ),
            checkpointing.WriteError(
                "Could not write metrics.json: No space left on device; free "
                "space or fix the permissions, then rerun to finish"
            ),
        ]
    )

    def fail(config, **_):
        # The run saved before it failed: its directory is kept.
        os.makedirs(os.path.join(config.model_dir, "checkpoints"), exist_ok=True)
        raise next(failures)

    monkeypatch.setattr(run_lib, "train", fail)
    given = ["--model_dir=mine"] if model_dir else []
    for ending in ("free space and rerun{} to resume", "then rerun{} to finish"):
        before = set(os.listdir("runs")) if os.path.isdir("runs") else set()
        status, lines, _ = cli("--train_steps=1", *given)
        (error,) = [line for line in lines if line.startswith("error: ")]
        assert status == 1 and error == lines[-1], lines
        if model_dir:
            assert error.endswith(ending.format("")), error
        else:
            (run,) = set(os.listdir("runs")) - before
            named = f" with --model_dir={os.path.join('runs', run)}"
            assert error.endswith(ending.format(named)), error


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
        assert paths.writes_model_dir("multi_worker") is writes
    assert paths.writes_model_dir("mirrored")  # TF_CONFIG is not read.
    # A worker that does not write needs no writable parent.
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert paths.check_model_dir(str(a_file / "run"), writes=False) == []
    assert paths.check_model_dir(str(a_file / "run"), writes=True)
    monkeypatch.delenv("TF_CONFIG")
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert not paths.writes_model_dir("multi_worker")


# --- Optimizer, model and sync arguments: refused before any work ----------
# (Their constructors' own checks, run once by `factories.check_arguments`
# before the run directory is announced and the strategy and data are made;
# each was refused only after them, one a traceback.)


@pytest.mark.parametrize(
    "flags_,message",
    [
        (
            ["--optimizer_args=bogus=1"],
            "--optimizer=adam does not take one of ['bogus']",
        ),
        (  # Only the one it does not take (it named nesterov too).
            ["--optimizer=momentum", "--nesterov", "--amsgrad"],
            "--optimizer=momentum does not take one of ['amsgrad']: ",
        ),
        (["--beta_1=1"], "--optimizer=adam: beta_1: must be in [0, 1), got 1.0."),
        (["--beta_2=nan"], "--optimizer=adam: beta_2: must be in [0, 1), got nan."),
        (["--epsilon=nan"], "--optimizer=adam: epsilon: must be >= 0, got nan."),
        (
            ["--optimizer=momentum", "--momentum=-1"],
            "--optimizer=momentum: momentum: must be in [0, 1), got -1.0.",
        ),
        (
            ["--optimizer=rmsprop", "--rho=2"],
            "--optimizer=rmsprop: rho: must be in [0, 1), got 2.0.",
        ),
        (
            ["--optimizer=adamw", "--weight_decay=-1"],
            "--optimizer=adamw: weight_decay: must be finite and non-negative",
        ),
        (["--optimizer=lars", "--eta=-1"], "--optimizer=lars: eta: "),
        (
            ["--optimizer=adagrad", "--initial_accumulator_value=-1"],
            "--optimizer=adagrad: initial_accumulator_value: ",
        ),
        (
            ["--global_clipnorm=inf"],
            "--global_clipnorm: must be a positive finite number, got inf.",
        ),
        (
            ["--optimizer=sam", "--global_clipnorm=inf"],
            "--global_clipnorm: must be a positive finite number, got inf.",
        ),
        (
            ["--model=mlp", "--model_args=hidden=-5"],
            (
                "--model=mlp --model_args: hidden: must be a list of integers >= 1 "
                "(the hidden layers' widths), got -5; write a list in brackets: "
                "--model_args=hidden=[a,b]."
            ),
        ),
        (
            ["--model=mlp", "--model_args=conv2_padding=SAME"],
            "--model=mlp does not take one of ['conv2_padding']",
        ),
        (
            ["--model_args=conv2_padding=FULL"],
            "--model=lenet --model_args: Unknown conv2_padding 'FULL'",
        ),
        (
            ["--sync=diloco", "--sync_args=outer_momentum=2"],
            "--sync=diloco --sync_args: outer_momentum: must be in [0, 1), got 2.",
        ),
        (
            ["--sync=diloco", "--sync_args=outer_learning_rate=-1"],
            (
                "--sync=diloco --sync_args: outer_learning_rate: must be finite "
                "and non-negative, got -1."
            ),
        ),
        (
            ["--sync=diloco", "--sync_args=warmup_steps=-1"],
            "--sync=diloco does not take {'warmup_steps': -1, 'k': 8}",
        ),
    ],
    ids=[
        "optimizer_args_key",
        "momentum_amsgrad",
        "beta_1",
        "beta_2",
        "epsilon",
        "momentum",
        "rho",
        "weight_decay",
        "eta",
        "initial_accumulator_value",
        "global_clipnorm_inf",
        "sam_global_clipnorm_inf",
        "model_args_value",
        "model_args_key",
        "lenet_padding",
        "outer_momentum",
        "outer_learning_rate",
        "sync_args_value",
    ],
)
def test_optimizer_model_and_sync_arguments_are_checked_first(
    cli, tmp_path, flags_, message
):
    # `work == []`: neither the run (which makes the strategy) nor the data
    # loader was called; `_tree`: the run directory was removed again.
    _assert_refused_first(cli, tmp_path, flags_, message)


def test_a_bad_outer_momentum_is_one_line_before_the_run_directory(tmp_path):
    # It was a 50-line traceback, exit 1, after "Run directory runs/..." (a
    # directory then deleted), the strategy and the data.
    proc = subprocess.run(
        [sys.executable, "-m", "distopt.train", "--model=mlp", "--sync=diloco"]
        + ["--sync_args=outer_momentum=2", "--verbosity=0"],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        "error: --sync=diloco --sync_args: outer_momentum: must be in [0, 1), got 2."
    ]
    assert os.listdir(tmp_path) == []


def test_checking_the_arguments_leaves_the_devices_unmade():
    # Built eagerly, the model's and optimizer's variables would initialise
    # TensorFlow's devices: the strategy could then no longer split the CPU
    # into logical devices. Every optimizer and sync mode passes the check
    # with its defaults (no valid run is refused), float16 and SAM included.
    code = (
        "import tensorflow as tf\n"
        "from distopt import optimizers, sync\n"
        "from distopt.trainer import config, factories\n"
        "for name in optimizers.names():\n"
        "    factories.check_arguments(config.TrainConfig(optimizer=name))\n"
        "for name in sync.names():\n"
        "    factories.check_arguments(config.TrainConfig(model='mlp', sync=name))\n"
        "factories.check_arguments(config.TrainConfig(\n"
        "    sync='diloco', sync_args={'outer_momentum': 0.5}, jit_compile=None))\n"
        "factories.check_arguments(config.TrainConfig(mixed_precision='float16'))\n"
        "cpu = tf.config.list_physical_devices('CPU')[0]\n"
        "tf.config.set_logical_device_configuration(\n"
        "    cpu, [tf.config.LogicalDeviceConfiguration()] * 3)\n"
        "print(len(tf.config.list_logical_devices('CPU')))\n"
    )
    proc = run_python("-c", code, timeout=240, forked=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["3"]


# --model_args=hidden=...: the MLP's hidden widths are a list, and parse_kv
# split every value at its commas, so no list could be given on the command
# line (hidden=256,128 was "Expected key=value, got '128'"; hidden=256 a
# TypeError from Python's `*`). A value in brackets is now a list.


@pytest.mark.parametrize(
    "text,want",
    [
        ("a=1, b=0.5,c=true,d=x", {"a": 1, "b": 0.5, "c": True, "d": "x"}),
        ("", {}),
        ("a=1,,b=2", {"a": 1, "b": 2}),
        ("hidden=[256,128]", {"hidden": [256, 128]}),
        ("hidden=[ 256 , 128 ],seed=3", {"hidden": [256, 128], "seed": 3}),
        ("hidden=[64]", {"hidden": [64]}),
        ("hidden=[]", {"hidden": []}),
        ("x=[a,[1,2.5],false]", {"x": ["a", [1, 2.5], False]}),
        ("name=w[0]", {"name": "w[0]"}),
    ],
)
def test_parse_kv_types_values_and_lists_in_brackets(text, want):
    assert config_lib.parse_kv(text, "model_args") == want


@pytest.mark.parametrize(
    "flags_,message",
    [
        (
            ["--model=mlp", "--model_args=hidden=256,128"],
            (
                "--model_args: Expected key=value, got '128' in 'hidden=256,128'; "
                "a list goes in brackets: key=[a,b]"
            ),
        ),
        (
            ["--model=mlp", "--model_args=hidden=[256,128"],
            "--model_args: a '[' without its ']' in 'hidden=[256,128'",
        ),
        (
            ["--model=mlp", "--model_args=hidden=256]"],
            "--model_args: a ']' without its '[' in 'hidden=256]'",
        ),
        (
            ["--model=mlp", "--model_args=hidden=[256,,128]"],
            "--model_args: an empty list item in '[256,,128]' of",
        ),
        (
            ["--model=mlp", "--model_args=hidden=256:128"],
            (
                "--model=mlp --model_args: hidden: must be a list of integers >= 1 "
                "(the hidden layers' widths), got '256:128'; write a list in "
                "brackets: --model_args=hidden=[a,b]."
            ),
        ),
        (
            ["--model=mlp", "--model_args=hidden=[256,0]"],
            (
                "--model=mlp --model_args: hidden: must be a list of integers >= 1 "
                "(the hidden layers' widths), got [256, 0]."
            ),
        ),
        (
            ["--model=mlp", "--model_args=hidden=[1.5]"],
            "--model=mlp --model_args: hidden: must be a list of integers >= 1",
        ),
        (
            ["--model=mlp", "--model_args=hidden=[true]"],
            "--model=mlp --model_args: hidden: must be a list of integers >= 1",
        ),
        (
            ["--model=mlp", "--model_args=hidden=[[8]]"],
            "--model=mlp --model_args: hidden: must be a list of integers >= 1",
        ),
        (
            ["--compression=topk", "--compression_args=fraction=[0.1]"],
            "--compression_args: fraction: must be a number, got [0.1] (in TopK).",
        ),
        (
            ["--sync_args=warmup_steps=1,2"],
            "--sync_args: Expected key=value, got '2'",
        ),
    ],
    ids=[
        "comma",
        "unclosed",
        "unopened",
        "empty_item",
        "colon",
        "zero_width",
        "float_width",
        "bool_width",
        "nested",
        "list_fraction",
        "sync_args_names_its_flag",
    ],
)
def test_bad_list_values_are_refused_first_naming_the_flag(
    cli, tmp_path, flags_, message
):
    _assert_refused_first(cli, tmp_path, flags_, message)


@pytest.mark.parametrize(
    "value,widths", [("[256,128]", [256, 128]), ("[32]", [32]), ("[]", [])]
)
def test_a_list_of_hidden_widths_on_the_command_line_builds_that_mlp(
    cli, value, widths
):
    from distopt.trainer import factories

    status, lines, work = cli("--model=mlp", f"--model_args=hidden={value}")
    assert status == 0 and lines == [] and len(work) == 1, lines
    config = work[0]
    assert config.model_args == {"hidden": widths}
    # The JSON of run_config.json keeps it as given (a tuple would be a list).
    assert json.loads(json.dumps(config_lib.run_identity(config)))["model_args"] == {
        "hidden": widths
    }
    with tf.Graph().as_default():
        model = factories.build_model(config.model, model_args=config.model_args)
        shapes = [v.shape.as_list() for v in model.trainable_variables]
    dims = [784, *widths, 10]
    want = [[dims[i], dims[i + 1]] for i in range(len(dims) - 1)]
    want += [[d] for d in dims[1:]]
    assert sorted(shapes) == sorted(want)


def test_compression_args_from_the_command_line_reach_the_compressor(cli):
    # The flag's string "0.1" becomes the number 0.1 in parse_kv: the
    # library refuses a str fraction (TopK("0.1")), the command line works.
    status, lines, work = cli(
        "--compression=topk", "--compression_args=fraction=0.1,error_feedback=false"
    )
    assert status == 0 and lines == [] and len(work) == 1, lines
    compressor = config_lib.make_compression(work[0])
    assert (compressor.fraction, compressor.error_feedback) == (0.1, False)
