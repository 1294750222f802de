"""The one writer of result folders: ``NAME.json``, ``NAME.md`` and ``NAME.png``, with the command that made them.

Benchmarks and evaluations hand it their records, a markdown body and a plotting function; every
JSON document carries the command to rerun, the versions of the packages that shape the figures
(:func:`hired.versions.package_versions`), and the records.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from .versions import package_versions


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table; every row must have the header's number of cells (``|`` in a cell is escaped)."""
    def line(cells: list[Any]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|").replace("\n", " ") for cell in cells) + " |"

    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a table row has {len(row)} cells for {len(header)} columns: {row}")
    return "\n".join([line(header), "|" + "---|" * len(header), *(line(row) for row in rows)])


def write_report(
    folder: Path,
    name: str,
    command: str,
    records: list[dict[str, Any]],
    markdown: str,
    plot: Callable[[Path], None] | None = None,
    **fields: Any,
) -> dict[str, Path]:
    """Write the report of one run into ``folder``; return the paths written, by kind.

    Args:
        folder: created if missing.
        name: the file stem (``bench``, ``eval``, ``evidence``).
        command: the command line that reproduces the run.
        records: one JSON-ready record per measured setting.
        markdown: the human-readable body (tables); the command is written above it.
        plot: draws the picture into the path it is given (PNG).
        fields: more top-level JSON fields (``machine``, ``settings``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / f"{name}.json", "markdown": folder / f"{name}.md"}
    document = {"command": command, "versions": package_versions(), **fields, "records": records}
    paths["json"].write_text(json.dumps(document, indent=2) + "\n")
    paths["markdown"].write_text(f"Command: `{command}`\n\n{markdown.strip()}\n")
    if plot is not None:
        paths["plot"] = folder / f"{name}.png"
        plot(paths["plot"])
    return paths
