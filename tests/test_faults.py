"""What real clusters do to a run: stop notices, damaged checkpoints, a full
disk, divergence, two trainers on one directory, a different cluster size on
resume. Most cases run the trainer (or the launcher) in a subprocess, as a
scheduler would; the thresholds of the non-finite policies and the
checkpoint fallback's bookkeeping are also checked in process, where a
whole run could not tell an off-by-one.

Test-only hooks (environment variables, see distopt/trainer_faults.py and
distopt/checkpoints.py): DISTOPT_FAULT_CHUNK_DELAY paces a run so that a test
can signal it mid-way; DISTOPT_FAULT_SAVE_ERROR_AT stands in for a full disk
where this machine cannot mount a small tmpfs.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, run_python, start_python

LAUNCHER = os.path.join(REPO, "launch", "local.py")
EXIT_DIVERGED, EXIT_PREEMPTED = 3, 42
COMMON = (
    "--model=mlp",
    "--batch_size=32",
    "--eval_steps=1",
    "--log_every=5",
    "--steps_per_loop=5",
    "--checkpoint_every=10",
)


def _env(**extra):
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def _start(argv, log_path, fresh=False, cwd=REPO, **env):
    """Starts ``python argv`` with stdout and stderr into ``log_path``.

    Forked from the fork server (see forkserver.py) unless ``fresh``: a
    launcher, which signals the process group of workers it starts itself.
    """
    log = open(log_path, "w")  # noqa: SIM115 (closed by _finish)
    # Its own session: a signal to it reaches nothing else.
    proc = start_python(
        argv,
        stdout=log,
        env=_env(**env),
        start_new_session=True,
        fresh=fresh,
        cwd=cwd,
    )
    proc.log = log
    return proc


def _finish(proc, timeout=240):
    proc.wait(timeout=timeout)
    proc.log.close()
    with open(proc.log.name) as f:
        return proc.returncode, f.read()


def _wait_for(path, text, proc, timeout=180):
    """Waits until ``text`` is in the file ``path`` (the process still runs)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(path) as f:
            if text in f.read():
                return
        assert proc.poll() is None, f"exited {proc.returncode} before {text!r}"
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not seen in {timeout} s")


def _metrics(model_dir):
    with open(os.path.join(model_dir, "metrics.json")) as f:
        # Strict JSON: NaN or Infinity would raise here.
        return json.loads(f.read(), parse_constant=_no_constants)


def _no_constants(name):
    raise AssertionError(f"metrics.json is not strict JSON: {name}")


def _tensors(model_dir):
    """Every tensor of the latest checkpoint of ``model_dir``."""
    directory = os.path.join(model_dir, "checkpoints")
    reader = tf.train.load_checkpoint(directory)
    return {
        name: reader.get_tensor(name)
        for name, _ in tf.train.list_variables(directory)
        # How many saves a run made is not its state.
        if not name.startswith(("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter"))
    }


def _assert_bit_identical(a_dir, b_dir):
    a, b = _tensors(a_dir), _tensors(b_dir)
    # Everything: weights, slots, sync state, counters (the weights' names
    # depend on which object tracks them first, model or optimizer).
    assert a.keys() == b.keys() and len(a) > 12
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _latest_step(model_dir):
    path = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    return int(path.rsplit("-", 1)[1]) if path else None


