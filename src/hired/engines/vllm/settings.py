"""The plugin's rules, without vLLM: which configuration an engine serves, what a request may change,
and how many tokens each image gets.

An engine's configuration is the ``hired`` entry of the model's ``config.json`` (written by
``save_pretrained`` after ``hired.apply``) or of ``hf_overrides``, read with the same validation as
:class:`hired.HiredConfig`. vLLM sizes each prompt before the vision tower runs, so only methods
that choose a fixed number of tokens on the vision side can be served.
"""

from __future__ import annotations

import difflib
import inspect
import typing
from dataclasses import dataclass
from typing import Any, Mapping

from ... import HiredConfig, stored_config
from ...compat import require_attribute
from ...geometry import PartitionGeometry
from ...algorithm import CLS_FREE_SCORE
from ...methods import available_methods, get_method
from ...native_drop import drop_block
from ...state import CONFIG_KEY



@dataclass(frozen=True)
class ServedFamily:
    """A family the plugin serves: what a refusal calls it, and the module in the family's folder that holds its
    vLLM classes (each named ``Hired<architecture>``, listed in the module's ``SERVED_CLASSES``)."""

    description: str
    module: str


# The families the plugin serves, by vLLM's architecture name: one line each, pointing into the family's folder.
# (LlavaForConditionalGeneration also serves Pixtral, which the plugin leaves to vLLM.)
SERVED_FAMILIES = {
    "LlavaNextForConditionalGeneration": ServedFamily("LLaVA-NeXT (LlavaNextForConditionalGeneration)",
                                                      "hired.families.llava_next.vllm"),
    "LlavaForConditionalGeneration": ServedFamily("LLaVA-1.5 (LlavaForConditionalGeneration with a CLIP tower)",
                                                  "hired.families.llava.vllm"),
    "InternVLForConditionalGeneration": ServedFamily("InternVL (InternVLForConditionalGeneration)",
                                                     "hired.families.internvl.vllm"),
    "LlavaOnevisionForConditionalGeneration": ServedFamily(
        "LLaVA-OneVision (LlavaOnevisionForConditionalGeneration)", "hired.families.llava_onevision.vllm"),
    "Qwen2_5_VLForConditionalGeneration": ServedFamily("Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration)",
                                                       "hired.families.qwen2_5_vl.vllm"),
    "Qwen3VLForConditionalGeneration": ServedFamily("Qwen3-VL (Qwen3VLForConditionalGeneration)",
                                                    "hired.families.qwen3_vl.vllm"),
}
# The architectures the plugin serves, as a refusal names them.
SERVED_ARCHITECTURES = {architecture: served.description for architecture, served in SERVED_FAMILIES.items()}
# What a request may set through ``mm_processor_kwargs`` (``extra_body`` of the OpenAI server).
REQUEST_KEYS = ("budget", "tokens")
# The scopes of a Hugging Face processor call that vLLM routes a LLaVA request's keys to (text and images).
PROCESSOR_SCOPES = ("text_kwargs", "images_kwargs")
# The per-image field the processor adds for the model: the tokens it keeps, or EVERY_TOKEN.
KEPT_FIELD = "hired_kept_tokens"
# KEPT_FIELD's value for an image that keeps every token (HiredConfig.kept_count's None): a tensor field
# holds no None, and no image keeps 0 tokens. Only kept_field and field_count read or write it.
EVERY_TOKEN = 0


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


def engine_keys() -> frozenset[str]:
    """hired's keys that only the engine's configuration sets: the method and every registered method's options."""
    keys = {"method", "method_options"}
    for name in available_methods():
        keys.update(get_method(name).option_defaults)
    return frozenset(keys)


@dataclass(frozen=True)
class ProcessorKeys:
    """The keys a Hugging Face processor declares: ``flat`` (given at the top level of ``mm_processor_kwargs``)
    and, per scope (``images_kwargs``), the keys accepted inside it."""

    processor: str
    flat: frozenset[str]
    scopes: Mapping[str, frozenset[str]]


