"""The ``hired`` command line: a client of the public API.

Each subcommand lives beside the code it drives and registers itself through an
``add_cli(subparsers)`` function; this module only assembles them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any, Sequence

# Modules that contribute subcommands, in the order --help lists them.
SUBCOMMAND_MODULES = ("hired.demo", "hired.cli", "hired.bench.cli", "hired.visualize", "hired.testbed.evidence", "hired.testbed.evaluate")


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


# --------------------------------------------------------------------------------------------
# Shared helpers for subcommands


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every token-reduction subcommand shares."""
    from .methods import available_methods

    group = parser.add_argument_group("token budget")
    amount = group.add_mutually_exclusive_group()
    amount.add_argument("--budget", type=float, default=None,
                        help="fraction of the stock visual tokens to keep, in (0, 1] (default 0.2)")
    amount.add_argument("--tokens", type=int, default=None, help="absolute visual tokens per image (>= 1)")
    group.add_argument("--method", default="hired", help=f"one of: {', '.join(available_methods())} (default hired)")
    group.add_argument("--alpha", type=float, default=0.5, help="HiRED: base view's share of the budget, in [0, 1]")
    group.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                       help="method-specific option (repeatable), e.g. --method-option seed=3")


def config_from_args(args: argparse.Namespace):
    """Build a validated :class:`hired.HiredConfig` from parsed budget arguments."""
    from .config import HiredConfig

    options: dict[str, Any] = {}
    for item in args.method_option:
        key, sep, value = item.partition("=")
        if not sep:
            raise CliError(f"--method-option expects KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    budget = args.budget if args.budget is not None or args.tokens is not None else 0.2
    try:
        return HiredConfig(budget=None if args.tokens is not None else budget, tokens=args.tokens,
                           method=args.method, alpha=args.alpha, method_options=options)
    except ValueError as error:
        raise CliError(str(error)) from None


def load_image(path: str):
    """Open an image file as RGB, with a clear error for anything unreadable."""
    from .images import open_image

    try:
        return open_image(path)
    except (OSError, ValueError) as error:
        raise CliError(str(error)) from None


def load_model(name: str, dtype: str):
    """Load a LLaVA-NeXT / LLaVA checkpoint (hub id or local folder) and its processor."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name == "tiny-random":
        from .testing import tiny_llava_next

        model, processor = tiny_llava_next()
        return model.to(dtypes[dtype]), processor
    if name == "offline":
        from .testbed.encoder import build_offline_llava_next

        try:
            model, processor = build_offline_llava_next()
        except ImportError as error:
            raise CliError(str(error)) from None
        return model.to(dtypes[dtype]), processor
    try:
        model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtypes[dtype]).eval()
        processor = AutoProcessor.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise CliError(f"cannot load model {name!r}: {error}") from None
    return model, processor


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if getattr(args, "json", False) else text)


# --------------------------------------------------------------------------------------------
# generate / inspect


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
    fed = sum(r.get("fastv_kept", r["visual_tokens"]) for r in records)
    stock = sum(r["stock_tokens"] + r.get("newline_tokens", 0) for r in records)
    summary = f"[{config.method}] visual tokens: {fed} of {stock} ({100 * fed / stock:.1f}%)"
    emit(args, {"answer": answer, "model": args.model, "config": config.to_dict(), "images": records},
         f"{answer}\n{summary}")


def _inspect(args: argparse.Namespace) -> None:
    from .algorithm import LLAVA_NEXT_PINPOINTS, AnyresGeometry

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hired",
        description="HiRED token selection for high-resolution vision-language models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_cli(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        args.run(args)
    except CliError as error:
        print(f"hired {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
