"""The trainer when its disk is full or read-only, or it is killed mid-save.

Every failure to write (the lock, a checkpoint, ``run_config.json``,
``metrics.json``) must be one ``error:`` line, the last one, exit status 1,
with nothing half-written left and nothing that blocks the rerun; the rerun,
once the space is back, must finish the run.

A small tmpfs stands in for the disk. Mounting one needs no privilege inside
a new user and mount namespace (``unshare --user --map-root-user
--mount``); where namespaces are unavailable the tests skip. Root ignores
permission bits, so "read-only" is a read-only mount, never a chmod.
"""

import json
import os
import shutil
import subprocess
import sys

import forkserver
import pytest
from conftest import REPO, python_env, run_python

# LeNet: about 0.75 MB per checkpoint with Adam's slots, so a few MB hold a run.
TRAIN = (
    f"{sys.executable} -m distopt.train --model=lenet --batch_size=32 "
    "--eval_steps=4 --log_every=5 --steps_per_loop=2 --checkpoint_every=10 "
    "--train_steps=20"
)


def _in_namespace(script, timeout=400):
    """Runs ``sh -c script`` as root of a new user and mount namespace."""
    return subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )


@pytest.fixture
def disk(tmp_path):
    """A mount point for a small tmpfs; skips where none can be mounted."""
    if not shutil.which("unshare"):
        pytest.skip("no unshare(1): cannot mount a small filesystem here")
    path = tmp_path / "disk"
    path.mkdir()
    probe = _in_namespace(f"mount -t tmpfs -o size=1m tmpfs {path}", timeout=30)
    if probe.returncode:
        pytest.skip(f"user and mount namespaces unavailable: {probe.stderr.strip()}")
    return path


#: The disks' namespace: the trainer runs fork from a server (forkserver.py)
#: that is root of a user and mount namespace of its own.
_UNSHARE_MOUNT = ["unshare", "--user", "--map-root-user", "--mount"]


