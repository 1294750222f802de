"""Evenly spaced tokens: a lattice over each raster of the image (base view, tile mosaic)."""

from __future__ import annotations

import torch

from ..algorithm import apportion
from .base import Method, NoOptions, Selection, VisionEvidence, register_method
from .common import check_count, lattice_indices, make_selection, split_rows


def select(evidence: VisionEvidence, tokens: int, options: NoOptions) -> Selection:
    geometry = evidence.geometry
    check_count("spatial", tokens, geometry)
    views = geometry.views()
    sizes = torch.tensor([view.height * view.width for view in views])
    shares = apportion(tokens, sizes, sizes)
    rows = torch.cat([
        view.rows[lattice_indices(view.height, view.width, int(share))] for view, share in zip(views, shares)
    ])
    return make_selection(geometry, split_rows(geometry, rows))


SPATIAL = register_method(
    Method(
        "spatial",
        "evenly spaced lattice over the base view and the unpadded tile mosaic",
        select=select,
        signal="none (even lattice)",
        partition_policy="base view and unpadded tile mosaic in proportion to their tokens, an even lattice over each",
    )
)
