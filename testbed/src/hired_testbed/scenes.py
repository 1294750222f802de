"""Generated scenes: patterned shapes on plain, noisy and real-photo backgrounds, with known evidence.

Each image is laid out on a LLaVA-NeXT canvas (1x2, 2x1, 2x2, 1x3 or 3x1 tiles of 224 px, in
turn, so that every grid occurs), drawn at 1x or 2x that size and, where the grid stays the same, trimmed by up to 8% along its
shorter side so that the stock model has padding to remove. Three to six objects by default (the
``objects`` range; the trained VLM's task has one). Every object is a circle, square, triangle or
diamond of one of six colours (no two alike in a scene), 3 to 4 patches (42-56 px) across at tile resolution, filled with one
of four patterns (plain, stripes, bars, checks). The patterns alternate a lighter and a darker shade
of the colour with a 4 px period at tile resolution and have the colour as their mean. The base
view squashes the whole image into one tile and averages the patterns away where it shrinks both
sides (a 1x2, 2x1, 1x3 or 3x1 image keeps its bars or its stripes along the side that is not
shrunk as much): pattern questions need the tiles, colour and shape questions do not.

Scenes are drawn from a generator seeded by ``(seed, index)``, so scene ``i`` is the same whatever
``n``, and any other ``seed`` gives a fresh split. :func:`ask` draws a fresh question about an
existing scene (the trainer asks new questions about cached scenes at every step).
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw
from transformers.image_processing_utils import select_best_resolution

from .sample import Box, Sample

TILE = 224
# (rows, cols) of the AnyRes grid each scene is laid out for, cycled by index.
GRIDS: tuple[tuple[int, int], ...] = ((2, 2), (1, 2), (2, 1), (1, 3), (3, 1))
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 55, 55),
    "green": (55, 165, 70),
    "blue": (55, 90, 200),
    "yellow": (200, 185, 55),
    "purple": (140, 60, 190),
    "orange": (200, 120, 55),
}
SHADE = 55  # pattern shades are colour +- SHADE, so every pattern averages to the colour
SHAPES = ("circle", "square", "triangle", "diamond")
PATTERNS = ("plain", "stripes", "bars", "checks")
QUESTION_TYPES = ("pattern", "colour", "shape")
BACKGROUNDS = ("plain", "noise", "photo")
OBJECT_COUNT = (3, 6)  # objects per scene, at most one per colour
OBJECT_SIZE = (42, 56)  # pixels at tile resolution: 3 to 4 patches of 14 px
HALF_PERIOD = 2  # pixels at tile resolution
PHOTOS = ("china", "flower", "astronaut", "coffee", "chelsea", "rocket")

VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(
        "what color is the pattern on shape object ?".split() + list(COLOURS) + list(SHAPES) + list(PATTERNS)
    )
)


def _question(question_type: str, target: dict) -> tuple[str, str]:
    if question_type == "pattern":
        return f"what pattern is on the {target['colour']} {target['shape']} ?", target["pattern"]
    if question_type == "colour":
        return f"what color is the {target['shape']} ?", target["colour"]
    if question_type == "shape":
        return f"what shape is the {target['colour']} object ?", target["shape"]
    raise ValueError(f"unknown question type {question_type!r}; known: {', '.join(QUESTION_TYPES)}")


def _askable(objects: list[dict], question_type: str) -> list[dict]:
    """Objects a question of this type names unambiguously."""
    key = {"pattern": ("colour", "shape"), "colour": ("shape",), "shape": ("colour",)}[question_type]
    counts: dict[tuple, int] = {}
    for item in objects:
        counts[tuple(item[k] for k in key)] = counts.get(tuple(item[k] for k in key), 0) + 1
    return [item for item in objects if counts[tuple(item[k] for k in key)] == 1]


def ask(
    objects: list[dict], rng: np.random.Generator, question_types: tuple[str, ...] = QUESTION_TYPES
) -> tuple[str, str, Box, str]:
    """A question about one of ``objects`` (as in ``Sample.meta["objects"]``).

    Returns:
        ``(question, answer, evidence box, question type)``; the type is drawn uniformly from
        ``question_types``, then the object among those the question names unambiguously.
    """
    for name in question_types:
        if name not in QUESTION_TYPES:
            raise ValueError(f"unknown question type {name!r}; known: {', '.join(QUESTION_TYPES)}")
    for index in rng.permutation(len(question_types)):  # a type nothing in the scene can answer is skipped
        question_type = question_types[index]
        candidates = _askable(objects, question_type)
        if candidates:
            target = candidates[int(rng.integers(len(candidates)))]
            question, answer = _question(question_type, target)
            return question, answer, tuple(target["box"]), question_type
    raise ValueError(f"no object of this scene can be named unambiguously by a {'/'.join(question_types)} question")


# --------------------------------------------------------------------------------------------
# Drawing


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> Image.Image:
    try:
        if name in ("china", "flower"):
            from sklearn.datasets import load_sample_image

            return Image.fromarray(load_sample_image(f"{name}.jpg"))
        import skimage.data

        return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    except ImportError:
        raise ImportError(
            "photo backgrounds use the sample images of scikit-learn and scikit-image: "
            "pip install scikit-learn scikit-image (or pass backgrounds=('plain', 'noise'))"
        ) from None


def _background(kind: str, size: tuple[int, int], scale: int, rng: np.random.Generator) -> Image.Image:
    width, height = size
    if kind == "plain":
        level = int(rng.integers(200, 246)) if rng.random() < 0.7 else int(rng.integers(15, 45))
        tint = rng.integers(-8, 9, size=3)
        return Image.new("RGB", size, tuple(int(v) for v in np.clip(level + tint, 0, 255)))
    if kind == "noise":
        level = float(rng.integers(120, 220))
        coarse = rng.normal(0, 25, size=(max(2, height // (24 * scale)), max(2, width // (24 * scale)), 1))
        base = np.asarray(Image.fromarray(np.uint8(np.clip(level + coarse.repeat(3, 2), 0, 255))).resize(size, Image.BILINEAR), dtype=np.float32)
        grain = rng.normal(0, 10, size=(height, width, 1))
        image = Image.fromarray(np.uint8(np.clip(base + grain, 0, 255)))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(6, 14))):  # grey clutter, smaller than any object
            x, y = rng.integers(0, width), rng.integers(0, height)
            r = int(rng.integers(3, 10)) * scale
            grey = int(rng.integers(40, 230))
            if rng.random() < 0.5:
                draw.ellipse([x - r, y - r, x + r, y + r], fill=(grey,) * 3)
            else:
                draw.line([x - 2 * r, y, x + 2 * r, y + int(rng.integers(-2 * r, 2 * r + 1))], fill=(grey,) * 3, width=2 * scale)
        return image
    if kind == "photo":
        photo = _photo(PHOTOS[int(rng.integers(len(PHOTOS)))])
        ratio = width / height
        pw, ph = photo.size
        crop_w, crop_h = (pw, int(pw / ratio)) if pw / ph < ratio else (int(ph * ratio), ph)
        left, top = int(rng.integers(0, pw - crop_w + 1)), int(rng.integers(0, ph - crop_h + 1))
        return photo.crop((left, top, left + crop_w, top + crop_h)).resize(size, Image.BICUBIC)
    raise ValueError(f"unknown background {kind!r}; known: {', '.join(BACKGROUNDS)}")


def _pattern_fill(pattern: str, colour: tuple[int, int, int], width: int, height: int, half_period: int) -> np.ndarray:
    base = np.array(colour, dtype=np.int16)
    light, dark = base + SHADE, base - SHADE
    ys, xs = np.mgrid[0:height, 0:width]
    if pattern == "plain":
        return np.broadcast_to(base, (height, width, 3)).astype(np.uint8)
    phase = {"stripes": xs // half_period, "bars": ys // half_period, "checks": xs // half_period + ys // half_period}[pattern]
    return np.where((phase % 2 == 0)[..., None], light, dark).astype(np.uint8)


def _shape_mask(shape: str, width: int, height: int) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    box = [0, 0, width - 1, height - 1]
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "square":
        draw.rectangle(box, fill=255)
    elif shape == "triangle":
        draw.polygon([(width / 2, 0), (width - 1, height - 1), (0, height - 1)], fill=255)
    elif shape == "diamond":
        draw.polygon([(width / 2, 0), (width - 1, height / 2), (width / 2, height - 1), (0, height / 2)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def _place(rng: np.random.Generator, size: tuple[int, int], sides: list[int], gap: int) -> list[tuple[int, int]]:
    width, height = size
    placed: list[tuple[int, int, int]] = []
    for side in sides:
        for _ in range(200):
            x, y = int(rng.integers(gap, width - side - gap)), int(rng.integers(gap, height - side - gap))
            if all(x + side + gap <= px or px + ps + gap <= x or y + side + gap <= py or py + ps + gap <= y for px, py, ps in placed):
                placed.append((x, y, side))
                break
    return [(x, y) for x, y, _ in placed]


def draw_scene(
    rng: np.random.Generator,
    grid: tuple[int, int],
    backgrounds: tuple[str, ...] = BACKGROUNDS,
    objects: tuple[int, int] = OBJECT_COUNT,
) -> tuple[Image.Image, list[dict], dict]:
    """One scene laid out for ``grid`` with ``objects[0]`` to ``objects[1]`` objects: ``(image, objects, details)``.

    Each object is ``{"shape", "colour", "pattern", "box"}`` with ``box = (x0, y0, x1, y1)`` in image
    pixels, the exact bounding box of the drawn shape.
    """
    rows, cols = grid
    scale = int(rng.integers(1, 3))
    width, height = cols * TILE * scale, rows * TILE * scale
    # Trim the side with fewer tiles (either side of a square grid), unless that would make
    # LLaVA-NeXT pick another grid (a 1x2 image at 2x is then closer to 1x3).
    trim = 1.0 - float(rng.uniform(0.0, 0.08))
    trimmed = (width, int(round(height * trim)))
    if cols < rows or (cols == rows and rng.random() < 0.5):
        trimmed = (int(round(width * trim)), height)
    pinpoints = [(r * TILE, c * TILE) for r, c in GRIDS]
    if select_best_resolution((trimmed[1], trimmed[0]), pinpoints) == (rows * TILE, cols * TILE):
        width, height = trimmed
    background = backgrounds[int(rng.integers(len(backgrounds)))]
    image = _background(background, (width, height), scale, rng)

    count = int(rng.integers(objects[0], objects[1] + 1))
    sides = [int(rng.integers(OBJECT_SIZE[0], OBJECT_SIZE[1] + 1)) * scale for _ in range(count)]
    positions = _place(rng, (width, height), sides, gap=8 * scale)
    # Distinct colours and at least one shape that occurs once: every question type can be asked.
    colours = rng.choice(len(COLOURS), size=len(positions), replace=False)
    shapes = rng.integers(len(SHAPES), size=len(positions))
    while 1 not in np.bincount(shapes):
        shapes = rng.integers(len(SHAPES), size=len(positions))
    drawn = []
    for (x, y), side, colour_index, shape_index in zip(positions, sides, colours, shapes):
        colour, shape = list(COLOURS)[int(colour_index)], SHAPES[int(shape_index)]
        pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
        mask = _shape_mask(shape, side, side)
        fill = Image.fromarray(_pattern_fill(pattern, COLOURS[colour], side, side, HALF_PERIOD * scale))
        image.paste(fill, (x, y), mask)
        left, top, right, bottom = mask.getbbox()
        box = (x + left, y + top, x + right, y + bottom)
        drawn.append({"shape": shape, "colour": colour, "pattern": pattern, "box": box})
    return image, drawn, {"grid": list(grid), "scale": scale, "background": background}


def generate_scenes(
    seed: int,
    n: int,
    question_types: tuple[str, ...] = QUESTION_TYPES,
    backgrounds: tuple[str, ...] = BACKGROUNDS,
    objects: tuple[int, int] = OBJECT_COUNT,
) -> list[Sample]:
    """``n`` scenes with one question each, deterministic in ``(seed, index)``.

    ``objects`` is the range of the number of objects per scene (at most one per colour).

    ``Sample.meta`` holds ``seed``, ``index``, ``grid``, ``scale``, ``background`` and ``objects``
    (every drawn object with its box), so that more questions can be asked with :func:`ask`.
    """
    if n < 0:
        raise ValueError(f"n must be a non-negative number of scenes, got {n}")
    for name in backgrounds:
        if name not in BACKGROUNDS:
            raise ValueError(f"unknown background {name!r}; known: {', '.join(BACKGROUNDS)}")
    if not 1 <= objects[0] <= objects[1] <= len(COLOURS):
        raise ValueError(f"objects must be a range (low, high) with 1 <= low <= high <= {len(COLOURS)}, got {tuple(objects)}")
    samples = []
    for index in range(n):
        rng = np.random.default_rng([seed, index])
        image, drawn, details = draw_scene(rng, GRIDS[index % len(GRIDS)], tuple(backgrounds), tuple(objects))
        question, answer, box, question_type = ask(drawn, rng, tuple(question_types))
        samples.append(
            Sample(
                image=image,
                question=question,
                answer=answer,
                evidence=[box],
                kind="scene",
                question_type=question_type,
                meta={"seed": seed, "index": index, **details, "objects": drawn},
            )
        )
    return samples
