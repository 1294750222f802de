"""``hired generate`` and ``hired inspect``."""

from __future__ import annotations

import argparse
from typing import Any

from .common import CliError, add_budget_arguments, config_from_args, emit, load_image, load_model


def _generate(args: argparse.Namespace) -> None:
    import torch

    import hired

    config = config_from_args(args)
    images = [load_image(path) for path in args.image]
    model, processor = load_model(args.model, args.dtype)
    try:
        hired.apply(model, processor, config)
    except (TypeError, ValueError) as error:
        raise CliError(str(error)) from None
    prompt = args.prompt
    if "<image>" not in prompt:
        prompt = "USER: " + "<image>\n" * len(images) + prompt + " ASSISTANT:"
    if prompt.count("<image>") != len(images):
        raise CliError(f"the prompt has {prompt.count('<image>')} <image> markers for {len(images)} images")
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
    # FastV feeds every placeholder and prunes inside the LLM: count what it kept there.
    fed = sum(r.get("llm_kept", r["visual_tokens"]) for r in records)
    stock = sum(r["stock_tokens"] + r.get("newline_tokens", 0) for r in records)
    summary = f"[{config.method}] visual tokens: {fed} of {stock} ({100 * fed / stock:.1f}%)"
    emit(args, {"answer": answer, "model": args.model, "config": config.to_dict(), "images": records},
         f"{answer}\n{summary}")


def _inspect(args: argparse.Namespace) -> None:
    from ..geometry import LLAVA_NEXT_PINPOINTS, AnyresGeometry

    config = config_from_args(args)
    rows = []
    for path in args.image:
        image = load_image(path)
        geometry = AnyresGeometry.create((image.height, image.width), args.tile, args.patch, LLAVA_NEXT_PINPOINTS)
        rows.append(_allocation(path, geometry, config))
    text = "\n".join(
        f"{r['image']}: {r['image_size'][1]}x{r['image_size'][0]} px, grid {r['grid'][0]}x{r['grid'][1]}, "
        f"K={r['budget']} of {r['stock_tokens']} (+{r['newline_tokens']} newlines); "
        f"base {r['partition_caps'][0]} candidates; tile candidates {r['partition_caps'][1:]}"
        for r in rows
    )
    emit(args, rows, text)


def _allocation(path: str, geometry, config) -> dict[str, Any]:
    return {
        "image": path,
        "image_size": list(geometry.image_size),
        "grid": list(geometry.grid),
        "stock_tokens": geometry.stock_tokens,
        "newline_tokens": geometry.newline_tokens,
        "budget": config.budget_for(geometry.stock_tokens),
        "partition_caps": [int(c) for c in geometry.candidates.sum(dim=1)],
    }


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    generate = subparsers.add_parser(
        "generate", help="answer a prompt about images with a HiRED-patched model",
        description="Load a LLaVA-NeXT or LLaVA-1.5 checkpoint, apply HiRED and generate an answer. "
        "Prints the answer and a one-line token summary (--json for machines).",
    )
    generate.add_argument("image", nargs="+", help="image file(s)")
    generate.add_argument("--model", default="llava-hf/llava-v1.6-vicuna-7b-hf",
                          help="hub id or local folder ('tiny-random' builds a random test model)")
    generate.add_argument("--prompt", default="Describe the image.", help="question; <image> markers optional")
    generate.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_budget_arguments(generate)
    generate.set_defaults(run=_generate)

    inspect = subparsers.add_parser(
        "inspect", help="show how an image's token budget is laid out (no model needed)",
        description="AnyRes grid, stock token count, HiRED budget K and per-partition candidate counts "
        "for each image, for LLaVA-NeXT geometry (336 px tiles, 14 px patches by default).",
    )
    inspect.add_argument("image", nargs="+")
    inspect.add_argument("--tile", type=int, default=336)
    inspect.add_argument("--patch", type=int, default=14)
    inspect.add_argument("--json", action="store_true")
    add_budget_arguments(inspect)
    inspect.set_defaults(run=_inspect)


# --------------------------------------------------------------------------------------------


