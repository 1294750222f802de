"""The picture of a selection: every partition with its kept tokens and its attention heat map.

One column per partition (the base view, then the AnyRes tiles in row-major order), showing the
pixels the vision tower saw (read back from the processor's ``pixel_values``, square tiles or a
native raster of any shape): kept tokens outlined where the geometry puts them, dropped tokens
dimmed, pixels no fed token covers (padding) hatched, the partition's budget in the title; below,
the selection-layer attention (CLS, or received where the tower has no CLS token) that ranked the
tokens. For AnyRes models a first column shows the whole image with the tiles' regions and
budgets, over the base view's distribution-layer attention that shared the budget among them (the
paper's figure 1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

PANEL_INCHES = 3.0
TITLE_INCHES = 0.6
DPI = 100
DROPPED_BRIGHTNESS = 0.35


def figure_size(num_partitions: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of the picture for an image of ``num_partitions`` partitions."""
    columns = num_partitions + (1 if num_partitions > 1 else 0)
    return round(columns * PANEL_INCHES * DPI), round((2 * PANEL_INCHES + TITLE_INCHES) * DPI)


def check_drawable(config) -> None:
    """Raise ``ValueError`` unless ``config``'s method selects tokens on the vision side, which the picture shows."""
    from .methods import get_method

    if not get_method(config.method).selects_before_llm:
        raise ValueError(
            f"method {config.method!r} selects no visual tokens before the language model, so there is no "
            "selection to draw; pick a vision-side method (e.g. hired, random, spatial)"
        )


def select_tokens(model, processor, image: Image.Image, config):
    """Patch ``model`` with ``config``, encode ``image`` and return its selection record and tiles.

    Returns:
        ``(record, tiles)``: the :class:`hired.SelectionRecord` and the ``(P, H, W, 3)`` pixels in
        ``[0, 1]`` that each partition showed the vision tower (square tiles, or one native raster).

    Raises:
        ValueError: the method or budget selects nothing on the vision side, so there is nothing to show.
    """
    import hired

    check_drawable(config)
    hired.apply(model, processor, config)
    inputs = processor(images=[image], text=[processor.image_token], return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(model.device, model.dtype)
    image_inputs = {key: inputs[key] for key in ("pixel_values", "image_sizes", "batch_num_images", "image_grid_thw")
                    if key in inputs}
    with torch.inference_mode():
        model.model.get_image_features(**image_inputs)
    record = hired.selections(model)[0]
    if record.extras.get("stock_model"):
        raise ValueError(
            f"a budget of {config.budget if config.tokens is None else config.tokens} keeps every token of this "
            f"{image.width}x{image.height} image, so nothing is selected; give a smaller --budget or --tokens"
        )
    tiles = hired.family_of(model).partition_pixels(inputs)[: len(record.kept)].float().cpu()
    mean = torch.tensor(processor.image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)
    return record, (tiles * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def token_boxes(geometry, partition: int, panel_size: tuple[int, int]) -> np.ndarray:
    """``(s*s, 4)`` boxes ``(x0, y0, x1, y1)`` of ``partition``'s token positions in the pixels of its panel.

    ``panel_size`` is the ``(height, width)`` of the partition's pixels (as :func:`select_tokens`
    returns them); pixel ``(row, col)`` spans ``[col, col + 1) x [row, row + 1)``. Each token's
    footprint in the image is mapped through the window of the image that the partition's pixels
    show, so every partition shape (square tiles, a non-square native raster, the cells of a
    downsampled mosaic) is placed by the geometry itself. Positions past a native raster land
    outside the panel.
    """
    height, width = panel_size
    x0, y0, x1, y1 = geometry.windows()[partition].tolist()
    footprints = geometry.footprints(clip=False)[partition].numpy()
    scale = np.array([width / (x1 - x0), height / (y1 - y0)] * 2)
    return (footprints - np.array([x0, y0, x0, y0])) * scale


def selection_figure(image: Image.Image, record, geometry, tiles: np.ndarray):
    """The matplotlib ``Figure`` of ``record`` (see the module docstring).

    ``geometry`` is the image's partition geometry (``processor.hired_geometry`` of the patched
    processor); ``tiles`` the ``(P, H, W, 3)`` pixels of :func:`select_tokens`. Each partition's two
    axes carry the labels ``"tokens <p>"`` (pixels, kept tokens outlined) and ``"scores <p>"``.
    """
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone
    from matplotlib.patches import Rectangle

    partitions = len(record.kept)
    score = {"cls": "CLS attention"}.get(record.extras.get("score"), f"{record.extras.get('score')} score")
    width, height = figure_size(partitions)
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    columns = partitions + (1 if partitions > 1 else 0)
    grid = figure.add_gridspec(2, columns, left=0.01, right=0.99, bottom=0.01,
                               top=1 - TITLE_INCHES / (height / DPI), wspace=0.04, hspace=0.12)
    total = int(record.partition_tokens.sum())
    narrow = columns == 1  # one panel's width holds the title only on two lines in a smaller font
    figure.suptitle(
        f"{record.method}: {record.visual_tokens} of {record.stock_tokens} visual tokens kept "
        f"({100 * record.visual_tokens / record.stock_tokens:.0f}%),{chr(10) if narrow else ' '}"
        f"image {image.width}x{image.height}, "
        + (f"grid {record.grid[0]}x{record.grid[1]}" if partitions > 1 else "one partition"),
        fontsize=8 if narrow else 11,
    )
    candidates = geometry.candidates
    first = 0
    if partitions > 1:
        first = 1
        _draw_overview(figure, grid, image, record, geometry, total, score)
    for p in range(partitions):
        title = "base view" if p == 0 else f"tile {p} (row {(p - 1) // record.grid[1] + 1}, col {(p - 1) % record.grid[1] + 1})"
        pixels = tiles[p]
        boxes = token_boxes(geometry, p, pixels.shape[:2])
        fed = candidates[p].nonzero().flatten().tolist()
        kept = set(record.kept[p].tolist())
        top = figure.add_subplot(grid[0, first + p], label=f"tokens {p}")
        top.imshow(_dimmed(pixels, boxes, fed, kept))
        for index in sorted(kept):
            x0, y0, x1, y1 = boxes[index]
            top.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,  # pixel centres at integers
                                    edgecolor="#00e5ff", linewidth=0.8))
        top.set_title(f"{title}: {int(record.partition_tokens[p])} of {len(fed)} kept", fontsize=9)
        bottom = figure.add_subplot(grid[1, first + p], label=f"scores {p}")
        scores = record.selection_scores[p].float().numpy()
        bottom.imshow(pixels.mean(axis=2), cmap="gray", vmin=0, vmax=1)
        bottom.imshow(_painted(pixels.shape[:2], boxes, {i: float(scores[i]) for i in fed}, np.nan),
                      cmap="inferno", alpha=0.75, norm=_norm(scores[fed]))
        bottom.set_title(f"selection-layer {score} (sqrt scale)", fontsize=8)
        for axis in (top, bottom):
            axis.set_axis_off()
    return figure


