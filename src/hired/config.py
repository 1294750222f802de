"""The configuration object: what to keep, validated on construction, stored on the model config."""

from __future__ import annotations

import dataclasses
import json
import numbers
from dataclasses import dataclass, field
from typing import Any

HEAD_AGGREGATIONS = ("sum", "mean", "max")


@dataclass
class HiredConfig:
    """How many visual tokens to keep and how to choose them.

    Args:
        budget: fraction of the tokens the stock model would feed for the image, in ``(0, 1]``.
            ``1.0`` means the stock model. Mutually exclusive with ``tokens``.
        tokens: absolute number of visual tokens per image (>= 1). A count at or above the stock
            count of an image means the stock model for that image.
        method: token-reduction method; see ``hired.available_methods()``.
        alpha: share of the budget given to the base (whole-image) view, in ``[0, 1]``.
        distribution_layer: ViT layer whose CLS attention shares the budget among partitions.
        selection_layer: ViT layer whose CLS attention picks tokens inside a partition; ``None``
            means the layer the VLM takes its features from (``vision_feature_layer``).
        head_aggregation: how attention heads are combined: ``"sum"``, ``"mean"`` or ``"max"``.
        method_options: extra, method-specific parameters (validated by the method).
    """

    budget: float | None = 0.2
    tokens: int | None = None
    method: str = "hired"
    alpha: float = 0.5
    distribution_layer: int = 0
    selection_layer: int | None = None
    head_aggregation: str = "sum"
    method_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tokens is not None:
            if self.budget is not None and self.budget != HiredConfig.budget:
                raise ValueError("give either budget (a fraction) or tokens (a count), not both")
            self.budget = None
            if isinstance(self.tokens, bool) or not isinstance(self.tokens, numbers.Integral):
                raise ValueError(f"tokens must be a whole number of tokens, got {self.tokens!r}")
            if self.tokens < 1:
                raise ValueError(f"tokens must be at least 1, got {self.tokens}")
            self.tokens = int(self.tokens)
        else:
            if self.budget is None:
                raise ValueError("give a budget (fraction of the stock tokens, e.g. 0.2) or tokens (a count)")
            if isinstance(self.budget, bool) or not isinstance(self.budget, numbers.Real):
                raise ValueError(f"budget must be a number in (0, 1], got {self.budget!r}")
            if not 0 < self.budget <= 1:
                hint = f"; for an absolute count use tokens={int(self.budget)}" if self.budget > 1 else ""
                raise ValueError(f"budget must be a fraction in (0, 1], got {self.budget}{hint}")
            self.budget = float(self.budget)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real) or not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha (the base view's share of the budget) must be in [0, 1], got {self.alpha!r}")
        self.alpha = float(self.alpha)
        if self.head_aggregation not in HEAD_AGGREGATIONS:
            raise ValueError(
                f"head_aggregation must be one of {', '.join(HEAD_AGGREGATIONS)}, got {self.head_aggregation!r}"
            )
        for name in ("distribution_layer", "selection_layer"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise ValueError(f"{name} must be a layer index (an int), got {value!r}")
        from .methods import get_method  # late import: methods validate their own options

        get_method(self.method).validate(self)

    @property
    def is_full(self) -> bool:
        """True when the configuration keeps every token of every image."""
        return self.method == "full" or (self.budget is not None and self.budget >= 1.0)

    def budget_for(self, stock_tokens: int) -> int:
        """Visual tokens fed to the LLM for an image whose stock count (newlines not counted) is given.

        Methods that prune inside the LLM (and ``full``) feed the stock count.
        """
        from .algorithm import token_budget
        from .methods import get_method

        if get_method(self.method).select is None:
            return stock_tokens
        return token_budget(stock_tokens, fraction=self.budget, tokens=self.tokens)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HiredConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown HiRED config keys {sorted(unknown)}; known keys: {sorted(known)}")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