class _Namespace:
    """Shell commands and trainer runs in one user and mount namespace."""

    def __init__(self):
        # Each run was a new interpreter in a namespace of its own (`unshare
        # ... sh -c`): six imports of TensorFlow, about 3.5 CPU-s each.
        # Forked, a run sees the mounts made here (`sh`, by `nsenter`) and is
        # otherwise the same process: root here, its own pid, exit status and
        # files. A fresh start is not the point: a run starts on a disk
        # already full, or one made read-only under it.
        self.server = forkserver.ForkServer(prefix=_UNSHARE_MOUNT)

    def sh(self, script, timeout=400):
        """Runs ``sh -c script`` in the namespace; checks it exits 0."""
        self.server.start()
        proc = subprocess.run(
            ["nsenter", f"--target={self.server.pid}", "--user", "--mount"]
            + ["--preserve-credentials", "sh", "-c", script],
            check=False,
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=timeout,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def start(self, log, model_dir, **env):
        """Starts one trainer run in the namespace, its output into ``log``."""
        with open(log, "w") as out:
            proc = self.server.popen(
                [*TRAIN.split()[1:], f"--model_dir={model_dir}"],
                cwd=REPO,
                env=python_env(**env),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        proc.log = log
        return proc

    def train(self, log, model_dir, **env):
        """One trainer run in the namespace: (exit status, its output lines)."""
        return _report(self.start(log, model_dir, **env))


@pytest.fixture(scope="module")
def namespace():
    """One namespace for this module's runs (each test mounts its own disk)."""
    if not shutil.which("nsenter"):
        pytest.skip("no nsenter(1): cannot run in the disks' namespace")
    ns = _Namespace()
    yield ns
    ns.server.close()


def _report(proc, timeout=400):
    """(exit status, output lines) of a trainer run, once it has ended."""
    proc.wait(timeout=timeout)
    with open(proc.log) as f:
        return proc.returncode, f.read().splitlines()


def _saved_then(namespace, log, run, step, script):
    """A paced run in ``run``; ``script`` once ckpt-``step`` is saved.

    Saved means named in the state file, which is written after the
    checkpoint's files. Returns the run's (exit status, output lines).
    """
    proc = namespace.start(log, run, DISTOPT_FAULT_CHUNK_DELAY="0.5")
    try:
        namespace.sh(
            f"while ! grep -qs 'ckpt-{step}\"' {run}/checkpoints/checkpoint; "
            f"do sleep 0.05; done; {script}"
        )
        return _report(proc)
    finally:
        if proc.poll() is None:
            proc.kill()


def _assert_one_error_last(lines, starts):
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines[-12:]
    assert errors[0].startswith(starts), errors
    assert not [line for line in lines if "Traceback" in line], lines


def _metrics(model_dir):
    with open(os.path.join(model_dir, "metrics.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_full_disk_at_start_is_one_line_and_leaves_no_lock(disk, namespace, tmp_path):
    logs, run = tmp_path, f"{disk}/run"
    namespace.sh(
        f"mount -t tmpfs -o size=4m tmpfs {disk} && "
        f"{{ head -c 5m /dev/zero > {disk}/filler 2>/dev/null; true; }}"
    )
    status, lines = namespace.train(logs / "full.log", run)
    left = namespace.sh(f"ls -A {run}; rm {disk}/filler")
    rerun = namespace.train(logs / "rerun.log", run)
    after = namespace.sh(f"ls -A {run}")
    assert status == 1, lines[-12:]
    _assert_one_error_last(
        lines, f"error: Could not write the lock file {run}/LOCK: No space left"
    )
    # No empty LOCK (it would block every rerun): nothing at all.
    assert left.split() == []
    status, lines = rerun
    assert status == 0, lines[-12:]
    assert "LOCK" not in after.split()


@pytest.mark.slow
def test_model_dir_read_only_mid_run_is_one_line_and_the_rerun_resumes(
    disk, namespace, tmp_path
):
    logs, run = tmp_path, f"{disk}/run"
    # A read-only bind mount over the tmpfs once ckpt-10 is saved: the files
    # the trainer holds open stay writable, as when a mount turns read-only
    # under a running job; every new file fails. Saved means named in the
    # state file, which is written after ckpt-10.index (waiting for the
    # index alone, the state file's write could fail instead, 12-05).
    namespace.sh(f"mount -t tmpfs -o size=8m tmpfs {disk}")
    status, lines = _saved_then(
        namespace,
        logs / "ro.log",
        run,
        10,
        f"mount --bind {disk} {disk} && mount -o remount,bind,ro {disk}",
    )
    namespace.sh(f"umount {disk}")
    rerun = namespace.train(logs / "rerun.log", run)
    left = namespace.sh(f"ls -A {run}/checkpoints").split()
    assert status == 1, lines[-12:]
    _assert_one_error_last(
        lines, f"error: Could not save the checkpoint of step 20 in {run}/checkpoints"
    )
    assert "Read-only file system" in lines[-1]
    status, lines = rerun
    assert status == 0, lines[-12:]
    assert any("resuming at step 10 of 20" in line for line in lines), lines
    assert any("Taking over the stale lock" in line for line in lines), lines
    assert left == [
        "checkpoint",
        "ckpt-10.data-00000-of-00001",
        "ckpt-10.index",
        "ckpt-20.data-00000-of-00001",
        "ckpt-20.index",
    ]


@pytest.mark.slow
def test_full_disk_at_the_final_evaluation_leaves_no_metrics_and_reruns(
    disk, namespace, tmp_path
):
    logs, run = tmp_path, f"{disk}/run"
    # The disk fills while the final evaluation runs (after the last save):
    # its record (evaluations.json) cannot be written, nor then metrics.json.
    namespace.sh(f"mount -t tmpfs -o size=8m tmpfs {disk}")
    status, lines = _saved_then(
        namespace,
        logs / "full.log",
        run,
        20,
        f"head -c 9m /dev/zero > {disk}/filler 2>/dev/null; true",
    )
    left = namespace.sh(f"ls -A {run}; rm {disk}/filler")
    rerun = namespace.train(logs / "rerun.log", run)
    metrics = json.loads(namespace.sh(f"cat {run}/metrics.json"))
    assert status == 1, lines[-12:]
    _assert_one_error_last(lines, f"error: Could not write {run}/evaluations.json: ")
    assert "No space left on device" in lines[-1]
    # No metrics.json, no evaluations.json, no temporary file; lock released.
    assert sorted(left.split()) == [
        "checkpoints",
        "eval",
        "run_config.json",
        "train",
        "training_clock.json",
    ]
    status, lines = rerun
    assert status == 0, lines[-12:]
    assert metrics["status"] == "completed" and metrics["train_steps"] == 20
    assert metrics["start_step"] == 20


def test_kill_9_during_a_save_leaves_nothing_after_the_rerun(tmp_path):
    run = tmp_path / "run"
    train = TRAIN.split()[1:] + [f"--model_dir={run}"]

    def trainer(**env):
        # Forked (no mount namespace needed): killed -9, the lock names a
        # pid that is gone, as it would for a new interpreter.
        return run_python(*train, timeout=300, env=env, forked=True)

    killed = trainer(DISTOPT_FAULT_KILL_IN_SAVE_AT="20")
    assert killed.returncode == -9, killed.stderr[-2000:]
    # What the killed save left: its temporary files, and the lock.
    assert (run / "checkpoints" / "ckpt-20_temp").is_dir()
    assert os.listdir(run / "checkpoints" / "ckpt-20_temp")
    assert (run / "LOCK").exists()
    rerun = trainer()
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "Removed 1 leftover(s) of an unfinished save: ckpt-20_temp" in rerun.stderr
    assert sorted(os.listdir(run / "checkpoints")) == [
        "checkpoint",
        "ckpt-10.data-00000-of-00001",
        "ckpt-10.index",
        "ckpt-20.data-00000-of-00001",
        "ckpt-20.index",
    ]
    assert sorted(os.listdir(run)) == [
        "checkpoints",
        "eval",
        "evaluations.json",
        "metrics.json",
        "run_config.json",
        "train",
        "training_clock.json",
    ]
    assert _metrics(run)["start_step"] == 10


def test_an_empty_or_damaged_lock_is_stale_and_release_tolerates_errors(
    tmp_path, monkeypatch
):
    from distopt import checkpoints

    for content in ("", '{"host": "'):
        (tmp_path / "LOCK").write_text(content)
        lock = checkpoints.RunLock(str(tmp_path))
        lock.acquire()  # Taken over: no trainer writes an empty lock.
        with open(tmp_path / "LOCK") as f:
            assert json.load(f)["pid"] == os.getpid()
        lock.release()
        assert not (tmp_path / "LOCK").exists()
    # A live process's lock (the parent of this one, on this host) holds.
    (tmp_path / "LOCK").write_text(
        json.dumps({"host": os.uname().nodename, "pid": os.getppid()})
    )
    with pytest.raises(checkpoints.LockError, match="in use by another trainer"):
        checkpoints.RunLock(str(tmp_path)).acquire()
    os.remove(tmp_path / "LOCK")
    # A lock that cannot be removed (the directory turned read-only): a
    # warning, not a second error after the run's own.
    lock = checkpoints.RunLock(str(tmp_path))
    lock.acquire()

    def read_only(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(checkpoints.os, "remove", read_only)
    lock.release()
    monkeypatch.undo()
    assert (tmp_path / "LOCK").exists()
    # ... and the next trainer in this process takes it over.
    checkpoints.RunLock(str(tmp_path)).acquire()


def test_a_run_removes_only_the_directories_it_made(tmp_path, monkeypatch):
    """`made_dirs`, shared by the run lock and the trainer's run directory."""
    from distopt import checkpoints, made_dirs

    (tmp_path / "a").mkdir()
    made = made_dirs.make_dirs(str(tmp_path / "a" / "b" / "c"))
    assert made == [str(tmp_path / "a" / "b"), str(tmp_path / "a" / "b" / "c")]
    assert made_dirs.make_dirs(str(tmp_path / "a" / "b")) == []  # Exists.
    # Something of someone's in b: c (empty) goes, b and a stay.
    (tmp_path / "a" / "b" / "theirs").write_text("x")
    made_dirs.remove_if_empty(made)
    assert sorted(os.listdir(tmp_path / "a" / "b")) == ["theirs"]
    # A file on the path: named, nothing created.
    with pytest.raises(NotADirectoryError) as e:
        made_dirs.make_dirs(str(tmp_path / "a" / "b" / "theirs" / "d"))
    assert e.value.filename == str(tmp_path / "a" / "b" / "theirs")
    # A failure half-way (a full disk at the second level): the first level,
    # made by this call, is removed again; the error names the directory.
    real_mkdir = os.mkdir

    def full_below_x(path, *args):
        if os.path.basename(os.path.dirname(path)) == "x":
            raise OSError(28, "No space left on device", path)
        real_mkdir(path, *args)

    monkeypatch.setattr(made_dirs.os, "mkdir", full_below_x)
    with pytest.raises(OSError, match="No space") as e:
        made_dirs.make_dirs(str(tmp_path / "x" / "y" / "z"))
    assert e.value.filename == str(tmp_path / "x" / "y")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["a"]
    # The lock under a file: one line naming it; a lock whose run wrote
    # nothing else removes the directories it made, and only those.
    with pytest.raises(checkpoints.LockError, match="Not a directory"):
        checkpoints.RunLock(str(tmp_path / "a" / "b" / "theirs" / "run")).acquire()
    lock = checkpoints.RunLock(str(tmp_path / "a" / "new" / "run"))
    lock.acquire()
    assert os.path.exists(tmp_path / "a" / "new" / "run" / "LOCK")
    lock.release()
    assert sorted(os.listdir(tmp_path / "a")) == ["b"]
