"""The configuration object: what every method shares, validated on construction, stored on the model config."""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping

from .algorithm import token_count
from .deprecation import warn_renamed
from .methods import get_method

DEFAULT_BUDGET = 0.2
# Configurations stored by hired 0.1 kept HiRED's options at the top level.
_LEGACY_HIRED_KEYS = ("alpha", "distribution_layer", "selection_layer", "head_aggregation")


@dataclass(frozen=True)
class HiredConfig:
    """How many visual tokens to keep and which method chooses them (immutable once validated:
    build a changed one with :meth:`updated`).

    Args:
        budget: fraction of the tokens the stock model would feed for the image, in ``(0, 1]``;
            ``1.0`` means the stock model. Mutually exclusive with ``tokens``; with neither, 0.2 for
            methods that take a budget. Methods that cannot honour one (``full``, adaptive modes)
            refuse it.
        tokens: absolute number of visual tokens per image (>= 1). A count at or above the stock
            count of an image means the stock model for that image.
        method: token-reduction method; see ``hired.available_methods()``.
        method_options: the method's own options, as a mapping (``{"alpha": 0.3}``) or the
            method's options object (``hired.methods.hired.HiredOptions(alpha=0.3)``); validated by
            the method, stored as its options object. An option the method does not have is an error.
        drop_layer: the vision-tower layer (an index; negative ones count from the end) at which a
            vision-side method selects, after which the tower runs over the kept tokens only (the early
            drop); ``None`` (the default) runs every layer over every token and selects at the feature
            layer. The families that offer it and the layers they accept: docs/early-drop.md.
    """

    budget: float | None = None
    tokens: int | None = None
    method: str = "hired"
    method_options: Any = field(default_factory=dict)
    drop_layer: int | None = None

    def __post_init__(self) -> None:
        method = get_method(self.method)
        object.__setattr__(self, "method_options", method.make_options(self.method_options))
        self._check_drop_layer(method)
        given = self.budget is not None or self.tokens is not None
        if self.tokens is not None:
            if self.budget is not None:
                raise ValueError(f"give either budget (a fraction) or tokens (a count), not both: got budget="
                                 f"{self.budget!r} and tokens={self.tokens!r}")
            if isinstance(self.tokens, bool) or not isinstance(self.tokens, numbers.Integral):
                raise ValueError(f"tokens must be a whole number of tokens, got {self.tokens!r}")
            if self.tokens < 1:
                raise ValueError(f"tokens must be at least 1, got {self.tokens}")
            object.__setattr__(self, "tokens", int(self.tokens))
        elif given:
            if isinstance(self.budget, bool) or not isinstance(self.budget, numbers.Real):
                raise ValueError(f"budget must be a number in (0, 1], got {self.budget!r}")
            if not 0 < self.budget <= 1:
                whole = math.isfinite(self.budget) and 1 < self.budget < 1e6 and self.budget == int(self.budget)
                hint = f"; for an absolute count use tokens={int(self.budget)}" if whole else ""
                raise ValueError(f"budget must be a fraction in (0, 1], got {self.budget}{hint}")
            object.__setattr__(self, "budget", float(self.budget))
        # A budget the method cannot honour is refused rather than ignored.
        if method.stage == "none":
            if given and (self.tokens is not None or self.budget != 1.0):
                amount = f"tokens={self.tokens}" if self.tokens is not None else f"budget={self.budget}"
                raise ValueError(f"method {self.method!r} feeds every visual token, so {amount} cannot take effect; "
                                 "drop it, or choose a method that reduces tokens (see hired.available_methods())")
            object.__setattr__(self, "budget", 1.0)
        elif self.method_options.adaptive:
            if given:
                amount = f"tokens={self.tokens}" if self.tokens is not None else f"budget={self.budget}"
                raise ValueError(f"method {self.method!r} with adaptive=True chooses its token count from the pixels, "
                                 f"so {amount} cannot take effect; drop it, or set adaptive=False for a fixed budget")
        elif not given:
            object.__setattr__(self, "budget", DEFAULT_BUDGET)

    def _check_drop_layer(self, method) -> None:
        """Refuse an early drop the method cannot make: only a vision-side method that keeps tokens selects in the tower."""
        if self.drop_layer is None:
            return
        if isinstance(self.drop_layer, bool) or not isinstance(self.drop_layer, numbers.Integral):
            raise ValueError(f"drop_layer must be a vision-tower layer index (an int), got {self.drop_layer!r}")
        object.__setattr__(self, "drop_layer", int(self.drop_layer))
        if not method.selects_before_llm:
            raise ValueError(f"drop_layer selects inside the vision tower, but method {self.method!r} does not select "
                             "on the vision side; drop it, or choose a vision-side method")
        if method.merges != "no":
            raise ValueError(f"drop_layer runs the tower's last layers over the kept tokens, but method {self.method!r} "
                             "merges tokens, which then would not be tower tokens; drop it, or choose a method that "
                             "keeps tokens (hired, fastervlm, divprune, random, spatial)")
        if self.method_options.adaptive:
            raise ValueError(f"drop_layer needs a count known before the tower runs, but method {self.method!r} with "
                             "adaptive=True chooses it from the pixels; set adaptive=False")

    @property
    def fixes_count(self) -> bool:
        """Whether the visual tokens kept depend only on the image size (not adaptive)."""
        return get_method(self.method).has_fixed_budget(self.method_options)

    def require_fixed_count(self) -> None:
        """Raise ``ValueError`` unless the token count is known before the model runs (not adaptive)."""
        if not self.fixes_count:
            raise ValueError(
                f"method {self.method!r} in adaptive mode chooses its token count from the pixels, so it is not known "
                "before the model runs (no processor can emit its placeholders, nor inspect show it); use its "
                "fixed-budget mode, or build inputs with hired.adaptive.prepare_inputs(model, processor, images, text) "
                "and read each count from hired.selections(model)"
            )

    @classmethod
    def create(cls, **settings: Any) -> "HiredConfig":
        """A config from flat keywords: ``budget``, ``tokens``, ``method``, ``method_options``, and any
        of the method's own options (``alpha=0.3`` for HiRED), which join ``method_options``."""
        own = {key: settings.pop(key) for key in ("budget", "tokens", "method", "drop_layer") if key in settings}
        return cls(**own, method_options=_method_options(settings))

    def updated(self, **settings: Any) -> "HiredConfig":
        """This configuration with the given settings (as for :meth:`create`) replacing those they name.

        ``budget`` or ``tokens`` replaces both; a new ``method`` starts from its own default options
        (and keeps the budget, if the old method had one); options given for the same method are
        merged into the stored ones. ``HiredConfig.create`` builds a configuration from defaults instead.
        """
        method = settings.pop("method", self.method)
        drop_layer = settings.pop("drop_layer", self.drop_layer)
        amount = {key: settings.pop(key) for key in ("budget", "tokens") if key in settings}
        options = _method_options(settings)
        if method == self.method:
            options = {**self.method_options.to_dict(), **options}
        if not amount and get_method(self.method).stage != "none" and self.fixes_count:
            without_amount = HiredConfig(method=method, method_options=options, drop_layer=drop_layer)
            if get_method(method).stage == "none" or not without_amount.fixes_count:
                return without_amount
            amount = {"budget": self.budget, "tokens": self.tokens}
        return HiredConfig(method=method, method_options=options, drop_layer=drop_layer, **amount)

    def fed_tokens(self, stock_tokens: int) -> int | None:
        """Visual tokens fed to the LLM for an image whose stock count (newlines not counted) is given.

        Methods that prune inside the LLM (and ``full``) feed the stock count; ``None`` for a method
        that chooses its count from the pixels (adaptive mode).
        """
        if not get_method(self.method).selects_before_llm:
            return stock_tokens
        if not self.fixes_count:
            return None
        return token_count(stock_tokens, fraction=self.budget, tokens=self.tokens)

    def budget_for(self, stock_tokens: int) -> int | None:
        """The former name of :meth:`fed_tokens` (the budget is the fraction; this is a count)."""
        warn_renamed("HiredConfig.budget_for", "HiredConfig.fed_tokens")
        return self.fed_tokens(stock_tokens)

    def kept_count(self, stock_tokens: int) -> int | None:
        """Visual tokens an image whose stock count is given keeps on the vision side; ``None`` when it keeps
        every token and is fed as the stock model feeds it (a budget of the whole image, a method that feeds
        every token, or one that prunes inside the LLM). Every engine reads "every token" from this ``None``.

        Raises:
            ValueError: the method is in adaptive mode, so the count is not known before the model runs.
        """
        self.require_fixed_count()
        fed = self.fed_tokens(stock_tokens)
        return None if fed >= stock_tokens else fed

    def keeps_every_token(self, most_stock_tokens: int) -> bool:
        """Whether every image whose stock count is at most ``most_stock_tokens`` keeps all its tokens,
        before the LLM and inside it: the model is then the stock model for such images."""
        method = get_method(self.method)
        if method.stage == "none":
            return True
        if not self.fixes_count:
            return False
        if self.tokens is not None:
            return self.tokens >= most_stock_tokens
        return self.budget >= 1.0

    def kept_for(self, stock_tokens: int) -> int | None:
        """Visual tokens the method keeps in the end for such an image: fed to the LLM, or (for a
        method that prunes inside the LLM) kept after its pruning layer; ``None`` when adaptive."""
        if get_method(self.method).stage == "llm":
            return token_count(stock_tokens, fraction=self.budget, tokens=self.tokens)
        return self.fed_tokens(stock_tokens)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as JSON values; ``drop_layer`` only where it is set (configurations without one read
        as they always did)."""
        data = {"budget": self.budget, "tokens": self.tokens, "method": self.method,
                "method_options": self.method_options.to_dict()}
        if self.drop_layer is not None:
            data["drop_layer"] = self.drop_layer
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "HiredConfig":
        """The inverse of :meth:`to_dict`; also reads configurations stored by hired 0.1."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a stored HiRED configuration is a mapping (the 'hired' entry of config.json), got "
                             f"{type(data).__name__}")
        data = dict(data)
        legacy = {key: data.pop(key) for key in _LEGACY_HIRED_KEYS if key in data}
        if data.get("method", "hired") == "hired":
            options = dict(data.get("method_options") or {})
            clash = sorted(key for key in legacy if key in options and options[key] != legacy[key])
            if clash:
                raise ValueError(f"the stored configuration gives {clash} twice, with different values (at the top "
                                 "level, as hired 0.1 stored them, and in method_options)")
            data["method_options"] = {**legacy, **options}
        else:
            defaults = get_method("hired").option_defaults
            changed = sorted(key for key, value in legacy.items() if value != defaults[key])
            if changed:
                raise ValueError(f"the stored configuration sets HiRED's options {changed} for method "
                                 f"{data.get('method')!r}, which has no such options")
        known = {"budget", "tokens", "method", "method_options", "drop_layer"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown HiRED config keys {sorted(unknown)}; known keys: {sorted(known)}")
        if data.get("tokens") is not None and data.get("budget") == DEFAULT_BUDGET:
            data["budget"] = None  # hired 0.1 stored the default budget beside a token count
        # hired 0.2 stored the default budget with methods that take none (full, adaptive modes).
        if data.get("budget") == DEFAULT_BUDGET and data.get("tokens") is None:
            probe = cls(method=data.get("method", "hired"), method_options=data.get("method_options") or {})
            if probe.budget != DEFAULT_BUDGET:
                data["budget"] = None
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _method_options(settings: dict[str, Any]) -> dict[str, Any]:
    """``method_options`` merged with the method's options given as keywords (the other keys of ``settings``)."""
    options = dict(settings.pop("method_options", None) or {})
    clash = sorted(set(options) & set(settings))
    if clash:
        raise ValueError(f"options {clash} given both as keywords and in method_options")
    return {**options, **settings}
