"""hired: HiRED token selection for high-resolution vision-language models.

    model, processor = hired.apply(model, processor, budget=0.2)
    output = model.generate(**processor(images=image, text=prompt, return_tensors="pt"))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import HiredConfig
    from .families import FamilyAdapter, family_of, register_family, registered_families
    from .geometry import AnyresGeometry, PartitionGeometry
    from .methods import Method, MethodOptions, available_methods, get_method, register_method
    from .sources import check_model_source
    from .state import SelectionRecord, pruning_plan, selections, share_tower_runs, stored_config

# The public names and the modules that define them, imported on first use: `import hired` stays
# cheap (no torch, no transformers) for the command line's help and for engines that discover the
# plugins of every installed package.
_EXPORTS = {
    "HiredConfig": "config",
    "FamilyAdapter": "families",
    "family_of": "families",
    "register_family": "families",
    "registered_families": "families",
    "AnyresGeometry": "geometry",
    "PartitionGeometry": "geometry",
    "Method": "methods",
    "MethodOptions": "methods",
    "available_methods": "methods",
    "get_method": "methods",
    "register_method": "methods",
    "check_model_source": "sources",
    "SelectionRecord": "state",
    "pruning_plan": "state",
    "selections": "state",
    "share_tower_runs": "state",
    "stored_config": "state",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    try:  # a submodule, as after `import hired.families`
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError:
        raise AttributeError(f"module 'hired' has no attribute {name!r}") from None


__version__ = "0.2.0"

__all__ = [
    "AnyresGeometry",
    "FamilyAdapter",
    "HiredConfig",
    "Method",
    "MethodOptions",
    "PartitionGeometry",
    "SelectionRecord",
    "apply",
    "available_methods",
    "from_pretrained",
    "get_method",
    "pruning_plan",
    "register_family",
    "register_method",
    "registered_families",
    "remove",
    "selections",
    "share_tower_runs",
    "stored_config",
]


def apply(model, processor=None, config: HiredConfig | None = None, **settings: Any):
    """Make ``model`` (and ``processor``) keep only the visual tokens the method selects.

    Args:
        model: a model of a registered family (``LlavaNextForConditionalGeneration``,
            ``LlavaForConditionalGeneration``, or its inner model), patched in place.
        processor: the model's processor, patched in place so that it emits exactly as many image
            placeholders as the model will return features. Optional for callers that expand
            placeholders themselves.
        config: a :class:`HiredConfig`; alternatively its settings as keywords (``budget=0.2``,
            ``tokens=576``, ``method="visionzip"``), where the method's own options may be given
            directly (``alpha=0.3`` for HiRED) or as ``method_options``. Keywords describe the whole
            configuration (what they do not name takes its default); to change one setting of a
            stored one, pass ``hired.stored_config(model).updated(budget=0.1)``. With neither, the
            configuration stored on ``model.config`` by an earlier ``apply`` is used.

    Raises:
        TypeError: ``model`` is not of a registered family (the message lists the supported
            classes), or ``processor`` is not that family's processor.
        ValueError: a setting the model or the method cannot honour (its vision feature layer or
            strategy, layers out of range, a CLS-attention method on a tower without CLS token).

    Returns:
        ``(model, processor)``, the same objects, patched.
    """
    from .config import HiredConfig
    from .families import patching
    from .families import family_of
    from .state import stored_config

    family = family_of(model)
    if config is not None and settings:
        raise ValueError("pass either a HiredConfig or keyword settings, not both")
    if config is None:
        config = HiredConfig.create(**settings) if settings else (stored_config(model) or HiredConfig())
    elif not isinstance(config, HiredConfig):
        raise TypeError(f"config must be a hired.HiredConfig, got {type(config).__name__}; or pass settings as keywords "
                        "(hired.apply(model, processor, budget=0.2))")
    return patching.apply(family, model, processor, config)


def remove(model, processor=None):
    """Restore the stock classes of ``model`` and of ``processor``.

    Without ``processor``, the processor that ``apply`` patched together with this model is
    restored as well (unless it was patched again for another configuration since), so that a
    stock model is never left beside a processor that emits HiRED's token count.
    """
    from .families import patching
    from .families import family_of

    return patching.remove(family_of(model), model, processor)


def from_pretrained(path: str, **kwargs: Any):
    """Load a model and processor saved after ``hired.apply`` and patch them with the stored config.

    Keyword arguments go to ``from_pretrained`` of the model (e.g. ``dtype=torch.bfloat16``). For a
    method in an adaptive mode the processor is returned stock (it cannot know the count ahead of the
    model): build inputs with ``hired.adaptive.prepare_inputs``.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .sources import check_model_source
    from .state import stored_config

    check_model_source(path)
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    config = stored_config(model)
    if config is None:
        raise ValueError(f"{path} holds no HiRED configuration; load it normally and call hired.apply(model, processor)")
    if not config.fixes_count:
        return apply(model, None, config)[0], processor
    return apply(model, processor, config)
