"""The evidence benchmark: how much of the drawn evidence the tokens each method keeps can see.

Every method runs through the real ``hired.apply`` path on the model's vision side (the patched
``get_image_features``); the kept tokens of ``hired.selections(model)`` are mapped back to the
image through the AnyRes geometry, and compared with the evidence boxes the generators drew.

Definitions (per evidence box, an *item*):

- a kept token's *footprint* is the image region its patch sees: for the base view, cell
  ``(i, j)`` of an ``s x s`` grid over the whole (squashed) image; for a tile, its patch square
  on the canvas, mapped back through the aspect-preserving resize and its centred padding, and
  clipped to the image;
- *tile coverage* of an item is the share of its box area inside the union of the footprints of
  the kept tile tokens (full resolution); *any coverage* counts kept base-view tokens too (the
  base view sees the whole image at a quarter of the tile resolution for a 2x2 grid);
- *recall by item* (``evidence_recall``, ``evidence_recall_any``) is the share of items whose
  coverage exceeds one half; *recall by area* (``evidence_area_recall``,
  ``evidence_area_recall_any``) is the mean coverage over items.

Items are pooled over all images of a split. Confidence intervals are 95% percentile bootstrap
intervals over images (an image's items are resampled together), with the same resamples for
every configuration, so differences between methods are paired.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from hired.geometry import AnyresGeometry

from .sample import Box, Sample
from .statistics import interval, pooled_difference, pooled_ratio

SPLITS = ("scenes", "documents")
DEFAULT_BUDGETS = (0.05, 0.1, 0.2, 0.4)
DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75)
MAJORITY = 0.5
METRICS = ("evidence_recall", "evidence_recall_any", "evidence_area_recall", "evidence_area_recall_any")


# --------------------------------------------------------------------------------------------
# Geometry: kept tokens -> image regions -> covered evidence


def _clip(rects: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Intersections of ``rects`` (N, 4) with ``box``, empty ones dropped."""
    clipped = np.concatenate([np.maximum(rects[:, :2], box[:2]), np.minimum(rects[:, 2:], box[2:])], axis=1)
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return clipped[keep]


def _area(rects: np.ndarray) -> float:
    return float(((rects[:, 2] - rects[:, 0]) * (rects[:, 3] - rects[:, 1])).sum())


def box_coverage(box: Box, tile_rects: np.ndarray, base_rects: np.ndarray) -> tuple[float, float]:
    """``(tile coverage, any coverage)`` of ``box`` by kept footprints.

    Tile footprints do not overlap one another, nor do base footprints, so the union of both is
    ``|T| + |B| - |T n B|`` with ``|T n B|`` the sum of the pairwise intersections: exact, no
    rasterisation.
    """
    box = np.asarray(box, dtype=np.float64)
    area = (box[2] - box[0]) * (box[3] - box[1])
    if area <= 0:
        raise ValueError(f"evidence box {tuple(box)} has no area")
    tiles, base = _clip(tile_rects, box), _clip(base_rects, box)
    tile_area = _area(tiles)
    if len(tiles) and len(base):
        x0 = np.maximum(tiles[:, None, 0], base[None, :, 0])
        y0 = np.maximum(tiles[:, None, 1], base[None, :, 1])
        x1 = np.minimum(tiles[:, None, 2], base[None, :, 2])
        y1 = np.minimum(tiles[:, None, 3], base[None, :, 3])
        both = float((np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)).sum())
    else:
        both = 0.0
    return tile_area / area, (tile_area + _area(base) - both) / area


def kept_coverage(
    geometry: AnyresGeometry, kept: Sequence[torch.Tensor], boxes: Sequence[Box]
) -> np.ndarray:
    """``(len(boxes), 2)``: tile and any coverage of each box by the kept tokens of one image.

    Args:
        geometry: the image's AnyRes geometry.
        kept: kept indices per partition (base view first), as in :class:`hired.SelectionRecord`.
        boxes: evidence boxes in pixels of the original image.
    """
    footprints = geometry.footprints()
    if len(kept) != geometry.num_partitions:
        raise ValueError(f"{len(kept)} kept-index lists for an image of {geometry.num_partitions} partitions")
    base_rects = footprints[0, kept[0].long()].numpy()
    tile_rects = np.concatenate(
        [footprints[p, kept[p].long()].numpy() for p in range(1, geometry.num_partitions)]
    ).reshape(-1, 4)
    return np.array([box_coverage(box, tile_rects, base_rects) for box in boxes]).reshape(-1, 2)


