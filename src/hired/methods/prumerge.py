"""PruMerge and PruMerge+ (arXiv 2403.15388): CLS-attention IQR outliers, dropped tokens merged in by key similarity.

On AnyRes images the method runs on each partition (each ViT input) as it does on LLaVA-1.5's
single image. With a fixed budget ``K`` is shared among partitions in proportion to each
partition's native (adaptive) count; with ``adaptive=True`` the count is the method's own, chosen
from the pixels (see :mod:`hired.adaptive`). PruMerge+ adds spatially uniform samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..algorithm import apportion, round_half_up, top_k_indices
from .base import Method, MethodOptions, Selection, VisionEvidence, register_method
from .common import check_count, cosine, make_selection, partition_lattice


@dataclass(frozen=True)
class PruMergeOptions(MethodOptions):
    """PruMerge's options.

    Args:
        iqr_factor: outliers lie above ``Q3 + iqr_factor * (Q3 - Q1)`` of the CLS attention.
        neighbours: dropped tokens merged into each kept one (most key-similar first).
        adaptive: keep the method's own, pixel-dependent count instead of the budget.
    """

    iqr_factor: float = 1.5
    neighbours: int = 32
    adaptive: bool = False

    def __post_init__(self) -> None:
        self._check_number("iqr_factor", 0.0)
        self._check_int("neighbours", 0)
        self._check_bool("adaptive")



@dataclass(frozen=True)
class PruMergePlusOptions(PruMergeOptions):
    """PruMerge+'s options: PruMerge's, plus ``uniform_ratio``, the share of each partition sampled on a lattice."""

    uniform_ratio: float = 0.25

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_number("uniform_ratio", 0.0, 1.0)


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
    scores = scores.to(features.device)  # the weights meet the features where the model is
    own = scores[kept].float()[:, None] * features[kept].float()
    total = scores[kept].float()[:, None]
    count = min(neighbours, len(dropped))
    if count > 0:
        nearest = dropped.to(keys.device)[cosine(keys[kept], keys[dropped]).topk(count, dim=1).indices]  # (K, count)
        weights = scores[nearest].float()[..., None]
        own = own + (weights * features[nearest].float()).sum(dim=1)
        total = total + weights.sum(dim=1)
    return own / total


def partition_kept(
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
        chosen[partition_lattice(mask, side, round_half_up(uniform * candidates))] = True
        return chosen.nonzero().flatten()
    lattice = partition_lattice(mask, side, count - min(int(outliers.sum()), count))
    rest = mask.clone()
    rest[lattice] = False
    by_attention = top_k_indices(scores, count - len(lattice), rest)
    return torch.cat([lattice, by_attention]).sort().values


def _select(evidence: VisionEvidence, tokens: int, options: PruMergeOptions, name: str,
            uniform: float | None) -> Selection:
    geometry = evidence.geometry
    factor = options.iqr_factor
    adaptive = options.adaptive
    if not adaptive:
        check_count(name, tokens, geometry)
    candidates = geometry.candidates
    scores = evidence.selection_scores.float()
    s = geometry.side
    outliers = torch.zeros_like(candidates)
    for p in range(geometry.num_partitions):
        if candidates[p].any():  # a tile of padding only (very wide or tall images) has no outliers
            outliers[p, candidates[p]] = iqr_outliers(scores[p, candidates[p]], factor)
    native = [
        partition_kept(scores[p], candidates[p], s, outliers[p], None, uniform)
        for p in range(geometry.num_partitions)
    ]
    native_counts = torch.tensor([len(k) for k in native])
    if adaptive:
        kept = native
        if int(native_counts.sum()) == 0:  # a flat attention map has no outliers: keep its peak
            kept = [top_k_indices(scores[p], 1 if p == 0 else 0, candidates[p]) for p in range(len(native))]
    else:
        shares = apportion(tokens, native_counts, candidates.sum(dim=1))
        kept = [
            partition_kept(scores[p], candidates[p], s, outliers[p], int(shares[p]), uniform)
            for p in range(geometry.num_partitions)
        ]
    merged = evidence.features.clone()
    neighbours = options.neighbours
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
    return make_selection(geometry, kept, merged, adaptive=adaptive, **extras)


def select_prumerge(evidence: VisionEvidence, tokens: int, options: PruMergeOptions) -> Selection:
    return _select(evidence, tokens, options, "prumerge", None)


def select_prumerge_plus(evidence: VisionEvidence, tokens: int, options: PruMergePlusOptions) -> Selection:
    return _select(evidence, tokens, options, "prumerge+", options.uniform_ratio)


PRUMERGE = register_method(
    Method(
        "prumerge",
        "PruMerge (arXiv 2403.15388): CLS-attention IQR outliers, dropped tokens merged in by key similarity",
        options=PruMergeOptions,
        select=select_prumerge,
        needs_cls=True,
        paper="LLaVA-PruMerge, arXiv 2403.15388",
        signal="feature-layer CLS attention, IQR outliers; keys for merging",
        merges="yes: each kept token becomes the attention-weighted mean of itself and its most key-similar "
        "dropped tokens",
        partition_policy="per tile: each partition's outliers are found on its own; a fixed K is shared in "
        "proportion to the partitions' outlier counts",
    )
)
PRUMERGE_PLUS = register_method(
    Method(
        "prumerge+",
        "PruMerge+ (arXiv 2403.15388): PruMerge's outliers plus spatially uniform samples, then merging",
        options=PruMergePlusOptions,
        select=select_prumerge_plus,
        needs_cls=True,
        paper="LLaVA-PruMerge+, arXiv 2403.15388",
        signal="as `prumerge`, plus spatially uniform samples",
        merges="yes, as `prumerge`",
        partition_policy="per tile: outliers plus an even lattice of `uniform_ratio` of the partition; a fixed K is "
        "shared in proportion to those counts",
    )
)