def processor_keys(processor) -> ProcessorKeys:
    """What ``processor`` declares it accepts, as vLLM passes a request's keys on to it: the keys of its
    call's text and image scopes, which vLLM routes flat keys into (the image scope with the image
    processor's own, as vLLM counts them), and its constructor's settings, which vLLM passes to
    ``from_pretrained``."""
    for name in ("valid_processor_kwargs", "get_attributes"):
        require_attribute(processor, name, "checking the keys of a vLLM request")
    declared = typing.get_type_hints(processor.valid_processor_kwargs)
    scopes = {scope: set(typing.get_type_hints(declared[scope])) for scope in PROCESSOR_SCOPES if scope in declared}
    image_kwargs = getattr(getattr(processor, "image_processor", None), "valid_kwargs", None)
    if image_kwargs is not None:
        scopes.setdefault("images_kwargs", set()).update(typing.get_type_hints(image_kwargs))
    # Its sub-processors (image_processor, tokenizer) are constructor arguments too, but no setting.
    components = {"self", *type(processor).get_attributes()}
    settings = {name for name, parameter in inspect.signature(type(processor).__init__).parameters.items()
                if name not in components and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)}
    return ProcessorKeys(type(processor).__name__, frozenset(settings.union(*scopes.values())),
                         {scope: frozenset(keys) for scope, keys in scopes.items()})


def check_request_keys(kwargs: Mapping[str, Any], processor: ProcessorKeys) -> None:
    """Refuse a key of a request's ``mm_processor_kwargs`` that would change nothing.

    Accepted: hired's :data:`REQUEST_KEYS`, and what ``processor`` declares (inside a scope such as
    ``images_kwargs``, that scope's keys). The Hugging Face processor drops any other key without a
    word, so the request would be served at settings it did not ask for.

    Raises:
        ValueError: the first key that is neither, with the closest valid key, or why hired's engine keys
            cannot change per request.
    """
    for key, value in kwargs.items():
        if key in REQUEST_KEYS or key in processor.flat:
            continue
        if key in processor.scopes:
            if isinstance(value, Mapping):
                for inner in value:
                    if inner not in processor.scopes[key]:
                        raise ValueError(_unknown_key(f"{key}.{inner}", inner, processor.scopes[key],
                                                      f"which {processor.processor}'s {key} does not accept"))
            continue
        if key in engine_keys():
            raise ValueError(
                f"mm_processor_kwargs {{{key!r}: {value!r}}}: {key!r} belongs to the engine's hired configuration, which "
                "a request cannot change: the model runs one method, with one set of options, for every image of a batch "
                "(it reads the vision-tower layers that method needs). A request may set 'budget' or 'tokens'; set "
                f"{key!r} when the engine starts (hf_overrides={{'{CONFIG_KEY}': {{...}}}} or the model's config.json)")
        raise ValueError(_unknown_key(key, key, [*REQUEST_KEYS, *processor.flat, *processor.scopes],
                                      f"which neither hired (budget, tokens) nor {processor.processor} accepts"))


