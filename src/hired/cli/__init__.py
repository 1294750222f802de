"""The ``hired`` command line: a client of the public API.

Each subcommand is a module with an ``add_cli(subparsers)`` function. The built-in ones are listed
here; other distributions add theirs through the ``hired.cli`` entry-point group (the testbed adds
``demo``, ``evidence`` and ``eval`` that way).

:func:`main` is the one error boundary: every failure ends as one line on stderr and a non-zero
exit status (2 for a problem with the input or the environment, 1 for an internal error, whose
traceback ``--debug`` shows).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from importlib.metadata import entry_points
from typing import NoReturn, Sequence

from ..compat import IncompatibleTransformers
from . import bench, generate, lmms, methods, show
from .common import CliError

SUBCOMMAND_ENTRY_POINTS = "hired.cli"
MAX_MESSAGE = 600
# Errors that describe the user's input or environment; anything else is a bug of hired.
USER_ERRORS = (CliError, ValueError, TypeError, OSError, ImportError, IncompatibleTransformers)


class OneLineParser(argparse.ArgumentParser):
    """argparse with a one-line error message (the usage stays behind --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="hired",
        description="HiRED token selection for high-resolution vision-language models.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (generate, methods, bench, show, lmms):
        module.add_cli(subparsers)
    for point in sorted(entry_points(group=SUBCOMMAND_ENTRY_POINTS), key=lambda p: p.name):
        point.load()(subparsers)
    for subparser in subparsers.choices.values():
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                               help="show the full traceback of an error")
    return parser


def describe(error: BaseException) -> str:
    """``error`` as one line: its message, or its type and message for errors outside :data:`USER_ERRORS`."""
    if isinstance(error, OSError) and error.strerror and error.filename:
        text = f"{error.strerror}: {error.filename}; check the path and its permissions"
    else:
        text = str(error)
    text = " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(error).__name__
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - 30] + f" ... ({len(text)} characters)"
    if isinstance(error, USER_ERRORS):
        return text
    return f"internal error ({type(error).__name__}: {text}); rerun with --debug for the traceback and report it"


def _one_line_warning(command: str):
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"hired {command}: warning: {message}", file=sys.stderr if file is None else file)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, or a bad argument already reported in one line
        return stop.code if isinstance(stop.code, int) else 0
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    if not sys.stderr.isatty():  # progress bars in a log or a pipe are noise around the one error line
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging

        disable_progress_bars()
        logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning(args.command)
            args.run(args)
    except KeyboardInterrupt:
        print(f"hired {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        print(f"hired {args.command}: error: {describe(error)}", file=sys.stderr)
        return 2 if isinstance(error, USER_ERRORS) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
