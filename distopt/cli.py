"""Command-line parsing shared by the standalone tools (compare, hardware_check).

Each tool keeps its flags in its own `flags.FlagValues`, not absl's global
FLAGS, so that it stays importable next to other absl programs (tests,
notebooks). This module gives them one behaviour for `--help` and for bad
flags: help on stdout with exit status 0, a one-line error naming the
tool on stderr with exit status 2, and no traceback.
"""

from __future__ import annotations

import sys

from absl import flags

HELP = ("-h", "--help", "--helpshort", "--helpfull")


def parse(prog: str, doc: str, flag_values: flags.FlagValues, argv) -> int | None:
    """Parses `argv` into `flag_values`.

    Args:
        prog: The tool's name in messages (`distopt.compare`).
        doc: Printed above the flags' help for `--help`.
        flag_values: The tool's flags; parsed afresh on every call, so that
            `main` can be called more than once in one process.
        argv: The command line, program name first (`sys.argv` if None).

    Returns:
        None when the tool should run; otherwise its exit status (0 after
        `--help`, 2 after a bad flag or a stray positional argument).
    """
    argv = list(sys.argv if argv is None else argv)
    if _wants_help(argv):
        _print_help(doc, flag_values)
        return 0
    flag_values.unparse_flags()
    try:
        rest = flag_values(argv)
    except flags.Error as e:
        return error(prog, e)
    if len(rest) > 1:
        return error(prog, f"unexpected arguments {rest[1:]}")
    return None


def error(prog: str, message) -> int:
    """Prints `prog: error: message` on stderr; returns exit status 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def exit_if_help(doc: str, flag_values: flags.FlagValues, argv=None) -> None:
    """Prints the help and exits with status 0 if `argv` asks for it.

    For a tool's module body, before it imports TensorFlow: `--help` then
    answers at once instead of after TensorFlow's import (seconds).

    Args:
        doc: Printed above the flags' help.
        flag_values: The tool's flags.
        argv: The command line, program name first (`sys.argv` if None).
    """
    if _wants_help(list(sys.argv if argv is None else argv)):
        _print_help(doc, flag_values)
        sys.exit(0)


def _wants_help(argv) -> bool:
    return any(a in HELP for a in argv[1:])


def _print_help(doc: str, flag_values: flags.FlagValues) -> None:
    print(doc)
    print(flag_values.get_help())
