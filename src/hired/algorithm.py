"""HiRED as pure tensor functions: scores, budget, AnyRes geometry, allocation, selection.

Nothing here knows a model class. The adapters in :mod:`hired.patch` feed these functions the
query/key projections of two ViT layers and the image geometry, and turn the kept indices back
into features.

Conventions: a *partition* is one ViT input tile. Partition 0 is the base view (the whole image
squashed to one tile); partitions 1..P-1 are the AnyRes tiles in row-major order. Each partition
has ``s*s`` patch positions numbered row-major (the CLS token is not counted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, Sequence

import torch

HeadAggregation = Literal["sum", "mean", "max"]

# The (height, width) canvases of every llava-hf v1.6 checkpoint, for 336 px tiles.
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def round_half_up(x: float) -> int:
    """Round to the nearest integer, halves up (Python's ``round`` rounds halves to even)."""
    return math.floor(x + 0.5)


# --------------------------------------------------------------------------------------------
# Scores


def cls_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    num_heads: int,
    aggregation: HeadAggregation = "sum",
    cls_index: int = 0,
) -> torch.Tensor:
    """CLS attention over the patch tokens from one layer's query/key projections.

    Computes ``softmax_j(q_cls . k_j / sqrt(d))`` per head for the CLS query only (O(N d), no
    N x N matrix), drops the CLS column and aggregates heads.

    Args:
        query: ``(B, 1 + N, num_heads * d)`` output of the layer's query projection (or just the
            CLS row, ``(B, 1, num_heads * d)``).
        key: ``(B, 1 + N, num_heads * d)`` output of the key projection.
        num_heads: attention heads of the layer.
        aggregation: how heads are combined: ``"sum"`` (the paper's choice), ``"mean"``, ``"max"``.
        cls_index: position of the CLS token in the sequence.

    Returns:
        ``(B, N)`` float32 scores, in the token order of ``key`` without the CLS token.
    """
    batch, tokens, width = key.shape
    if width % num_heads:
        raise ValueError(f"key width {width} is not divisible by num_heads={num_heads}")
    head_dim = width // num_heads
    q_cls = query[:, cls_index if query.shape[1] > 1 else 0].float().view(batch, num_heads, head_dim)
    k = key.float().view(batch, tokens, num_heads, head_dim)
    logits = torch.einsum("bhd,bnhd->bhn", q_cls, k) / math.sqrt(head_dim)
    attention = logits.softmax(dim=-1)
    patch = torch.cat([attention[..., :cls_index], attention[..., cls_index + 1 :]], dim=-1)
    if aggregation == "sum":
        return patch.sum(dim=1)
    if aggregation == "mean":
        return patch.mean(dim=1)
    if aggregation == "max":
        return patch.amax(dim=1)
    raise ValueError(f"unknown head aggregation {aggregation!r}; use 'sum', 'mean' or 'max'")


# --------------------------------------------------------------------------------------------
# AnyRes geometry


