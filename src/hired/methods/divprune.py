"""DivPrune (arXiv 2503.02175): the most diverse tokens, by greedy max-min cosine distance.

Implemented from the paper (its code is CC BY-NC).
"""

from __future__ import annotations

import torch

from .base import Method, NoOptions, Selection, VisionEvidence, register_method
from .common import candidate_positions, check_count, cosine, make_selection, split_rows


def max_min_diverse(features: torch.Tensor, count: int) -> torch.Tensor:
    """Greedy max-min diversity selection under cosine distance, in selection order.

    Approximates the Max-Min Diversity Problem (choose ``count`` rows maximising the smallest
    pairwise distance): the first pick is the row whose nearest other row is farthest; each next
    pick is the unselected row whose distance to its nearest selected row is largest (ties to the
    lower index). The picks stay on the features' device until the end: no host read per pick.

    Returns:
        ``(count,)`` host row indices in the order they were picked.
    """
    n = features.shape[0]
    if not 0 < count <= n:
        raise ValueError(f"cannot pick {count} of {n} tokens")
    distance = 1.0 - cosine(features, features)
    if n == 1:
        return torch.zeros(1, dtype=torch.long)
    nearest_other = distance.masked_fill(torch.eye(n, dtype=torch.bool, device=distance.device), float("inf"))
    picked = torch.empty(count, dtype=torch.long, device=distance.device)
    pick = nearest_other.amin(dim=1).argmax().view(1)
    to_selected = distance.index_select(0, pick)[0]
    for step in range(count):
        if step:
            pick = to_selected.argmax().view(1)
            # A picked row's distance is -inf and stays so under the minimum, so it is never picked again.
            to_selected = torch.minimum(to_selected, distance.index_select(0, pick)[0])
        picked[step : step + 1] = pick
        to_selected = to_selected.index_fill(0, pick, float("-inf"))
    return picked.cpu()


def select(evidence: VisionEvidence, tokens: int, options: NoOptions) -> Selection:
    geometry = evidence.geometry
    check_count("divprune", tokens, geometry)
    rows = candidate_positions(geometry)
    picked = max_min_diverse(evidence.features[rows[:, 0], rows[:, 1]], tokens)
    return make_selection(geometry, split_rows(geometry, rows[picked]))


DIVPRUNE = register_method(
    Method(
        "divprune",
        "DivPrune (arXiv 2503.02175): greedy max-min diversity of feature-layer tokens (cosine distance)",
        select=select,
        paper="DivPrune, arXiv 2503.02175",
        signal="cosine distance between feature-layer tokens (greedy max-min diversity)",
        partition_policy="global: one pool of all tokens of the image",
    )
)
