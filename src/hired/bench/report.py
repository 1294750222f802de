"""Benchmark output: the machine, a JSON document, a markdown table and a speed-up plot."""

from __future__ import annotations

import os
import platform
from itertools import groupby
from pathlib import Path
from typing import Any

from ..report import write_report

GROUP_KEYS = ("model", "layers", "full_layers", "dtype", "batch", "image_size", "grid")


def machine() -> dict[str, Any]:
    """CPU model, cores, RAM and library versions of the machine running the benchmark."""
    import torch

    from ..versions import package_versions

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    memory_gb = None
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        total = next(line for line in meminfo.read_text().splitlines() if line.startswith("MemTotal:"))
        memory_gb = round(int(total.split()[1]) / 2**20, 1)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": memory_gb,
        **package_versions(),
    }


def _groups(records: list[dict[str, Any]]):
    keyed = sorted(records, key=lambda r: tuple(str(r[k]) for k in GROUP_KEYS))
    return groupby(keyed, key=lambda r: tuple(r[k] for k in GROUP_KEYS))


def _number(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _layout(grid: str) -> str:
    if grid == "0x0":  # the geometry's (0, 0): a LLaVA-1.5 model
        return "one view, no tiles"
    return f"native resolution, {grid}" if grid.endswith("tokens") else f"grid {grid}"


def _percent(share) -> str:
    return "n/a" if share is None else f"{100 * share:.0f}%"


def markdown_table(records: list[dict[str, Any]]) -> str:
    """One table per (model, depth, dtype, batch, image size): times are medians, ranges min-max."""
    sections = []
    for (model, layers, full_layers, dtype, batch, image_size, grid), rows in _groups(records):
        rows = list(rows)
        title = (f"**{model}**, {layers} of {full_layers} decoder layers, {dtype}, batch {batch}, "
                 f"image {image_size} ({_layout(grid)}), {rows[0]['repeats']} repeats, {rows[0]['new_tokens']} new tokens")
        header = ("| method | budget | visual tokens | TTFT s (min-max) | preprocess / vision / selection / "
                  "prefill s | TTFT speed-up (min-max) | FLOP-ideal | of ideal | decode tok/s | e2e tok/s | "
                  "peak RSS MB | KV cache MB |")
        lines = [title, "", header, "|" + "---|" * 12]
        for r in sorted(rows, key=lambda r: (r["method"] != "stock", r["method"], r["budget"])):
            lines.append(
                f"| {r['method']} | {r['budget']:g} | {r['visual_tokens']} | {r['ttft_s']:.2f} "
                f"({r['ttft_s_min']:.2f}-{r['ttft_s_max']:.2f}) | {r['preprocess_s']:.2f} / {r['vision_s']:.2f} / "
                f"{r['selection_s']:.3f} / {r['prefill_s']:.2f} | {r['ttft_speedup']:.2f} "
                f"({r['ttft_speedup_min']:.2f}-{r['ttft_speedup_max']:.2f}) | {_number(r['ttft_speedup_ideal'])} | "
                f"{_percent(r['ttft_speedup_of_ideal'])} | "
                f"{r['decode_tok_s']:.2f} | {r['e2e_tok_s']:.2f} | {_number(r['peak_rss_mb'], 0)} | "
                f"{_number(r['kv_cache_mb'], 1)} |"
            )
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """Measured TTFT speed-up against budget, one line per method, FLOP-ideal dotted, one panel per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(key, list(rows)) for key, rows in _groups(records)]
    figure, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
    for axis, ((model, layers, full_layers, dtype, batch, image_size, _), rows) in zip(axes[0], groups):
        methods = sorted({r["method"] for r in rows} - {"stock"})
        for index, method in enumerate(methods):
            colour = f"C{index}"
            points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["budget"])
            budgets = [r["budget"] for r in points]
            speedups = [r["ttft_speedup"] for r in points]
            spread = [[r["ttft_speedup"] - r["ttft_speedup_min"] for r in points],
                      [r["ttft_speedup_max"] - r["ttft_speedup"] for r in points]]
            axis.errorbar(budgets, speedups, yerr=spread, marker="o", color=colour, capsize=3, label=method)
            ideal = [(r["budget"], r["ttft_speedup_ideal"]) for r in points if r["ttft_speedup_ideal"]]
            if ideal:
                axis.plot(*zip(*ideal), linestyle=":", color=colour, label=f"{method} FLOP-ideal")
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_xlabel("budget (fraction of stock visual tokens)")
        axis.set_ylabel("time-to-first-token speed-up vs stock")
        axis.set_title(f"{model.split('/')[-1]}\n{layers}/{full_layers} layers, {dtype}, batch {batch}, {image_size}",
                       fontsize=9)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_outputs(records: list[dict[str, Any]], folder: Path, command: str, settings: dict[str, Any]) -> dict[str, Path]:
    """Write ``bench.json``, ``bench.md`` and ``bench.png`` into ``folder``; return their paths."""
    return write_report(folder, "bench", command, records, markdown_table(records),
                        plot=lambda path: plot(records, path), machine=machine(), settings=settings)
