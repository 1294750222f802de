"""``hired show``: the picture of a selection."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..visualize import show
from .common import CliError, add_budget_arguments, config_from_args, emit, load_image, load_model


def _run_cli(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    image = load_image(args.image)
    output = Path(args.output)
    if output.suffix.lower() != ".png":
        raise CliError(f"the picture is written as PNG; give an output path ending in .png, got {output}")
    if not output.parent.is_dir():
        raise CliError(f"output folder {output.parent} does not exist")
    model, processor = load_model(args.model, args.dtype)
    try:
        show(model, processor, image, config, output)
    except ValueError as error:
        raise CliError(str(error)) from None
    emit(args, {"output": str(output), "config": config.to_dict()}, f"wrote {output}")


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "show", help="draw which tokens a method keeps in each partition, beside the CLS-attention maps",
        description="Encode IMAGE, select tokens and write a PNG: the base view and each AnyRes tile with the "
        "kept tokens outlined and the per-partition budgets, the selection-layer CLS attention below, and "
        "the whole image with the tiles' budgets over the first-layer attention that shared them.",
    )
    parser.add_argument("image", help="image file")
    parser.add_argument("--model", default="offline",
                        help="'offline' (real DINOv2 encoder), 'tiny-random', a hub id or a local folder")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("-o", "--output", default="selection.png", help="PNG file to write")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_budget_arguments(parser)
    parser.set_defaults(run=_run_cli)
