"""A process that has imported TensorFlow once and forks a child per command.

Many subprocess tests start ``python -m distopt.train ...`` (or a harness
script) to see what a process does: exit codes, signals, files left on disk,
two runs at once. Each paid for importing TensorFlow, often more than its
short run: 3 runs of a 10-step MLP took 15.5 CPU-s as new interpreters and
9.4 forked from here, the server's start included (2026-12-05). This
server imports TensorFlow (nothing
more: no runtime, no device, no tensor) and forks a child per request; the
child takes the caller's stdin/stdout/stderr, working directory,
environment and arguments, and runs the command as ``python`` would.

What stays the same as a new interpreter: its own pid (signals reach it
alone), its exit status or terminating signal, its output, its files, its
atexit handlers, its own TensorFlow runtime (created after the fork; the
logical-device split and ``TF_CONFIG`` are read then),
``start_new_session``. What does not: the interpreter's start (the time to
the first step, imports made before TensorFlow), environment variables
read while TensorFlow imports (``TF_CPP_MIN_LOG_LEVEL`` is 2 here), and
start-up noise. Tests of those start a new interpreter (``conftest.run_python``
without ``forked=True``), as do launchers, which start their own workers.
test_forkserver.py compares the two ways case by case.

Forking after ``import tensorflow`` is safe because the import starts no
TensorFlow thread (the one other thread is OpenBLAS's pool, which
shuts down around a fork and restarts in the child).
The server itself is single-threaded: children are reaped on ``SIGCHLD``.

Protocol (a Unix socket, one connection per child): the client sends a JSON
request (argv, cwd, env, start_new_session) with three file descriptors
(stdin, stdout, stderr); the server answers ``{"pid": ...}`` and, when the
child ends, ``{"status": <waitpid status>}``.
"""

from __future__ import annotations

import array
import atexit
import gc
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

_MAX_REQUEST = 1 << 20


# --- The server ---------------------------------------------------------------


def _serve(path: str) -> None:
    """Accepts requests on the socket ``path`` until stdin closes."""
    # The repository, not this tests/ directory, as a fresh `python -m`
    # from the repository would have it (each child sets its own entry 0).
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    from distopt import quiet

    quiet.import_tensorflow()  # The point of the server: once, here.
    # Out of the collector's sight: a child's first collection would
    # otherwise touch, and so copy, every page of the inherited heap.
    gc.freeze()

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(wake_r, selectors.EVENT_READ, "reap")
    # The client holds our stdin: when it exits (even by SIGKILL), we do.
    selector.register(sys.stdin, selectors.EVENT_READ, "parent")
    waiting: dict[int, socket.socket] = {}
    print("ready", flush=True)
    # Nobody reads this pipe again: a later write must not fill it and stall.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    while True:
        for key, _ in selector.select():
            if key.data == "accept":
                conn, _ = listener.accept()
                pid, argv = _fork_child(conn, listener, selector, wake_r, wake_w)
                if pid == 0:
                    _run(argv)  # The child: never returns.
                waiting[pid] = conn
            elif key.data == "reap":
                os.read(wake_r, 4096)
                _reap(waiting)
            else:
                for pid in list(waiting):
                    _kill_quietly(pid)
                os.unlink(path)
                return


def _fork_child(conn, listener, selector, wake_r, wake_w):
    """Forks for one request: (the child's pid, argv), or (0, argv) in the child."""
    fds = array.array("i")
    message, ancillary, _, _ = conn.recvmsg(
        _MAX_REQUEST, socket.CMSG_SPACE(3 * fds.itemsize)
    )
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    request = json.loads(message)
    pid = os.fork()
    if pid:
        for fd in fds:
            os.close(fd)
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        return pid, request["argv"]
    # The child: nothing of the server's loop survives.
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    selector.close()
    for s in (listener, conn):
        s.close()
    for fd in (wake_r, wake_w):
        os.close(fd)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    if request["start_new_session"]:
        os.setsid()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    tempfile.tempdir = None  # As a new interpreter: TMPDIR read when needed.
    return 0, request["argv"]


def _run(argv):
    """Runs ``python *argv`` in this (forked) process; never returns."""
    try:
        _run_main(argv)
        code = 0
    except SystemExit as e:
        code = _exit_code(e.code)
    except KeyboardInterrupt:
        # As the interpreter does: die of SIGINT.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        code = 1
    except BaseException:  # noqa: BLE001 (an uncaught exception, as python shows it)
        sys.excepthook(*sys.exc_info())
        code = 1
    # The interpreter's shutdown, but for freeing every object: that would
    # write to (and so copy) every inherited page, about 1 CPU-s a child.
    threading._shutdown()  # Wait for non-daemon threads, as python does.
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 120  # As python does when its stdout cannot flush.
    os._exit(code)


def _run_main(argv):
    import runpy

    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        sys.path[0] = os.getcwd()
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif argv[0] == "-c":
        sys.argv = ["-c", *argv[2:]]
        sys.path[0] = ""
        # What `python -c` does with its code.
        exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})  # noqa: S102
    else:
        script = os.path.abspath(argv[0])
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(script)
        runpy.run_path(script, run_name="__main__")


