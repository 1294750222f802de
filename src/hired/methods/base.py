"""What a token-reduction method is, and the registry that names them.

A method is one module in this package: a frozen options dataclass (validated on construction), a
pure function, and a :func:`register_method` call. Vision-side methods see one image at a time as
:class:`VisionEvidence` (tensors and a :class:`~hired.geometry.PartitionGeometry`, never a model) and
return a :class:`Selection`. LLM-side methods supply a scoring function that the decoder hooks of
:mod:`hired.llm_pruning` call inside the language model.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping

import torch

from ..algorithm import SCORES
from ..deprecation import warn_renamed

if TYPE_CHECKING:
    from ..geometry import PartitionGeometry

Stage = Literal["vision", "llm", "none"]
HEAD_AGGREGATIONS = ("sum", "mean", "max")


@dataclass(frozen=True)
class SignalLayers:
    """Which vision-tower layers a method reads, which attention score, and how heads are combined.

    ``distribution`` and ``selection`` are layer indices of the tower (negative ones count from
    its end); ``None`` for ``selection`` means the layer the VLM takes its features from.
    ``score``: one of :data:`hired.algorithm.SCORES`: ``"cls"`` (the CLS token's attention row),
    a CLS-free score for towers without one, or ``"auto"`` (CLS where the tower has one, the
    measured CLS-free default otherwise; see docs/families.md).
    """

    distribution: int = 0
    selection: int | None = None
    aggregation: str = "sum"
    score: str = "auto"


@dataclass(frozen=True)
class MethodOptions:
    """Base class of every method's options: a frozen dataclass whose ``__post_init__`` validates.

    Subclasses declare one field per option, with its default; :meth:`Method.make_options` adds
    the method's name to the messages of their checks.
    """

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def adaptive(self) -> bool:
        """True when the token count is chosen from the pixels (the budget does not fix it)."""
        return False

    def signal_layers(self) -> SignalLayers:
        """The tower layers this method reads; by default CLS attention of the feature layer."""
        return SignalLayers()

    # Validators for subclasses' __post_init__: one clear message per bad value.
    def _check_int(self, name: str, minimum: int | None = None) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (minimum is not None and value < minimum):
            bound = "" if minimum is None else f" >= {minimum}"
            raise ValueError(f"option {name!r} must be an integer{bound}, got {value!r}")
        object.__setattr__(self, name, int(value))  # numpy integers become plain ones (JSON, torch seeds)

    def _check_number(self, name: str, low: float, high: float | None = None) -> None:
        value = getattr(self, name)
        bad = isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
        if bad or value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise ValueError(f"option {name!r} must be a number {bounds}, got {value!r}")
        object.__setattr__(self, name, float(value))

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        if getattr(self, name) not in choices:
            raise ValueError(f"option {name!r} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")

    def _check_bool(self, name: str) -> None:
        if not isinstance(getattr(self, name), bool):
            raise ValueError(f"option {name!r} must be true or false, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class NoOptions(MethodOptions):
    """For methods without options."""


@dataclass
class VisionEvidence:
    """What the vision encoder says about one image.

    Attributes:
        geometry: the image's partitions and their candidate positions.
        features: ``(P, s*s, D)`` feature-layer hidden states of the patch tokens.
        distribution_scores: ``(P, s*s)`` token scores of the distribution layer, heads aggregated, of
            the kind :attr:`SignalLayers.score` names: with ``"auto"`` (the default) CLS attention where
            the tower has a CLS token and key distinctiveness where it has none. hired's families and its
            vLLM plugin always compute them, on towers without a CLS token too.
        selection_scores: ``(P, s*s)`` the same scores of the selection layer.
        keys: ``(P, s*s, Dk)`` key projections of the patch tokens in the selection layer.

    Where the tensors live: :meth:`Method.choose` hands a method the score maps on the host (CPU) and the
    features and keys on the model's device. Choosing indices is integer work over a few thousand scores,
    done beside the geometry (which is on the host) without a host read per token; the work that grows with
    the feature width stays on the device. Kept indices are host tensors.
    """

    geometry: "PartitionGeometry"
    features: torch.Tensor
    distribution_scores: torch.Tensor | None
    selection_scores: torch.Tensor | None
    keys: torch.Tensor | None


@dataclass(init=False)
class Selection:
    """A vision-side method's decision for one image.

    Attributes:
        partition_tokens: ``(P,)`` tokens kept per partition (``budgets`` before hired 0.3).
        kept: ascending kept indices per partition, in that partition's ``s*s`` numbering.
        features: ``(K, D)`` features to feed in place of the kept tokens (merging methods), in
            stock order of the kept positions; ``None`` means "the kept tokens themselves".
        extras: method-specific record fields (e.g. an adaptive count).
    """

    partition_tokens: torch.Tensor
    kept: list[torch.Tensor]
    features: torch.Tensor | None
    extras: dict

    def __init__(self, partition_tokens: torch.Tensor | None = None, kept: list[torch.Tensor] | None = None,
                 features: torch.Tensor | None = None, extras: dict | None = None, *,
                 budgets: torch.Tensor | None = None) -> None:
        if budgets is not None:
            warn_renamed("Selection(budgets=...)", "Selection(partition_tokens=...)")
            partition_tokens = budgets if partition_tokens is None else partition_tokens
        if partition_tokens is None or kept is None:
            raise TypeError("Selection needs partition_tokens and kept")
        self.partition_tokens, self.kept = partition_tokens, kept
        self.features, self.extras = features, {} if extras is None else extras

    @property
    def budgets(self) -> torch.Tensor:
        warn_renamed("Selection.budgets", "Selection.partition_tokens")
        return self.partition_tokens

    @property
    def num_tokens(self) -> int:
        return int(self.features.shape[0]) if self.features is not None else int(self.partition_tokens.sum())


@dataclass(frozen=True)
class Method:
    """A registered token-reduction method.

    Attributes:
        name: what users pass as ``method=``.
        summary: one line for ``--help``, error messages and the methods table.
        options: the method's :class:`MethodOptions` subclass.
        stage: ``"vision"`` (chooses tokens before the LLM through ``select``), ``"llm"`` (prunes
            inside the decoder through ``score``) or ``"none"`` (the stock model).
        select: ``(evidence, tokens, options) -> Selection`` for vision-side methods: keep ``tokens`` of the image.
        score: for LLM-side methods, ``(query, key, rotary, apply_rotary, head_dim, scaling,
            attention_mask) -> (B, L)`` importance of every position, computed in the decoder layer
            before the one where pruning starts (``options.layer``).
        needs_cls: reads CLS attention and has no CLS-free form, so towers without a CLS token
            cannot run it (methods with a ``score`` option choose their signal instead).
        paper, signal, merges, partition_policy: documentation, rendered into the methods table.
    """

    name: str
    summary: str
    options: type[MethodOptions] = NoOptions
    stage: Stage = "vision"
    select: Callable[[VisionEvidence, int, Any], Selection] | None = None
    score: Callable[..., torch.Tensor] | None = None
    needs_cls: bool = False
    paper: str = "-"
    signal: str = "-"
    merges: str = "no"
    partition_policy: str = "-"

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"a method needs a non-empty name, got {self.name!r}")
        if not (isinstance(self.options, type) and issubclass(self.options, MethodOptions)):
            raise TypeError(f"method {self.name!r}: options must be a MethodOptions subclass, got {self.options!r}")
        wanted = {"vision": ("select",), "llm": ("score",), "none": ()}
        if self.stage not in wanted:
            raise ValueError(f"method {self.name!r}: stage must be 'vision', 'llm' or 'none', got {self.stage!r}")
        for attribute in ("select", "score"):
            given = getattr(self, attribute) is not None
            if given != (attribute in wanted[self.stage]):
                raise ValueError(
                    f"method {self.name!r} of stage {self.stage!r} must {'' if not given else 'not '}define {attribute}"
                )

    @property
    def option_defaults(self) -> dict[str, Any]:
        return {f.name: f.default for f in dataclasses.fields(self.options)}

    def make_options(self, data: Mapping[str, Any] | MethodOptions | None = None) -> MethodOptions:
        """The validated options object from a mapping (unknown keys are an error) or an instance."""
        if isinstance(data, self.options):
            return data
        if isinstance(data, MethodOptions):
            raise ValueError(f"method {self.name!r} takes {self.options.__name__}, got {type(data).__name__}")
        data = dict(data or {})
        known = self.option_defaults
        unknown = sorted(set(data) - set(known))
        if unknown:
            allowed = ", ".join(sorted(known)) or "none"
            raise ValueError(f"method {self.name!r} has no options {unknown}; its options: {allowed}")
        try:
            return self.options(**data)
        except ValueError as error:
            raise ValueError(f"method {self.name!r}: {error}") from None

    @property
    def selects_before_llm(self) -> bool:
        """Whether the method chooses the visual tokens before the language model (from the vision tower)."""
        return self.stage == "vision"

    def check_tower(self, has_cls: bool, tower: str) -> None:
        """Refuse a vision tower without a CLS token when this method scores tokens by CLS attention.

        ``tower`` names the tower in the message (``"the vision tower of this qwen2.5-vl model"``).

        Raises:
            ValueError: the method needs CLS attention and the tower has no CLS token.
        """
        if self.needs_cls and not has_cls:
            raise ValueError(
                f"method {self.name!r} scores tokens by CLS attention and has no CLS-free form, but {tower} has no CLS "
                "token; choose a method that needs none (hired and visionzip use a CLS-free score there; divprune, random "
                "and spatial need no attention)"
            )

    def has_fixed_budget(self, options: MethodOptions) -> bool:
        """Whether, under ``options``, the token count depends only on the image size."""
        return not options.adaptive

    def choose(self, evidence: VisionEvidence, tokens: int | None, options: MethodOptions) -> tuple[Selection, torch.Tensor]:
        """Run this vision-side method on one image: its :class:`Selection` and the ``(K, D)`` features to feed.

        The features are the kept tokens in stock order (or the method's merged ones); every engine
        feeds exactly these.

        Raises:
            RuntimeError: a fixed-budget method returned another count than ``tokens`` (a bug in the method).
        """
        selection = self.decide(evidence, tokens, options)
        return selection, self.feed(selection, evidence.features, evidence.geometry)

    def decide(self, evidence: VisionEvidence, tokens: int | None, options: MethodOptions) -> Selection:
        """This vision-side method's :class:`Selection` for one image (the first half of :meth:`choose`).

        Raises:
            RuntimeError: a fixed-budget method returned another count than ``tokens`` (a bug in the method).
        """
        selection = self.select(dataclasses.replace(
            evidence,
            distribution_scores=_on_host(evidence.distribution_scores),
            selection_scores=_on_host(evidence.selection_scores),
        ), tokens, options)
        count = selection.features.shape[0] if selection.features is not None else sum(len(k) for k in selection.kept)
        if self.has_fixed_budget(options) and count != tokens:
            raise RuntimeError(f"method {self.name!r} returned {count} tokens where it was asked for "
                               f"{tokens}; this is a bug in the method")
        return selection

    @staticmethod
    def feed(selection: Selection, features: torch.Tensor, geometry: "PartitionGeometry") -> torch.Tensor:
        """The ``(K, D)`` features to feed for ``selection``: the method's merged ones, or the kept tokens of
        ``features`` (``(P, s*s, D)``) in stock order (the second half of :meth:`choose`)."""
        if selection.features is not None:
            return selection.features
        order = geometry.stock_order(selection.kept).to(features.device)
        return features[order[:, 0], order[:, 1]]


def _on_host(scores: torch.Tensor | None) -> torch.Tensor | None:
    return None if scores is None else scores.detach().to("cpu", torch.float32)


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Make ``method`` available by name to ``hired.apply``, the CLI and the benchmarks.

    Raises:
        ValueError: a method of that name is registered already (names are never replaced).
    """
    if not isinstance(method, Method):
        raise TypeError(f"register_method takes a hired.Method, got {type(method).__name__}")
    if method.name in _METHODS:
        raise ValueError(f"a method named {method.name!r} is registered already; choose another name")
    _METHODS[method.name] = method
    return method


def unregister_method(name: str) -> Method:
    """Remove a registered method (for tests and notebooks that define one more than once); return it."""
    method = get_method(name)
    del _METHODS[name]
    return method


def available_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available methods: {', '.join(available_methods())}") from None


def vision_methods() -> list[str]:
    """Names of the registered methods that choose tokens before the language model."""
    return [name for name in available_methods() if _METHODS[name].selects_before_llm]


def registered_methods() -> list[Method]:
    """Every registered method, by name."""
    return [_METHODS[name] for name in available_methods()]
