"""HiRED (arXiv 2408.10945): the budget shared by first-layer CLS attention, tokens picked by feature-layer CLS attention."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

from ..algorithm import hired_select
from .base import HEAD_AGGREGATIONS, SCORES, Method, MethodOptions, Selection, SignalLayers, VisionEvidence, register_method


@dataclass(frozen=True)
class HiredOptions(MethodOptions):
    """HiRED's options.

    Args:
        alpha: share of the budget given to the base (whole-image) view, in ``[0, 1]``.
        distribution_layer: ViT layer whose CLS attention shares the budget among partitions.
        selection_layer: ViT layer whose CLS attention picks tokens inside a partition; ``None``
            means the layer the VLM takes its features from (``vision_feature_layer``).
        head_aggregation: how attention heads are combined: ``"sum"``, ``"mean"`` or ``"max"``.
        score: the token score at both layers: ``"cls"`` (the paper's CLS attention), a CLS-free one
            for towers without a CLS token (``"distinct"``, ``"received"``, ``"mean-query"``,
            ``"key-norm"``; see docs/families.md) or ``"auto"`` (CLS where the tower has a CLS token,
            ``"distinct"`` otherwise). The record says which ran.
    """

    alpha: float = 0.5
    distribution_layer: int = 0
    selection_layer: int | None = field(default=None, metadata={"shown": "feature layer"})
    head_aggregation: str = "sum"
    score: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real) or not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha (the base view's share of the budget) must be in [0, 1], got {self.alpha!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        if self.head_aggregation not in HEAD_AGGREGATIONS:
            raise ValueError(
                f"head_aggregation must be one of {', '.join(HEAD_AGGREGATIONS)}, got {self.head_aggregation!r}"
            )
        for name in ("distribution_layer", "selection_layer"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise ValueError(f"{name} must be a layer index (an int), got {value!r}")
            if value is not None:
                object.__setattr__(self, name, int(value))
        self._check_choice("score", SCORES)

    def signal_layers(self) -> SignalLayers:
        return SignalLayers(self.distribution_layer, self.selection_layer, self.head_aggregation, self.score)


def select(evidence: VisionEvidence, tokens: int, options: HiredOptions) -> Selection:
    partition_tokens, kept = hired_select(
        evidence.distribution_scores, evidence.selection_scores, evidence.geometry, tokens, options.alpha
    )
    return Selection(partition_tokens, kept)


HIRED = register_method(
    Method(
        "hired",
        "HiRED: budget shared by first-layer CLS attention, tokens picked by feature-layer CLS attention",
        options=HiredOptions,
        select=select,
        paper="HiRED, arXiv 2408.10945",
        signal="CLS attention (a CLS-free score on towers without CLS, `score`): layer 0 shares the budget, "
        "the feature layer picks tokens",
        partition_policy="base view gets `alpha*K`; tiles share the rest by the base-view attention over the region "
        "each covers; top-k per tile",
    )
)