def _exit_code(code):
    """The exit status of ``sys.exit(code)``, printing a message as python does."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _reap(waiting):
    while waiting:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = waiting.pop(pid, None)
        if conn is not None:
            try:
                conn.sendall(json.dumps({"status": status}).encode() + b"\n")
            except OSError:
                pass  # The client went away.
            conn.close()


def _kill_quietly(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --- The client ---------------------------------------------------------------


class ForkedProcess:
    """The part of ``subprocess.Popen`` the tests use, for a forked child."""

    def __init__(self, conn: socket.socket, argv, captured=(None, None)):
        self.args = argv
        self._captured = captured
        self._conn = conn
        self._reader = conn.makefile("rb")
        self.pid = json.loads(self._reader.readline())["pid"]
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            ready = selectors.DefaultSelector()
            ready.register(self._conn, selectors.EVENT_READ)
            if ready.select(timeout=0):
                self._collect()
            ready.close()
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None:
            ready = selectors.DefaultSelector()
            ready.register(self._conn, selectors.EVENT_READ)
            events = ready.select(timeout=timeout)
            ready.close()
            if not events:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._collect()
        return self.returncode

    def _collect(self):
        line = self._reader.readline()
        if not line:
            raise RuntimeError("the fork server went away before its child ended")
        status = json.loads(line)["status"]
        self.returncode = os.waitstatus_to_exitcode(status)
        self._reader.close()
        self._conn.close()

    def communicate(self, timeout=None):
        """Waits; returns (stdout, stderr) as text where they were PIPE, else None."""
        self.wait(timeout)
        texts = []
        for f in self._captured:
            if f is None:
                texts.append(None)
                continue
            f.seek(0)
            texts.append(f.read().decode(errors="replace"))
            f.close()
        return tuple(texts)

    def send_signal(self, sig):
        if self.returncode is None:
            os.kill(self.pid, sig)

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.returncode is None:
            self.kill()
            self.wait()


class ForkServer:
    """Starts the server on first use (one per test process) and talks to it.

    Args:
      prefix: a command the server runs under, which must ``exec`` it (so
        that ``pid`` is the server's): ``["unshare", "--user",
        "--map-root-user", "--mount"]`` makes its children root of a mount
        namespace of their own, shared with whatever ``nsenter`` puts there.
    """

    def __init__(self, prefix=()):
        self._prefix = list(prefix)
        self._proc = None
        self._path = None

    def start(self):
        """Starts the server unless it runs (``popen`` and ``run`` call this)."""
        if self._proc is not None and self._proc.poll() is None:
            return
        self._path = os.path.join(tempfile.mkdtemp(prefix="forkserver-"), "socket")
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        self._proc = subprocess.Popen(
            [*self._prefix, sys.executable, os.path.abspath(__file__), self._path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        line = self._proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"the fork server did not start: {line!r}")
        atexit.register(self.close)

    @property
    def pid(self):
        """The server's pid, once started (None before)."""
        return None if self._proc is None else self._proc.pid

    def close(self):
        if self._proc is not None and self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.wait(timeout=30)
        if self._path is not None:
            shutil.rmtree(os.path.dirname(self._path), ignore_errors=True)

    def popen(
        self,
        argv,
        *,
        cwd,
        env,
        stdin=None,
        stdout=None,
        stderr=None,
        start_new_session=False,
    ) -> ForkedProcess:
        """Like ``subprocess.Popen([sys.executable, *argv], ...)``.

        ``stdin``, ``stdout`` and ``stderr`` are open files or
        ``subprocess.DEVNULL`` (None: /dev/null for stdin, this process's own
        for the others); ``stderr`` may be ``subprocess.STDOUT``.
        """
        self.start()
        devnull = open(os.devnull, "r+b")  # noqa: SIM115 (closed below)

        def fd(target, default):
            if target is None:
                return default.fileno()
            return devnull.fileno() if target == subprocess.DEVNULL else target.fileno()

        # PIPE: a temporary file instead (read by `communicate`), which
        # cannot fill up and stall the child.
        captured = [
            tempfile.TemporaryFile() if target == subprocess.PIPE else None  # noqa: SIM115 (closed by communicate)
            for target in (stdout, stderr)
        ]
        try:
            ins = fd(stdin, devnull)
            out = fd(captured[0] or stdout, sys.stdout)
            if stderr == subprocess.STDOUT:
                err = out
            else:
                err = fd(captured[1] or stderr, sys.stderr)
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(self._path)
            request = {
                "argv": list(argv),
                "cwd": os.path.abspath(cwd),
                "env": dict(env),
                "start_new_session": start_new_session,
            }
            socket.send_fds(conn, [json.dumps(request).encode()], [ins, out, err])
            return ForkedProcess(conn, argv, captured)
        finally:
            devnull.close()

    def run(self, argv, *, cwd, env, timeout) -> subprocess.CompletedProcess:
        """Like ``subprocess.run(..., capture_output=True, text=True)``."""
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = self.popen(argv, cwd=cwd, env=env, stdout=out, stderr=err)
            deadline = time.monotonic() + timeout
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise
            texts = []
            for f in (out, err):
                f.seek(0)
                texts.append(f.read().decode(errors="replace"))
        return subprocess.CompletedProcess(argv, proc.returncode, *texts)


if __name__ == "__main__":
    _serve(sys.argv[1])
