"""Partition geometry: where every visual token of an image comes from, for any tiled VLM.

A model family's adapter describes its images through the :class:`PartitionGeometry` protocol;
methods and the algorithm read only the protocol. Conventions: a *partition* is one ViT input
tile; partition 0 is the base view (the whole image in one tile); each partition has ``s*s``
token positions numbered row-major. The kinds of geometry several families share live here:
:class:`AnyresGeometry` is LLaVA-NeXT's AnyRes (and, with no pinpoints, LLaVA-1.5's single tile);
:class:`TiledGeometry` is InternVL's tiles plus thumbnail; :class:`NativeGeometry` is Qwen2.5-VL's
(and Qwen3-VL's) one raster of merged patches at the image's own resolution. What belongs to one
family (its grid pinpoints, LLaVA-OneVision's downsampled mosaics) lives in that family's folder,
``hired/families/<family>/geometry.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol, Sequence, runtime_checkable

import torch
from transformers.image_processing_utils import select_best_resolution

from .deprecation import moved_attribute


def square_side(value) -> int:
    """A size that configs give as an int or a square ``[height, width]`` pair (InternVL's), as an int.

    Raises:
        ValueError: the pair is not square.
    """
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"hired supports square tiles and patches, got {list(value)}")
        return int(value[0])
    return int(value)


def checked_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    """An image's ``(height, width)`` as ints.

    Raises:
        ValueError: a side is not positive.
    """
    height, width = (int(v) for v in image_size)
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    return height, width


@dataclass(frozen=True)
class TokenView:
    """A raster of tokens that sit side by side in the image (a base view, a tile mosaic).

    Attributes:
        height, width: the raster's size in tokens.
        rows: ``(height * width, 2)`` ``(partition, index)`` of each raster cell, row-major.
    """

    height: int
    width: int
    rows: torch.Tensor


@runtime_checkable
class PartitionGeometry(Protocol):
    """What methods and the algorithm may know about one image's partitions."""

    image_size: tuple[int, int]

    @property
    def side(self) -> int:
        """Patch positions per partition side (``s``)."""

    @property
    def num_partitions(self) -> int:
        """Partitions, the base view first."""

    @property
    def grid(self) -> tuple[int, int]:
        """Tile grid ``(rows, cols)``; ``(0, 0)`` for a single-partition model."""

    @property
    def candidates(self) -> torch.Tensor:
        """``(P, s*s)`` bool: the positions the stock model feeds to the LLM."""

    @property
    def stock_tokens(self) -> int:
        """Visual tokens the stock model feeds, separator tokens (newlines) not counted."""

    @property
    def newline_tokens(self) -> int:
        """Separator tokens the stock model adds."""

    @property
    def tile_overlap(self) -> torch.Tensor:
        """``(P-1, s*s)``: the fraction of each base-view patch that each other partition covers."""

    def stock_order(self, kept: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(K, 2)`` ``(partition, index)`` rows of the kept tokens in the order the stock model feeds them."""

    def footprints(self, clip: bool = True) -> torch.Tensor:
        """``(P, s*s, 4)`` boxes ``(x0, y0, x1, y1)`` of every token in pixels of the original image."""

    def views(self) -> list[TokenView]:
        """The rasters of tokens that lie side by side in the image."""

    def windows(self) -> torch.Tensor:
        """``(P, 4)`` rectangles ``(x0, y0, x1, y1)`` that each partition's input pixels show, in the
        coordinates of ``footprints(clip=False)`` (pixels of the original image, past its edge over padding)."""


@dataclass(frozen=True)
class AnyresGeometry:
    """Where every token of an AnyRes image (LLaVA-NeXT, LLaVA-1.5 as one partition) comes from.

    Args:
        image_size: original ``(height, width)`` in pixels.
        tile: tile side in pixels (336 for CLIP ViT-L/14-336).
        patch: ViT patch side in pixels (14).
        pinpoints: the model's ``image_grid_pinpoints`` as ``(height, width)`` pairs; ``None``
            means a single-partition model (LLaVA-1.5).
    """

    image_size: tuple[int, int]
    tile: int
    patch: int
    pinpoints: tuple[tuple[int, int], ...] | None = None

    @classmethod
    def create(
        cls,
        image_size: Sequence[int],
        tile: int,
        patch: int,
        pinpoints: Sequence[Sequence[int]] | None = None,
    ) -> "AnyresGeometry":
        if tile % patch:
            raise ValueError(f"tile size {tile} is not a multiple of the patch size {patch}")
        points = None if pinpoints is None else tuple((int(h), int(w)) for h, w in pinpoints)
        return cls(checked_image_size(image_size), int(tile), int(patch), points)

    @property
    def side(self) -> int:
        """Patch positions per tile side (``s``)."""
        return self.tile // self.patch

    @property
    def tokens_per_tile(self) -> int:
        return self.side * self.side

    @cached_property
    def canvas(self) -> tuple[int, int]:
        """The best-fit ``(height, width)`` canvas the tiles are cut from."""
        if self.pinpoints is None:
            return (self.tile, self.tile)
        best = select_best_resolution(self.image_size, [list(p) for p in self.pinpoints])
        if best is None:
            raise ValueError(f"no grid pinpoint fits image size {self.image_size}; pinpoints: {list(self.pinpoints)}")
        return (int(best[0]), int(best[1]))

    @property
    def grid(self) -> tuple[int, int]:
        """Tile grid as ``(rows, cols)``; ``(0, 0)`` for a single-partition model."""
        if self.pinpoints is None:
            return (0, 0)
        return (self.canvas[0] // self.tile, self.canvas[1] // self.tile)

    @property
    def num_partitions(self) -> int:
        rows, cols = self.grid
        return 1 + rows * cols

    @cached_property
    def resized(self) -> tuple[int, int]:
        """Size of the aspect-preserving resize placed on the canvas (the rest is padding)."""
        height, width = self.image_size
        canvas_h, canvas_w = self.canvas
        scale_w, scale_h = canvas_w / width, canvas_h / height
        if scale_w < scale_h:
            return (min(math.ceil(height * scale_w), canvas_h), canvas_w)
        return (canvas_h, min(math.ceil(width * scale_h), canvas_w))

    @cached_property
    def unpadded_window(self) -> tuple[int, int, int, int]:
        """``(row0, row1, col0, col1)`` of the mosaic feature grid kept by the stock unpadding.

        Mirrors the integer arithmetic of LLaVA-NeXT's ``unpad_image`` so the candidate set is
        exactly the set of tokens the stock model feeds.
        """
        rows, cols = self.grid
        mosaic_h, mosaic_w = rows * self.side, cols * self.side
        height, width = self.image_size
        if width / height > mosaic_w / mosaic_h:
            new_h = int(round(height * (mosaic_w / width), 7))
            pad = (mosaic_h - new_h) // 2
            return (pad, mosaic_h - pad, 0, mosaic_w)
        new_w = int(round(width * (mosaic_h / height), 7))
        pad = (mosaic_w - new_w) // 2
        return (0, mosaic_h, pad, mosaic_w - pad)

    @cached_property
    def candidates(self) -> torch.Tensor:
        """``(P, s*s)`` bool: positions the stock model feeds to the LLM (base: all of them)."""
        s = self.side
        mask = torch.ones(self.num_partitions, s, s, dtype=torch.bool)
        if self.num_partitions > 1:
            row0, row1, col0, col1 = self.unpadded_window
            rows, cols = self.grid
            mosaic = torch.zeros(rows * s, cols * s, dtype=torch.bool)
            mosaic[row0:row1, col0:col1] = True
            mask[1:] = mosaic.view(rows, s, cols, s).permute(0, 2, 1, 3).reshape(rows * cols, s, s)
        return mask.view(self.num_partitions, s * s)

    @property
    def stock_tokens(self) -> int:
        """Visual tokens the stock model feeds, newline tokens not counted."""
        return int(self.candidates.sum())

    @property
    def newline_tokens(self) -> int:
        """``image_newline`` tokens the stock model appends (one per unpadded mosaic row)."""
        if self.num_partitions == 1:
            return 0
        row0, row1, _, _ = self.unpadded_window
        return row1 - row0

    @cached_property
    def tile_overlap(self) -> torch.Tensor:
        """``(P-1, s*s)``: the area of each base-view patch that each tile covers, in patch units.

        The base view is the whole image squashed to one tile, so base patch (i, j) is the square
        ``[j/s, (j+1)/s] x [i/s, (i+1)/s]`` in normalised image coordinates. Tile (r, c) covers the
        canvas rectangle ``[c*T, (c+1)*T] x [r*T, (r+1)*T]``, which maps to normalised image
        coordinates through the aspect-preserving resize and its centred padding. Entry [t, i*s+j]
        is the fraction of base patch (i, j) that lies inside tile t.
        """
        rows, cols = self.grid
        s = self.side
        top, left, new_h, new_w = self.tile_placement

        def overlap(num_tiles: int, offset: int, extent: int) -> torch.Tensor:
            edges = (torch.arange(num_tiles + 1, dtype=torch.float64) * self.tile - offset) / extent
            lo, hi = edges[:-1, None], edges[1:, None]
            p_lo = torch.arange(s, dtype=torch.float64)[None] / s
            p_hi = p_lo + 1.0 / s
            return ((torch.minimum(hi, p_hi) - torch.maximum(lo, p_lo)).clamp(min=0) * s).float()

        along_rows = overlap(rows, top, new_h)  # (rows, s)
        along_cols = overlap(cols, left, new_w)  # (cols, s)
        area = along_rows[:, None, :, None] * along_cols[None, :, None, :]  # (rows, cols, s, s)
        return area.reshape(rows * cols, s * s)

    def mosaic_position(self, partition: int, index: torch.Tensor) -> torch.Tensor:
        """Row-major position in the unpadded mosaic of tile ``partition``'s patch ``index``."""
        rows, cols = self.grid
        s = self.side
        row0, _, col0, col1 = self.unpadded_window
        tile_row, tile_col = divmod(partition - 1, cols)
        mosaic_row = tile_row * s + torch.div(index, s, rounding_mode="floor") - row0
        mosaic_col = tile_col * s + index % s - col0
        return mosaic_row * (col1 - col0) + mosaic_col

    @property
    def tile_placement(self) -> tuple[int, int, int, int]:
        """``(top, left, new_h, new_w)``: where the aspect-preserving resize sits on the tile canvas.

        The one mapping between tile pixels and image pixels: canvas point ``(y, x)`` shows image
        point ``((y - top) * H / new_h, (x - left) * W / new_w)``.
        """
        canvas_h, canvas_w = self.canvas
        new_h, new_w = self.resized
        return (canvas_h - new_h) // 2, (canvas_w - new_w) // 2, new_h, new_w

    def footprints(self, clip: bool = True) -> torch.Tensor:
        """``(P, s*s, 4)`` float64 boxes ``(x0, y0, x1, y1)`` of every token, in pixels of the original image.

        Partition 0 squashes the whole image into one tile; the tiles are cut from the resize placed
        on the canvas, so their tokens over padding lie outside the image: with ``clip`` they get an
        empty box on the image border, without it their true (outside) position.
        """
        height, width = self.image_size
        s, patch = self.side, self.patch
        steps = torch.arange(s, dtype=torch.float64)
        base_x0 = (steps * width / s).repeat(s)
        base_y0 = (steps * height / s).repeat_interleave(s)
        boxes = [torch.stack([base_x0, base_y0, base_x0 + width / s, base_y0 + height / s], dim=1)]
        top, left, new_h, new_w = self.tile_placement if self.num_partitions > 1 else (0, 0, 1, 1)
        rows, cols = self.grid
        for tile_row in range(rows):
            for tile_col in range(cols):
                x0 = tile_col * self.tile + (steps * patch).repeat(s)
                y0 = tile_row * self.tile + (steps * patch).repeat_interleave(s)
                boxes.append(torch.stack([
                    (x0 - left) * width / new_w, (y0 - top) * height / new_h,
                    (x0 + patch - left) * width / new_w, (y0 + patch - top) * height / new_h,
                ], dim=1))
        boxes = torch.stack(boxes)
        if not clip:
            return boxes
        limits = torch.tensor([width, height, width, height], dtype=torch.float64)
        return torch.minimum(boxes.clamp(min=0), limits)

    def windows(self) -> torch.Tensor:
        """``(P, 4)`` float64 rectangles of the image that each partition's ``tile x tile`` pixels show.

        As :meth:`footprints` places the tokens: the base view's ``s`` tokens span the whole image,
        so a tile wider than its patches (SigLIP's 384 px for 27 patches of 14) shows a little more
        than the image; a tile of the grid shows its square of the canvas, padding included.
        """
        height, width = self.image_size
        beyond_patches = self.tile / (self.side * self.patch)
        windows = [torch.tensor([0.0, 0.0, width * beyond_patches, height * beyond_patches], dtype=torch.float64)]
        if self.num_partitions > 1:
            top, left, new_h, new_w = self.tile_placement
            rows, cols = self.grid
            for tile_row in range(rows):
                for tile_col in range(cols):
                    x0, y0 = tile_col * self.tile, tile_row * self.tile
                    windows.append(torch.tensor([
                        (x0 - left) * width / new_w, (y0 - top) * height / new_h,
                        (x0 + self.tile - left) * width / new_w, (y0 + self.tile - top) * height / new_h,
                    ], dtype=torch.float64))
        return torch.stack(windows)

    def stock_order(self, kept: Sequence[torch.Tensor]) -> torch.Tensor:
        """Flatten per-partition kept indices into ``(partition, index)`` rows in stock order.

        Stock order is the base tile in raster order, then the unpadded mosaic in raster order, in
        which the rows of neighbouring tiles interleave.
        """
        base = torch.stack([torch.zeros_like(kept[0]), kept[0]], dim=1)
        if len(kept) == 1:
            return base
        rows, keys = [], []
        for partition in range(1, len(kept)):
            index = kept[partition]
            rows.append(torch.stack([torch.full_like(index, partition), index], dim=1))
            keys.append(self.mosaic_position(partition, index))
        mosaic = torch.cat(rows)
        mosaic = mosaic[torch.cat(keys).argsort(stable=True)]
        return torch.cat([base, mosaic])

    def views(self) -> list[TokenView]:
        """The image's token grids: the base view, then (with tiles) the unpadded tile mosaic."""
        s = self.side
        base = torch.stack([torch.zeros(s * s, dtype=torch.long), torch.arange(s * s)], dim=1)
        views = [TokenView(s, s, base)]
        if self.num_partitions > 1:
            row0, row1, col0, col1 = self.unpadded_window
            _, cols = self.grid
            mosaic_row = torch.arange(row0, row1).repeat_interleave(col1 - col0)
            mosaic_col = torch.arange(col0, col1).repeat(row1 - row0)
            partition = 1 + (mosaic_row // s) * cols + mosaic_col // s
            index = (mosaic_row % s) * s + mosaic_col % s
            views.append(TokenView(row1 - row0, col1 - col0, torch.stack([partition, index], dim=1)))
        return views


@dataclass(frozen=True)
class TiledGeometry:
    """Tiles that cover the whole image with no padding, plus a thumbnail (InternVL, GOT-OCR2).

    The image is resized (squashed) to ``rows x cols`` tiles; when that is more than one tile, a
    thumbnail of the whole image is added, which is the base view here (partition 0), although
    the stock model feeds it last. Tokens are the LLM's (after any merging of patches), ``side``
    per tile side.

    Args:
        image_size: original ``(height, width)`` in pixels.
        tiles: ``(rows, cols)`` of the tile grid the processor chose.
        side: LLM tokens per tile side (16 for InternVL's 448 px tiles pixel-shuffled 2x2).
        tile: tile side in pixels.
    """

    image_size: tuple[int, int]
    tiles: tuple[int, int]
    side: int
    tile: int

    @classmethod
    def create(cls, image_size: Sequence[int], tiles: Sequence[int], side: int, tile: int) -> "TiledGeometry":
        height, width = (int(v) for v in image_size)
        rows, cols = (int(v) for v in tiles)
        if min(height, width, rows, cols, side, tile) < 1:
            raise ValueError(f"image size, tile grid and sides must be positive, got size {(height, width)}, "
                             f"grid {(rows, cols)}, side {side}, tile {tile}")
        return cls((height, width), (rows, cols), int(side), int(tile))

    @property
    def num_partitions(self) -> int:
        rows, cols = self.tiles
        return 1 if rows * cols == 1 else 1 + rows * cols

    @property
    def grid(self) -> tuple[int, int]:
        return (0, 0) if self.num_partitions == 1 else self.tiles

    @cached_property
    def candidates(self) -> torch.Tensor:
        return torch.ones(self.num_partitions, self.side * self.side, dtype=torch.bool)

    @property
    def stock_tokens(self) -> int:
        return self.num_partitions * self.side * self.side

    @property
    def newline_tokens(self) -> int:
        return 0

    @cached_property
    def tile_overlap(self) -> torch.Tensor:
        """``(P-1, s*s)``: the fraction of each thumbnail token's square that each tile covers."""
        rows, cols = self.tiles
        s = self.side

        def overlap(count: int) -> torch.Tensor:
            edges = torch.arange(count + 1, dtype=torch.float64) / count
            lo, hi = edges[:-1, None], edges[1:, None]
            p_lo = torch.arange(s, dtype=torch.float64)[None] / s
            return ((torch.minimum(hi, p_lo + 1.0 / s) - torch.maximum(lo, p_lo)).clamp(min=0) * s).float()

        if self.num_partitions == 1:
            return torch.zeros(0, s * s)
        area = overlap(rows)[:, None, :, None] * overlap(cols)[None, :, None, :]
        return area.reshape(rows * cols, s * s)

    def stock_order(self, kept: Sequence[torch.Tensor]) -> torch.Tensor:
        """The tiles in raster order, each in its own raster order, then the thumbnail."""
        order = list(range(1, len(kept))) + [0]
        return torch.cat([torch.stack([torch.full_like(kept[p], p), kept[p]], dim=1) for p in order])

    def footprints(self, clip: bool = True) -> torch.Tensor:
        """``(P, s*s, 4)`` boxes in pixels of the original image (no padding: ``clip`` changes nothing)."""
        height, width = self.image_size
        s = self.side
        steps = torch.arange(s, dtype=torch.float64)
        x, y = steps.repeat(s), steps.repeat_interleave(s)
        boxes = [torch.stack([x * width / s, y * height / s, (x + 1) * width / s, (y + 1) * height / s], dim=1)]
        if self.num_partitions > 1:
            rows, cols = self.tiles
            for row in range(rows):
                for col in range(cols):
                    gx, gy = col * s + x, row * s + y
                    boxes.append(torch.stack([gx * width / (cols * s), gy * height / (rows * s),
                                              (gx + 1) * width / (cols * s), (gy + 1) * height / (rows * s)], dim=1))
        return torch.stack(boxes)

    def windows(self) -> torch.Tensor:
        """``(P, 4)`` float64: the thumbnail shows the whole image, tile ``(r, c)`` its ``r, c`` share of it."""
        height, width = self.image_size
        windows = [torch.tensor([0.0, 0.0, width, height], dtype=torch.float64)]
        if self.num_partitions > 1:
            rows, cols = self.tiles
            for row in range(rows):
                for col in range(cols):
                    windows.append(torch.tensor([col * width / cols, row * height / rows,
                                                 (col + 1) * width / cols, (row + 1) * height / rows], dtype=torch.float64))
        return torch.stack(windows)

    def views(self) -> list[TokenView]:
        s = self.side
        views = [TokenView(s, s, torch.stack([torch.zeros(s * s, dtype=torch.long), torch.arange(s * s)], dim=1))]
        if self.num_partitions > 1:
            rows, cols = self.tiles
            mosaic_row = torch.arange(rows * s).repeat_interleave(cols * s)
            mosaic_col = torch.arange(cols * s).repeat(rows * s)
            partition = 1 + (mosaic_row // s) * cols + mosaic_col // s
            views.append(TokenView(rows * s, cols * s,
                                   torch.stack([partition, (mosaic_row % s) * s + mosaic_col % s], dim=1)))
        return views


@dataclass(frozen=True)
class NativeGeometry:
    """One image at its own resolution as one raster of LLM tokens (Qwen2.5-VL): no tiles, no base view.

    The processor resizes the image to ``rows x cols`` tokens (each a merged group of patches) keeping
    its aspect ratio as closely as the token size allows. The raster is one partition whose lattice
    is ``side x side`` with ``side = max(rows, cols)``; the positions of the ``rows x cols`` corner are
    the candidates, numbered ``row * side + col``, fed in raster order.

    Args:
        image_size: original ``(height, width)`` in pixels.
        tokens: ``(rows, cols)`` LLM tokens.
    """

    image_size: tuple[int, int]
    tokens: tuple[int, int]

    @classmethod
    def create(cls, image_size: Sequence[int], tokens: Sequence[int]) -> "NativeGeometry":
        height, width = (int(v) for v in image_size)
        rows, cols = (int(v) for v in tokens)
        if min(height, width, rows, cols) < 1:
            raise ValueError(f"image size and token grid must be positive, got size {(height, width)}, grid {(rows, cols)}")
        return cls((height, width), (rows, cols))

    @classmethod
    def from_patch_grid(cls, grid_thw: Sequence[int], patch: int, merge: int) -> "NativeGeometry":
        """The geometry of an image the processor gave the patch grid ``(t, h, w)``: its ``(h / merge, w / merge)``
        tokens, in the resized image's pixels (the model sees only those)."""
        _, height, width = (int(v) for v in grid_thw)
        return cls.create((height * patch, width * patch), (height // merge, width // merge))

    @property
    def side(self) -> int:
        return max(self.tokens)

    @property
    def num_partitions(self) -> int:
        return 1

    @property
    def grid(self) -> tuple[int, int]:
        return (0, 0)

    @cached_property
    def candidates(self) -> torch.Tensor:
        rows, cols = self.tokens
        lattice = torch.zeros(self.side, self.side, dtype=torch.bool)
        lattice[:rows, :cols] = True
        return lattice.reshape(1, -1)

    @property
    def stock_tokens(self) -> int:
        return self.tokens[0] * self.tokens[1]

    @property
    def newline_tokens(self) -> int:
        return 0

    @property
    def tile_overlap(self) -> torch.Tensor:
        return torch.zeros(0, self.side * self.side)

    def stock_order(self, kept: Sequence[torch.Tensor]) -> torch.Tensor:
        """Raster order (row by row), as the stock model feeds the merged tokens."""
        (indices,) = kept
        indices = torch.sort(indices).values
        return torch.stack([torch.zeros_like(indices), indices], dim=1)

    def footprints(self, clip: bool = True) -> torch.Tensor:
        """``(1, s*s, 4)``: each token covers an equal share of the whole image; lattice positions past the
        raster are clipped to the image's edge (``clip``) or extend past it."""
        height, width = self.image_size
        rows, cols = self.tokens
        s = self.side
        steps = torch.arange(s, dtype=torch.float64)
        x, y = steps.repeat(s), steps.repeat_interleave(s)
        boxes = torch.stack([x * width / cols, y * height / rows, (x + 1) * width / cols, (y + 1) * height / rows], dim=1)
        if clip:
            limit = torch.tensor([width, height, width, height], dtype=torch.float64)
            boxes = torch.minimum(boxes, limit)
        return boxes[None]

    def windows(self) -> torch.Tensor:
        """``(1, 4)`` float64: the one partition's pixels are the whole image, resized to the raster."""
        height, width = self.image_size
        return torch.tensor([[0.0, 0.0, width, height]], dtype=torch.float64)

    def views(self) -> list[TokenView]:
        rows, cols = self.tokens
        index = (torch.arange(rows)[:, None] * self.side + torch.arange(cols)[None]).reshape(-1)
        return [TokenView(rows, cols, torch.stack([torch.zeros_like(index), index], dim=1))]


# Names that moved to a family's folder, and the module that holds them now. They are imported on
# first use only: this module itself knows no family.
_MOVED = {
    "LLAVA_NEXT_PINPOINTS": "hired.families.llava_next",
    "ONEVISION_PINPOINTS": "hired.families.llava_onevision",
    "OnevisionGeometry": "hired.families.llava_onevision",
}


def __getattr__(name: str):
    return moved_attribute(__name__, name, _MOVED)