# --------------------------------------------------------------------------------------------
# Statistics


@dataclass
class ImageResult:
    """Coverage of the items of one image under one configuration."""

    coverage: np.ndarray  # (items, 2): tile, any
    question_types: list[str]
    visual_tokens: int
    stock_tokens: int


def _per_image_totals(results: Sequence[ImageResult]) -> tuple[np.ndarray, np.ndarray]:
    """``(images, 4)`` sums behind each metric (items over half covered, coverage) and ``(images,)`` item counts."""
    totals = np.array([
        [(r.coverage[:, 0] > MAJORITY).sum(), (r.coverage[:, 1] > MAJORITY).sum(),
         r.coverage[:, 0].sum(), r.coverage[:, 1].sum()]
        for r in results
    ], dtype=np.float64).reshape(-1, 4)
    counts = np.array([len(r.coverage) for r in results], dtype=np.float64)
    return totals, counts


def summarize(results: Sequence[ImageResult], resamples: int, seed: int) -> dict[str, Any]:
    """Point estimates and 95% bootstrap intervals (over images) of the recall metrics over ``results``."""
    totals, counts = _per_image_totals(results)
    if counts.sum() == 0:
        raise ValueError("the split has no evidence items")
    point = totals.sum(axis=0) / counts.sum()
    low, high = interval((totals.T, np.broadcast_to(counts, totals.T.shape)), pooled_ratio, resamples, seed)
    summary: dict[str, Any] = {}
    for index, metric in enumerate(METRICS):
        summary[metric] = float(point[index])
        summary[f"{metric}_ci"] = [float(low[index]), float(high[index])]
    summary["ci_low"], summary["ci_high"] = summary["evidence_recall_ci"]
    by_type: dict[str, list[float]] = {}
    for result in results:
        for kind, tile in zip(result.question_types, result.coverage[:, 0]):
            by_type.setdefault(kind, []).append(float(tile > MAJORITY))
    summary["evidence_recall_by_question_type"] = {k: float(np.mean(v)) for k, v in sorted(by_type.items())}
    summary["visual_tokens"] = float(np.mean([r.visual_tokens for r in results]))
    summary["stock_tokens"] = float(np.mean([r.stock_tokens for r in results]))
    summary["images"] = len(results)
    summary["items"] = int(sum(len(r.coverage) for r in results))
    return summary


# --------------------------------------------------------------------------------------------
# Running the model


@dataclass(frozen=True)
class Setting:
    """One benchmark configuration."""

    method: str
    budget: float
    alpha: float | None
    score: str | None = None  # HiRED's attention score; None: the method's default

    def config(self):
        from hired import HiredConfig

        if self.method == "full":
            return HiredConfig(budget=1.0, method="full")
        options = {name: value for name, value in (("alpha", self.alpha), ("score", self.score)) if value is not None}
        return HiredConfig(budget=self.budget, method=self.method, method_options=options)


def settings_for(methods: Sequence[str], budgets: Sequence[float], alphas: Sequence[float],
                 scores: Sequence[str | None] = (None,)) -> list[Setting]:
    """HiRED at every budget, alpha and score, every other vision-side method at every budget, ``full`` once.

    Raises:
        ValueError: an unknown method, or one that selects nothing on the vision side.
    """
    from hired.methods import get_method

    settings = []
    for name in methods:
        method = get_method(name)
        if name == "full":
            settings.append(Setting("full", 1.0, None))
            continue
        if not method.selects_before_llm:
            raise ValueError(
                f"method {name!r} prunes inside the language model, so it keeps every visual token the vision "
                "side sees; the evidence benchmark only compares vision-side selections"
            )
        for budget in budgets:
            if name == "hired":
                settings.extend(Setting(name, budget, alpha, score) for score in scores for alpha in alphas)
            else:
                settings.append(Setting(name, budget, None))
    return settings


def _group_by_image(samples: Sequence[Sample]) -> list[tuple[Any, list[Box], list[str]]]:
    """Samples that share one image object become one entry with all their evidence boxes."""
    groups: dict[int, tuple[Any, list[Box], list[str]]] = {}
    for sample in samples:
        image, boxes, kinds = groups.setdefault(id(sample.image), (sample.image, [], []))
        boxes.extend(sample.evidence)
        kinds.extend([sample.question_type] * len(sample.evidence))
    return list(groups.values())


