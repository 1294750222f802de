"""The early drop's speed: stock against HiRED at one budget, with and without selecting inside the tower.

    python benchmarks/early_drop.py --model qwen2.5-vl-7b-instruct --layers 2 --budget 0.2 \\
        --drop-layers 7 15 23 --image-size 1280x960 --rounds 3 --output benchmarks/results/early-drop-qwen2.5-vl-7b

The model is a stored architecture of ``hired.bench`` with random weights and ``--layers`` decoder
layers. Every variant runs on the same model, one warm-up request each, then ``--rounds`` rounds that
interleave the variants (each round starts one variant later). For each variant: the tower's time
(``vision_s``: the ViT's forward, selection inside it included when it drops early), the time to first
token, their ratios to stock within each round (median, min-max), the FLOP-ideal of the run's depth
and of the checkpoint's full depth (the tower with its drop, the projector, the decoder's prefill), and
the peak resident memory of one request in a fresh process (``hired.bench.probe``). Writes
``early-drop.json`` (with the command, versions and machine) and ``early-drop.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

import hired
from hired.bench.cost import ModelShape
from hired.bench.measure import Sample, time_request
from hired.bench.models import build_model, build_processor, load_model_spec, synthetic_image
from hired.bench.runner import STOCK, grid_label, prefill_cost
from hired.families import family_of
from hired.geometry import NativeGeometry


def variants(budget: float, drop_layers: list[int]) -> list[dict]:
    return ([{"name": "stock", "budget": None, "drop_layer": None},
             {"name": f"hired {budget:g}", "budget": budget, "drop_layer": None}]
            + [{"name": f"hired {budget:g}, drop at {layer}", "budget": budget, "drop_layer": layer}
               for layer in drop_layers])


def switch(model, processor, variant: dict) -> None:
    hired.remove(model, processor)
    if variant["budget"] is not None:
        hired.apply(model, processor, method="hired", budget=variant["budget"], drop_layer=variant["drop_layer"])


def prefill_flops(shape: ModelShape, geometry, variant: dict, sample: Sample, projects_all: bool) -> int:
    """The tower (with its drop), the projector or merger over the tokens it sees and the decoder's prefill."""
    method = STOCK if variant["budget"] is None else "hired"
    drop = None if variant["drop_layer"] is None else variant["drop_layer"] % shape.vision_layers
    # new_tokens and value_bytes size the cache only, which this table does not report.
    return prefill_cost(shape, geometry, sample, batch=1, method=method, new_tokens=2, value_bytes=4,
                        projects_all=projects_all, drop_layer=drop)["prefill_flops"]


