"""``hired generate`` and ``hired inspect``."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ..algorithm import allocate
from ..methods import get_method
from .common import (
    DTYPES,
    CliError,
    add_budget_arguments,
    check_settings,
    config_from_args,
    emit,
    integer,
    load_image,
    load_model,
)


def _generate(args: argparse.Namespace) -> None:
    import torch

    import hired
    from hired.loading import chat_prompt

    check_settings(args, needs="fixed")
    images = [load_image(path) for path in args.image]
    model, processor = load_model(args.model, args.dtype)
    config = config_from_args(args, model)
    hired.apply(model, processor, config)
    try:
        prompt = chat_prompt(processor, args.prompt, len(images))
    except ValueError as error:
        raise CliError(str(error)) from None
    inputs = processor(images=images, text=prompt, return_tensors="pt")
    inputs = inputs.to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    answer = processor.decode(new_tokens, skip_special_tokens=True).strip()
    if not answer:
        answer = f"(no text: the model generated {len(new_tokens)} special tokens, ids {new_tokens.tolist()})"
    records = [record.to_dict() for record in hired.selections(model)]
    kept = sum(r["kept_tokens"] for r in records)
    stock = sum(r["stock_tokens"] + r.get("newline_tokens", 0) for r in records)
    summary = f"[{config.method}] visual tokens: {kept} of {stock} ({100 * kept / stock:.1f}%)"
    emit(args, {"answer": answer, "model": args.model, "config": config.to_dict(), "images": records},
         f"{answer}\n{summary}")


MAX_PATCHES_PER_SIDE = 256


def _inspect(args: argparse.Namespace) -> None:
    from ..families import registered_families

    family = {family.name: family for family in registered_families()}[args.family]
    if args.family != "llava-next":
        if args.tile is not None or args.patch is not None:
            raise CliError(f"--tile and --patch scale the LLaVA-NeXT grid; --family {args.family} uses the tiles of its "
                           "released checkpoints")
        layout = family.released_geometry
    else:
        layout = _llava_next_layout(args.tile or 336, args.patch or 14)
    config = config_from_args(args)
    try:
        config.require_fixed_count()
        get_method(config.method).check_tower(family.released_has_cls,
                                              f"the vision tower of the released {family.name} checkpoints")
    except ValueError as error:
        raise CliError(str(error)) from None
    rows = []
    for path in args.image:  # a bad image stops the run, naming its file, as an unreadable one does
        image = load_image(path)
        try:
            geometry = layout((image.height, image.width))
        except ValueError as error:
            raise CliError(f"{path}: {error}") from None
        rows.append(_allocation(path, geometry, config))
    emit(args, rows, "\n".join(_describe(row) for row in rows))


def _llava_next_layout(tile: int, patch: int):
    from ..families.llava_next import scaled_pinpoints
    from ..geometry import AnyresGeometry

    if tile % patch:
        raise CliError(f"--tile {tile} is not a multiple of --patch {patch}; a tile holds whole patches")
    if tile // patch > MAX_PATCHES_PER_SIDE:
        raise CliError(f"--tile {tile} over --patch {patch} makes {tile // patch} patches per tile "
                       f"side; vision towers use far fewer (LLaVA-NeXT: 24), and inspect allows at most "
                       f"{MAX_PATCHES_PER_SIDE}")
    pinpoints = scaled_pinpoints(tile)
    return lambda size: AnyresGeometry.create(size, tile, patch, pinpoints)


def _allocation(path: str, geometry, config) -> dict[str, Any]:
    row = {
        "image": path,
        "image_size": list(geometry.image_size),
        "grid": list(geometry.grid),
        "method": config.method,
        "stock_tokens": geometry.stock_tokens,
        "newline_tokens": geometry.newline_tokens,
        "fed_tokens": _as_fed(config.fed_tokens(geometry.stock_tokens), geometry),
        "kept_tokens": _as_fed(config.kept_for(geometry.stock_tokens), geometry),
        "partition_caps": [int(c) for c in geometry.candidates.sum(dim=1)],
    }
    if get_method(config.method).stage == "llm":
        row["llm_layer"] = config.method_options.layer
    alpha = getattr(config.method_options, "alpha", None)
    if alpha is not None and row["kept_tokens"] < row["stock_tokens"] and geometry.num_partitions > 1:
        # HiRED's split: the base view's count depends on the sizes only (the tiles' total is what
        # they can hold of the rest, whatever the attention); how the tiles share it needs the pixels.
        caps = geometry.candidates.sum(dim=1)
        row["base_view_tokens"] = int(allocate(row["kept_tokens"], alpha, torch.ones(len(caps) - 1), caps)[0])
    return row


def _as_fed(count: int, geometry) -> int:
    """A count as the records give it: the stock model's count includes its newline tokens."""
    return count + geometry.newline_tokens if count >= geometry.stock_tokens else count


