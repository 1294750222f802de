"""Qwen2.5-VL's resize rule: how many merged tokens an image gets, and its released processor's settings.

The geometry itself is the generic :class:`hired.geometry.NativeGeometry`; Qwen3-VL resizes by the
same rule with its own settings.
"""

from __future__ import annotations

from typing import Sequence

from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from ...geometry import NativeGeometry

# The released checkpoints' image processor (their preprocessor_config.json): 14 px patches merged 2x2,
# 3,136 to 12,845,056 pixels. transformers' own default caps images at 1,003,520 pixels instead.
RELEASED = {"patch": 14, "merge": 2, "min_pixels": 56 * 56, "max_pixels": 12_845_056}


def token_grid(image_size: Sequence[int], patch: int, merge: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """``(rows, cols)`` of LLM tokens for an image of ``(height, width)``, by the processor's own resize rule.

    Raises:
        ValueError: the processor refuses the image (an aspect ratio above 200).
    """
    try:
        height, width = smart_resize(int(image_size[0]), int(image_size[1]), factor=patch * merge,
                                     min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as error:
        raise ValueError(f"a Qwen-VL processor refuses an image of {int(image_size[1])}x{int(image_size[0])} px "
                         f"({error}); crop or pad it first") from None
    return height // (patch * merge), width // (patch * merge)


def pixel_limits(image_processor) -> tuple[int, int]:
    """``(min_pixels, max_pixels)`` of a Qwen-VL image processor.

    Raises:
        ValueError: the processor gives none.
    """
    size = getattr(image_processor, "size", None) or {}
    low = size.get("shortest_edge", getattr(image_processor, "min_pixels", None))
    high = size.get("longest_edge", getattr(image_processor, "max_pixels", None))
    if low is None or high is None:
        raise ValueError("the image processor gives no min/max pixels (size shortest_edge/longest_edge); use the "
                         "processor saved with this model")
    return int(low), int(high)


def image_geometry(image_processor, image_size: Sequence[int]) -> NativeGeometry:
    """The geometry an image of ``(height, width)`` gets from a Qwen-VL image processor's settings."""
    grid = token_grid(image_size, image_processor.patch_size, image_processor.merge_size,
                      *pixel_limits(image_processor))
    return NativeGeometry.create(image_size, grid)

