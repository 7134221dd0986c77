"""The measurement protocol the benchmarks share.

Each measurement runs in a fresh process (`measure_in_subprocess`), which
prints one `RESULT {json}` line (`print_result`, read back by
`parse_result`); the caller alternates the contenders and repeats each
(`alternate`), then reports `stats` (median and spread) and may keep the
results (`write_json`).

Every child process of a benchmark starts through `run_children`, which ends
the children when the benchmark is stopped (SIGTERM, SIGINT).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from distopt import output_files

RESULT = "RESULT "

#: Seconds a child gets to exit after the SIGTERM forwarded to it, before
#: SIGKILL (a caller whose child has a longer grace of its own passes more).
GRACE_SECONDS = 10.0
#: How often `run_children` looks at its children and at a stop request.
_POLL_SECONDS = 0.05
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Parser(argparse.ArgumentParser):
    """argparse with the other tools' errors: one line, ``prog: error: ...``
    on stderr, exit status 2 (argparse adds a usage line first).

    Output paths added with `add_output` are checked as the command line is
    parsed, before any work (they were written only after it, and a bad
    path lost the whole run with a traceback).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._outputs = []

    def add_output(self, flag: str, help: str) -> None:
        """Adds ``--flag=PATH``: a file the results are written to."""
        self._outputs.append(flag)
        self.add_argument(f"--{flag}", metavar="PATH", help=help)

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        for flag in self._outputs:
            why = check_output(getattr(parsed, flag), flag)
            if why:
                self.error(why)
        return parsed

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def check_output(path: str | None, flag: str) -> str | None:
    """Why ``--flag=path`` cannot take the results; None if it can or is unset."""
    return output_files.check_file(path, flag) if path else None


def names(allowed, prefix: str | None = None):
    """An argparse ``type``: a comma-separated list of names from ``allowed``.

    An unknown name was measured as something else under its label, or
    failed every run; now it is the one-line error before any run.

    Args:
        allowed: The valid names.
        prefix: Names starting with it are valid too (``trainer:<flags>``).
    """

    def parse(text: str) -> list[str]:
        items = text.split(",")
        for item in items:
            if item not in allowed and not (prefix and item.startswith(prefix)):
                raise argparse.ArgumentTypeError(
                    f"{item!r} is not one of {', '.join(allowed)}"
                )
        return items

    return parse


def no_results(prog: str, results) -> bool:
    """Says so on stderr if every measurement failed (the caller exits 1)."""
    if results:
        return False
    print(f"{prog}: error: every run failed (see above)", file=sys.stderr)
    return True


def check_items(flag_values, name: str, allowed=None, minimum=None) -> None:
    """Registers a check of list flag `name`: every item in `allowed`, or
    (with `minimum`) an integer >= `minimum`; a bad one is the tool's one-line
    error before any run (an unknown name failed every run, then printed an
    empty table with exit status 0)."""
    from absl import flags

    def check(values):
        for value in values or ():
            if minimum is not None:
                try:
                    at_least(minimum)(value)
                except argparse.ArgumentTypeError:
                    raise flags.ValidationError(
                        f"{value!r} is not an integer >= {minimum}"
                    ) from None
            elif value not in allowed:
                raise flags.ValidationError(
                    f"{value!r} is not one of {', '.join(allowed)}"
                )
        return True

    flags.register_validator(name, check, flag_values=flag_values)


