"""Pieces several methods share: token count checks, candidate rows, lattices, cosine similarity."""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any

import torch

from ..algorithm import round_half_up
from .base import Selection

if TYPE_CHECKING:
    from ..geometry import PartitionGeometry


def check_count(method: str, tokens: int, geometry: "PartitionGeometry") -> None:
    """The tokens to keep must be a whole count between 1 and the image's stock count."""
    if isinstance(tokens, bool) or not isinstance(tokens, numbers.Integral) or tokens < 1:
        raise ValueError(f"method {method!r} needs to keep at least 1 token, got {tokens!r}")
    if tokens > geometry.stock_tokens:
        raise ValueError(
            f"method {method!r} cannot keep {tokens} tokens of an image that has only {geometry.stock_tokens} "
            "(the stock count); ask for at most that many, or use budget=1.0 for the stock model"
        )


def candidate_positions(geometry: "PartitionGeometry") -> torch.Tensor:
    """``(N, 2)`` ``(partition, index)`` rows of every candidate token of the image, in stock order."""
    return geometry.stock_order([row.nonzero().flatten() for row in geometry.candidates])


def split_rows(geometry: "PartitionGeometry", rows: torch.Tensor) -> list[torch.Tensor]:
    """Ascending kept indices per partition from ``(partition, index)`` rows."""
    return [rows[rows[:, 0] == p, 1].sort().values for p in range(geometry.num_partitions)]


def make_selection(
    geometry: "PartitionGeometry", kept: list[torch.Tensor], merged: torch.Tensor | None = None, **extras: Any
) -> Selection:
    """A :class:`Selection`; ``merged`` is a ``(P, s*s, D)`` map whose kept positions hold merged features."""
    partition_tokens = torch.tensor([len(k) for k in kept], dtype=torch.long)
    features = None
    if merged is not None:
        order = geometry.stock_order(kept).to(merged.device)
        features = merged[order[:, 0], order[:, 1]]
    return Selection(partition_tokens, kept, features, extras)


def lattice_indices(height: int, width: int, count: int) -> torch.Tensor:
    """``count`` positions spread evenly over a ``height x width`` grid, as ascending row-major indices.

    The points sit on ``n`` rows (``n`` chosen so that the spacing along rows and columns is about
    equal, for the grid's aspect ratio) at the centres of ``n`` equal bands; the rows share
    ``count`` as evenly as possible, and each row's points sit at the centres of equal column
    segments. When ``count`` is a product ``a * b`` that divides the grid, this is the regular
    ``a x b`` sub-grid.
    """
    if not 0 <= count <= height * width:
        raise ValueError(f"cannot place {count} points on a {height}x{width} grid")
    if count == 0:
        return torch.empty(0, dtype=torch.long)
    rows = round_half_up(math.sqrt(count * height / width))
    rows = min(height, max(rows, 1, math.ceil(count / width)))
    row_of_band = [math.floor((band + 0.5) * height / rows) for band in range(rows)]
    indices = []
    for band, row in enumerate(row_of_band):
        in_row = (band + 1) * count // rows - band * count // rows
        indices += [row * width + math.floor((i + 0.5) * width / in_row) for i in range(in_row)]
    return torch.tensor(indices, dtype=torch.long)


def partition_lattice(mask: torch.Tensor, side: int, count: int) -> torch.Tensor:
    """``count`` evenly spread candidate positions of one partition (its candidates form a rectangle)."""
    if count == 0:
        return torch.empty(0, dtype=torch.long)
    grid = mask.view(side, side)
    rows = grid.any(dim=1).nonzero().flatten()
    cols = grid.any(dim=0).nonzero().flatten()
    row0, row1, col0, col1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    local = lattice_indices(row1 - row0, col1 - col0, count)
    width = col1 - col0
    return ((local // width + row0) * side + local % width + col0).sort().values


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(len(a), len(b))`` cosine similarities of two sets of row vectors."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return a @ b.T
