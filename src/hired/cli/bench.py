"""``hired bench``: the efficiency benchmark on the real architectures with random weights."""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

from PIL.Image import MAX_IMAGE_PIXELS

from ..bench.models import known_models
from ..bench.runner import BenchSpec, default_methods
from .common import DTYPES, CliError, fraction, integer, output_folder, positive_number, unique

MEMORY_NOTE = (
    "peak_rss_mb is the resident-set high-water mark of a fresh process serving one request of the variant, "
    "weights included, counted from the end of model building (Linux VmHWM reset); model_rss_mb is that "
    "process's resident set right after building the model"
)


def _image_size(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit() or int(width) < 1 or int(height) < 1:
        raise argparse.ArgumentTypeError(f"image size must look like WIDTHxHEIGHT (e.g. 672x672), got {text!r}")
    if int(width) * int(height) > MAX_IMAGE_PIXELS:
        raise argparse.ArgumentTypeError(f"{text} is {int(width) * int(height)} pixels, above the {MAX_IMAGE_PIXELS} "
                                         "an image may have (Pillow's guard); the models resize to at most 1008 px")
    return int(width), int(height)


def _run(args: argparse.Namespace) -> None:
    from ..bench.report import markdown_table, write_outputs
    from ..bench.runner import ProbeFailed, run_benchmark

    for values, option in ((args.methods or [], "--methods"), (args.budgets, "--budgets"),
                           (args.image_size, "--image-size"), (args.batch, "--batch")):
        unique(values, option)
    bench = BenchSpec(
        model=args.model, layers=args.layers, dtype=args.dtype, methods=args.methods, budgets=args.budgets,
        image_sizes=args.image_size, batches=args.batch, new_tokens=args.new_tokens, warmup=args.warmup,
        repeats=args.repeats, peak_memory=not args.no_peak_memory, max_memory_gb=args.max_memory_gb, seed=args.seed,
    )
    try:
        spec = bench.validate()
    except ValueError as error:
        raise CliError(str(error)) from None
    steps = len(bench.variants()) * len(bench.image_sizes) * len(bench.batches)
    total = steps * (bench.warmup + bench.repeats + (1 if bench.peak_memory else 0))
    depth = bench.layers or spec.full_layers
    print(f"{spec.checkpoint}: {depth} of {spec.full_layers} decoder layers, {bench.dtype}, random weights",
          file=sys.stderr)
    from tqdm import tqdm

    with tqdm(total=total, desc="hired bench", disable=args.quiet) as bar:
        def progress(label: str) -> None:
            bar.set_postfix_str(label)
            bar.update()

        try:
            records = run_benchmark(bench, progress)
        except (ValueError, ProbeFailed) as error:
            raise CliError(str(error)) from None
    settings = {**asdict(bench), "memory_measurement": MEMORY_NOTE}
    paths = write_outputs(records, Path(args.output), _command(bench, str(args.output)), settings)
    print(markdown_table(records))
    print("wrote " + ", ".join(str(path) for path in paths.values()))


def _command(bench: BenchSpec, output: str) -> str:
    """The run as one explicit command line, defaults spelled out, to rerun it exactly."""
    words = ["hired", "bench", "--model", bench.model, "--dtype", bench.dtype]
    if bench.layers is not None:
        words += ["--layers", str(bench.layers)]
    words += ["--methods", *bench.methods, "--budgets", *map(str, bench.budgets)]
    words += ["--image-size", *(f"{w}x{h}" for w, h in bench.image_sizes), "--batch", *map(str, bench.batches)]
    words += ["--new-tokens", str(bench.new_tokens), "--warmup", str(bench.warmup), "--repeats", str(bench.repeats)]
    words += ["--seed", str(bench.seed), "--output", output]
    if not bench.peak_memory:
        words.append("--no-peak-memory")
    return shlex.join(words)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "bench", help="measure time to first token, decode speed and memory of each method and budget",
        description="Build a real VLM architecture (LLaVA-NeXT, LLaVA-1.5, InternVL, LLaVA-OneVision) from its stored "
        "configuration with random weights and "
        "measure, for the stock model and every (method, budget): visual tokens, time to first token split into "
        "preprocessing / vision encoder / selection / LLM prefill, decode and end-to-end tokens/s, peak memory "
        "(each variant in a fresh process), the exact KV-cache size and the FLOP-ideal speed-up. Variants are "
        "interleaved; times are medians over --repeats. Writes bench.json, bench.md and bench.png.",
    )
    bench.add_argument("--model", default="llava-v1.6-vicuna-7b-hf",
                       help=f"architecture (hub organisation prefix optional): {', '.join(known_models())}")
    bench.add_argument("--layers", type=integer(1), default=None,
                       help="decoder layers to build (default: all, as the checkpoint); stated in every output")
    bench.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    bench.add_argument("--methods", nargs="+", default=None,
                       help=f"methods to compare with the stock model (default: {', '.join(default_methods())})")
    bench.add_argument("--budgets", nargs="+", type=fraction, default=[0.1, 0.2, 0.4, 1.0],
                       help="fractions of the stock visual tokens, each in (0, 1] (default 0.1 0.2 0.4 1.0)")
    bench.add_argument("--image-size", nargs="+", type=_image_size, default=[(672, 672)], metavar="WxH",
                       help="image sizes, each picking a grid: 672x672 (2x2), 1008x336 (1x3), 1000x600, 336x336")
    bench.add_argument("--batch", nargs="+", type=integer(1), default=[1], help="batch sizes, e.g. 1 2 4 (default 1)")
    bench.add_argument("--new-tokens", type=integer(2), default=8, help="tokens generated per request (>= 2)")
    bench.add_argument("--warmup", type=integer(0), default=1, help="untimed requests per variant first (default 1)")
    bench.add_argument("--repeats", type=integer(1), default=3, help="timed requests per variant, interleaved (default 3)")
    bench.add_argument("--no-peak-memory", action="store_true",
                       help="skip the per-variant fresh-process memory probes (peak_rss_mb becomes null)")
    bench.add_argument("--max-memory-gb", type=positive_number, default=None,
                       help="refuse runs estimated above this (default: the memory available now)")
    bench.add_argument("--seed", type=integer(0), default=0, help="seed of the random weights and images (default 0)")
    bench.add_argument("--output", type=output_folder, default="bench-results", help="folder for bench.json, bench.md, bench.png")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.set_defaults(run=_run)
