"""InternVL's tile rule: the grid of 448 px tiles its image processor cuts an image into.

The geometry itself is the generic :class:`hired.geometry.TiledGeometry`.
"""

from __future__ import annotations

from typing import Sequence

# The PIL backend's module: the torchvision one imports torchvision, which hired never needs.
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas


def tile_grid(image_size: Sequence[int], tile: int = 448, min_tiles: int = 1, max_tiles: int = 12) -> tuple[int, int]:
    """``(rows, cols)`` of the tiles InternVL's image processor cuts an image of ``(height, width)`` into.

    transformers' own rule (the grid of ``min_tiles..max_tiles`` tiles closest in aspect ratio).
    """
    cols, rows = get_optimal_tiled_canvas(tuple(int(v) for v in image_size), (tile, tile), min_tiles, max_tiles)
    return rows, cols
