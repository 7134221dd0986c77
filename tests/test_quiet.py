"""distopt.quiet: which log lines the command lines show at each verbosity.

The whole effect on a real run (no C++ start-up block, no duplicated line,
no "Reduce to" line) is checked on the README's command in test_readme.py.
"""

import logging
import os
import subprocess
import sys

import pytest
from conftest import REPO

from distopt import quiet

REDUCE = "Reduce to /job:localhost/replica:0/task:0/device:CPU:0 then broadcast"
RETRACING = "5 out of the last 5 calls to <function f> triggered tf.function retracing"


@pytest.fixture
def emit(caplog):
    """Logs the same lines after configure_logging(verbosity); returns the shown."""
    caplog.set_level(logging.INFO)
    tf_logger = logging.getLogger("tensorflow")
    absl_logger = logging.getLogger("absl")
    saved = tf_logger.handlers[:], tf_logger.filters[:], tf_logger.propagate
    saved_absl = absl_logger.filters[:], absl_logger.level
    saved_tf_level = tf_logger.level
    # absl sets its logger's level from --verbosity, which other tests parse
    # and reset (to WARNING): INFO, as at the default --verbosity=0. The
    # trainer's `error:` exit silences TensorFlow's logger (tests run it in
    # process): unset, as in a new process.
    absl_logger.setLevel(logging.INFO)
    tf_logger.setLevel(logging.NOTSET)

    def run(verbosity):
        quiet.configure_logging(verbosity)
        caplog.clear()
        tf_logger.info(REDUCE)
        tf_logger.warning(RETRACING)
        tf_logger.warning("A TensorFlow warning that matters")
        absl_logger.info("step 100/200: loss 0.5")
        return [r.getMessage() for r in caplog.records]

    yield run
    tf_logger.handlers[:], tf_logger.filters[:], tf_logger.propagate = saved
    tf_logger.setLevel(saved_tf_level)
    absl_logger.filters[:], level = saved_absl
    absl_logger.setLevel(level)


def test_tensorflow_info_and_retracing_hidden_at_verbosity_0(emit):
    assert emit(0) == ["A TensorFlow warning that matters", "step 100/200: loss 0.5"]


def test_everything_shown_at_verbosity_1(emit, capsys):
    assert emit(1) == [
        REDUCE,
        RETRACING,
        "A TensorFlow warning that matters",
        "step 100/200: loss 0.5",
    ]


def test_tensorflows_own_handler_is_removed(emit):
    tf_logger = logging.getLogger("tensorflow")
    tf_logger.addHandler(logging.StreamHandler())
    emit(0)
    assert not tf_logger.handlers and tf_logger.propagate


def test_startup_output_is_held_and_shown_at_verbosity_1(capfd, monkeypatch):
    # TensorFlow's C++ start-up block goes straight to file descriptor 2.
    with quiet._captured_fd2() as read:
        os.write(2, b"I0000 00:00 cudart_stub.cc:31] Could not find cuda drivers\n")
        held = read()
    assert "Could not find cuda drivers" in held
    assert capfd.readouterr().err == ""
    monkeypatch.setattr(quiet, "_startup_output", held)
    quiet.replay_startup()
    assert capfd.readouterr().err == held


# TensorFlow 2.21's start-up lines on this CPU-only host (import and device
# discovery), with TF_CPP_MIN_LOG_LEVEL=2.
STARTUP = [
    (
        "WARNING: All log messages before absl::InitializeLog() is called are "
        "written to STDERR\n"
    ),
    (
        "I0000 00:00:1796403530.799675   21989 cudart_stub.cc:31] Could not find "
        "cuda drivers on your machine, GPU will not be used.\n"
    ),
    (
        "I0000 00:00:1796403530.912425   21989 cpu_feature_guard.cc:227] This "
        "TensorFlow binary is optimized to use available CPU instructions.\n"
    ),
    (
        "To enable the following instructions: AVX2 FMA, in other operations, "
        "rebuild TensorFlow with the appropriate compiler flags.\n"
    ),
    (
        "E0000 00:00:1796403537.110513   21989 cuda_platform.cc:52] failed call to "
        "cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n"
    ),
]


def test_library_import_drops_only_the_known_startup_lines():
    other = [
        "a line of the user's own\n",
        "E0000 00:00:1796403537.2 21989 some_op.cc:1] a real error\n",
    ]
    text = "".join(STARTUP[:3] + other[:1] + STARTUP[3:] + other[1:])
    assert quiet.drop_startup_noise(text) == "".join(other)
    # With a CUDA driver present, a failed cuInit is a real error: kept.
    with_driver = "".join(line for line in STARTUP if "cudart_stub" not in line)
    assert quiet.drop_startup_noise(with_driver) == STARTUP[-1]


