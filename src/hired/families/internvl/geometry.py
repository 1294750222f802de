"""InternVL's tile rule: the grid of 448 px tiles its image processor cuts an image into.

The geometry itself is the generic :class:`hired.geometry.TiledGeometry`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

# The PIL backend's module: the torchvision one imports torchvision, which hired never needs.
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

from ...geometry import TiledGeometry


def tile_grid(image_size: Sequence[int], tile: int = 448, min_tiles: int = 1, max_tiles: int = 12) -> tuple[int, int]:
    """``(rows, cols)`` of the tiles InternVL's image processor cuts an image of ``(height, width)`` into.

    transformers' own rule (the grid of ``min_tiles..max_tiles`` tiles closest in aspect ratio).
    """
    cols, rows = get_optimal_tiled_canvas(tuple(int(v) for v in image_size), (tile, tile), min_tiles, max_tiles)
    return rows, cols


def processed_geometry(image_processor, image_seq_length: int, image_size: Sequence[int],
                       settings: Mapping[str, Any] | None = None) -> TiledGeometry:
    """The geometry InternVL's processor gives an image of ``(height, width)``: its image processor's tile size and
    grid rule, under ``settings`` (a call's image keys: ``size``, ``crop_to_patches``, ``min_patches``,
    ``max_patches``), and ``image_seq_length`` tokens per tile. Both engines' processors count with it."""
    settings = settings or {}
    size = settings.get("size") or image_processor.size
    tile = int(size["height"] if isinstance(size, dict) else size.height)
    crop = settings.get("crop_to_patches", image_processor.crop_to_patches)
    low = settings.get("min_patches", image_processor.min_patches)
    high = settings.get("max_patches", image_processor.max_patches)
    tiles = tile_grid(image_size, tile, low, high) if crop else (1, 1)
    return TiledGeometry.create(image_size, tiles, math.isqrt(image_seq_length), tile)