def at_least(minimum: int):
    """An argparse ``type``: an integer >= ``minimum``, or an error naming it."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def multiple_of(divisor: int, what: str):
    """An argparse ``type``: a positive multiple of ``divisor`` (``what``)."""

    def parse(text: str) -> int:
        value = at_least(1)(text)
        if value % divisor:
            raise argparse.ArgumentTypeError(
                f"must be a positive multiple of {divisor} ({what}), got {value}"
            )
        return value

    return parse


def mirrored_batch_error(batch_size: int, strategies, replicas: int) -> str | None:
    """Why mirrored cannot split ``batch_size`` over its ``replicas``, or None.

    None too without ``mirrored`` in ``strategies``: the default strategy has
    one replica, any batch is fine. (A per-replica batch dropped the
    remainder, batch 1 gave 0 examples, or every run failed.)
    """
    if "mirrored" not in strategies:
        return None
    try:
        multiple_of(replicas, "mirrored's replicas")(str(batch_size))
    except argparse.ArgumentTypeError as e:
        return str(e)
    return None


def print_result(result: dict) -> None:
    """Prints a measurement for `measure_in_subprocess` to read."""
    print(RESULT + json.dumps(result), flush=True)


def run_child(command, **kwargs) -> subprocess.CompletedProcess:
    """`run_children` of one command."""
    return run_children([command], **kwargs)[0]


def run_children(
    commands,
    *,
    env=None,
    merge_stderr: bool = False,
    timeout: float | None = None,
    grace_seconds: float | None = None,
) -> list[subprocess.CompletedProcess]:
    """Runs ``commands`` at once, each in a session of its own; waits for all.

    A SIGTERM or SIGINT to this process ends them: SIGTERM to each child's
    process group, ``grace_seconds`` to exit, then SIGKILL; then this process
    exits with status 128 + the signal, saying so in one line. (Without this
    a stopped benchmark left its children running, orphaned, to the end of
    their work: a Ctrl-C reaches only the terminal's process group, and a
    scheduler's SIGTERM only the benchmark.)

    Args:
        commands: argv lists.
        env: Their environment (this process's if None).
        merge_stderr: stderr into stdout (`stderr` of the results is "").
        timeout: Seconds after which the children are ended the same way
            (their status then says how they ended).
        grace_seconds: `GRACE_SECONDS` if None.

    Returns:
        One `subprocess.CompletedProcess` each, stdout and stderr as text.
    """
    grace = GRACE_SECONDS if grace_seconds is None else grace_seconds
    stop = []
    previous = _catch_stop_signals(stop)
    outs = []
    procs = []
    try:
        for command in commands:
            # The files first: the finally closes them if Popen fails.
            outs.append(_capture_files(merge_stderr))
            procs.append(_start(command, *outs[-1], env))
        _wait(procs, stop, timeout, grace)
        return [
            subprocess.CompletedProcess(
                c, p.returncode, _read(out), _read(err) if err else ""
            )
            for c, p, (out, err) in zip(commands, procs, outs)
        ]
    finally:
        _end(procs, 0)  # Only if something above failed: never leave one.
        for f in [f for pair in outs for f in pair if f is not None]:
            f.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _start(command, out, err, env) -> subprocess.Popen:
    """``command`` in a session of its own (its group is what `_end` ends)."""
    return subprocess.Popen(
        command,
        stdout=out,
        stderr=subprocess.STDOUT if err is None else err,
        env=env,
        start_new_session=True,
    )


def _wait(procs, stop: list, timeout: float | None, grace: float) -> None:
    """Waits for ``procs``; ends them at ``timeout`` or at a stop request.

    A stop (a signal number in ``stop``) ends them, says so in one line and
    exits this process with status 128 + the signal.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while not stop and any(p.poll() is None for p in procs):
        if deadline is not None and time.monotonic() > deadline:
            _end(procs, grace)
            break
        time.sleep(_POLL_SECONDS)
    if stop:
        _end(procs, grace)
        name = signal.Signals(stop[0]).name
        print(
            f"{_prog()}: stopped by {name}; ended its child processes",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(128 + stop[0])


def _catch_stop_signals(stop: list) -> dict:
    """Appends SIGTERM and SIGINT's numbers to ``stop``; the handlers before."""
    if threading.current_thread() is not threading.main_thread():
        return {}  # Only the main thread may set handlers (and gets signals).
    # The handler only records: the wait loop ends the children (a handler
    # that waited for them could interrupt Popen's own wait, holding its lock).
    return {s: signal.signal(s, lambda n, _: stop.append(n)) for s in _STOP_SIGNALS}


def _capture_files(merge_stderr: bool):
    # Files, not pipes: a child that writes much cannot fill a pipe and stall
    # while this process waits for another.
    out = tempfile.TemporaryFile()  # noqa: SIM115 (closed by run_children)
    return out, None if merge_stderr else tempfile.TemporaryFile()


def _read(f) -> str:
    f.seek(0)
    return f.read().decode(errors="replace")


def _end(procs, grace: float) -> None:
    """SIGTERM to each live child's group; after ``grace`` s SIGKILL; reaps."""
    live = [p for p in procs if p.poll() is None]
    if not live:
        return
    _signal_groups(live, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(p.poll() is None for p in live) and time.monotonic() < deadline:
        time.sleep(_POLL_SECONDS)
    # The whole group, even if its leader exited: its own children go too.
    _signal_groups(live, signal.SIGKILL)
    for p in live:
        p.wait()


def _signal_groups(procs, sig) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass  # The group is gone.


def _prog() -> str:
    """The running tool's name (``distopt.benchmarks.x``) for messages."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) or os.path.basename(sys.argv[0])


def measure_in_subprocess(module: str, flags: list[str], label: str) -> dict | None:
    """Runs `python -m module *flags` and returns its `RESULT` line, or None.

    A failed measurement prints the tail of its stderr under `label` and
    returns None, so one crash does not end a long benchmark.
    """
    proc = run_child([sys.executable, "-m", module, *flags])
    result = parse_result(proc.stdout)
    if result is None:
        print(f"{label} failed:\n{proc.stderr[-3000:]}")
    return result


def parse_result(stdout: str) -> dict | None:
    """The last `RESULT` line's measurement in a process's output, or None."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT) :])
    return None


def alternate(contenders, repeats: int, measure) -> dict:
    """Each contender's samples from `repeats` rounds, the order rotated each round.

    Rotating the order means no contender always goes first, and a drift in
    the machine's load hits every contender alike.

    Args:
        contenders: The contenders' names.
        repeats: How many rounds.
        measure: `measure(contender)`: one sample, or None if it failed (it
            is then left out).

    Returns:
        `{contender: [sample, ...]}`.
    """
    contenders = list(contenders)
    samples = {c: [] for c in contenders}
    for r in range(repeats):
        shift = r % len(contenders)
        for c in contenders[shift:] + contenders[:shift]:
            result = measure(c)
            if result is not None:
                samples[c].append(result)
    return samples


def write_json(prog: str, path: str | None, results) -> int:
    """Writes `results` to `path` as indented JSON, whole or not at all.

    Nothing when `path` is empty. A failed write (a full disk) leaves the
    file as it was and is one line naming it, not a traceback.

    Returns:
        The exit status: 0, or 1 if it could not be written.
    """
    if not path:
        return 0
    try:
        output_files.write_json(path, results)
    except OSError as e:
        return write_error(prog, path, e)
    return 0


def write_error(prog: str, path: str, error: OSError) -> int:
    """Says ``path`` could not be written, in one line; returns exit status 1.

    The path is named here: a full disk's error names no file.
    """
    print(
        f"{prog}: error: could not write {path}: {error.strerror or error}",
        file=sys.stderr,
    )
    return 1


def warm_up_fit(model, dataset, steps: int) -> None:
    """``model.fit`` of ``steps`` untimed steps; none for 0.

    ``fit(steps_per_epoch=0)`` on a repeated dataset is not 0 steps: it runs
    until the dataset ends, which is never (the benchmark hung).
    """
    if steps > 0:
        model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)


def stats(values) -> dict | None:
    """Median, min, max and count of `values` (None when empty)."""
    values = list(values)
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def random_mnist_batch(strategy, per_replica: int):
    """One MNIST-shaped batch per replica, made on its device (for bare steps).

    Images uniform in [0, 1), labels in [0, 10): the bare-step ceilings run on
    in-memory tensors, with no input pipeline.
    """
    import tensorflow as tf

    def batch_fn(context):
        del context
        images = tf.random.stateless_uniform([per_replica, 28, 28, 1], (0, 1))
        labels = tf.random.stateless_uniform([per_replica], (0, 2), 0, 10, tf.int32)
        return images, labels

    return strategy.experimental_distribute_values_from_function(batch_fn)
