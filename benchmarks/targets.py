"""Check the efficiency targets of the benchmark issue against a ``bench.json``.

    python benchmarks/targets.py benchmarks/results/sweep/bench.json [--method hired] [--budget 0.2]

For every group (model, depth, batch, image size) of the file it prints, for the method at the budget:
1. the measured time-to-first-token speed-up as a share of the FLOP-ideal one (target >= 90%);
2. the method's own work (selection) as a share of the vision encoder's time (target <= 2%);
3. the fall of peak memory against the fall of the KV cache (target: at least as large);
4. at budget 1.0, whether the per-round speed-ups over the stock model straddle 1 (target: within the noise).
"""

from __future__ import annotations

import argparse
import json
from itertools import groupby
from pathlib import Path

GROUP = ("model", "layers", "full_layers", "dtype", "batch", "image_size")


def _verdict(passed: bool | None) -> str:
    return "n/a" if passed is None else ("met" if passed else "MISSED")


def check(records: list[dict], method: str, budget: float) -> list[str]:
    lines = []
    keyed = sorted(records, key=lambda r: tuple(str(r[k]) for k in GROUP))
    for key, rows in groupby(keyed, key=lambda r: tuple(r[k] for k in GROUP)):
        rows = {(r["method"], r["budget"]): r for r in rows}
        stock, reduced, full = rows.get(("stock", 1.0)), rows.get((method, budget)), rows.get((method, 1.0))
        if stock is None or reduced is None:
            continue
        model, layers, full_layers, dtype, batch, image = key
        lines.append(f"{model}, {layers}/{full_layers} layers, {dtype}, batch {batch}, {image}: {method} at {budget:g}")
        share = reduced["ttft_speedup_of_ideal"]
        lines.append(
            f"  TTFT speed-up {reduced['ttft_speedup']:.2f} (min {reduced['ttft_speedup_min']:.2f}, max "
            f"{reduced['ttft_speedup_max']:.2f}) of FLOP-ideal {reduced['ttft_speedup_ideal']:.2f} = "
            f"{100 * share:.0f}% -> {_verdict(share >= 0.9)} (target >= 90%)"
        )
        selection = reduced["selection_share_of_vision"]
        lines.append(
            f"  selection {1000 * reduced['selection_s']:.0f} ms = {100 * selection:.1f}% of the vision encoder "
            f"({reduced['vision_s']:.2f} s) -> {_verdict(selection <= 0.02)} (target <= 2%)"
        )
        if stock["peak_rss_mb"] is not None and reduced["peak_rss_mb"] is not None:
            memory_fall = stock["peak_rss_mb"] - reduced["peak_rss_mb"]
            kv_fall = stock["kv_cache_mb"] - reduced["kv_cache_mb"]
            lines.append(
                f"  peak RSS {stock['peak_rss_mb']:.0f} -> {reduced['peak_rss_mb']:.0f} MB (fall {memory_fall:.0f} MB); "
                f"KV cache fall {kv_fall:.0f} MB -> {_verdict(memory_fall >= kv_fall)}"
            )
        if full is not None:
            low, high = full["ttft_speedup_min"], full["ttft_speedup_max"]
            lines.append(
                f"  budget 1.0: speed-up {full['ttft_speedup']:.3f} (per-round {low:.3f}-{high:.3f}) "
                f"-> {_verdict(low <= 1.0 <= high)} (target: the rounds straddle 1)"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a bench.json written by hired bench")
    parser.add_argument("--method", default="hired")
    parser.add_argument("--budget", type=float, default=0.2)
    args = parser.parse_args()
    document = json.loads(args.results.read_text())
    lines = check(document["records"], args.method, args.budget)
    if not lines:
        raise SystemExit(f"{args.results} has no stock record and no {args.method} record at budget {args.budget}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
