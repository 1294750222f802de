"""The other token-reduction methods, as pure tensor functions registered beside HiRED.

Every method here chooses visual tokens before the LLM from one image's :class:`VisionEvidence`
and, for a fixed budget ``K``, returns exactly ``K`` tokens, only among the positions the stock
model feeds (``geometry.candidates``: padded positions of AnyRes tiles never count). Methods that
merge return their features in the ViT feature space, in stock order of the kept positions.

How each method meets the AnyRes partitions of LLaVA-NeXT (base view + tiles) follows its paper:

- ``fastervlm``, ``random``, ``divprune``: *global*, one pool of all candidate tokens of the image.
- ``prumerge``, ``prumerge+``: *per tile*: the method runs on each ViT input (each partition) as
  it does on LLaVA-1.5's single image. With a fixed budget, ``K`` is shared among partitions in
  proportion to each partition's native (adaptive) count.
- ``visionzip``: *per tile*, ``K`` shared in proportion to candidate counts (an unpadded tile gets
  as many as the base view), each share split into dominant and contextual tokens.
- ``spatial``: the base view and the unpadded tile mosaic are each covered by an even lattice,
  ``K`` shared between them in proportion to their token counts.

The FastV baseline prunes inside the LLM; it lives in :mod:`hired.patch.fastv`.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any

import torch

from .algorithm import AnyresGeometry, apportion, round_half_up, stock_order, top_k_indices
from .methods import Method, Selection, VisionEvidence, register

if TYPE_CHECKING:
    from .config import HiredConfig


# --------------------------------------------------------------------------------------------
# Option checks


def _check_int(method: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"method {method!r}: option {name!r} must be an integer >= {minimum}, got {value!r}")


def _check_number(method: str, name: str, value: Any, low: float, high: float | None = None) -> None:
    bad = isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
    if bad or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"method {method!r}: option {name!r} must be a number {bounds}, got {value!r}")


def _check_bool(method: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"method {method!r}: option {name!r} must be true or false, got {value!r}")


def _check_budget(method: str, budget: int, geometry: AnyresGeometry) -> None:
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget < 1:
        raise ValueError(f"method {method!r} needs a budget of at least 1 token, got {budget!r}")
    if budget > geometry.stock_tokens:
        raise ValueError(
            f"method {method!r} cannot keep {budget} tokens of an image that has only {geometry.stock_tokens} "
            "(the stock count); ask for at most that many, or use budget=1.0 for the stock model"
        )


# --------------------------------------------------------------------------------------------
# Shared pieces


def candidate_positions(geometry: AnyresGeometry) -> torch.Tensor:
    """``(N, 2)`` ``(partition, index)`` rows of every candidate token of the image, in stock order."""
    return stock_order(geometry, [row.nonzero().flatten() for row in geometry.candidates])


def _split_rows(geometry: AnyresGeometry, rows: torch.Tensor) -> list[torch.Tensor]:
    """Ascending kept indices per partition from ``(partition, index)`` rows."""
    return [rows[rows[:, 0] == p, 1].sort().values for p in range(geometry.num_partitions)]


def _selection(
    geometry: AnyresGeometry, kept: list[torch.Tensor], merged: torch.Tensor | None = None, **extras: Any
) -> Selection:
    """A :class:`Selection`; ``merged`` is a ``(P, s*s, D)`` map whose kept positions hold merged features."""
    budgets = torch.tensor([len(k) for k in kept], dtype=torch.long)
    features = None
    if merged is not None:
        order = stock_order(geometry, kept).to(merged.device)
        features = merged[order[:, 0], order[:, 1]]
    return Selection(budgets, kept, features, extras)


def _candidate_box(mask: torch.Tensor, side: int) -> tuple[int, int, int, int]:
    """``(row0, row1, col0, col1)`` of a partition's candidate positions, which form one rectangle."""
    grid = mask.view(side, side)
    rows = grid.any(dim=1).nonzero().flatten()
    cols = grid.any(dim=0).nonzero().flatten()
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


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