def _unknown_key(label: str, key: str, valid: typing.Iterable[str], refusal: str) -> str:
    close = difflib.get_close_matches(key, sorted(valid), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (f"mm_processor_kwargs has the key {label!r}{hint}, {refusal}: it would be ignored and the request "
            "served at the engine's settings; correct or remove it")


def served_families() -> str:
    return " and ".join(SERVED_ARCHITECTURES.values())


def unserved_config(served_as: str) -> str:
    """Why a model carrying a ``hired`` entry cannot start when vLLM serves it as ``served_as``."""
    return (f"the model's configuration has a '{CONFIG_KEY}' entry (config.json or hf_overrides), but vLLM serves it as "
            f"{served_as}, which hired's vLLM plugin does not prune, so the entry would be ignored; the plugin serves "
            f"{served_families()}. Remove the entry to serve the stock model (hired.apply prunes more families in "
            "transformers: hired.registered_families())")


def check_unserved_request(kwargs: Mapping[str, Any], served_as: str) -> None:
    """Refuse hired's keys in a request to a model the plugin does not serve (its processor would drop them).

    Raises:
        ValueError: the request names ``budget``, ``tokens``, ``method`` or ``method_options``.
    """
    ours = sorted(set(kwargs) & {*REQUEST_KEYS, "method", "method_options"})
    if ours:
        raise ValueError(f"mm_processor_kwargs {ours}: this engine serves {served_as}, which hired's vLLM plugin does "
                         f"not prune, so the key would be ignored; the plugin serves {served_families()}")


def split_request_kwargs(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(hired's keys, the rest)``: the rest goes on to the Hugging Face processor."""
    ours = {key: value for key, value in kwargs.items() if key in REQUEST_KEYS}
    return ours, {key: value for key, value in kwargs.items() if key not in REQUEST_KEYS}


def kept_tokens(config: HiredConfig | None, geometry: PartitionGeometry) -> int | None:
    """Tokens an image of this geometry keeps under ``config``; ``None`` when it is fed whole (stock), as
    without a configuration."""
    return None if config is None else config.kept_count(geometry.stock_tokens)


def kept_field(count: int | None) -> int:
    """An image's kept count as :data:`KEPT_FIELD` carries it."""
    return EVERY_TOKEN if count is None else count


def field_count(value: int | None) -> int | None:
    """An image's kept count from its :data:`KEPT_FIELD` value (``None`` when the image carries none)."""
    return None if value is None or value == EVERY_TOKEN else value


@dataclass(frozen=True)
class TowerPlan:
    """What the model reads from vLLM's vision tower for a method: two layers (indices into the built
    tower), the score, the head aggregation, ``skip``, the tokens ahead of the patches in the
    layers' queries and keys (a CLS token), and where an early drop selects."""

    distribution: int
    selection: int
    score: str
    aggregation: str
    skip: int = 0
    # The early drop (HiredConfig.drop_layer): the layer the method selects at, before the feature layer ``feature``,
    # after which only the kept tokens run on; None: the method selects after the tower.
    drop: int | None = None
    feature: int | None = None


# The towers over tiles the plugin reads (the LLaVA families' CLIP and SigLIP, InternVL's InternViT), by model type:
# whether it has a CLS token, and the vision_feature_select_strategy under which every patch token, and nothing
# else, reaches the LLM.
TILED_TOWERS = {"clip_vision_model": (True, "default"), "siglip_vision_model": (False, "full"),
                "internvl_vision": (True, "default")}


def tower_plan(config: HiredConfig, hf_config) -> TowerPlan:
    """The method's layers as indices into vLLM's vision tower over tiles (CLIP, SigLIP without a CLS token,
    InternViT), and the score it reads there.

    vLLM builds the tower only up to the layer the LLM takes its features from, so the method's
    layers must lie at or before it.

    Raises:
        ValueError: a model setting the selection cannot honour, or a layer the truncated tower lacks.
    """
    vision = hf_config.vision_config
    kind = getattr(vision, "model_type", None)
    if kind not in TILED_TOWERS:
        raise ValueError(f"the vLLM plugin reads vLLM's CLIP, SigLIP or InternViT vision tower, but this model's tower is "
                         f"{kind or type(vision).__name__!r}; serve it without a 'hired' entry")
    has_cls, wanted = TILED_TOWERS[kind]
    strategy = hf_config.vision_feature_select_strategy
    if strategy != wanted:
        tokens = "no CLS token, " if has_cls else ""
        raise ValueError(f"hired needs vision_feature_select_strategy={wanted!r} for a {kind} tower (every patch "
                         f"token, {tokens}reaches the LLM); this model uses {strategy!r}")
    feature_layer, depth = hf_config.vision_feature_layer, vision.num_hidden_layers
    if isinstance(feature_layer, bool) or not isinstance(feature_layer, int):
        raise ValueError(f"hired supports a single vision_feature_layer, got {feature_layer!r}")
    feature = feature_layer % (depth + 1) - 1
    if not has_cls:
        get_method(config.method).check_tower(False, f"the {kind} tower of this {hf_config.model_type} model")
    layers = config.method_options.signal_layers()
    drop = feature
    if config.drop_layer is not None:
        if not -depth <= config.drop_layer < depth or config.drop_layer % depth > feature:
            raise ValueError(f"drop_layer={config.drop_layer} is out of range: this {hf_config.model_type} model takes "
                             f"its features from layer {feature} of {depth}, so drop at a layer from {-depth} to "
                             f"{feature}")
        drop = config.drop_layer % depth
    indices = []
    for name, value in (("distribution_layer", layers.distribution), ("selection_layer", layers.selection)):
        if value is None:
            indices.append(drop)
            continue
        if not -depth <= value < depth:
            raise ValueError(f"{name}={value} is out of range for a vision tower of {depth} layers "
                             f"(valid: {-depth}..{depth - 1}; the feature layer is {feature})")
        if value % depth > feature:
            raise ValueError(f"{name}={value} is layer {value % depth} of the vision tower, after the feature layer "
                             f"{feature}; vLLM builds the tower only up to the feature layer, so that layer does not "
                             f"exist there: choose a layer up to {feature}")
        if value % depth > drop:
            raise ValueError(f"{name}={value} lies after drop_layer={config.drop_layer} (layer {drop}), whose tokens "
                             "the method must choose from; read layers at or before it")
        indices.append(value % depth)
    return TowerPlan(indices[0], indices[1], resolved_score(layers.score, has_cls, hf_config), layers.aggregation,
                     skip=int(has_cls), drop=None if drop == feature else drop, feature=feature)


def resolved_score(score: str, has_cls: bool, hf_config) -> str:
    """The score a method's ``score`` option reads on a tower with or without a CLS token.

    Raises:
        ValueError: ``score="cls"`` on a tower without a CLS token.
    """
    if has_cls:
        return "cls" if score == "auto" else score
    if score == "cls":
        raise ValueError(f"score='cls' reads CLS attention, but the vision tower of this {hf_config.model_type} model "
                         f"has no CLS token; use score='auto' (here {CLS_FREE_SCORE!r}) or another CLS-free score")
    return CLS_FREE_SCORE if score == "auto" else score


def native_tower_plan(config: HiredConfig, hf_config) -> TowerPlan:
    """The method's layers as block indices of a native-resolution tower (Qwen-VL's ViT: no CLS token, the merger
    reads the last block, which vLLM builds in full), and the CLS-free score it reads there.

    Raises:
        ValueError: a method that needs a CLS token, or a layer the tower lacks.
    """
    vision = hf_config.vision_config
    depth = int(vision.depth)
    get_method(config.method).check_tower(False, f"the vision tower of this {hf_config.model_type} model")
    layers = config.method_options.signal_layers()
    feature = drop = depth - 1
    if config.drop_layer is not None:
        whole = sorted(getattr(vision, "fullatt_block_indexes", None) or range(depth))
        drop = drop_block(config.drop_layer, depth, whole, hf_config.model_type)
    indices = []
    for name, value in (("distribution_layer", layers.distribution), ("selection_layer", layers.selection)):
        if value is None:
            indices.append(drop)
            continue
        if not -depth <= value < depth:
            raise ValueError(f"{name}={value} is out of range for a vision tower of {depth} blocks "
                             f"(valid: {-depth}..{depth - 1})")
        if value % depth > drop:
            raise ValueError(f"{name}={value} lies after drop_layer={config.drop_layer} (block {drop}), whose tokens "
                             "the method must choose from; read blocks at or before it")
        indices.append(value % depth)
    return TowerPlan(indices[0], indices[1], resolved_score(layers.score, False, hf_config), layers.aggregation,
                     drop=None if drop == feature else drop, feature=feature)
