"""The fork server (forkserver.py) runs a command as a new interpreter would.

Each case runs the same code both ways, forked and as ``python -c``, and
compares what a caller sees: the exit status, the last line of stderr, the
output. The subprocess tests rely on this to keep their meaning.
"""

import os
import signal
import subprocess
import textwrap
import time

import pytest
from conftest import FORK_SERVER, python_env, run_python, start_python

CASES = {
    "falls_through": "print('out')",
    "exit_7": "import sys; sys.exit(7)",
    "exit_message": "import sys; sys.exit('a message')",
    "uncaught": "raise ValueError('boom')",
    "sigterm_itself": "import os, signal; os.kill(os.getpid(), signal.SIGTERM)",
    "unflushed_output": "import sys; sys.stdout.write('no newline')",
    "atexit": "import atexit; atexit.register(print, 'at exit')",
}


@pytest.mark.parametrize("name", CASES)
def test_forked_equals_a_new_interpreter(name):
    code = CASES[name]
    fresh = run_python("-c", code, timeout=60)
    forked = run_python("-c", code, timeout=60, forked=True)
    assert forked.returncode == fresh.returncode
    assert forked.stdout == fresh.stdout
    assert (
        forked.stderr.strip().splitlines()[-1:]
        == (fresh.stderr.strip().splitlines()[-1:])
    )


def test_the_child_has_the_callers_arguments_and_a_runtime_of_its_own(tmp_path):
    code = textwrap.dedent(
        """
        import os, sys
        print(os.getcwd(), os.environ["FORKSERVER_PROBE"], sys.argv[1:])
        print("tensorflow" in sys.modules)  # imported once, by the server
        from distopt import distribute
        # Raises if the server had started TensorFlow's runtime before the fork.
        print(distribute.logical_cpu_devices(2))
        """
    )
    proc = start_python(
        ["-c", code, "a", "b"],
        cwd=tmp_path,
        env=python_env(FORKSERVER_PROBE="here"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.splitlines() == [
        f"{tmp_path} here ['a', 'b']",
        "True",
        "['/device:CPU:0', '/device:CPU:1']",
    ]
    assert proc.pid not in (os.getpid(), FORK_SERVER.pid)


def test_a_signal_reaches_the_child_alone_in_its_own_session(tmp_path):
    done = tmp_path / "done"
    code = textwrap.dedent(
        f"""
        import atexit, os, signal, sys, time
        atexit.register(lambda: open({str(done)!r}, "w").write(str(os.getsid(0))))
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(42))
        print("ready", flush=True)
        time.sleep(60)
        """
    )
    log = tmp_path / "log"
    with open(log, "w") as f:
        proc = start_python(["-c", code], stdout=f, start_new_session=True)
        while "ready" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 42
    # Its own session (as start_new_session gives), and its atexit ran.
    assert done.read_text() == str(proc.pid)


def test_a_script_runs_as_main_with_its_directory_first_on_the_path(tmp_path):
    script = tmp_path / "script.py"
    script.write_text("import sys\nprint(__name__, sys.path[0], sys.argv)\n")
    fresh = run_python(str(script), "x", timeout=60)
    forked = run_python(str(script), "x", timeout=60, forked=True)
    assert fresh.stdout == f"__main__ {tmp_path} [{str(script)!r}, 'x']\n"
    assert (forked.returncode, forked.stdout) == (0, fresh.stdout), forked.stderr
