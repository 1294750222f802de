"""A tiny, randomly initialised LLaVA-1.5 with its real processor, for tests and demos (see :mod:`hired.testing`)."""

from __future__ import annotations

from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.utils import is_torchvision_available

from ..llava_next.tiny import tiny_llava_like

# The image processor backend that from_pretrained loads back: torchvision's where it imports, PIL's otherwise
# (so a saved tiny model reloads with the pixels it was tested with).
if is_torchvision_available():
    from transformers import LlavaImageProcessor
else:
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil as LlavaImageProcessor


def tiny_llava(seed: int = 0, **sizes) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A random LLaVA-1.5 (one 336 px partition) and its real processor class; ``sizes`` as for
    :func:`hired.families.llava_next.tiny.tiny_llava_next`."""
    image_processor = LlavaImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    return tiny_llava_like(LlavaForConditionalGeneration, LlavaConfig, LlavaProcessor, image_processor, seed, {},
                           **sizes)
