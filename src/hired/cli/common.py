"""What every ``hired`` subcommand shares: argument types, the budget options, loading models and images.

Bad values are caught where they enter: argument types refuse them at parse time, with the
option's name, and the few checks that need a model run right after loading it. Whatever still
goes wrong reaches the one error boundary in :func:`hired.cli.main`, which prints one line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


DTYPES = ("float32", "bfloat16", "float16")  # the keys of hired.loading.DTYPES, without importing torch


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


# --------------------------------------------------------------------------------------------
# argument types: each turns the text into a value or refuses it with the rule it broke


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A budget: a number in (0, 1]."""
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text}")
    return value


def budget_fraction(text: str) -> float:
    """A budget beside a ``--tokens`` option: a fraction, or a hint to use the count option."""
    try:
        return fraction(text)
    except argparse.ArgumentTypeError as error:
        value = float(text) if text.replace(".", "", 1).isdigit() else 0.0
        if 1 < value < 1e6 and value == int(value):
            raise argparse.ArgumentTypeError(f"{error} (for an absolute count use --tokens {int(value)})") from None
        raise


def share(text: str) -> float:
    """A number in [0, 1] (HiRED's alpha)."""
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def positive_number(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text}")
    return value


def integer(minimum: int) -> Callable[[str], int]:
    """A whole number of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def method_name(text: str) -> str:
    from ..methods import get_method

    try:
        return get_method(text).name
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def unique(values, option: str) -> None:
    """Refuse a value given twice to a list option (it would be measured twice and pooled)."""
    seen = set()
    for value in values:
        if value in seen:
            raise CliError(f"{option} lists {value} twice; give each value once")
        seen.add(value)


def _writable_folder(folder: Path, what: str) -> None:
    """Refuse ``folder`` unless files can be written in it, or it can be created, so that a run that
    would fail at its end, when it writes, fails before it starts. Nothing is left behind."""
    ancestor, missing = folder, None
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor, missing = ancestor.parent, ancestor
    if not ancestor.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {what}: {ancestor} is a file, not a folder")
    try:
        if missing is None:
            with tempfile.TemporaryFile(dir=folder):
                pass
        else:
            missing.mkdir()
            missing.rmdir()
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot write {what}: {error.strerror or error} ({folder})") from None


def output_folder(text: str) -> Path:
    """A folder to write results into (created with its parents if missing)."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a file; give a folder for the results")
    _writable_folder(path, f"into {path}")
    return path


def png_file(text: str) -> Path:
    """A PNG file to write (its folder created if missing)."""
    path = Path(text).expanduser()
    if text.endswith(("/", os.sep)) or path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name ending in .png")
    if path.suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"the picture is written as PNG; give a path ending in .png, got {text}")
    _writable_folder(path.parent, f"the picture {path}")
    return path


# --------------------------------------------------------------------------------------------
# the budget options and the configuration they make


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every token-reduction subcommand shares."""
    from ..methods import available_methods

    group = parser.add_argument_group(
        "token budget", "With none of these, a model saved after hired.apply keeps its stored configuration; "
        "those given replace the stored ones."
    )
    amount = group.add_mutually_exclusive_group()
    amount.add_argument("--budget", type=budget_fraction, default=None,
                        help="fraction of the stock visual tokens to keep, in (0, 1] (default 0.2)")
    amount.add_argument("--tokens", type=integer(1), default=None, help="absolute visual tokens per image (>= 1)")
    group.add_argument("--method", type=method_name, default=None,
                       help=f"one of: {', '.join(available_methods())} (default hired)")
    group.add_argument("--alpha", type=share, default=None,
                       help="HiRED: base view's share of the budget, in [0, 1] (default 0.5); other methods refuse it")
    group.add_argument("--drop-layer", type=int, default=None, metavar="LAYER",
                       help="select at this vision-tower layer and run the layers after it over the kept tokens only "
                            "(the early drop: docs/early-drop.md; Qwen2.5-VL at a full-attention block; not "
                            "LLaVA-OneVision nor vLLM); default: select at the feature layer, every layer over "
                            "every token")
    group.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                       help="method-specific option (repeatable), e.g. --method-option seed=3")


def budget_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The budget options the user gave, as keywords of :meth:`hired.HiredConfig.create`."""
    options: dict[str, Any] = {}
    for item in args.method_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"--method-option expects KEY=VALUE, got {item!r}")
        if key in options:
            raise CliError(f"--method-option {key} is given twice; give each option once")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    if args.alpha is not None:
        if "alpha" in options:
            raise CliError("give alpha either as --alpha or as --method-option alpha=..., not both")
        options["alpha"] = args.alpha
    settings = {name: getattr(args, name) for name in ("budget", "tokens", "method", "drop_layer")
                if getattr(args, name, None) is not None}
    return {**settings, **({"method_options": options} if options else {})}


def check_settings(args: argparse.Namespace, needs: str) -> None:
    """Refuse, before a model loads, settings the command cannot serve whatever the model stores.

    ``needs``: ``"fixed"`` (a count known ahead of the model, for a processor) or ``"vision"`` (a
    selection made on the vision side, to draw). Checked when ``--method`` is given; a stored method
    is checked after loading.
    """
    from ..config import HiredConfig

    settings = budget_settings(args)
    if "method" not in settings:
        return
    from ..visualize import check_drawable

    try:
        config = HiredConfig.create(**settings)
        if needs == "fixed":
            config.require_fixed_count()
        else:
            check_drawable(config)
    except ValueError as error:
        raise CliError(str(error)) from None


def config_from_args(args: argparse.Namespace, model=None):
    """The :class:`hired.HiredConfig` the options ask for.

    A ``model`` that carries a stored configuration (saved after ``hired.apply``) keeps it, with
    the options given replacing the settings they name; otherwise the options build a new one.
    """
    from ..config import HiredConfig
    from ..state import stored_config

    settings = budget_settings(args)
    stored = stored_config(model) if model is not None else None
    try:
        return stored.updated(**settings) if stored is not None else HiredConfig.create(**settings)
    except ValueError as error:
        origin = " (the model's stored configuration with the options given)" if stored is not None else ""
        raise CliError(f"{error}{origin}") from None


def load_image(path: str):
    """Open an image file as upright RGB, with a clear error for anything unreadable."""
    from ..images import open_image

    try:
        return open_image(path)
    except ValueError as error:
        raise CliError(str(error)) from None


# --------------------------------------------------------------------------------------------
# models


def load_model(name: str, dtype: str):
    """:func:`hired.loading.load_model`, its refusals as one-line CLI errors."""
    from ..loading import load_model as load

    try:
        return load(name, dtype)
    except ValueError as error:
        raise CliError(str(error)) from None


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if getattr(args, "json", False) else text)