def _partition_lattice(mask: torch.Tensor, side: int, count: int) -> torch.Tensor:
    """``count`` evenly spread candidate positions of one partition (its candidates form a rectangle)."""
    if count == 0:
        return torch.empty(0, dtype=torch.long)
    row0, row1, col0, col1 = _candidate_box(mask, side)
    local = lattice_indices(row1 - row0, col1 - col0, count)
    width = col1 - col0
    return ((local // width + row0) * side + local % width + col0).sort().values


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(len(a), len(b))`` cosine similarities of two sets of row vectors."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return a @ b.T


# --------------------------------------------------------------------------------------------
# FasterVLM, random: one global pool


def _fastervlm(evidence: VisionEvidence, budget: int, config: "HiredConfig") -> Selection:
    geometry = evidence.geometry
    _check_budget("fastervlm", budget, geometry)
    rows = candidate_positions(geometry)
    scores = evidence.selection_scores[rows[:, 0], rows[:, 1]]
    return _selection(geometry, _split_rows(geometry, rows[top_k_indices(scores, budget)]))


def random_rows(num_candidates: int, budget: int, seed: int) -> torch.Tensor:
    """``budget`` of ``num_candidates`` positions drawn uniformly without replacement, reproducibly."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_candidates, generator=generator)[:budget].sort().values


def _random(evidence: VisionEvidence, budget: int, config: "HiredConfig") -> Selection:
    geometry = evidence.geometry
    _check_budget("random", budget, geometry)
    rows = candidate_positions(geometry)
    seed = RANDOM.option(config, "seed")
    return _selection(geometry, _split_rows(geometry, rows[random_rows(len(rows), budget, seed)]))


# --------------------------------------------------------------------------------------------
# Spatial: even lattices over the base view and the unpadded mosaic


def _spatial(evidence: VisionEvidence, budget: int, config: "HiredConfig") -> Selection:
    geometry = evidence.geometry
    _check_budget("spatial", budget, geometry)
    s = geometry.side
    if geometry.num_partitions == 1:
        return _selection(geometry, [lattice_indices(s, s, budget)])
    row0, row1, col0, col1 = geometry.unpadded_window
    sizes = torch.tensor([s * s, (row1 - row0) * (col1 - col0)])
    base_share, mosaic_share = (int(v) for v in apportion(budget, sizes, sizes))
    local = lattice_indices(row1 - row0, col1 - col0, mosaic_share)
    mosaic_row, mosaic_col = local // (col1 - col0) + row0, local % (col1 - col0) + col0
    _, cols = geometry.grid
    partition = 1 + (mosaic_row // s) * cols + mosaic_col // s
    index = (mosaic_row % s) * s + mosaic_col % s
    rows = torch.stack([partition, index], dim=1)
    kept = _split_rows(geometry, rows)
    kept[0] = lattice_indices(s, s, base_share)
    return _selection(geometry, kept)


# --------------------------------------------------------------------------------------------
# PruMerge and PruMerge+


def iqr_outliers(scores: torch.Tensor, factor: float = 1.5) -> torch.Tensor:
    """Boolean mask of the high outliers of ``scores``: above ``Q3 + factor * (Q3 - Q1)``.

    Quartiles interpolate linearly between order statistics (as ``numpy.quantile`` does).
    """
    values = scores.double()
    q1, q3 = torch.quantile(values, torch.tensor([0.25, 0.75], dtype=torch.float64, device=values.device))
    return values > q3 + factor * (q3 - q1)


def merge_neighbours(
    features: torch.Tensor,
    keys: torch.Tensor,
    scores: torch.Tensor,
    kept: torch.Tensor,
    dropped: torch.Tensor,
    neighbours: int,
) -> torch.Tensor:
    """PruMerge's token supplement: each kept token absorbs its nearest dropped tokens.

    For kept token ``p``, its cluster is ``p`` and the ``neighbours`` dropped tokens whose keys are
    most cosine-similar to ``p``'s key; the merged feature is the cluster's average weighted by
    CLS attention: ``sum_q a_q y_q / sum_q a_q``.

    Args:
        features: ``(N, D)`` token features.
        keys: ``(N, Dk)`` token keys.
        scores: ``(N,)`` positive CLS attention.
        kept: indices of the kept tokens.
        dropped: indices of the dropped tokens that may be merged.
        neighbours: cluster size besides the kept token (capped at ``len(dropped)``).

    Returns:
        ``(len(kept), D)`` merged features, float32.
    """
    own = scores[kept].float()[:, None] * features[kept].float()
    total = scores[kept].float()[:, None]
    count = min(neighbours, len(dropped))
    if count > 0:
        nearest = dropped[_cosine(keys[kept], keys[dropped]).topk(count, dim=1).indices]  # (K, count)
        weights = scores[nearest].float()[..., None]
        own = own + (weights * features[nearest].float()).sum(dim=1)
        total = total + weights.sum(dim=1)
    return own / total


def _prumerge_partition_kept(
    scores: torch.Tensor,
    mask: torch.Tensor,
    side: int,
    outliers: torch.Tensor,
    count: int | None,
    uniform: float | None,
) -> torch.Tensor:
    """Kept indices of one partition: its outliers (native count) or ``count`` tokens (fixed budget).

    Without ``uniform`` (PruMerge) the fixed-budget choice is the top ``count`` by CLS attention.
    With it (PruMerge+) the native choice adds a lattice of ``round(uniform * candidates)`` tokens;
    the fixed-budget choice keeps ``min(outliers, count)`` tokens by attention and fills the rest
    with a lattice.
    """
    candidates = int(mask.sum())
    if uniform is None:
        if count is None:
            return outliers.nonzero().flatten()
        return top_k_indices(scores, count, mask)
    if count is None:
        chosen = outliers.clone()
        chosen[_partition_lattice(mask, side, round_half_up(uniform * candidates))] = True
        return chosen.nonzero().flatten()
    lattice = _partition_lattice(mask, side, count - min(int(outliers.sum()), count))
    rest = mask.clone()
    rest[lattice] = False
    by_attention = top_k_indices(scores, count - len(lattice), rest)
    return torch.cat([lattice, by_attention]).sort().values


def _prumerge_select(evidence: VisionEvidence, budget: int, config: "HiredConfig", method: Method) -> Selection:
    geometry = evidence.geometry
    uniform = method.option(config, "uniform_ratio") if "uniform_ratio" in method.options else None
    factor = method.option(config, "iqr_factor")
    adaptive = method.option(config, "adaptive")
    if not adaptive:
        _check_budget(method.name, budget, geometry)
    candidates = geometry.candidates
    scores = evidence.selection_scores.float()
    s = geometry.side
    outliers = torch.zeros_like(candidates)
    for p in range(geometry.num_partitions):
        outliers[p, candidates[p]] = iqr_outliers(scores[p, candidates[p]], factor)
    native = [
        _prumerge_partition_kept(scores[p], candidates[p], s, outliers[p], None, uniform)
        for p in range(geometry.num_partitions)
    ]
    native_counts = torch.tensor([len(k) for k in native])
    if adaptive:
        kept = native
        if int(native_counts.sum()) == 0:  # a flat attention map has no outliers: keep its peak
            kept = [top_k_indices(scores[p], 1 if p == 0 else 0, candidates[p]) for p in range(len(native))]
    else:
        shares = apportion(budget, native_counts, candidates.sum(dim=1))
        kept = [
            _prumerge_partition_kept(scores[p], candidates[p], s, outliers[p], int(shares[p]), uniform)
            for p in range(geometry.num_partitions)
        ]
    merged = evidence.features.clone()
    neighbours = method.option(config, "neighbours")
    for p, kept_p in enumerate(kept):
        if len(kept_p):
            dropped = candidates[p].clone()
            dropped[kept_p] = False
            merged[p, kept_p] = merge_neighbours(
                evidence.features[p], evidence.keys[p], scores[p], kept_p, dropped.nonzero().flatten(), neighbours
            ).to(merged.dtype)
    extras = {"outliers": [int(v) for v in outliers.sum(dim=1)], "native_tokens": int(native_counts.sum())}
    if adaptive:
        extras["adaptive_tokens"] = sum(len(k) for k in kept)
    return _selection(geometry, kept, merged, adaptive=adaptive, **extras)


def _check_prumerge(method: str, options: dict) -> None:
    _check_number(method, "iqr_factor", options["iqr_factor"], 0.0)
    _check_int(method, "neighbours", options["neighbours"], 0)
    _check_bool(method, "adaptive", options["adaptive"])
    if "uniform_ratio" in options:
        _check_number(method, "uniform_ratio", options["uniform_ratio"], 0.0, 1.0)


# --------------------------------------------------------------------------------------------
# VisionZip


def contextual_tokens(
    features: torch.Tensor, keys: torch.Tensor, remaining: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's contextual tokens: ``count`` merged groups of the non-dominant tokens.

    ``count`` targets are taken evenly spaced from ``remaining`` (ascending indices); every other
    remaining token joins the target whose key is most cosine-similar (ties to the earlier
    target), and each contextual token is the plain mean of its group.

    Returns:
        ``(targets, merged)``: the target indices and their ``(count, D)`` float32 features.
    """
    if count == 0:
        return remaining[:0], features[:0].float()
    picks = torch.tensor([math.floor(i * len(remaining) / count) for i in range(count)], dtype=torch.long)
    targets = remaining[picks]
    others = remaining[~torch.isin(remaining, targets)]
    sums = features[targets].float().clone()
    sizes = torch.ones(count, dtype=torch.float32, device=features.device)
    if len(others):
        group = _cosine(keys[others], keys[targets]).argmax(dim=1)
        sums.index_add_(0, group, features[others].float())
        sizes.index_add_(0, group, torch.ones(len(others), device=features.device))
    return targets, sums / sizes[:, None]


def _visionzip(evidence: VisionEvidence, budget: int, config: "HiredConfig") -> Selection:
    geometry = evidence.geometry
    _check_budget("visionzip", budget, geometry)
    dominant_per, contextual_per = VISIONZIP.option(config, "dominant"), VISIONZIP.option(config, "contextual")
    candidates = geometry.candidates
    caps = candidates.sum(dim=1)
    shares = apportion(budget, caps, caps)
    merged = evidence.features.clone()
    kept, dominant_counts = [], []
    for p in range(geometry.num_partitions):
        share = int(shares[p])
        dominant_count = round_half_up(share * dominant_per / (dominant_per + contextual_per))
        dominant = top_k_indices(evidence.selection_scores[p], dominant_count, candidates[p])
        rest = candidates[p].clone()
        rest[dominant] = False
        targets, context = contextual_tokens(
            evidence.features[p], evidence.keys[p], rest.nonzero().flatten(), share - dominant_count
        )
        merged[p, targets] = context.to(merged.dtype)
        kept.append(torch.cat([dominant, targets]).sort().values)
        dominant_counts.append(dominant_count)
    return _selection(
        geometry, kept, merged, dominant=dominant_counts, contextual=[len(k) - d for k, d in zip(kept, dominant_counts)]
    )


def _check_visionzip(method: str, options: dict) -> None:
    _check_int(method, "dominant", options["dominant"], 1)
    _check_int(method, "contextual", options["contextual"], 0)


# --------------------------------------------------------------------------------------------
# DivPrune


def max_min_diverse(features: torch.Tensor, count: int) -> torch.Tensor:
    """Greedy max-min diversity selection under cosine distance, in selection order.

    Approximates the Max-Min Diversity Problem (choose ``count`` rows maximising the smallest
    pairwise distance): the first pick is the row whose nearest other row is farthest; each next
    pick is the unselected row whose distance to its nearest selected row is largest (ties to the
    lower index).

    Returns:
        ``(count,)`` row indices in the order they were picked.
    """
    n = features.shape[0]
    if not 0 < count <= n:
        raise ValueError(f"cannot pick {count} of {n} tokens")
    distance = 1.0 - _cosine(features, features)
    if n == 1:
        return torch.zeros(1, dtype=torch.long)
    nearest_other = distance.masked_fill(torch.eye(n, dtype=torch.bool, device=distance.device), float("inf"))
    first = int(nearest_other.amin(dim=1).argmax())
    picked = [first]
    to_selected = distance[first].clone()
    to_selected[first] = float("-inf")
    for _ in range(count - 1):
        nxt = int(to_selected.argmax())
        picked.append(nxt)
        to_selected = torch.minimum(to_selected, distance[nxt])
        to_selected[picked] = float("-inf")
    return torch.tensor(picked, dtype=torch.long)


def _divprune(evidence: VisionEvidence, budget: int, config: "HiredConfig") -> Selection:
    geometry = evidence.geometry
    _check_budget("divprune", budget, geometry)
    rows = candidate_positions(geometry)
    picked = max_min_diverse(evidence.features[rows[:, 0], rows[:, 1]], budget)
    return _selection(geometry, _split_rows(geometry, rows[picked]))


# --------------------------------------------------------------------------------------------
# Registration


def _prumerge(evidence: VisionEvidence, budget: int, config: "HiredConfig") -> Selection:
    return _prumerge_select(evidence, budget, config, PRUMERGE)


def _prumerge_plus(evidence: VisionEvidence, budget: int, config: "HiredConfig") -> Selection:
    return _prumerge_select(evidence, budget, config, PRUMERGE_PLUS)


_PRUMERGE_OPTIONS = {"iqr_factor": 1.5, "neighbours": 32, "adaptive": False}

PRUMERGE = register(
    Method(
        "prumerge",
        _prumerge,
        "PruMerge (arXiv 2403.15388): CLS-attention IQR outliers, dropped tokens merged in by key similarity",
        partition_policy="per tile: K shared in proportion to each partition's IQR outlier count",
        options=dict(_PRUMERGE_OPTIONS),
        check_options=_check_prumerge,
        adaptive_option="adaptive",
    )
)
PRUMERGE_PLUS = register(
    Method(
        "prumerge+",
        _prumerge_plus,
        "PruMerge+ (arXiv 2403.15388): PruMerge's outliers plus spatially uniform samples, then merging",
        partition_policy="per tile: K shared in proportion to each partition's outliers-plus-lattice count",
        options={**_PRUMERGE_OPTIONS, "uniform_ratio": 0.25},
        check_options=_check_prumerge,
        adaptive_option="adaptive",
    )
)
VISIONZIP = register(
    Method(
        "visionzip",
        _visionzip,
        "VisionZip (arXiv 2412.04467): dominant tokens by CLS attention plus contextual tokens merged by similarity",
        partition_policy="per tile: K shared in proportion to candidate counts, dominant:contextual per share",
        options={"dominant": 54, "contextual": 10},
        check_options=_check_visionzip,
    )
)
register(
    Method(
        "fastervlm",
        _fastervlm,
        "FasterVLM (arXiv 2412.01818): global top-K by feature-layer CLS attention",
        partition_policy="global",
    )
)
register(
    Method(
        "divprune",
        _divprune,
        "DivPrune (arXiv 2503.02175): greedy max-min diversity of feature-layer tokens (cosine distance)",
        partition_policy="global",
    )
)
RANDOM = register(
    Method(
        "random",
        _random,
        "uniformly random tokens, reproducible by seed",
        partition_policy="global",
        options={"seed": 0},
        check_options=lambda method, options: _check_int(method, "seed", options["seed"], 0),
    )
)
register(
    Method(
        "spatial",
        _spatial,
        "evenly spaced lattice over the base view and the unpadded tile mosaic",
        partition_policy="base view and mosaic in proportion to their tokens, an even lattice over each",
    )
)
