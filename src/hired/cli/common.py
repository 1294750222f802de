"""What every ``hired`` subcommand shares: the error type, the budget options, loading models and images."""

from __future__ import annotations

import argparse
import json
from importlib.metadata import entry_points
from typing import Any

# Entry-point group through which other distributions name models for --model (e.g. the testbed's
# "offline": the real pretrained encoder in LLaVA-NeXT geometry).
MODEL_ENTRY_POINTS = "hired.models"


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""




def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every token-reduction subcommand shares."""
    from ..methods import available_methods

    group = parser.add_argument_group("token budget")
    amount = group.add_mutually_exclusive_group()
    amount.add_argument("--budget", type=float, default=None,
                        help="fraction of the stock visual tokens to keep, in (0, 1] (default 0.2)")
    amount.add_argument("--tokens", type=int, default=None, help="absolute visual tokens per image (>= 1)")
    group.add_argument("--method", default="hired", help=f"one of: {', '.join(available_methods())} (default hired)")
    group.add_argument("--alpha", type=float, default=None,
                       help="HiRED: base view's share of the budget, in [0, 1] (default 0.5); other methods refuse it")
    group.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                       help="method-specific option (repeatable), e.g. --method-option seed=3")


def config_from_args(args: argparse.Namespace):
    """Build a validated :class:`hired.HiredConfig` from parsed budget arguments."""
    from ..config import HiredConfig

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
        if args.alpha is not None:
            if "alpha" in options:
                raise CliError("give alpha either as --alpha or as --method-option alpha=..., not both")
            options["alpha"] = args.alpha
        return HiredConfig(budget=None if args.tokens is not None else budget, tokens=args.tokens,
                           method=args.method, method_options=options)
    except ValueError as error:
        raise CliError(str(error)) from None


def load_image(path: str):
    """Open an image file as RGB, with a clear error for anything unreadable."""
    from ..images import open_image

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
        from ..testing import tiny_llava_next

        model, processor = tiny_llava_next()
        return model.to(dtypes[dtype]), processor
    named = {point.name: point for point in entry_points(group=MODEL_ENTRY_POINTS)}
    if name in named:
        try:
            model, processor = named[name].load()()
        except ImportError as error:
            raise CliError(f"model {name!r} cannot be built: {error}") from None
        return model.to(dtypes[dtype]), processor
    if name == "offline":
        raise CliError("model 'offline' comes with the testbed distribution: pip install -e testbed (make install does)")
    try:
        model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtypes[dtype]).eval()
        processor = AutoProcessor.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise CliError(f"cannot load model {name!r}: {error}") from None
    return model, processor


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if getattr(args, "json", False) else text)