def measure(
    model,
    processor,
    samples: Sequence[Sample],
    settings: Sequence[Setting],
    batch_size: int = 4,
    progress: bool = True,
) -> dict[Setting, list[ImageResult]]:
    """Run every setting over the images of ``samples`` and measure the coverage of their evidence.

    The model and processor are patched by ``hired.apply`` for each setting in turn (the tower runs
    once per batch of images) and restored to the stock classes at the end.
    """
    import hired

    groups = _group_by_image(samples)
    if not groups:
        raise ValueError("no samples to measure: the split is empty")
    vision = model.config.vision_config
    pinpoints = getattr(model.config, "image_grid_pinpoints", None)
    if pinpoints is None:
        raise ValueError("the evidence benchmark needs a LLaVA-NeXT (AnyRes) model; this one has a single partition")
    results: dict[Setting, list[ImageResult]] = {setting: [] for setting in settings}
    bar = _progress(len(groups) * len(settings), progress)
    try:
        for start in range(0, len(groups), batch_size):
            batch = groups[start:start + batch_size]
            inputs = processor.image_processor([image for image, _, _ in batch], return_tensors="pt")
            pixel_values = inputs["pixel_values"].to(model.device, model.dtype)
            tower_runs: dict = {}  # the tower runs once per batch for all settings
            for setting in settings:
                hired.apply(model, processor, setting.config())
                hired.share_tower_runs(model, tower_runs)
                with torch.inference_mode():
                    model.model.get_image_features(pixel_values=pixel_values, image_sizes=inputs["image_sizes"])
                for (_image, boxes, kinds), record in zip(batch, hired.selections(model)):
                    geometry = AnyresGeometry.create(record.image_size, vision.image_size, vision.patch_size, pinpoints)
                    results[setting].append(
                        ImageResult(kept_coverage(geometry, record.kept, boxes), kinds, record.visual_tokens,
                                    record.stock_tokens)
                    )
                bar.update(len(batch))
    finally:
        bar.close()
        hired.remove(model, processor)
    return results


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="evidence", unit="image", disable=not enabled)


def records_for(
    split: str, results: dict[Setting, list[ImageResult]], seed: int, resamples: int
) -> list[dict[str, Any]]:
    """One JSON record per setting.

    Every other record carries ``hired_minus_this``: for each metric, the reference (HiRED with
    alpha 0.5 and the first score measured, same budget) minus this setting, with a paired 95%
    bootstrap interval (same resampled images).
    """
    summaries = {setting: summarize(rows, resamples, seed) for setting, rows in results.items()}
    references = {}
    for setting in results:
        if setting.method == "hired" and setting.alpha == 0.5:
            references.setdefault(setting.budget, setting)
    records = []
    for setting, summary in summaries.items():
        record = {"split": split, "method": setting.method, "budget": setting.budget, "alpha": setting.alpha,
                  "seed": seed, **({} if setting.score is None else {"score": setting.score}), **summary}
        reference = references.get(setting.budget)
        if reference is not None and setting != reference:
            reference_totals, counts = _per_image_totals(results[reference])
            totals, _ = _per_image_totals(results[setting])
            samples = (reference_totals.T, totals.T, np.broadcast_to(counts, totals.T.shape))
            low, high = interval(samples, pooled_difference, resamples, seed)
            record["hired_minus_this"] = {
                metric: [summaries[reference][metric] - summary[metric], float(low[i]), float(high[i])]
                for i, metric in enumerate(METRICS)
            }
        records.append(record)
    return records


# --------------------------------------------------------------------------------------------
# Splits and reports


def load_split(split: str, seed: int, images: int) -> list[Sample]:
    """The samples of a split: ``images`` generated images from ``seed``.

    Documents carry four questions per page, each with the box of the text that answers it.
    In scenes every drawn object is an item (each is the answer region of some question), so a
    scene contributes all its objects rather than the one its question names.
    """
    if split == "documents":
        from .documents import generate_documents

        return generate_documents(seed, images, questions_per_image=4)
    if split == "scenes":
        from .scenes import generate_scenes

        return [
            dataclasses.replace(sample, evidence=[tuple(item["box"])], question_type="object")
            for sample in generate_scenes(seed, images)
            for item in sample.meta["objects"]
        ]
    raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")


