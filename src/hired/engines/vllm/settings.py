"""The plugin's rules, without vLLM: which configuration an engine serves, what a request may change,
and how many tokens each image gets.

An engine's configuration is the ``hired`` entry of the model's ``config.json`` (written by
``save_pretrained`` after ``hired.apply``) or of ``hf_overrides``, read with the same validation as
:class:`hired.HiredConfig`. vLLM sizes each prompt before the vision tower runs, so only methods
that choose a fixed number of tokens on the vision side can be served.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ... import HiredConfig, stored_config
from ...geometry import PartitionGeometry
from ...methods import get_method

# What a request may set through ``mm_processor_kwargs`` (``extra_body`` of the OpenAI server).
REQUEST_KEYS = ("budget", "tokens")
# The per-image field the processor adds for the model: tokens to keep, 0 for every token (stock).
KEPT_FIELD = "hired_kept_tokens"


class UnservableConfig(RuntimeError):
    """The engine's configuration cannot be served; raised when the engine starts.

    Not a ``ValueError``: vLLM reads a ``ValueError`` raised while it probes the model's processor as
    "no multimodal processor" and would start the engine text-only instead of failing.
    """


def engine_config(hf_config) -> HiredConfig | None:
    """The configuration stored on a model's ``hf_config`` (``config.json`` or ``hf_overrides``), validated.

    Returns ``None`` when there is none: the engine serves the stock model unless a request asks
    for a budget.

    Raises:
        ValueError: the entry is not a valid configuration, or names a method vLLM cannot serve.
    """
    try:
        config = stored_config(hf_config)
    except ValueError as error:
        raise ValueError(f"the model's 'hired' configuration is invalid: {error}") from None
    if config is None:
        return None
    check_servable(config)
    return config


def check_servable(config: HiredConfig) -> None:
    """Refuse a method whose token count is not known before the vision tower runs."""
    method = get_method(config.method)
    if method.stage == "llm":
        raise ValueError(
            f"method {config.method!r} prunes inside the language model, but vLLM fixes each prompt's length "
            "before the model runs; serve a method that selects on the vision side (hired, fastervlm, visionzip, "
            "divprune, prumerge, random, spatial), or run this one in transformers"
        )
    if not config.fixes_count:
        raise ValueError(
            f"method {config.method!r} in adaptive mode chooses its token count from the pixels, but vLLM must know "
            "each image's count before encoding it (to place its tokens in the prompt); set adaptive=False for a "
            "fixed budget"
        )


def request_config(engine: HiredConfig | None, kwargs: Mapping[str, Any]) -> HiredConfig | None:
    """The configuration of one request: the engine's, with the request's ``budget`` or ``tokens``.

    A request on an engine without a configuration that gives a budget runs HiRED with its
    defaults at that budget.

    Raises:
        ValueError: an invalid budget or token count (the message of :class:`hired.HiredConfig`).
    """
    amount = {key: kwargs[key] for key in REQUEST_KEYS if kwargs.get(key) is not None}
    if not amount:
        return engine
    try:
        if engine is None:
            return HiredConfig.create(**amount)
        if get_method(engine.method).stage == "none":
            raise ValueError(f"the engine serves method {engine.method!r}, which feeds every token, so a per-request "
                             f"{' and '.join(amount)} cannot take effect")
        return engine.updated(**amount)
    except ValueError as error:
        raise ValueError(f"mm_processor_kwargs {amount}: {error}") from None


def split_request_kwargs(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(hired's keys, the rest)``: the rest goes on to the Hugging Face processor."""
    ours = {key: value for key, value in kwargs.items() if key in REQUEST_KEYS}
    return ours, {key: value for key, value in kwargs.items() if key not in REQUEST_KEYS}


def kept_tokens(config: HiredConfig | None, geometry: PartitionGeometry) -> int:
    """Tokens an image of this geometry keeps under ``config``; 0 when it is fed whole (stock)."""
    if config is None:
        return 0
    budget = config.budget_for(geometry.stock_tokens)
    return 0 if budget >= geometry.stock_tokens else budget


@dataclass(frozen=True)
class TowerPlan:
    """What the model reads from vLLM's vision tower for a method: two layers (indices into the built
    tower), the score and the head aggregation."""

    distribution: int
    selection: int
    score: str
    aggregation: str


def tower_plan(config: HiredConfig, hf_config) -> TowerPlan:
    """The method's layers as indices into vLLM's vision tower, and the score it reads there.

    vLLM builds the tower only up to the layer the LLM takes its features from, so the method's
    layers must lie at or before it.

    Raises:
        ValueError: a model setting the selection cannot honour, or a layer the truncated tower lacks.
    """
    vision = hf_config.vision_config
    if getattr(vision, "model_type", None) != "clip_vision_model":
        raise ValueError(f"the vLLM plugin reads vLLM's CLIP vision tower, but this model's tower is "
                         f"{getattr(vision, 'model_type', type(vision).__name__)!r}; serve it without a 'hired' entry")
    strategy = hf_config.vision_feature_select_strategy
    if strategy != "default":
        raise ValueError(f"hired needs vision_feature_select_strategy='default' for a CLIP tower (every patch "
                         f"token, no CLS token, reaches the LLM); this model uses {strategy!r}")
    feature_layer, depth = hf_config.vision_feature_layer, vision.num_hidden_layers
    if isinstance(feature_layer, bool) or not isinstance(feature_layer, int):
        raise ValueError(f"hired supports a single vision_feature_layer, got {feature_layer!r}")
    feature = feature_layer % (depth + 1) - 1
    layers = config.method_options.signal_layers()
    indices = []
    for name, value in (("distribution_layer", layers.distribution), ("selection_layer", layers.selection)):
        if value is None:
            indices.append(feature)
            continue
        if not -depth <= value < depth:
            raise ValueError(f"{name}={value} is out of range for a vision tower of {depth} layers "
                             f"(valid: {-depth}..{depth - 1}; the feature layer is {feature})")
        if value % depth > feature:
            raise ValueError(f"{name}={value} is layer {value % depth} of the vision tower, after the feature layer "
                             f"{feature}; vLLM builds the tower only up to the feature layer, so that layer does not "
                             f"exist there: choose a layer up to {feature}")
        indices.append(value % depth)
    score = "cls" if layers.score == "auto" else layers.score  # a CLIP tower has a CLS token
    return TowerPlan(indices[0], indices[1], score, layers.aggregation)
