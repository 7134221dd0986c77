"""Stop notices (SIGTERM, SIGINT) that come before the trainer's own handler.

The trainer's handler (`trainer_faults.StopSignals`) is installed once the
strategy exists. Before that, while TensorFlow loads and the strategy starts
(seconds), a scheduler's SIGTERM killed the process (exit 143, not 42) and
Ctrl-C printed a traceback, leaving an empty run directory behind. The
command line installs this handler first (`install`); the trainer's handler
takes the notice over (`take`) and stops the run after its first step, as
for a notice during the set-up. No TensorFlow here: it runs before the import.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_requested: str | None = None
_previous: dict = {}


def _handle(signum, frame) -> None:
    del frame
    global _requested
    if _requested and signum == signal.SIGINT:
        raise KeyboardInterrupt  # A second Ctrl-C: the user means it.
    _requested = _requested or signal.Signals(signum).name


def install() -> None:
    """Remembers SIGTERM and SIGINT from now on (main thread only)."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            _previous[sig] = signal.signal(sig, _handle)


def uninstall() -> None:
    """Puts the handlers back as they were and forgets any notice."""
    global _requested
    for sig, previous in _previous.items():
        signal.signal(sig, signal.SIG_DFL if previous is None else previous)
    _previous.clear()
    _requested = None


def ignore() -> None:
    """SIGTERM and SIGINT change nothing from now on, to the process's exit.

    For a command line that is ending anyway (it saved, or the user pressed
    Ctrl-C twice): tf.data's teardown keeps the process alive for seconds,
    and a further notice then killed it (143, -2) instead of its exit
    status. SIG_IGN, not a Python handler: the interpreter resets its own
    handlers to the default as it finalizes, not ignored signals. Not undone
    by :func:`uninstall` (main thread only).
    """
    if threading.current_thread() is threading.main_thread():
        _previous.clear()
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def take() -> str | None:
    """The notice that came (its signal's name), or None; forgets it."""
    global _requested
    requested, _requested = _requested, None
    return requested
