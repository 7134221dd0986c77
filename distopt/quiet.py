"""Quiet command lines: TensorFlow's start-up noise and duplicate log lines.

Imported by ``distopt.train`` and ``distopt.compare`` before TensorFlow. Three
sources of noise are handled, each only as far as needed:

* TensorFlow's C++ start-up block (oneDNN, "Could not find cuda drivers",
  "failed call to cuInit" on CPU hosts, printed once per shared library, so
  twice) is written straight to file descriptor 2 before TensorFlow reads
  ``TF_CPP_MIN_LOG_LEVEL``. :func:`import_tensorflow` therefore captures fd 2
  while TensorFlow loads and finds its devices, and :func:`replay_startup`
  prints it under ``--verbosity=1`` (or when the import fails).
* After start-up, ``TF_CPP_MIN_LOG_LEVEL=2`` (set unless the user set it)
  hides the C++ INFO and WARNING lines; errors still show.
* TensorFlow's Python logger has its own handler when it is imported before
  absl's, so each of its lines is printed twice. :func:`configure_logging`
  removes that handler, and hides TensorFlow's own INFO lines (e.g. "Reduce to
  ... then broadcast" per all-reduce under MirroredStrategy) and its retracing
  warnings unless ``--verbosity`` is 1 or more.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile

# The C++ log level TensorFlow reads when it initialises logging: 2 hides INFO
# and WARNING, keeps ERROR.
DEFAULT_TF_CPP_MIN_LOG_LEVEL = "2"

_startup_output = ""


_TF_SOURCE = os.sep + "tensorflow" + os.sep


def _tf_noise(record: logging.LogRecord) -> bool:
    """True for TensorFlow's own log records hidden at --verbosity=0."""
    if record.name != "tensorflow" and _TF_SOURCE not in record.pathname:
        return False  # distopt's own lines, and other libraries'.
    if record.levelno < logging.WARNING:
        return True  # "Reduce to ...", "Using MirroredStrategy ...", saver timings.
    return "retracing" in record.getMessage()


class _HideTensorFlowNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _tf_noise(record)


_FILTER = _HideTensorFlowNoise()


@contextlib.contextmanager
def _captured_fd2():
    """Sends file descriptor 2 to a temporary file; yields a reader of it."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)

        def read():
            capture.seek(0)
            return capture.read().decode("utf-8", "replace")

        try:
            yield read
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def import_tensorflow(hide_modules: tuple[str, ...] = ()) -> None:
    """Imports TensorFlow and lists its devices with the C++ start-up block held.

    Sets ``TF_CPP_MIN_LOG_LEVEL`` first unless the environment sets it. If the
    import raises, the held output is printed before the exception goes on.

    Args:
      hide_modules: modules made unimportable during the import (for example
        ``("matplotlib",)``: Keras imports ``matplotlib.pyplot`` when it is
        installed, 0.5-0.6 s that the trainer never uses).
    """
    global _startup_output
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", DEFAULT_TF_CPP_MIN_LOG_LEVEL)
    hidden = [m for m in hide_modules if m not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # `import name...` raises ImportError
    try:
        with _captured_fd2() as read:
            try:
                import tensorflow as tf

                # Device discovery prints "failed call to cuInit" on CPU hosts.
                # Listing physical devices does not initialise them, so
                # virtual CPU devices can still be configured afterwards.
                tf.config.list_physical_devices()
            finally:
                _startup_output = read()
    except BaseException:
        sys.stderr.write(_startup_output)
        raise
    finally:
        for name in hidden:
            del sys.modules[name]


def replay_startup() -> None:
    """Prints the held C++ start-up output (for ``--verbosity`` >= 1)."""
    sys.stderr.write(_startup_output)
    sys.stderr.flush()


def configure_logging(verbosity: int) -> None:
    """One handler for TensorFlow's Python log lines; its noise below verbosity 1.

    Args:
      verbosity: absl's ``--verbosity`` (0 is INFO, the default).
    """
    tf_logger = logging.getLogger("tensorflow")
    # TensorFlow adds a StreamHandler when it is imported before absl sets up
    # the root logger's; absl's root handler then prints every line again.
    for handler in list(tf_logger.handlers):
        if isinstance(handler, logging.StreamHandler):
            tf_logger.removeHandler(handler)
    tf_logger.propagate = True
    # Some TensorFlow modules log through absl's logger instead (e.g. the
    # checkpoint saver's "Sharding callback duration").
    loggers = (tf_logger, logging.getLogger("absl"))
    for logger in loggers:
        logger.removeFilter(_FILTER)
    if verbosity < 1:
        for logger in loggers:
            logger.addFilter(_FILTER)
    else:
        replay_startup()
