"""hired: HiRED token selection for high-resolution vision-language models.

    model, processor = hired.apply(model, processor, budget=0.2)
    output = model.generate(**processor(images=image, text=prompt, return_tensors="pt"))
"""

from __future__ import annotations

from typing import Any

from .algorithm import AnyresGeometry
from .config import HiredConfig
from .methods import available_methods, get_method
from .patch.llava import SelectionRecord, remove, selections, stored_config

__version__ = "0.1.0"

__all__ = [
    "AnyresGeometry",
    "HiredConfig",
    "SelectionRecord",
    "apply",
    "available_methods",
    "from_pretrained",
    "get_method",
    "remove",
    "selections",
]


def apply(model, processor=None, config: HiredConfig | None = None, **options: Any):
    """Make ``model`` (and ``processor``) keep only the visual tokens HiRED selects.

    Args:
        model: a transformers ``LlavaNextForConditionalGeneration`` or ``LlavaForConditionalGeneration``
            (or its inner model), patched in place.
        processor: the model's processor, patched in place so that it emits exactly as many image
            placeholders as the model will return features. Optional for callers that expand
            placeholders themselves.
        config: a :class:`HiredConfig`; alternatively pass its fields as keyword arguments
            (``budget=0.2``, ``tokens=576``, ``alpha=0.5``, ``method="hired"``, ...). With neither,
            the configuration stored on ``model.config`` by an earlier ``apply`` is used.

    Returns:
        ``(model, processor)``, the same objects, patched.
    """
    from .patch import llava

    if config is not None and options:
        raise ValueError("pass either a HiredConfig or keyword options, not both")
    if config is None:
        config = HiredConfig(**options) if options else (stored_config(model) or HiredConfig())
    return llava.apply(model, processor, config)


def from_pretrained(path: str, **kwargs: Any):
    """Load a model and processor saved after ``hired.apply`` and patch them with the stored config.

    Keyword arguments go to ``from_pretrained`` of the model (e.g. ``dtype=torch.bfloat16``).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    processor = AutoProcessor.from_pretrained(path)
    config = stored_config(model)
    if config is None:
        raise ValueError(f"{path} holds no HiRED configuration; load it normally and call hired.apply(model, processor)")
    return apply(model, processor, config)