def draw_selection(image: Image.Image, record, geometry, tiles: np.ndarray, path: Path) -> None:
    """Write :func:`selection_figure` of ``record`` to ``path`` as PNG."""
    selection_figure(image, record, geometry, tiles).savefig(path, dpi=DPI, format="png")


def _norm(scores: np.ndarray):
    """Square-root colour scale: attention is peaked, and a linear scale shows only its peak."""
    from matplotlib.colors import PowerNorm

    return PowerNorm(gamma=0.5, vmin=0.0, vmax=max(float(scores.max(initial=0.0)), 1e-12))  # a tile of padding feeds none


def _painted(size: tuple[int, int], boxes: np.ndarray, values: dict[int, float], background: float) -> np.ndarray:
    """A ``size`` array of ``background`` with token ``i``'s box (rounded to whole pixels) set to ``values[i]``."""
    height, width = size
    spans = np.clip(np.rint(boxes), 0, [width, height, width, height]).astype(int)
    canvas = np.full(size, background, dtype=np.float64)
    for index, value in values.items():
        x0, y0, x1, y1 = spans[index]
        canvas[y0:y1, x0:x1] = value
    return canvas


def _dimmed(pixels: np.ndarray, boxes: np.ndarray, fed: list[int], kept: set[int]) -> np.ndarray:
    """The partition with dropped tokens darkened and pixels no fed token covers (padding) striped."""
    brightness = _painted(pixels.shape[:2], boxes, {i: 1.0 if i in kept else DROPPED_BRIGHTNESS for i in fed}, np.nan)
    padding = np.isnan(brightness)
    shaded = pixels * np.where(padding, DROPPED_BRIGHTNESS, brightness)[..., None]
    stripes = (np.add.outer(np.arange(pixels.shape[0]), np.arange(pixels.shape[1])) // 4) % 2 == 0
    shaded[padding & stripes] = 0.6
    return shaded


def _draw_overview(figure, grid, image, record, geometry, total: int, score: str) -> None:
    from matplotlib.patches import Rectangle

    footprints = geometry.footprints()
    top = figure.add_subplot(grid[0, 0])
    top.imshow(image)
    top.set_title(f"image: base view {int(record.partition_tokens[0])}, tiles {total - int(record.partition_tokens[0])}", fontsize=9)
    bottom = figure.add_subplot(grid[1, 0])
    side = geometry.side
    scores = record.distribution_scores.float().view(side, side).numpy()
    bottom.imshow(scores, cmap="inferno", extent=(0, image.width, image.height, 0), aspect="auto", norm=_norm(scores))
    bottom.set_title(f"base view, distribution-layer {score} (sqrt)", fontsize=8)
    for p in range(1, geometry.num_partitions):
        boxes = footprints[p][geometry.candidates[p]]
        if not len(boxes):  # a tile of padding only (very wide or tall images): nothing of the image to outline
            continue
        x0, y0 = float(boxes[:, 0].min()), float(boxes[:, 1].min())
        x1, y1 = float(boxes[:, 2].max()), float(boxes[:, 3].max())
        for axis in (top, bottom):
            axis.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="#00e5ff", linewidth=1.2))
            axis.text(x0 + 0.04 * (x1 - x0), y0 + 0.12 * (y1 - y0), f"{p}: {int(record.partition_tokens[p])}", color="white",
                      fontsize=8, bbox={"facecolor": "black", "alpha": 0.6, "pad": 1, "linewidth": 0})
    for axis in (top, bottom):
        axis.set_xlim(0, image.width)
        axis.set_ylim(image.height, 0)
        axis.set_axis_off()


def show(model, processor, image: Image.Image, config, path: Path) -> None:
    """Select tokens of ``image`` with ``config`` and write the picture of the selection to ``path``."""
    record, tiles = select_tokens(model, processor, image, config)
    draw_selection(image, record, processor.hired_geometry((image.height, image.width)), tiles, path)
