"""The one generic apply / remove path.

``apply`` swaps the class of the inner model (the module that holds the vision tower, the projector
and the language model) and of the processor in place: nothing is copied or re-initialised. The
swapped model overrides ``get_image_features``, the one method both ``forward`` and ``generate``
use to encode images; the swapped processor emits exactly as many image placeholders as the model
will return features. A family adapter (:mod:`.adapter`, one file per family in this package) says
how its classes do that.
"""

from __future__ import annotations

import functools
import inspect
import weakref

from .. import compat
from ..config import HiredConfig
from ..methods import Method, get_method
from ..state import CONFIG_KEY, ModelState
from .. import llm_pruning
from .adapter import FamilyAdapter
from .mixins import HiredProcessor
from .records import check_counts


def _check_internals(family: FamilyAdapter, model, inner, processor) -> None:
    """Raise a clear error when an internal the adapter relies on is gone from this transformers."""
    for name in family.model_internals:
        compat.require_attribute(inner if name == "multi_modal_projector" else family.inner_class, name,
                                 "selecting image features")
    if model is not inner:
        compat.require_attribute(type(model), "_expand_multimodal_outputs",
                                 "checking placeholder and feature counts in generate")
    if processor is not None:
        for name in family.processor_internals:
            compat.require_attribute(family.processor_class, name, "emitting the kept number of image placeholders")
    compat.warn_if_untested()


def apply(family: FamilyAdapter, model, processor, config: HiredConfig):
    """Patch ``model`` (and ``processor``) in place; see :func:`hired.apply`."""
    inner = family.inner(model)
    if processor is not None and not isinstance(processor, family.processor_class):
        raise TypeError(f"{type(inner).__name__} needs a {family.processor_class.__name__}, got {type(processor).__name__}")
    _check_internals(family, model, inner, processor)
    method = get_method(config.method)
    options = config.method_options
    if processor is not None:
        config.require_fixed_count()
    probe = family.vision_probe(inner)
    method.check_tower(probe.has_cls, f"the vision tower of this {family.name} model")
    feature_layer = family.feature_layer(inner, probe)
    layers = options.signal_layers()
    if method.selects_before_llm:
        family.check_call(inner, probe)  # settings of the model itself, refused here rather than at generate
        probe.resolve_score(layers.score)  # score='cls' on a tower without a CLS token is refused here
    for name, value in (("distribution_layer", layers.distribution), ("selection_layer", layers.selection)):
        if value is not None and not -probe.num_layers <= value < probe.num_layers:
            raise ValueError(
                f"{name}={value} is out of range for a vision tower of {probe.num_layers} layers "
                f"(valid: {-probe.num_layers}..{probe.num_layers - 1}; the feature layer is {feature_layer})"
            )
    if config.drop_layer is not None:  # a vision-side method (HiredConfig refuses the others)
        drop_layer = family.drop_layer(inner, probe, config.drop_layer, feature_layer)
        later = [f"{name}={value}" for name, value in (("distribution_layer", layers.distribution),
                                                       ("selection_layer", layers.selection))
                 if value is not None and value % probe.num_layers > drop_layer]
        if later:
            raise ValueError(f"{' and '.join(later)} lie after drop_layer={config.drop_layer} (layer {drop_layer}), whose "
                             "tokens the method must choose from; read layers at or before it")
    if processor is not None:
        family.check_processor(inner, processor)
    pruning = llm_pruning.prepare(inner, method, options) if method.stage == "llm" else None

    previous = getattr(inner, "_hired", None)
    earlier_processor = previous.paired_processor() if isinstance(previous, ModelState) else None
    if earlier_processor is not None and earlier_processor is not processor:
        _restore_processor(earlier_processor)  # it would emit the old count beside the new configuration
    _uninstall_hooks(inner)
    if isinstance(processor, HiredProcessor):
        processor.__class__ = processor._stock_class
    if processor is not None:
        processor.__class__ = family.hired_processor_class
        processor.hired_config = config
    compat.save_under_stock_names(family.inner_class, family.hired_inner_class)
    inner.__class__ = family.hired_inner_class
    state = ModelState(family, config, probe, weakref.ref(processor) if processor is not None else None)
    inner._hired = state
    if pruning is not None:
        state.llm_pruning = pruning
        llm_pruning.install(inner, pruning, config, records=functools.partial(getattr, state, "records"))
    state.handles.append(inner.register_forward_pre_hook(
        functools.partial(_forget_records_of_earlier_calls, state, positional_names(family.inner_class.forward)),
        with_kwargs=True,
    ))
    state.handles.extend(family.install(inner, state))
    if model is not inner:
        model._expand_multimodal_outputs = functools.partial(_checked_expand, model)
    for holder in {id(model.config): model.config, id(inner.config): inner.config}.values():
        setattr(holder, CONFIG_KEY, config.to_dict())
    return model, processor