def _label(record: dict[str, Any]) -> str:
    if record["method"] == "hired":
        score = f", score {record['score']}" if record.get("score") else ""
        return f"hired (alpha {record['alpha']:g}{score})"
    return record["method"]


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def markdown_report(records: Sequence[dict[str, Any]]) -> str:
    """Results tables, one per split, recall in percent with 95% bootstrap intervals."""
    lines = []
    for split in dict.fromkeys(r["split"] for r in records):
        rows = [r for r in records if r["split"] == split]
        references = [_label(r) for r in rows if r["method"] == "hired" and r["alpha"] == 0.5
                      and "hired_minus_this" not in r]
        reference = references[0] if references else "hired (alpha 0.5)"
        lines += [
            f"### {split} ({rows[0]['images']} images, {rows[0]['items']} evidence items, seed {rows[0]['seed']})",
            "",
            "| method | budget | visual tokens | recall, tile, by item [95% CI] | recall, any, by item [95% CI] "
            f"| recall, tile, by area | recall, any, by area | {reference} minus this [95% CI] |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted(rows, key=lambda r: (r["budget"], r["method"] != "hired", r["method"], r.get("score") or "",
                                             r["alpha"] or 0)):
            difference = ""
            if "hired_minus_this" in r:
                value, low, high = r["hired_minus_this"]["evidence_recall"]
                difference = f"{_percent(value)} [{_percent(low)}, {_percent(high)}]"
            lines.append(
                f"| {_label(r)} | {_percent(r['budget'])}% | {r['visual_tokens']:.0f} of {r['stock_tokens']:.0f} "
                f"| {_percent(r['evidence_recall'])} [{_percent(r['ci_low'])}, {_percent(r['ci_high'])}] "
                f"| {_percent(r['evidence_recall_any'])} [{_percent(r['evidence_recall_any_ci'][0])}, "
                f"{_percent(r['evidence_recall_any_ci'][1])}] "
                f"| {_percent(r['evidence_area_recall'])} | {_percent(r['evidence_area_recall_any'])} | {difference} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(records: Sequence[dict[str, Any]], path: Path) -> None:
    """Recall against budget per method, tile and any tokens, one column per split."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone
    from matplotlib.ticker import NullLocator

    splits = list(dict.fromkeys(r["split"] for r in records))
    labels = list(dict.fromkeys(_label(r) for r in records if r["method"] != "full"))
    reference = next((label for label in labels if label.startswith("hired (alpha 0.5")), None)  # drawn bold
    palette = colormaps["tab20"].colors
    colours = dict(zip(labels, palette[::2] + palette[1::2]))
    figure = Figure(figsize=(6 * len(splits), 8))
    axes = figure.subplots(2, len(splits), squeeze=False, sharey=True)
    for column, split in enumerate(splits):
        rows = [r for r in records if r["split"] == split and r["method"] != "full"]
        for row, (metric, title) in enumerate(
            [("evidence_recall", "kept tile tokens"), ("evidence_recall_any", "any kept token")]
        ):
            ax = axes[row][column]
            for label in labels:
                line = sorted((r for r in rows if _label(r) == label), key=lambda r: r["budget"])
                if not line:
                    continue
                x = [100 * r["budget"] for r in line]
                y = np.array([100 * r[metric] for r in line])
                ci = np.array([[100 * v for v in r[f"{metric}_ci"]] for r in line])
                headline = label == reference
                style = "--" if label.startswith("hired") and not headline else "-"
                ax.errorbar(x, y, yerr=[y - ci[:, 0], ci[:, 1] - y], label=label, linestyle=style, marker="o",
                            color=colours[label], markersize=3, capsize=2, linewidth=2.2 if headline else 1.2)
            ax.set_xscale("log")
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticks([100 * b for b in sorted({r["budget"] for r in rows})])
            ax.set_xticklabels([f"{100 * b:g}%" for b in sorted({r["budget"] for r in rows})])
            ax.set_title(f"{split}: evidence items covered by {title}")
            ax.set_xlabel("token budget")
            ax.set_ylabel("items more than half covered (%)")
            ax.grid(alpha=0.3)
        axes[0][column].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def run(
    model_name: str,
    splits: Sequence[str],
    seed: int,
    images: int,
    methods: Sequence[str],
    budgets: Sequence[float],
    alphas: Sequence[float],
    scores: Sequence[str | None],
    resamples: int,
    batch_size: int,
    output: Path,
    command: str,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """The whole benchmark: generate, measure, summarise, write ``evidence.json``, ``.md`` and ``.png``."""
    from hired.cli.common import load_model
    from hired.report import write_report

    settings = settings_for(methods, budgets, alphas, scores)
    model, processor = load_model(model_name, "float32")
    records = []
    for split in splits:
        samples = load_split(split, seed, images)
        results = measure(model, processor, samples, settings, batch_size=batch_size, progress=progress)
        records.extend(records_for(split, results, seed, resamples))
    write_report(output, "evidence", command, records, markdown_report(records), plot=lambda path: plot(records, path))
    return records


def reproducing_command(args: argparse.Namespace, methods: Sequence[str]) -> str:
    """The run as one command line, every setting spelled out."""
    words = ["hired", "evidence", "--model", args.model, "--split", *args.split, "--seed", str(args.seed),
             "--images", str(args.images), "--method", *methods, "--budget", *map(str, args.budget),
             "--alpha", *map(str, args.alpha), *(["--score", *args.score] if args.score else []),
             "--resamples", str(args.resamples), "--batch-size", str(args.batch_size), "-o", str(args.output)]
    return shlex.join(words)


def _run_cli(args: argparse.Namespace) -> None:
    from hired.cli.common import CliError, emit, unique
    from hired.methods import vision_methods

    methods = args.method or vision_methods()
    if args.alpha is not None and "hired" not in methods:
        raise CliError("--alpha sets HiRED's base-view share, and hired is not among the --method given")
    if args.score is not None and "hired" not in methods:
        raise CliError("--score sets HiRED's attention score, and hired is not among the --method given")
    args.alpha = list(DEFAULT_ALPHAS) if args.alpha is None else args.alpha
    scores = [None] if args.score is None else args.score
    for values, option in ((methods, "--method"), (args.budget, "--budget"), (args.alpha, "--alpha"), (scores, "--score")):
        unique(values, option)
    try:
        settings_for(methods, args.budget, args.alpha, scores)
        command = reproducing_command(args, methods)
        records = run(args.model, args.split, args.seed, args.images, methods, args.budget, args.alpha, scores,
                      args.resamples, args.batch_size, Path(args.output), command, progress=not args.quiet)
    except (ValueError, ImportError) as error:
        raise CliError(str(error)) from None
    headline = [r for r in records if r["budget"] == 0.2 and (r["alpha"] in (None, 0.5))]
    text = "\n".join(
        f"{r['split']:9} {_label(r):18} budget {_percent(r['budget'])}%: recall (tile) {_percent(r['evidence_recall'])}% "
        f"[{_percent(r['ci_low'])}, {_percent(r['ci_high'])}], any {_percent(r['evidence_recall_any'])}%"
        for r in headline
    ) + f"\nwrote {Path(args.output) / 'evidence.json'}, .md and .png"
    emit(args, records, text)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    from hired.cli.common import fraction, integer, output_folder, share

    parser = subparsers.add_parser(
        "evidence", help="measure how much drawn evidence each method's kept tokens cover",
        description="Generate scenes and documents with known evidence boxes, run every method through "
        "hired.apply, and report evidence recall (tile and any tokens, by item and by area) with bootstrap "
        "intervals. Writes evidence.json, evidence.md and evidence.png to --output.",
    )
    parser.add_argument("--model", default="offline",
                        help="'offline' (real DINOv2 encoder), 'tiny-random', a hub id or a local folder")
    parser.add_argument("--split", nargs="+", choices=SPLITS, default=list(SPLITS))
    parser.add_argument("--seed", type=integer(0), default=0,
                        help="generation and bootstrap seed (a new seed is a fresh split)")
    parser.add_argument("--images", type=integer(1), default=60, help="images per split")
    parser.add_argument("--method", nargs="+", default=None, help="methods to compare (default: every vision-side method)")
    parser.add_argument("--budget", nargs="+", type=fraction, default=list(DEFAULT_BUDGETS),
                        help="fractions of the stock tokens, each in (0, 1]")
    parser.add_argument("--alpha", nargs="+", type=share, default=None,
                        help=f"HiRED alpha sweep, in [0, 1] (default {' '.join(map(str, DEFAULT_ALPHAS))})")
    parser.add_argument("--score", nargs="+", choices=("cls", "received", "mean-query", "key-norm", "distinct"),
                        default=None,
                        help="HiRED's attention score: the CLS row, the attention each token receives, or both "
                        "(default: the method's own, CLS on this encoder); the first is the reference of the paired "
                        "differences")
    parser.add_argument("--resamples", type=integer(10), default=1000, help="bootstrap resamples (>= 10)")
    parser.add_argument("--batch-size", type=integer(1), default=4, help="images per encoder call")
    parser.add_argument("-o", "--output", type=output_folder, default="evidence-results", help="output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the records as JSON")
    parser.set_defaults(run=_run_cli)