FAKE_TENSORFLOW = """
import os, types
for line in STARTUP + ["not TensorFlow's: kept\\n"]:
    os.write(2, line.encode())
if os.environ.get("FAIL"):
    raise ImportError("the fake TensorFlow failed")
config = types.SimpleNamespace(list_physical_devices=lambda: [])
"""


@pytest.mark.parametrize("fail", [False, True])
def test_import_distopt_quiets_the_next_tensorflow_import(tmp_path, fail):
    """A stand-in `tensorflow` package that prints TF 2.21's start-up lines."""
    package = tmp_path / "tensorflow"
    package.mkdir()
    (package / "__init__.py").write_text(f"STARTUP = {STARTUP!r}\n" + FAKE_TENSORFLOW)
    code = (
        "import distopt, sys\n"
        "import tensorflow\n"
        "print(type(tensorflow.__loader__).__name__)\n"
        "print(sys.meta_path[0].__class__.__name__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), REPO])
    if fail:
        env["FAIL"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    if fail:
        # The import failed: everything it printed is shown, then the error.
        assert proc.returncode == 1
        assert proc.stderr.startswith("".join(STARTUP) + "not TensorFlow's: kept\n")
        assert "ImportError: the fake TensorFlow failed" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == "not TensorFlow's: kept\n"
        # Afterwards TensorFlow's own loader, and no finder left behind.
        loader, first_finder = proc.stdout.split()
        assert loader == "SourceFileLoader"
        assert first_finder != "_QuietTensorFlowFinder"


class _FailingImport:
    """A meta-path finder: ``import tensorflow`` writes a line to fd 2, then
    raises ``error`` (as a failed import, or a Ctrl-C during it)."""

    def __init__(self, error):
        self.error = error

    def find_spec(self, name, path=None, target=None):
        del path, target
        if name == "tensorflow":
            os.write(2, b"held start-up line\n")
            raise self.error


@pytest.mark.parametrize(
    "error,shown", [(ImportError("broken"), True), (KeyboardInterrupt(), False)]
)
def test_held_output_is_shown_when_the_import_fails_not_on_ctrl_c(
    capfd, monkeypatch, error, shown
):
    # A Ctrl-C during the import is the user's: TensorFlow's start-up lines
    # (cuInit, absl) printed before the trainer's one line said nothing.
    monkeypatch.delitem(sys.modules, "tensorflow")
    monkeypatch.setattr(sys, "meta_path", [_FailingImport(error), *sys.meta_path])
    with pytest.raises(type(error)):
        quiet.import_tensorflow()
    assert ("held start-up line" in capfd.readouterr().err) == shown


def _maker():
    """Makes a new `tf.function` per call, as the trainer does per run."""
    import tensorflow as tf

    @tf.function
    def made(x):
        return x + 1

    return made


def _other_maker():
    import tensorflow as tf

    @tf.function
    def made(x):
        return x - 1

    return made


def _users_own_loop():
    import tensorflow as tf

    @tf.function
    def own(x):
        return x * 2

    return own


def _retracing_warnings(caplog, make, calls=6):
    import tensorflow as tf

    caplog.clear()
    for i in range(calls):
        make()(tf.constant(float(i)))
    return [r for r in caplog.records if "retracing" in r.getMessage()]


def test_retracing_of_made_functions_is_hidden_and_a_users_is_not(caplog, monkeypatch):
    """A sweep of train() calls warned "(1) creating @tf.function repeatedly
    in a loop" about the trainer's own step and evaluation (made anew per
    run); the caller's own retracing still shows. TensorFlow warns at most
    twice per function's code, so each maker here is called in one place."""
    caplog.set_level(logging.WARNING, logger="tensorflow")
    # Without the command lines' filter, which another test of this process
    # may have installed (it hides every retracing warning at verbosity 0).
    monkeypatch.setattr(logging.getLogger("tensorflow"), "filters", [])
    with quiet.retracing_of_made_functions_hidden(_maker, _other_maker):
        assert _retracing_warnings(caplog, _maker) == []
        assert len(_retracing_warnings(caplog, _users_own_loop)) == 2
    # After the block, as before it: TensorFlow's real warning, as the
    # first assertion's silence would show without the filter.
    shown = _retracing_warnings(caplog, _other_maker)
    assert len(shown) == 2 and "_other_maker.<locals>.made" in shown[0].getMessage()
