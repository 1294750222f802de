"""``hired lmms-table``: accuracy against visual tokens, per method and task, from lmms-eval's result folders."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import CliError, emit, output_folder


def _budget(record: dict[str, Any]) -> str:
    if record["method"] == "full":
        return "100%"
    if record["tokens"] is not None:
        return f"{record['tokens']:g} tokens"
    return f"{100 * record['budget']:g}%" if record["budget"] is not None else "stored"


def _format(value: float | None, digits: int = 1, scale: float = 1.0) -> str:
    return "-" if value is None else f"{scale * value:.{digits}f}"


def markdown(records: list[dict[str, Any]]) -> str:
    """One row per run, task and metric; failures and notes beside the figure."""
    from ..report import markdown_table

    rows = [[r["task"], r["metric"], r["method"], _budget(r), _format(r["visual_tokens"], 0), _format(r["kept_tokens"], 0),
             _format(r["value"], 1, 100), r["samples"] if r["samples"] is not None else "-", r["failed"],
             _format(r["seconds"], 0), r.get("note", "")] for r in records]
    header = ["task", "metric", "method", "budget", "visual tokens fed", "kept", "value (%)", "samples", "failed",
              "run (s)", "note"]
    return markdown_table(header, rows) + "\n\nvisual tokens: means per sample; kept differs from fed for methods that prune " \
        "inside the LLM (FastV). run: the wall time of the whole lmms-eval run (all its tasks).\n"


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """One panel per task and metric: the value against the mean visual tokens kept, a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["task"], r["metric"]) for r in records})
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for axis, (task, metric) in zip(axes[0], panels):
        rows = [r for r in records if (r["task"], r["metric"]) == (task, metric) and r["value"] is not None and r["kept_tokens"]]
        for r in (r for r in rows if r["method"] == "full"):
            axis.axhline(100 * r["value"], color="k", linestyle="--", label=f"full ({r['kept_tokens']:.0f} tokens)")
        for method in sorted({r["method"] for r in rows} - {"full"}):
            line = sorted((r for r in rows if r["method"] == method), key=lambda r: r["kept_tokens"])
            axis.plot([r["kept_tokens"] for r in line], [100 * r["value"] for r in line], marker="o",
                      linewidth=2.5 if method == "hired" else 1.2, label=method)
        axis.set_title(task)
        axis.set_xlabel("visual tokens kept (mean per sample)")
        axis.set_ylabel(f"{metric} (%)")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _run(args: argparse.Namespace) -> None:
    from ..engines.lmms_eval.results import read_runs
    from ..report import write_report

    try:
        records = read_runs(args.results)
    except ValueError as error:
        raise CliError(str(error)) from None
    table = markdown(records)
    command = "hired lmms-table " + " ".join(args.results) + f" --out {args.out}"
    paths = write_report(Path(args.out), "lmms-table", command, records, table, plot=lambda path: plot(records, path))
    emit(args, records, table + "\nwritten: " + ", ".join(str(path) for path in paths.values()))


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "lmms-table", help="accuracy against visual tokens from lmms-eval results of the hired model",
        description="Read lmms-eval result folders (--output_path of runs with --model hired and --log_samples) and "
        "tabulate every task's metrics per method and budget, with the mean visual tokens kept per sample (from "
        "lmms-eval's per-sample log) and the failed samples of runs with on_error=record. Writes lmms-table.json, "
        "lmms-table.md and lmms-table.png (a panel per task: the metric against the visual tokens, a line per method).",
    )
    parser.add_argument("results", nargs="+", help="lmms-eval output folders (searched recursively) or *_results.json files")
    parser.add_argument("--out", type=output_folder, default="lmms-table", help="output folder (default lmms-table)")
    parser.add_argument("--json", action="store_true", help="print the records as JSON")
    parser.set_defaults(run=_run)