def remove(family: FamilyAdapter, model, processor=None):
    """Restore the stock classes of ``model`` and of ``processor``; see :func:`hired.remove`."""
    inner = family.inner(model)
    state = getattr(inner, "_hired", None)
    if processor is None and isinstance(state, ModelState):
        processor = state.paired_processor()
    _uninstall_hooks(inner)
    model.__dict__.pop("_expand_multimodal_outputs", None)
    if type(inner) is not family.inner_class:
        inner.__class__ = family.inner_class
        inner.__dict__.pop("_hired", None)
    for holder in {id(model.config): model.config, id(inner.config): inner.config}.values():
        if hasattr(holder, CONFIG_KEY):
            delattr(holder, CONFIG_KEY)
    if isinstance(processor, HiredProcessor):
        _restore_processor(processor)
    return model, processor


def _restore_processor(processor: HiredProcessor) -> None:
    processor.__class__ = processor._stock_class
    del processor.hired_config


def _uninstall_hooks(inner) -> None:
    state = getattr(inner, "_hired", None)
    if not isinstance(state, ModelState):
        return
    if state.llm_pruning is not None:
        llm_pruning.uninstall(state.llm_pruning)
        state.llm_pruning = None
    for handle in state.handles:
        handle.remove()
    state.handles = []


def _checked_expand(model, input_ids, mm_encoder_output, expand_size=1, inputs_embeds=None):
    """generate's per-sequence split of image features (beam search), with the count check first.

    Installed on the outer model as a ``functools.partial`` (not a closure), so that ``torch.save``
    and ``copy.deepcopy`` of a patched model work and a copy checks against its own records.
    """
    image = mm_encoder_output.get("image")
    if image is not None and input_ids is not None and input_ids.numel():
        placeholders = int((input_ids == model.config.image_token_id).sum())
        check_counts(model.model._hired.records, placeholders, sum(len(f) for f in image.pooler_output))
    return type(model)._expand_multimodal_outputs(model, input_ids, mm_encoder_output, expand_size=expand_size,
                                                  inputs_embeds=inputs_embeds)


def _forget_records_of_earlier_calls(state: ModelState, positional: tuple[str, ...], module, args, kwargs):
    """Forward pre-hook: a call that starts a sequence forgets the records of earlier calls.

    Its own images are encoded after this (from ``pixel_values``), or were just encoded for it
    (``generate`` passes them as ``mm_encoder_outputs``), or are already in ``inputs_embeds``
    without ``input_ids`` (``hired.adaptive.prepare_inputs``); only the first two kinds of call
    and text-only calls can be told apart, so the last keeps its records. ``positional`` names the
    forward's positional parameters, for callers that pass them so.
    """
    arguments = {**dict(zip(positional, args)), **kwargs}
    encoded = arguments.get("mm_encoder_outputs") or {}
    if encoded.get("image") is not None or (arguments.get("input_ids") is None and arguments.get("inputs_embeds") is not None):
        return None
    cache = compat.cache_from_kwargs(arguments)
    if cache is None or cache.get_seq_length() == 0:
        state.records = []
    return None


def positional_names(function) -> tuple[str, ...]:
    """The names of a method's positional parameters, ``self`` left out."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in inspect.signature(function).parameters.values() if p.kind in kinds]
    return tuple(names[1:])  # without self


__all__ = ["apply", "positional_names", "remove"]