def select_best_resolution(image_size: tuple[int, int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The (height, width) canvas LLaVA-NeXT picks for an image: most effective pixels, least waste."""
    height, width = image_size
    best, best_effective, best_waste = None, 0, float("inf")
    for cand_h, cand_w in pinpoints:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (int(cand_h), int(cand_w)), effective, waste
    if best is None:
        raise ValueError(f"no grid pinpoint fits image size {image_size}; pinpoints: {list(pinpoints)}")
    return best


@dataclass(frozen=True)
class AnyresGeometry:
    """Where every token of a LLaVA-NeXT image comes from.

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
        height, width = (int(v) for v in image_size)
        if height < 1 or width < 1:
            raise ValueError(f"image size must be positive, got height={height}, width={width}")
        if tile % patch:
            raise ValueError(f"tile size {tile} is not a multiple of the patch size {patch}")
        points = None if pinpoints is None else tuple((int(h), int(w)) for h, w in pinpoints)
        return cls((height, width), int(tile), int(patch), points)

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
        return select_best_resolution(self.image_size, self.pinpoints)

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
        canvas_h, canvas_w = self.canvas
        new_h, new_w = self.resized
        top, left = (canvas_h - new_h) // 2, (canvas_w - new_w) // 2

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


# --------------------------------------------------------------------------------------------
# Budget


def token_budget(stock_tokens: int, fraction: float | None = None, tokens: int | None = None) -> int:
    """The number of visual tokens to keep for one image: a function of its size only.

    Exactly one of ``fraction`` (of the stock count) and ``tokens`` (absolute) is given. The
    result is capped at ``stock_tokens``; a result equal to it means "run the stock model".
    """
    if (fraction is None) == (tokens is None):
        raise ValueError("give exactly one of fraction and tokens")
    if tokens is not None:
        return min(int(tokens), stock_tokens)
    return min(max(1, round_half_up(fraction * stock_tokens)), stock_tokens)


def apportion(total: int, weights: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    """Split ``total`` into integers proportional to ``weights``, none above its cap.

    Largest remainder (Hamilton): floors of the quotas, then one more to the largest fractional
    parts, ties to the lower index. A share that would exceed its cap is fixed at the cap and the
    rest is divided again among the others. All-zero weights mean shares proportional to the caps.
    Returns ``min(total, caps.sum())`` tokens in all.
    """
    weights = weights.double().clamp(min=0)
    caps = caps.long()
    shares = torch.zeros_like(caps)
    open_ = caps > 0
    remaining = min(int(total), int(caps.sum()))
    while remaining > 0 and bool(open_.any()):
        w = torch.where(open_, weights, torch.zeros_like(weights))
        if float(w.sum()) <= 0:
            w = torch.where(open_, (caps - shares).double(), torch.zeros_like(weights))
        quota = remaining * w / w.sum()
        room = (caps - shares).double()
        full = open_ & (quota >= room)
        if bool(full.any()):
            remaining -= int((caps - shares)[full].sum())
            shares[full] = caps[full]
            open_ &= ~full
            continue
        floors = quota.floor().long()
        shares += floors
        left = remaining - int(floors.sum())
        fractions = torch.where(open_, quota - floors.double(), torch.full_like(quota, -1.0))
        order = torch.sort(fractions, descending=True, stable=True).indices
        shares[order[:left]] += 1
        remaining = 0
    return shares


def tile_content_scores(base_scores: torch.Tensor, geometry: AnyresGeometry) -> torch.Tensor:
    """Visual content score of each tile: base-view attention summed over the area it covers."""
    return geometry.tile_overlap @ base_scores.float()


def allocate(
    budget: int,
    alpha: float,
    content_scores: torch.Tensor,
    caps: torch.Tensor,
) -> torch.Tensor:
    """Per-partition token budgets ``(P,)``: the base view first, then the tiles.

    The base view gets ``round(alpha * budget)`` (capped at its own cap); the tiles share the rest
    in proportion to ``content_scores`` (``(P-1,)``), each capped at its candidate count; what the
    tiles cannot take goes back to the base view. The sum is exactly ``budget`` whenever
    ``budget <= caps.sum()``.
    """
    caps = caps.long()
    base_cap = int(caps[0])
    base = min(round_half_up(alpha * budget), base_cap)
    tiles = apportion(budget - base, content_scores, caps[1:])
    base = min(base_cap, budget - int(tiles.sum()))
    return torch.cat([torch.tensor([base], dtype=torch.long), tiles])


# --------------------------------------------------------------------------------------------
# Selection


def top_k_indices(scores: torch.Tensor, k: int, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """The ``k`` highest-scoring candidate positions, ties to the lower index, in ascending order."""
    if candidates is not None:
        if k > int(candidates.sum()):
            raise ValueError(f"asked for {k} tokens among {int(candidates.sum())} candidates")
        scores = scores.float().masked_fill(~candidates, float("-inf"))
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return order[:k].sort().values


def stock_order(geometry: AnyresGeometry, kept: Sequence[torch.Tensor]) -> torch.Tensor:
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
        keys.append(geometry.mosaic_position(partition, index))
    mosaic = torch.cat(rows)
    mosaic = mosaic[torch.cat(keys).argsort(stable=True)]
    return torch.cat([base, mosaic])


def hired_select(
    distribution_scores: torch.Tensor,
    selection_scores: torch.Tensor,
    geometry: AnyresGeometry,
    budget: int,
    alpha: float = 0.5,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """HiRED for one image: per-partition budgets and kept indices.

    Args:
        distribution_scores: ``(P, s*s)`` CLS attention of the distribution layer; only the base
            view's row (partition 0) is used.
        selection_scores: ``(P, s*s)`` CLS attention of the selection (feature) layer.
        geometry: the image's AnyRes geometry.
        budget: tokens to keep, at most ``geometry.stock_tokens``.
        alpha: share of the budget for the base view.

    Returns:
        ``(budgets, kept)``: ``(P,)`` long and one ascending index tensor per partition.
    """
    candidates = geometry.candidates
    caps = candidates.sum(dim=1)
    if geometry.num_partitions == 1:
        budgets = torch.tensor([min(budget, int(caps[0]))])
    else:
        content = tile_content_scores(distribution_scores[0], geometry)
        budgets = allocate(budget, alpha, content, caps)
    kept = [
        top_k_indices(selection_scores[p], int(budgets[p]), candidates[p])
        for p in range(geometry.num_partitions)
    ]
    return budgets, kept