def probe(args, variant: dict, prompt: str) -> dict:
    request = {"model": args.model, "layers": args.layers, "dtype": args.dtype, "seed": 0,
               "method": "stock" if variant["budget"] is None else "hired", "budget": variant["budget"],
               "drop_layer": variant["drop_layer"], "batch": 1, "image_size": list(args.image_size),
               "prompt": prompt, "new_tokens": args.new_tokens}
    result = subprocess.run([sys.executable, "-m", "hired.bench.probe", json.dumps(request)], capture_output=True,
                            text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-vl-7b-instruct", help="a stored architecture of hired.bench")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers to build (default 2)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--budget", type=float, default=0.2, help="HiRED's budget (default 0.2)")
    parser.add_argument("--drop-layers", type=int, nargs="+", default=[7, 15, 23],
                        help="tower blocks to select at, each one variant (default: 7 15 23, the 7B's full-attention "
                             "blocks before its last)")
    parser.add_argument("--image-size", type=lambda text: tuple(int(v) for v in text.split("x")), default=(1280, 960),
                        metavar="WxH")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds (default 3)")
    parser.add_argument("--new-tokens", type=int, default=4, help="tokens generated per request (default 4)")
    parser.add_argument("--no-peak-memory", action="store_true", help="skip the fresh-process memory probes")
    parser.add_argument("--output", type=Path, required=True, help="folder for early-drop.json and early-drop.md")
    args = parser.parse_args()

    spec = load_model_spec(args.model)
    processor = build_processor(spec)
    model = build_model(spec, args.layers, args.dtype, processor, seed=0)
    shape = ModelShape.from_config(model.config)
    full_shape = dataclasses.replace(shape, text_layers=spec.full_layers)
    images = [synthetic_image(*args.image_size, 0)]
    runs = variants(args.budget, args.drop_layers)
    samples: dict[str, list] = {variant["name"]: [] for variant in runs}
    with torch.inference_mode():
        for variant in runs:
            switch(model, processor, variant)
            time_request(model, processor, images, spec.prompt, args.new_tokens)
            print(f"warm-up {variant['name']}", file=sys.stderr, flush=True)
        for round_index in range(args.rounds):
            shift = round_index % len(runs)
            for variant in runs[shift:] + runs[:shift]:
                switch(model, processor, variant)
                samples[variant["name"]].append(time_request(model, processor, images, spec.prompt, args.new_tokens))
                print(f"round {round_index + 1} {variant['name']}", file=sys.stderr, flush=True)
    family = family_of(model)
    geometry = family.processor_geometry(processor, args.image_size[::-1])
    del model
    stock = samples["stock"]
    records = []
    for variant in runs:
        mine = samples[variant["name"]]
        first = mine[0]
        vision = [s.vision_s / m.vision_s for s, m in zip(stock, mine)]
        ttft = [s.ttft_s / m.ttft_s for s, m in zip(stock, mine)]
        ideal = {}
        for label, model_shape in (("run", shape), ("full_depth", full_shape)):
            own = prefill_flops(model_shape, geometry, variant, first, family.selects_projected)
            base = prefill_flops(model_shape, geometry, runs[0], stock[0], family.selects_projected)
            ideal[label] = base / own
        record = {
            **variant, "visual_tokens": first.visual_tokens, "prompt_tokens": first.prompt_tokens,
            "vision_s": statistics.median(m.vision_s for m in mine), "ttft_s": statistics.median(m.ttft_s for m in mine),
            "vision_speedup": statistics.median(vision), "vision_speedup_min": min(vision),
            "vision_speedup_max": max(vision),
            "ttft_speedup": statistics.median(ttft), "ttft_speedup_min": min(ttft), "ttft_speedup_max": max(ttft),
            "flop_ideal": ideal["run"], "flop_ideal_full_depth": ideal["full_depth"],
        }
        if not args.no_peak_memory:
            record.update(probe(args, variant, spec.prompt))
            print(f"memory {variant['name']}", file=sys.stderr, flush=True)
        records.append(record)

    command = "python benchmarks/early_drop.py " + " ".join(sys.argv[1:])
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    layout = grid_label(geometry) if isinstance(geometry, NativeGeometry) else f"{geometry.num_partitions} tiles"
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "early-drop.json").write_text(json.dumps(
        {"command": command, "machine": machine, "hired": hired.__version__, "model": spec.checkpoint,
         "layers": args.layers, "full_layers": spec.full_layers, "dtype": args.dtype,
         "image_size": "x".join(map(str, args.image_size)), "grid": grid_label(geometry), "rounds": args.rounds,
         "records": records}, indent=2) + "\n")
    rows = ["| variant | visual tokens | tower s | tower speed-up (min-max) | TTFT s | TTFT speed-up (min-max) | "
            f"FLOP-ideal ({args.layers} layers) | FLOP-ideal ({spec.full_layers} layers) | peak RSS MB |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        peak = "-" if "peak_rss_mb" not in r else f"{r['peak_rss_mb']:.0f}"
        rows.append(f"| {r['name']} | {r['visual_tokens']} | {r['vision_s']:.2f} | {r['vision_speedup']:.2f} "
                    f"({r['vision_speedup_min']:.2f}-{r['vision_speedup_max']:.2f}) | {r['ttft_s']:.2f} | "
                    f"{r['ttft_speedup']:.2f} ({r['ttft_speedup_min']:.2f}-{r['ttft_speedup_max']:.2f}) | "
                    f"{r['flop_ideal']:.2f} | {r['flop_ideal_full_depth']:.2f} | {peak} |")
    header = (f"Command: `{command}`\n\nMachine: {machine}\n\n**{spec.checkpoint}** shape, random weights, "
              f"{args.layers} of {spec.full_layers} decoder layers, {args.dtype}, image "
              f"{args.image_size[0]}x{args.image_size[1]} ({layout}), "
              f"1 warm-up and {args.rounds} interleaved rounds; speed-ups are per round against stock.\n\n")
    (args.output / "early-drop.md").write_text(header + "\n".join(rows) + "\n")
    print(header + "\n".join(rows))


if __name__ == "__main__":
    main()
