"""LLaVA-NeXT's tile rules: the released grid pinpoints, the tile side of a LLaVA image processor.

The geometry itself is the generic :class:`hired.geometry.AnyresGeometry`; LLaVA-1.5 and
LLaVA-OneVision read their tiles by the same rules.
"""

from __future__ import annotations

# The (height, width) canvases of every llava-hf v1.6 checkpoint, for 336 px tiles.
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def scaled_pinpoints(tile: int) -> list[tuple[int, int]]:
    """The llava-hf grids (1x1 .. 3x1 and 1x3 tiles) in tiles of ``tile`` px instead of 336."""
    return [(h * tile // 336, w * tile // 336) for h, w in LLAVA_NEXT_PINPOINTS]


def tile_size(image_processor) -> int:
    """The square tile side a LLaVA image processor produces."""
    crop = getattr(image_processor, "crop_size", None)
    crop = dict(crop) if crop is not None and not isinstance(crop, dict) else crop
    if crop and crop.get("height"):
        return int(crop["height"])
    size = image_processor.size
    size = dict(size) if not isinstance(size, dict) else size
    return int(size.get("shortest_edge") or size["height"])


def as_pair(size) -> tuple[int, int]:
    """An image size the processor gives (a tensor row or a list) as ``(height, width)`` ints."""
    values = size.tolist() if hasattr(size, "tolist") else list(size)
    return int(values[0]), int(values[1])
