"""The ``hired`` command line: a client of the public API.

Each subcommand is a module with an ``add_cli(subparsers)`` function. The built-in ones are listed
here; other distributions add theirs through the ``hired.cli`` entry-point group (the testbed adds
``demo``, ``evidence`` and ``eval`` that way).
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points
from typing import Sequence

from . import bench, generate, methods, show
from .common import CliError

SUBCOMMAND_ENTRY_POINTS = "hired.cli"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hired",
        description="HiRED token selection for high-resolution vision-language models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (generate, methods, bench, show):
        module.add_cli(subparsers)
    for point in sorted(entry_points(group=SUBCOMMAND_ENTRY_POINTS), key=lambda p: p.name):
        point.load()(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        args.run(args)
    except CliError as error:
        print(f"hired {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
