"""Quiet command lines: TensorFlow's start-up noise and duplicate log lines.

Every entry point (``distopt.train``, ``distopt.compare``,
``distopt.hardware_check``, the benchmarks, the example) imports TensorFlow
through :func:`import_tensorflow`. Three sources of noise are handled, each
only as far as needed:

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

Library use (``import distopt``, then any module that imports TensorFlow) is
quieter too, without taking a user's settings away (:func:`quiet_library_import`):
``TF_CPP_MIN_LOG_LEVEL`` is set to 2 only if unset, and the first TensorFlow
import drops only the start-up lines that this level should hide and
TensorFlow 2.21 prints anyway (:func:`drop_startup_noise`); everything else
written to file descriptor 2 meanwhile is passed on. With
``TF_CPP_MIN_LOG_LEVEL`` set to 0 or 1 (INFO or WARNING lines wanted), or
TensorFlow imported first, nothing changes. Every ``python -m distopt.*``
program imports the package first, so this holds for each of them too.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import re
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


class _HideRetracingOf(logging.Filter):
    """Drops TensorFlow's retracing warning about functions made in `makers`.

    TensorFlow counts traces per code object, so functions a maker creates
    anew for each of its calls (the trainer's step, evaluation and
    agreement, which capture one run's model and strategy) trace "5 out of
    the last 5 calls" in a sweep of runs, and the warning blames the caller:
    "(1) creating @tf.function repeatedly in a loop".
    """

    def __init__(self, makers):
        super().__init__()
        names = "|".join(re.escape(m.__qualname__) for m in makers)
        self._made_there = re.compile(rf"calls to <function ({names})\.<locals>\.")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("retracing" in message and self._made_there.search(message))


@contextlib.contextmanager
def retracing_of_made_functions_hidden(*makers):
    """Inside the block, hides the retracing warning of what `makers` make."""
    logger = logging.getLogger("tensorflow")
    hide = _HideRetracingOf(makers)
    logger.addFilter(hide)
    try:
        yield
    finally:
        logger.removeFilter(hide)


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
    import raises (but for a Ctrl-C), the held output is printed before the
    exception goes on.

    Args:
      hide_modules: modules made unimportable during the import (for example
        ``("matplotlib",)``: Keras imports ``matplotlib.pyplot`` when it is
        installed, 0.5-0.6 s that the trainer never uses).
    """
    global _startup_output
    if "tensorflow" in sys.modules:
        return
    _remove_finder()  # This import holds all of it (see replay_startup).
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
    except KeyboardInterrupt:
        raise  # The user's, not TensorFlow's failure: its start-up says nothing.
    except BaseException:
        sys.stderr.write(_startup_output)
        raise
    finally:
        for name in hidden:
            del sys.modules[name]


def import_tensorflow_for_tool(hide_modules: tuple[str, ...] = ()) -> None:
    """`import_tensorflow` for a tool without ``--verbosity``.

    The held start-up output is printed if the user set
    ``TF_CPP_MIN_LOG_LEVEL`` to 0 or 1 (asking for INFO or WARNING lines).
    """
    asked = _wants_cpp_info_or_warnings()
    import_tensorflow(hide_modules)
    if asked:
        replay_startup()


def _wants_cpp_info_or_warnings() -> bool:
    """Whether the user set ``TF_CPP_MIN_LOG_LEVEL`` to show INFO or WARNING lines."""
    return os.environ.get("TF_CPP_MIN_LOG_LEVEL", "").strip() in ("0", "1")


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


# --- Library use -------------------------------------------------------------------

# What TensorFlow 2.21 prints on its import and device discovery that
# TF_CPP_MIN_LOG_LEVEL=2 should hide but does not (absl is not initialised
# yet): the pre-initialisation banner, INFO and WARNING lines, and the line
# continuing cpu_feature_guard's.
_BANNER = "WARNING: All log messages before absl::InitializeLog() is called"
_INFO_OR_WARNING = re.compile(r"^[IW]\d{4} ")
_CPU_FEATURES = "To enable the following instructions:"
# On a host without a CUDA driver, TensorFlow says so (an INFO line), then
# logs the failed cuInit as an ERROR: an expected consequence, not an error.
# With a driver present the same line is a real error and is kept.
_NO_DRIVER = "Could not find cuda drivers on your machine"
_CUINIT = re.compile(r"^E\d{4} .*cuda_platform\.cc.*failed call to cuInit")


def drop_startup_noise(text: str) -> str:
    """`text` without TensorFlow's known start-up lines; every other line kept."""
    no_driver = _NO_DRIVER in text
    kept = []
    for line in text.splitlines(keepends=True):
        noise = (
            line.startswith((_BANNER, _CPU_FEATURES))
            or _INFO_OR_WARNING.match(line)
            or (no_driver and _CUINIT.match(line))
        )
        if not noise:
            kept.append(line)
    return "".join(kept)


class _QuietLoader(importlib.abc.Loader):
    """TensorFlow's own loader, run with fd 2 held; the known noise dropped."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        text = ""
        try:
            with _captured_fd2() as read:
                try:
                    self._loader.exec_module(module)
                    _discover_devices(module)
                finally:
                    text = read()
        except BaseException:
            sys.stderr.write(text)  # The import failed: all of it.
            raise
        finally:
            # Everything after the import sees TensorFlow's own loader.
            module.__loader__ = module.__spec__.loader = self._loader
        sys.stderr.write(drop_startup_noise(text))
        sys.stderr.flush()


def _discover_devices(tf) -> None:
    """Lists the physical devices, whose discovery logs cuInit's failure.

    Listing does not initialise the devices (see `import_tensorflow`). A
    failure is left to the user's first use of a device, which meets it
    again and reports it there; its C++ lines are passed on.
    """
    try:
        tf.config.list_physical_devices()
    except Exception:  # noqa: BLE001, S110 (see the docstring)
        pass


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` once, through the other finders, with `_QuietLoader`."""

    def find_spec(self, name, path=None, target=None):
        del path, target
        if name != "tensorflow":
            return None
        _remove_finder()
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _QuietLoader(spec.loader)
        return spec


_FINDER = _QuietTensorFlowFinder()


def _remove_finder() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def quiet_library_import() -> bool:
    """Quiets the first import of TensorFlow, unless INFO or WARNING lines are wanted.

    Called by ``import distopt``. Does nothing when TensorFlow is already
    imported or ``TF_CPP_MIN_LOG_LEVEL`` is 0 or 1; otherwise sets it to 2
    if unset and makes the coming ``import tensorflow`` (whoever imports it)
    drop the lines :func:`drop_startup_noise` drops and pass every other
    line on.

    Returns:
        Whether the import will be quieted.
    """
    if "tensorflow" in sys.modules or _wants_cpp_info_or_warnings():
        return False
    try:
        os.fstat(2)
    except OSError:
        return False  # No file descriptor 2 to hold.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", DEFAULT_TF_CPP_MIN_LOG_LEVEL)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    return True
