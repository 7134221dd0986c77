"""distopt.quiet: which log lines the command lines show at each verbosity.

The whole effect on a real run (no C++ start-up block, no duplicated line,
no "Reduce to" line) is checked on the README's command in test_readme.py.
"""

import logging
import os

import pytest

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
    # absl sets its logger's level from --verbosity, which other tests parse
    # and reset (to WARNING): INFO, as at the default --verbosity=0.
    absl_logger.setLevel(logging.INFO)

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
