"""The FLOP-ideal TTFT speed-up of a ``bench.json`` run as it would be at the checkpoint's full depth.

    python benchmarks/full_depth_ideal.py benchmarks/results/internvl3-8b/bench.json

A run with ``--layers N`` measures N decoder layers; the vision tower, the projector and the token
counts do not depend on N, so the full-depth FLOPs follow from the same records with the decoder's
FLOPs counted for every layer of the checkpoint (``hired.bench.cost``). Prints one line per
reducing variant: stock and reduced prefill TFLOP, and their ratio.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hired.bench.cost import ModelShape, llm_prefill_flops
from hired.bench.models import load_model_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_json", type=Path)
    args = parser.parse_args()
    document = json.loads(args.bench_json.read_text())
    records = document["records"]
    shape = ModelShape.from_config(load_model_spec(document["settings"]["model"]).config())

    def full_depth(record) -> float:
        return record["vision_flops"] + llm_prefill_flops(shape, record["prompt_tokens"], record["batch"])

    for stock in (r for r in records if r["method"] == "stock"):  # one per image size and batch
        reference = full_depth(stock)
        print(f"{stock['model']}: {shape.text_layers} decoder layers, image {stock['image_size']}, "
              f"stock {reference / 1e12:.1f} TFLOP ({stock['visual_tokens']} visual tokens)")
        for record in records:
            same_input = (record["image_size"], record["batch"]) == (stock["image_size"], stock["batch"])
            if record["method"] != "stock" and same_input and record["vision_flops"] is not None:
                flops = full_depth(record)
                print(f"  {record['method']} at {record['budget']:g}: {flops / 1e12:.1f} TFLOP "
                      f"({record['visual_tokens']} visual tokens), FLOP-ideal speed-up {reference / flops:.2f}")


if __name__ == "__main__":
    main()
