"""``hired show``: the picture of a selection."""

from __future__ import annotations

import argparse

from ..visualize import show
from .common import (
    DTYPES,
    add_budget_arguments,
    check_settings,
    config_from_args,
    emit,
    load_image,
    load_model,
    png_file,
)


def _run_cli(args: argparse.Namespace) -> None:
    check_settings(args, needs="vision")
    image = load_image(args.image)
    model, processor = load_model(args.model, args.dtype)
    config = config_from_args(args, model)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    show(model, processor, image, config, args.output)
    emit(args, {"output": str(args.output), "config": config.to_dict()}, f"wrote {args.output}")


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
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("-o", "--output", type=png_file, default="selection.png", help="PNG file to write")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_budget_arguments(parser)
    parser.set_defaults(run=_run_cli)