def _describe(row: dict[str, Any]) -> str:
    size = f"{row['image']}: {row['image_size'][1]}x{row['image_size'][0]} px, grid {row['grid'][0]}x{row['grid'][1]}"
    stock = f"{row['stock_tokens']} (+{row['newline_tokens']} newlines)"
    if "llm_layer" in row:
        counts = (f"fed {row['fed_tokens']} of {stock}, {row['method']} keeps {row['kept_tokens']} after LLM layer "
                  f"{row['llm_layer']}")
    elif row["kept_tokens"] >= row["stock_tokens"]:
        counts = f"all {row['kept_tokens']} tokens of {stock}: the stock model"
    else:
        counts = f"K={row['kept_tokens']} of {stock}"
        if "base_view_tokens" in row:
            base = row["base_view_tokens"]
            counts += f" (base view {base}, tiles {row['kept_tokens'] - base} shared by attention)"
    caps = row["partition_caps"]
    if len(caps) == 1:  # one partition: LLaVA-1.5's single view, the Qwen-VL rasters
        return f"{size}, [{row['method']}] {counts}; {caps[0]} candidates in one partition"
    return f"{size}, [{row['method']}] {counts}; base {caps[0]} candidates; tile candidates {caps[1:]}"


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    from ..families import registered_families

    generate = subparsers.add_parser(
        "generate", help="answer a prompt about images with a HiRED-patched model",
        description="Load a checkpoint (LLaVA-NeXT, LLaVA-1.5, InternVL, LLaVA-OneVision), apply HiRED and generate "
        "an answer. "
        "Prints the answer and a one-line token summary (--json for machines).",
    )
    generate.add_argument("image", nargs="+", help="image file(s)")
    generate.add_argument("--model", default="llava-hf/llava-v1.6-vicuna-7b-hf",
                          help="hub id or local folder ('tiny-random' or 'tiny-random-<family>' builds a random test "
                          "model)")
    generate.add_argument("--prompt", default="Describe the image.",
                          help="question, put in the model's chat template (with <image> markers: used as it is)")
    generate.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    generate.add_argument("--max-new-tokens", type=integer(1), default=64, help="tokens to generate (default 64)")
    generate.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_budget_arguments(generate)
    generate.set_defaults(run=_generate)

    inspect = subparsers.add_parser(
        "inspect", help="show how an image's token budget is laid out (no model needed)",
        description="Tile grid, stock token count, budget K and per-partition candidate counts for each image, "
        "under the tiling of a model family's released checkpoints (LLaVA-NeXT: 336 px tiles of 14 px patches; "
        "InternVL: 1 to 12 tiles of 448 px plus a thumbnail, 256 tokens each; LLaVA-OneVision: up to 6x6 tiles "
        "of 384 px, mosaics above nine tiles' worth downsampled).",
    )
    inspect.add_argument("image", nargs="+", help="image file(s)")
    inspect.add_argument("--family", default="llava-next", choices=sorted(f.name for f in registered_families()),
                         help="whose tiling (default llava-next)")
    inspect.add_argument("--tile", type=integer(1), default=None,
                         help="LLaVA-NeXT tile side in pixels (default 336); the grid pinpoints scale with it")
    inspect.add_argument("--patch", type=integer(1), default=None, help="LLaVA-NeXT patch side in pixels (default 14)")
    inspect.add_argument("--json", action="store_true")
    add_budget_arguments(inspect)
    inspect.set_defaults(run=_inspect)

