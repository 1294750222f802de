"""Token-reduction methods behind one interface, selectable by name.

A method sees one image at a time as :class:`VisionEvidence` (tensors only) and returns a
:class:`Selection`: which positions of which partition it keeps, and, for methods that merge,
the features to feed instead of the plain kept tokens. Adapters build the evidence from a model
and turn the selection into LLM inputs; methods never see a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from .algorithm import AnyresGeometry, hired_select

if TYPE_CHECKING:
    from .config import HiredConfig


@dataclass
class VisionEvidence:
    """What the vision encoder says about one image.

    Attributes:
        geometry: the image's partitions and their unpadded (candidate) positions.
        features: ``(P, s*s, D)`` feature-layer hidden states of the patch tokens.
        distribution_scores: ``(P, s*s)`` CLS attention of the distribution layer (heads aggregated).
        selection_scores: ``(P, s*s)`` CLS attention of the selection layer (heads aggregated).
        keys: ``(P, s*s, Dk)`` key projections of the patch tokens in the selection layer.
    """

    geometry: AnyresGeometry
    features: torch.Tensor
    distribution_scores: torch.Tensor
    selection_scores: torch.Tensor
    keys: torch.Tensor


@dataclass
class Selection:
    """A method's decision for one image.

    Attributes:
        budgets: ``(P,)`` tokens kept per partition.
        kept: ascending kept indices per partition, in that partition's ``s*s`` numbering.
        features: ``(K, D)`` features to feed in place of the kept tokens (merging methods), in
            the order the method defines; ``None`` means "the kept tokens, in stock order".
        extras: method-specific record fields (e.g. an adaptive count).
    """

    budgets: torch.Tensor
    kept: list[torch.Tensor]
    features: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.features.shape[0]) if self.features is not None else int(self.budgets.sum())


@dataclass(frozen=True)
class Method:
    """A registered token-reduction method.

    Attributes:
        name: the name users pass as ``method=``.
        select: ``(evidence, budget, config) -> Selection``; ``None`` for the stock model.
        summary: one line for ``--help`` and error messages.
        partition_policy: how the budget meets AnyRes partitions (``"per tile"``, ``"global"``).
        options: allowed ``method_options`` keys with their defaults.
        fixed_budget: the token count depends only on the image size (so the processor can emit
            the placeholders before the model runs).
        stage: ``"vision"`` for methods that choose tokens before the LLM (through ``select``),
            ``"llm"`` for methods that prune inside the decoder (through ``install``).
        install: for ``"llm"`` methods, ``(inner_model, config) -> None`` patches the decoder in place
            (``inner_model`` is the ``LlavaNextModel``/``LlavaModel`` holding ``language_model``);
            ``uninstall: (inner_model) -> None`` undoes it.
        check_options: ``(method_name, options) -> None`` raises ``ValueError`` for a bad value;
            ``options`` holds every option, defaults filled in.
        adaptive_option: name of a boolean option that switches the method to a count chosen from
            the pixels (then the budget no longer fixes the token count).
    """

    name: str
    select: Callable[[VisionEvidence, int, "HiredConfig"], Selection] | None
    summary: str
    partition_policy: str = "per tile"
    options: dict = field(default_factory=dict)
    fixed_budget: bool = True
    stage: str = "vision"
    install: Callable[[Any, "HiredConfig"], None] | None = None
    uninstall: Callable[[Any], None] | None = None
    check_options: Callable[[str, dict], None] | None = None
    adaptive_option: str | None = None

    def validate(self, config: "HiredConfig") -> None:
        unknown = set(config.method_options) - set(self.options)
        if unknown:
            allowed = ", ".join(sorted(self.options)) or "none"
            raise ValueError(f"method {self.name!r} has no options {sorted(unknown)}; its options: {allowed}")
        if self.check_options is not None:
            self.check_options(self.name, {**self.options, **config.method_options})

    def has_fixed_budget(self, config: "HiredConfig") -> bool:
        """Whether, under ``config``, the token count depends only on the image size."""
        return self.fixed_budget and not (self.adaptive_option and self.option(config, self.adaptive_option))

    def option(self, config: "HiredConfig", name: str):
        return config.method_options.get(name, self.options[name])


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def available_methods() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available methods: {', '.join(available_methods())}") from None


def _hired(evidence: VisionEvidence, budget: int, config: "HiredConfig") -> Selection:
    budgets, kept = hired_select(
        evidence.distribution_scores, evidence.selection_scores, evidence.geometry, budget, config.alpha
    )
    return Selection(budgets, kept)


register(
    Method(
        "hired",
        _hired,
        "HiRED: budget shared by first-layer CLS attention, tokens picked by feature-layer CLS attention",
        partition_policy="base share alpha, tiles by content score, top-k per tile",
    )
)
register(Method("full", None, "the stock model: every token, with newline tokens", partition_policy="all"))


# Importing the baselines registers them.
from . import baselines  # noqa: E402,F401
from .patch import fastv  # noqa: E402,F401