def _errors(output):
    return [line for line in output.splitlines() if line.startswith("error:")]


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.slow
def test_sigterm_single_process_saves_and_resumes_exactly_and_one_run_per_dir(
    tmp_path,
):
    """SIGTERM mid-run: a checkpoint at the step reached, status "preempted",
    exit 42, a resume equal to an uninterrupted run bit for bit. Meanwhile a
    second trainer on the same directory refuses; a stale lock is taken over.
    """
    run_dir = str(tmp_path / "run")
    args = ["-m", "distopt.train", *COMMON, f"--model_dir={run_dir}"]
    log = str(tmp_path / "first.log")
    first = _start(
        [*args, "--train_steps=100000"], log, DISTOPT_FAULT_CHUNK_DELAY="0.3"
    )
    try:
        _wait_for(log, "step 10/100000", first)
        second = run_python(*args, "--train_steps=100000", timeout=240, forked=True)
        assert second.returncode == 1
        assert _errors(second.stderr) == [
            (
                f"error: {run_dir} is in use by another trainer (host "
                f"{socket.gethostname()}, pid {first.pid}; {run_dir}/LOCK); use another "
                "--model_dir, or delete the lock file if that process is gone"
            )
        ]
        assert "Traceback" not in second.stderr
        os.kill(first.pid, signal.SIGTERM)
        code, out = _finish(first)
    finally:
        if first.poll() is None:
            first.kill()
    assert code == EXIT_PREEMPTED, out[-3000:]
    metrics = _metrics(run_dir)
    reached = metrics["train_steps"]
    assert metrics["status"] == "preempted" and reached >= 10
    assert metrics["last_checkpoint_step"] == reached == _latest_step(run_dir)
    assert f"Stopped by SIGTERM at step {reached} of 100000" in out
    assert "Rerun the same command to resume" in out
    assert not os.path.exists(os.path.join(run_dir, "LOCK"))

    # A lock left by a process that is gone is taken over.
    with open(os.path.join(run_dir, "LOCK"), "w") as f:
        json.dump({"host": socket.gethostname(), "pid": _dead_pid()}, f)
    total = f"--train_steps={reached + 10}"
    straight_dir = str(tmp_path / "straight")
    straight = _start(
        ["-m", "distopt.train", *COMMON, f"--model_dir={straight_dir}", total],
        str(tmp_path / "straight.log"),
    )
    resumed = run_python(*args, total, timeout=240, forked=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Taking over the stale lock" in resumed.stderr
    metrics = _metrics(run_dir)
    assert metrics["status"] == "completed"
    assert (metrics["start_step"], metrics["train_steps"]) == (reached, reached + 10)
    assert _finish(straight)[0] == 0
    _assert_bit_identical(run_dir, straight_dir)


@pytest.mark.slow  # A new interpreter: the notice comes while TensorFlow loads.
def test_a_stop_notice_while_tensorflow_loads_exits_42_after_one_step(tmp_path):
    """Without --model_dir (a new run directory, made before the import): it
    was killed by the default handler (143; Ctrl-C: a traceback) and left an
    empty run directory. Now the notice waits for the trainer's handler."""
    proc = _start(
        ["-m", "distopt.train", *COMMON, "--train_steps=50"],
        str(tmp_path / "log"),
        fresh=True,
        cwd=str(tmp_path),
    )
    runs = tmp_path / "runs"
    deadline = time.time() + 60
    while not (runs.exists() and os.listdir(runs)) and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)  # TensorFlow takes seconds to import.
    code, out = _finish(proc)
    assert code == EXIT_PREEMPTED, out[-3000:]
    assert "SIGTERM received during the start: stopping after the first step" in out
    (run_dir,) = [str(p) for p in runs.iterdir()]
    # "Rerun the same command" would start another new run directory.
    name = os.path.basename(run_dir)
    assert f"Rerun with --model_dir=runs/{name} to resume" in out
    assert "Rerun the same command" not in out
    assert _metrics(run_dir)["status"] == "preempted"
    assert _latest_step(run_dir) == 1
    resumed = run_python(
        "-m",
        "distopt.train",
        *COMMON,
        "--train_steps=5",
        f"--model_dir={run_dir}",
        timeout=240,
        forked=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _metrics(run_dir)["start_step"] == 1


def test_sigterm_during_the_final_evaluation_cuts_it_short(tmp_path):
    """A stop notice in the final evaluation ends it at the next chunk (a big
    test set must not outlast the grace period): exit 42, "preempted", the
    final checkpoint kept. The rerun trains no further and evaluates in full.
    """
    run_dir = str(tmp_path / "run")
    args = [
        "-m",
        "distopt.train",
        *COMMON,
        "--train_steps=10",
        "--eval_steps=6",
        "--steps_per_loop=2",
        f"--model_dir={run_dir}",
    ]
    # Step 10 is the last: the hook fires as the final evaluation starts.
    code, out = _finish(
        _start(args, str(tmp_path / "first.log"), DISTOPT_FAULT_SIGTERM_AT="10")
    )
    assert code == EXIT_PREEMPTED, out[-3000:]
    assert "Evaluation at step 10 cut short by a stop notice (2 of 6 batches)" in out
    assert "Stopped by SIGTERM at step 10 of 10 during the final evaluation" in out
    metrics = _metrics(run_dir)
    assert metrics["status"] == "preempted" and metrics["test_accuracy"] is None
    assert metrics["last_checkpoint_step"] == metrics["train_steps"] == 10
    assert _latest_step(run_dir) == 10

    resumed = run_python(*args, timeout=240, forked=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = _metrics(run_dir)
    assert metrics["status"] == "completed"
    assert (metrics["start_step"], metrics["train_steps"]) == (10, 10)
    assert metrics["test_examples"] == 6 * 32 and metrics["test_accuracy"] is not None


def test_a_notice_after_the_stop_checkpoint_keeps_exit_42(tmp_path):
    """The process lives seconds after its "Stopped by ... saved a checkpoint"
    (tf.data's teardown, here an atexit sleep): a scheduler's second SIGTERM
    killed it then (143), a second Ctrl-C too (-2), and 42 was lost."""
    slow_exit = (
        "import atexit, runpy, sys, time\n"
        "atexit.register(time.sleep, 3)\n"
        "sys.argv = ['train', *sys.argv[1:]]\n"
        "runpy.run_module('distopt.train', run_name='__main__', alter_sys=True)\n"
    )
    run_dir, log = str(tmp_path / "run"), str(tmp_path / "log")
    args = [*COMMON, "--train_steps=20", f"--model_dir={run_dir}"]
    proc = _start(["-c", slow_exit, *args], log, DISTOPT_FAULT_SIGTERM_AT="5")
    _wait_for(log, "Stopped by SIGTERM at step", proc)
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            break  # Killed by the one before.
        time.sleep(0.2)
    code, out = _finish(proc)
    assert code == EXIT_PREEMPTED, (code, out[-3000:])
    assert _metrics(run_dir)["status"] == "preempted"


def _flip_bit(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def test_damaged_latest_checkpoints_fall_back_to_the_newest_that_loads(tmp_path):
    run_dir = str(tmp_path / "run")
    args = [
        "-m",
        "distopt.train",
        *COMMON,
        "--checkpoint_every=5",
        "--keep_checkpoints=5",
        "--train_steps=25",
        f"--model_dir={run_dir}",
    ]
    proc = run_python(*args, timeout=240, forked=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    intact = _tensors(run_dir)
    ckpt = os.path.join(run_dir, "checkpoints", "ckpt-{}.{}")
    data, index = "data-00000-of-00001", "index"
    _truncate(ckpt.format(25, index), 100)
    _flip_bit(ckpt.format(20, data), os.path.getsize(ckpt.format(20, data)) // 2)
    os.remove(ckpt.format(15, data))
    _truncate(ckpt.format(10, data), 0)

    proc = run_python(*args, timeout=240, forked=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "does not load" in line]
    assert len(warnings) == 4, proc.stderr[-3000:]
    for step, line in zip((25, 20, 15, 10), warnings):
        assert line.startswith("W") and f"ckpt-{step} does not load" in line
        assert "moved aside to" in line
    assert _metrics(run_dir)["start_step"] == 5
    # The state file is rewritten without a deprecated TensorFlow call.
    assert "deprecat" not in proc.stderr.lower(), proc.stderr[-3000:]
    # Moved aside, never deleted: every damaged file is still there.
    corrupt = os.path.join(run_dir, "checkpoints", "corrupt")
    kept = sorted(f for d in os.listdir(corrupt) for f in os.listdir(f"{corrupt}/{d}"))
    assert kept == sorted(
        [f"ckpt-25.{data}", "ckpt-25.index", f"ckpt-20.{data}", "ckpt-20.index"]
        + ["ckpt-15.index", f"ckpt-10.{data}", "ckpt-10.index"]
    )
    # From step 5 again, the same data and state: the same run.
    resumed = _tensors(run_dir)
    assert resumed.keys() == intact.keys()
    for name in intact:
        np.testing.assert_array_equal(resumed[name], intact[name], err_msg=name)


def _mount_small_tmpfs(path, size):
    """Mounts a tmpfs of ``size`` at ``path``; False where not allowed."""
    os.makedirs(path)
    if not shutil.which("mount"):
        return False
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
        capture_output=True,
        check=False,
    )
    return proc.returncode == 0


def test_a_full_disk_at_a_save_is_one_line_and_leaves_the_last_checkpoint(tmp_path):
    disk = str(tmp_path / "disk")
    # Room for one checkpoint of the MLP (10.9 MB with Adam's slots), not two.
    mounted = _mount_small_tmpfs(disk, "16m")
    try:
        run_dir = os.path.join(disk, "run")
        proc = run_python(
            "-m",
            "distopt.train",
            *COMMON,
            "--train_steps=30",
            f"--model_dir={run_dir}",
            timeout=240,
            # No mount allowed: the save of step 20 fails as a full disk does.
            env={} if mounted else {"DISTOPT_FAULT_SAVE_ERROR_AT": "20"},
            forked=True,
        )
        assert proc.returncode == 1, proc.stderr[-3000:]
        errors = _errors(proc.stderr)
        assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert errors[0].startswith(
            f"error: Could not save the checkpoint of step 20 in {run_dir}/checkpoints:"
            " ResourceExhaustedError: "
        ), ("tmpfs" if mounted else "injected", errors)
        assert errors[0].endswith(
            f"The latest checkpoint is still {run_dir}/checkpoints/ckpt-10; free "
            "space and rerun to resume"
        )
        assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == [
            "checkpoint",
            "ckpt-10.data-00000-of-00001",
            "ckpt-10.index",
        ]
        assert _latest_step(run_dir) == 10
    finally:
        if mounted:
            subprocess.run(["umount", disk], check=False)


def test_divergence_stops_with_exit_3_keeping_the_last_good_checkpoint(tmp_path):
    run_dir = str(tmp_path / "run")
    proc = run_python(
        "-m",
        "distopt.train",
        *COMMON,
        "--train_steps=60",
        "--optimizer=gradient_descent",
        # Sane for 10 steps (a good checkpoint), then 1e6: NaN within steps.
        "--lr_schedule=piecewise",
        "--lr_boundaries=10",
        "--lr_values=0.01,1e6",
        f"--model_dir={run_dir}",
        timeout=240,
        forked=True,
    )
    assert proc.returncode == EXIT_DIVERGED, proc.stderr[-3000:]
    errors = _errors(proc.stderr)
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert errors[0].startswith("error: Training diverged: a non-finite loss")
    assert "the checkpoint of step 10, the last good one, is kept" in errors[0]
    metrics = _metrics(run_dir)  # Strict JSON.
    assert metrics["status"] == "diverged" and metrics["test_loss"] is None
    assert metrics["last_checkpoint_step"] == 10 == _latest_step(run_dir)
    for name, value in _tensors(run_dir).items():
        if value.dtype.kind == "f":
            assert np.isfinite(value).all(), name


def test_skip_policy_stops_after_max_skipped_steps_in_a_row(tmp_path):
    from distopt import trainer_faults
    from distopt.trainer import config as config_lib
    from distopt.trainer import run as run_lib

    config = config_lib.TrainConfig(
        model="mlp",
        batch_size=32,
        eval_steps=1,
        log_every=5,
        steps_per_loop=5,
        checkpoint_every=10,
        train_steps=200,
        optimizer="gradient_descent",
        learning_rate=1e6,
        on_nonfinite="skip",
        max_skipped_steps=8,
        model_dir=str(tmp_path / "run"),
    )
    with pytest.raises(trainer_faults.Diverged, match="steps in a row skipped"):
        run_lib.train(config)
    metrics = _metrics(config.model_dir)
    assert metrics["status"] == "diverged" and metrics["skipped_steps"] >= 8
    assert metrics["train_steps"] < 200


def test_one_nonfinite_step_is_divergence_and_skips_stop_at_exactly_the_limit():
    from distopt import optimizers, trainer_faults

    opt = optimizers.GradientDescent(0.1, skip_nonfinite=True)
    stop = trainer_faults.NonfiniteGuard("stop", 3, opt)
    assert stop.diverged(0.0) is None
    stop.watch_loss(tf.constant(float("nan")))  # One bad step in a chunk.
    assert "non-finite loss" in stop.diverged(float(stop.bad.read_value()))

    var = tf.Variable([1.0])
    skip = trainer_faults.NonfiniteGuard("skip", 3, opt)

    def step(grad):
        before = opt.skipped_steps.read_value()
        opt.apply_gradients([tf.constant([grad])], [var])
        skip.count_skips(before)
        return skip.diverged(0.0)

    nan = float("nan")
    # Two skips, a good step (the run restarts), then skips 1, 2 and 3.
    verdicts = [step(g) for g in (nan, nan, 1.0, nan, nan, nan)]
    assert verdicts[:5] == [None] * 5
    assert "3 steps in a row skipped" in verdicts[5]
    np.testing.assert_allclose(var.numpy(), [0.9])


def test_fallback_drops_damaged_checkpoints_from_the_state_file(tmp_path):
    from distopt import checkpoints

    directory = str(tmp_path)
    ckpt = tf.train.Checkpoint(v=tf.Variable([1.0, 2.0]))
    manager = tf.train.CheckpointManager(ckpt, directory, max_to_keep=5)
    for _ in range(3):
        manager.save()
    name = os.path.join(directory, "ckpt-{}")
    assert checkpoints.candidates(directory) == [name.format(i) for i in (3, 2, 1)]
    _truncate(name.format(3) + ".data-00000-of-00001", 0)

    # A worker that is not the chief leaves files and state file alone.
    assert checkpoints.newest_loadable(directory, chief=False) == name.format(2)
    assert tf.train.latest_checkpoint(directory) == name.format(3)
    assert checkpoints.newest_loadable(directory, chief=True) == name.format(2)
    state = tf.train.get_checkpoint_state(directory)
    assert state.model_checkpoint_path == name.format(2)
    assert list(state.all_model_checkpoint_paths) == [name.format(1), name.format(2)]
    assert not os.path.exists(name.format(3) + ".index")
    # Gone from every listing: the next start does not trip over it again.
    assert checkpoints.candidates(directory) == [name.format(2), name.format(1)]
    # And the rewritten state lets the next manager delete them in turn (it
    # kept every checkpoint it listed without a timestamp, filling the disk).
    manager = tf.train.CheckpointManager(ckpt, directory, max_to_keep=2)
    for step in (4, 5):
        manager.save(checkpoint_number=step)
    assert checkpoints.candidates(directory) == [name.format(5), name.format(4)]


def _read_all(pattern):
    """The files matching ``pattern``: {name: content}."""
    found = {}
    for path in tf.io.gfile.glob(pattern):
        with open(path, "rb") as f:
            found[os.path.basename(path)] = f.read()
    return found


@pytest.mark.parametrize("damage", ["truncated_data", "missing_index"])
@pytest.mark.parametrize("state", ["relative_state", "absolute_state"])
@pytest.mark.parametrize(
    "cwd, directory",
    [("", "run/checkpoints"), ("run", "checkpoints"), ("", None)],
    ids=["relative", "relative_elsewhere", "absolute"],
)
def test_fallback_with_a_relative_model_dir(
    tmp_path, monkeypatch, damage, state, cwd, directory
):
    # Every configs/*.cfg names a relative --model_dir. The state file's
    # paths, already joined to it, were joined again (run/checkpoints/run/
    # checkpoints/ckpt-30): a bogus second WARNING and an empty doubled
    # tree; with the index gone, the data file was not moved aside but
    # overwritten by the resumed run's ckpt-30, and ckpt-10 was deleted.
    from google.protobuf import text_format

    from distopt import checkpoints

    monkeypatch.chdir(tmp_path)
    full = str(tmp_path / "run" / "checkpoints")
    ckpt = tf.train.Checkpoint(v=tf.Variable(tf.range(256.0)))
    # Saved as the trainer saves: a relative directory, 3 kept.
    manager = tf.train.CheckpointManager(ckpt, "run/checkpoints", max_to_keep=3)
    for step in (10, 20, 30):
        manager.save(checkpoint_number=step)
    if state == "absolute_state":  # As a fallback in an absolute dir wrote it.
        text = text_format.MessageToString(tf.train.get_checkpoint_state(full))
        with open(f"{full}/checkpoint", "w") as f:
            f.write(text)
    data = f"{full}/ckpt-30.data-00000-of-00001"
    if damage == "truncated_data":
        _truncate(data, os.path.getsize(data) // 2)
    else:
        os.remove(f"{full}/ckpt-30.index")
    damaged = _read_all(f"{full}/ckpt-30.*")
    # Read from another cwd than the state file was written from, or not.
    monkeypatch.chdir(tmp_path / cwd)
    directory = directory or full
    warnings = []
    monkeypatch.setattr(
        checkpoints.logging, "warning", lambda msg, *a: warnings.append(msg % a)
    )

    # Each checkpoint once, however spelt (the resume guards list them too).
    assert [os.path.abspath(p) for p in checkpoints.candidates(directory)] == [
        f"{full}/ckpt-{step}" for step in (30, 20, 10)
    ]
    chosen = checkpoints.newest_loadable(directory, chief=True)
    assert os.path.abspath(chosen) == f"{full}/ckpt-20"
    assert len(warnings) == 1 and "ckpt-30 does not load" in warnings[0], warnings
    with open(f"{full}/checkpoint") as f:  # Relative: the run can be moved.
        assert str(tmp_path) not in f.read()
    moved_to = os.path.abspath(warnings[0].split("moved aside to ")[1].split(",")[0])
    assert os.path.dirname(moved_to) == f"{full}/corrupt"
    # Moved aside whole, and nothing else created (no doubled directory).
    assert _read_all(f"{moved_to}/*") == damaged
    dirs = sorted(os.path.relpath(d, tmp_path) for d, _, _ in os.walk(tmp_path))
    assert dirs == [".", "run", "run/checkpoints", "run/checkpoints/corrupt"] + [
        os.path.relpath(moved_to, tmp_path)
    ]
    # The state file as rewritten reads the same from any cwd and spelling.
    monkeypatch.chdir(tmp_path)
    for where in (full, "run/checkpoints"):
        chosen = checkpoints.newest_loadable(where, chief=True)
        assert os.path.abspath(chosen) == f"{full}/ckpt-20"
    assert len(warnings) == 1, warnings
    # The resumed run saves ckpt-30 again and keeps 3: ckpt-10 stays.
    monkeypatch.chdir(tmp_path / cwd)
    manager = tf.train.CheckpointManager(ckpt, directory, max_to_keep=3)
    manager.save(checkpoint_number=30)
    assert sorted(tf.io.gfile.glob(f"{full}/ckpt-*.index")) == [
        f"{full}/ckpt-{step}.index" for step in (10, 20, 30)
    ]
    assert _read_all(f"{moved_to}/*") == damaged


def test_a_save_failing_at_its_state_file_names_the_checkpoint_before_it(tmp_path):
    # The manager writes the files, takes the new one as its latest, then
    # writes the state file: a disk turning read-only there (seen 12-05)
    # made the message name the checkpoint whose files were just deleted.
    from distopt import checkpoints

    directory = str(tmp_path)
    writer = checkpoints.CheckpointWriter(
        tf.train.Checkpoint(v=tf.Variable(1.0)), directory, True, 0, 3
    )
    writer.save(10)
    save = writer.manager.save

    def save_then_fail(checkpoint_number):
        save(checkpoint_number=checkpoint_number)
        raise tf.errors.PermissionDeniedError(None, None, "Read-only file system")

    writer.manager.save = save_then_fail
    with pytest.raises(checkpoints.CheckpointSaveError) as info:
        writer.save(20)
    assert str(info.value).endswith(
        f"The latest checkpoint is still {directory}/ckpt-10; free space and "
        "rerun to resume"
    )
    assert not [n for n in os.listdir(directory) if n.startswith("ckpt-20")]


FAKE_WORKER = """
import json, os, signal, sys, time
index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
# Like a TensorFlow worker before its trainer installs a handler: SIGTERM
# only logged.
signal.signal(signal.SIGTERM, lambda *a: print("SIGTERM caught", flush=True))
print(f"worker {index} up", flush=True)
if index == 1:
    time.sleep(1)
    sys.exit(5)
time.sleep(120)
"""


def test_launcher_ends_within_seconds_of_a_failure_and_binds_loopback(tmp_path):
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    start = time.time()
    proc = run_python(
        LAUNCHER,
        "--workers=2",
        f"--command={sys.executable} {script}",
        "--grace_seconds=100",
        timeout=90,
    )
    assert proc.returncode == 5, proc.stdout
    # Not the 100 s grace: the survivor is killed at once.
    assert time.time() - start < 60
    assert "worker 1 failed with status 5" in proc.stdout
    assert "workers on 127.0.0.1 ports" in proc.stdout


def _launch(model_dir, log, *extra, env=None, workers=2):
    return _start(
        [
            LAUNCHER,
            f"--workers={workers}",
            "--",
            *COMMON,
            "--sync=local_sgd",
            "--sync_period=4",
            "--train_steps=40",
            f"--model_dir={model_dir}",
            *extra,
        ],
        log,
        fresh=True,
        **(env or {}),
    )


@pytest.mark.slow
def test_sigterm_to_the_launcher_and_elastic_resume(tmp_path):
    """2 workers (local SGD, k=4), SIGTERM to the launcher: both workers save
    the same step and exit 42. Resumed on 2 workers it equals an uninterrupted
    run bit for bit; resumed on 1 worker and on mirrored 2 it completes.
    """
    straight_dir, run_dir = str(tmp_path / "straight"), str(tmp_path / "run")
    straight = _launch(straight_dir, str(tmp_path / "straight.log"))
    log = str(tmp_path / "stopped.log")
    stopped = _launch(run_dir, log, env={"DISTOPT_FAULT_CHUNK_DELAY": "0.5"})
    try:
        _wait_for(log, "[worker 0] ", stopped)
        _wait_for(log, "step 10/40", stopped)
        os.kill(stopped.pid, signal.SIGTERM)
        code, out = _finish(stopped)
    finally:
        if stopped.poll() is None:
            stopped.kill()
    assert code == EXIT_PREEMPTED, out[-4000:]
    assert "[launcher] SIGTERM: forwarding SIGTERM to the workers" in out
    metrics = _metrics(run_dir)
    reached = metrics["train_steps"]
    assert metrics["status"] == "preempted" and 10 <= reached < 40
    assert _latest_step(run_dir) == reached
    for worker in (0, 1):
        assert f"[worker {worker}] " in out
        assert f"Stopped by SIGTERM at step {reached} of 40" in out
    assert out.count(f"Stopped by SIGTERM at step {reached} of 40") == 2

    one_dir, mirrored_dir = str(tmp_path / "one"), str(tmp_path / "mirrored")
    shutil.copytree(run_dir, one_dir)
    shutil.copytree(run_dir, mirrored_dir)
    assert _finish(straight)[0] == 0
    resumed = _launch(run_dir, str(tmp_path / "resumed.log"))
    one = _launch(one_dir, str(tmp_path / "one.log"), workers=1)
    code, out = _finish(resumed)
    assert code == 0, out[-4000:]
    _assert_bit_identical(run_dir, straight_dir)
    code, out = _finish(one)
    assert code == 0, out[-4000:]
    if reached % 4:  # Stopped mid-period: the replicas' copies are averaged.
        assert "every replica starts from their average" in out
    proc = run_python(
        "-m",
        "distopt.train",
        *COMMON,
        "--sync=local_sgd",
        "--sync_period=4",
        "--train_steps=40",
        "--strategy=mirrored",
        "--virtual_devices=2",
        f"--model_dir={mirrored_dir}",
        timeout=240,
        forked=True,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for model_dir, replicas in ((run_dir, 2), (one_dir, 1), (mirrored_dir, 2)):
        metrics = _metrics(model_dir)
        assert metrics["status"] == "completed", model_dir
        assert (metrics["start_step"], metrics["train_steps"]) == (reached, 40)
        assert metrics["num_replicas"] == replicas


@pytest.mark.slow  # About 20 s of tracing and compiling, 2 strategies.
def test_diloco_stopped_mid_period_on_2_replicas_resumes_on_1(tmp_path, monkeypatch):
    """In process (cheaper): SIGTERM through the test hook, the real handler.

    One replica runs the whole step as one XLA function, which used to fail
    on the first step after this resume.
    """
    from distopt import trainer_faults
    from distopt.trainer import config as config_lib
    from distopt.trainer import run as run_lib

    def config(**overrides):
        values = {
            "model": "mlp",
            "batch_size": 32,
            "eval_steps": 1,
            "log_every": 5,
            "steps_per_loop": 5,
            "checkpoint_every": 10,
            "train_steps": 8,
            "sync": "diloco",
            "sync_period": 4,
            "model_dir": str(tmp_path / "run"),
        }
        return config_lib.TrainConfig(**{**values, **overrides})

    monkeypatch.setenv(trainer_faults.SIGTERM_AT_ENV, "1")
    with pytest.raises(trainer_faults.Preempted, match="at step 5 of 8"):
        run_lib.train(config(strategy="mirrored", virtual_devices=2))
    assert _metrics(str(tmp_path / "run"))["status"] == "preempted"
    assert _latest_step(str(tmp_path / "run")) == 5  # Mid-period: 5 % 4 == 1.
    monkeypatch.delenv(trainer_faults.SIGTERM_AT_ENV)
    metrics = run_lib.train(config())
    assert metrics["status"] == "completed" and metrics["start_step"] == 5
    assert metrics["num_replicas"] == 1 and metrics["train_steps"] == 8
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # Handler removed.
