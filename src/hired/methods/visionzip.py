"""VisionZip (arXiv 2412.04467): dominant tokens by CLS attention plus contextual tokens merged by similarity."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..algorithm import apportion, round_half_up, top_k_indices
from .base import SCORES, Method, MethodOptions, Selection, SignalLayers, VisionEvidence, register_method
from .common import check_count, cosine, make_selection


@dataclass(frozen=True)
class VisionZipOptions(MethodOptions):
    """Dominant and contextual tokens per tile (54 + 10 of 576 in the paper); at a fixed K only their ratio matters.

    ``score`` ranks the dominant tokens: ``"cls"`` (the paper's CLS attention), a CLS-free score for
    towers without a CLS token, or ``"auto"`` (CLS where the tower has one; see HiRED's ``score``).
    """

    dominant: int = 54
    contextual: int = 10
    score: str = "auto"

    def __post_init__(self) -> None:
        self._check_int("dominant", 1)
        self._check_int("contextual", 0)
        self._check_choice("score", SCORES)

    def signal_layers(self) -> SignalLayers:
        return SignalLayers(score=self.score)


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
        group = cosine(keys[others], keys[targets]).argmax(dim=1)
        sums.index_add_(0, group, features[others].float())
        sizes.index_add_(0, group, torch.ones(len(others), device=features.device))
    return targets, sums / sizes[:, None]


def select(evidence: VisionEvidence, tokens: int, options: VisionZipOptions) -> Selection:
    geometry = evidence.geometry
    check_count("visionzip", tokens, geometry)
    dominant_per, contextual_per = options.dominant, options.contextual
    candidates = geometry.candidates
    caps = candidates.sum(dim=1)
    shares = apportion(tokens, caps, caps)
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
    return make_selection(
        geometry, kept, merged, dominant=dominant_counts, contextual=[len(k) - d for k, d in zip(kept, dominant_counts)]
    )


VISIONZIP = register_method(
    Method(
        "visionzip",
        "VisionZip (arXiv 2412.04467): dominant tokens by CLS attention plus contextual tokens merged by similarity",
        options=VisionZipOptions,
        select=select,
        paper="VisionZip, arXiv 2412.04467",
        signal="feature-layer CLS attention (a CLS-free score on towers without CLS, `score`) for dominant "
        "tokens; key similarity (contextual)",
        merges="yes: contextual tokens are means of similar remaining tokens",
        partition_policy="per tile: K shared in proportion to each partition's unpadded tokens, split "
        "dominant:contextual",
    )
)
