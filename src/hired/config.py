"""The configuration object: what every method shares, validated on construction, stored on the model config."""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping

from .algorithm import token_budget
from .methods import get_method

DEFAULT_BUDGET = 0.2
# Configurations stored by hired 0.1 kept HiRED's options at the top level.
_LEGACY_HIRED_KEYS = ("alpha", "distribution_layer", "selection_layer", "head_aggregation")


@dataclass
class HiredConfig:
    """How many visual tokens to keep and which method chooses them.

    Args:
        budget: fraction of the tokens the stock model would feed for the image, in ``(0, 1]``;
            ``1.0`` means the stock model. Mutually exclusive with ``tokens``; with neither, 0.2.
        tokens: absolute number of visual tokens per image (>= 1). A count at or above the stock
            count of an image means the stock model for that image.
        method: token-reduction method; see ``hired.available_methods()``.
        method_options: the method's own options, as a mapping (``{"alpha": 0.3}``) or the
            method's options object (``hired.methods.hired.HiredOptions(alpha=0.3)``); validated by
            the method, stored as its options object. An option the method does not have is an error.
    """

    budget: float | None = None
    tokens: int | None = None
    method: str = "hired"
    method_options: Any = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tokens is not None:
            if self.budget is not None:
                raise ValueError(f"give either budget (a fraction) or tokens (a count), not both: got budget="
                                 f"{self.budget!r} and tokens={self.tokens!r}")
            if isinstance(self.tokens, bool) or not isinstance(self.tokens, numbers.Integral):
                raise ValueError(f"tokens must be a whole number of tokens, got {self.tokens!r}")
            if self.tokens < 1:
                raise ValueError(f"tokens must be at least 1, got {self.tokens}")
            self.tokens = int(self.tokens)
        else:
            if self.budget is None:
                self.budget = DEFAULT_BUDGET
            if isinstance(self.budget, bool) or not isinstance(self.budget, numbers.Real):
                raise ValueError(f"budget must be a number in (0, 1], got {self.budget!r}")
            if not 0 < self.budget <= 1:
                hint = f"; for an absolute count use tokens={int(self.budget)}" if self.budget > 1 else ""
                raise ValueError(f"budget must be a fraction in (0, 1], got {self.budget}{hint}")
            self.budget = float(self.budget)
        self.method_options = get_method(self.method).make_options(self.method_options)

    @classmethod
    def create(cls, **settings: Any) -> "HiredConfig":
        """A config from flat keywords: ``budget``, ``tokens``, ``method``, ``method_options``, and any
        of the method's own options (``alpha=0.3`` for HiRED), which join ``method_options``."""
        own = {key: settings.pop(key) for key in ("budget", "tokens", "method") if key in settings}
        options = dict(settings.pop("method_options", None) or {})
        clash = sorted(set(options) & set(settings))
        if clash:
            raise ValueError(f"options {clash} given both as keywords and in method_options")
        return cls(**own, method_options={**options, **settings})

    def budget_for(self, stock_tokens: int) -> int:
        """Visual tokens fed to the LLM for an image whose stock count (newlines not counted) is given.

        Methods that prune inside the LLM (and ``full``) feed the stock count.
        """
        if not get_method(self.method).selects_before_llm:
            return stock_tokens
        return token_budget(stock_tokens, fraction=self.budget, tokens=self.tokens)

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "tokens": self.tokens, "method": self.method,
                "method_options": self.method_options.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "HiredConfig":
        """The inverse of :meth:`to_dict`; also reads configurations stored by hired 0.1."""
        data = dict(data)
        legacy = {key: data.pop(key) for key in _LEGACY_HIRED_KEYS if key in data}
        if data.get("method", "hired") == "hired":
            data["method_options"] = {**legacy, **dict(data.get("method_options") or {})}
        else:
            defaults = get_method("hired").option_defaults
            changed = sorted(key for key, value in legacy.items() if value != defaults[key])
            if changed:
                raise ValueError(f"the stored configuration sets HiRED's options {changed} for method "
                                 f"{data.get('method')!r}, which has no such options")
        known = {"budget", "tokens", "method", "method_options"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown HiRED config keys {sorted(unknown)}; known keys: {sorted(known)}")
        if data.get("tokens") is not None:
            data["budget"] = None
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
