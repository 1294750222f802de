"""LLaVA-OneVision's AnyRes: its released grid pinpoints, its "anyres_max_N" rule and :class:`OnevisionGeometry`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch

from ...geometry import AnyresGeometry, TokenView, checked_image_size

# Every grid of 1..6 x 1..6 tiles of 384 px.
ONEVISION_PINPOINTS = [[384 * rows, 384 * cols] for rows in range(1, 7) for cols in range(1, 7)]
ASPECT_PREFIX = "anyres_max_"


def max_tiles(vision_aspect_ratio: str) -> int:
    """The ``N`` of ``"anyres_max_N"``: tiles' worth of tokens above which the mosaic is downsampled."""
    suffix = str(vision_aspect_ratio).removeprefix(ASPECT_PREFIX)
    if not str(vision_aspect_ratio).startswith(ASPECT_PREFIX) or not suffix.isdigit() or int(suffix) < 1:
        raise ValueError(f"hired supports vision_aspect_ratio='anyres_max_N' (N >= 1), got {vision_aspect_ratio!r}")
    return int(suffix)


@dataclass(frozen=True)
class OnevisionGeometry(AnyresGeometry):
    """LLaVA-OneVision's AnyRes: LLaVA-NeXT's tiles, then a bilinear downsampling of large mosaics.

    When the unpadded mosaic holds more than ``max_tiles`` tiles' worth of tokens (by more than
    10%, "anyres_max_9"), the stock model interpolates it down to ``downsampled`` and feeds those
    tokens. Each of them is given the slot of the mosaic patch under its centre (distinct patches,
    since the scale is above 1), so partitions, candidates and footprints keep their meaning: a
    tile's candidates are the fed tokens whose centres it holds. ``multi_image``: an image of a
    prompt with several images, which the stock model feeds as its base view alone.

    Args:
        max_tiles: the ``N`` of ``"anyres_max_N"``; ``None``: never downsample.
        multi_image: feed the base view only (plus one newline), as for several images per prompt.
    """

    max_tiles: int | None = 9
    multi_image: bool = False

    @classmethod
    def create(cls, image_size: Sequence[int], tile: int, patch: int, pinpoints: Sequence[Sequence[int]] | None = None,
               max_tiles: int | None = 9, multi_image: bool = False) -> "OnevisionGeometry":
        # SigLIP's 384 px tiles hold 27 whole 14 px patches (the patch convolution drops the last 6 px), so the
        # tile need not be a multiple of the patch.
        if not 0 < patch <= tile:
            raise ValueError(f"patch size {patch} must be positive and at most the tile size {tile}; pass the "
                             "vision tower's image_size and patch_size")
        # The pinpoints stay as given, in tile pixels: the stock processor and model choose the grid from
        # them as they are, and select_best_resolution is not scale-invariant (the same pinpoints scaled
        # by 384/378, to the pixels the patches cover, pick another grid for about 5% of image sizes).
        points = None if multi_image or pinpoints is None else tuple((int(h), int(w)) for h, w in pinpoints)
        return cls(checked_image_size(image_size), int(tile), int(patch), points, max_tiles, multi_image)

    @cached_property
    def downsampled(self) -> tuple[int, int] | None:
        """``(rows, cols)`` of the interpolated mosaic, or ``None`` when the stock model feeds it as it is."""
        if self.num_partitions == 1 or self.max_tiles is None:
            return None
        row0, row1, col0, col1 = self.unpadded_window
        height, width = row1 - row0, col1 - col0
        ratio = math.sqrt(height * width / (self.max_tiles * self.side**2))
        if ratio <= 1.1:
            return None
        return (int(height // ratio), int(width // ratio))

    @cached_property
    def _slots(self) -> torch.Tensor:
        """``(rows * cols, 2)`` ``(partition, index)`` slot of each downsampled token, row-major."""
        rows, cols = self.downsampled
        row0, row1, col0, col1 = self.unpadded_window
        height, width = row1 - row0, col1 - col0
        centre_row = row0 + (2 * torch.arange(rows) + 1) * height // (2 * rows)
        centre_col = col0 + (2 * torch.arange(cols) + 1) * width // (2 * cols)
        mosaic_row = centre_row.repeat_interleave(cols)
        mosaic_col = centre_col.repeat(rows)
        s, grid_cols = self.side, self.grid[1]
        partition = 1 + (mosaic_row // s) * grid_cols + mosaic_col // s
        return torch.stack([partition, (mosaic_row % s) * s + mosaic_col % s], dim=1)

    @cached_property
    def candidates(self) -> torch.Tensor:
        if self.downsampled is None:
            return super().candidates
        mask = torch.zeros(self.num_partitions, self.side * self.side, dtype=torch.bool)
        mask[0] = True
        mask[self._slots[:, 0], self._slots[:, 1]] = True
        return mask

    @property
    def newline_tokens(self) -> int:
        if self.num_partitions == 1:
            return 1 if self.multi_image else 0
        if self.downsampled is not None:
            return self.downsampled[0]
        return super().newline_tokens

    @property
    def grid(self) -> tuple[int, int]:
        return (0, 0) if self.multi_image else super().grid

    def mosaic_position(self, partition: int, index: torch.Tensor) -> torch.Tensor:
        if self.downsampled is None:
            return super().mosaic_position(partition, index)
        lookup = torch.full((self.num_partitions, self.side * self.side), -1, dtype=torch.long)
        lookup[self._slots[:, 0], self._slots[:, 1]] = torch.arange(len(self._slots))
        return lookup[partition, index.long()]

    def footprints(self, clip: bool = True) -> torch.Tensor:
        boxes = super().footprints(clip=clip)
        if self.downsampled is None:
            return boxes
        rows, cols = self.downsampled
        row0, row1, col0, col1 = self.unpadded_window
        height, width = self.image_size
        top, left, new_h, new_w = self.tile_placement
        cell_h, cell_w = (row1 - row0) / rows, (col1 - col0) / cols
        i = torch.arange(rows, dtype=torch.float64).repeat_interleave(cols)
        j = torch.arange(cols, dtype=torch.float64).repeat(rows)
        pixels = self.tile / self.side  # canvas pixels per mosaic token
        y0, y1 = (row0 + i * cell_h) * pixels, (row0 + (i + 1) * cell_h) * pixels
        x0, x1 = (col0 + j * cell_w) * pixels, (col0 + (j + 1) * cell_w) * pixels
        cells = torch.stack([(x0 - left) * width / new_w, (y0 - top) * height / new_h,
                             (x1 - left) * width / new_w, (y1 - top) * height / new_h], dim=1)
        if clip:
            limits = torch.tensor([width, height, width, height], dtype=torch.float64)
            cells = torch.minimum(cells.clamp(min=0), limits)
        boxes[self._slots[:, 0], self._slots[:, 1]] = cells
        return boxes

    def views(self) -> list[TokenView]:
        if self.downsampled is None:
            return super().views()
        rows, cols = self.downsampled
        return [super().views()[0], TokenView(rows, cols, self._slots)]
