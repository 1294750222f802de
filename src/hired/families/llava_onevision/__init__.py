"""LLaVA-OneVision: SigLIP over 384 px AnyRes tiles, large mosaics downsampled; LLaVA-NeXT's adapter extended.

:mod:`.geometry` holds its pinpoints, its "anyres_max_N" rule and :class:`OnevisionGeometry`,
:mod:`.transformers` the swapped classes and the adapter, :mod:`.tiny` its tiny random test model.
"""

from ..registry import register_family
from .geometry import ONEVISION_PINPOINTS, OnevisionGeometry, max_tiles
from .transformers import HiredLlavaOnevisionModel, HiredLlavaOnevisionProcessor, LlavaOnevisionAdapter

LLAVA_ONEVISION = register_family(LlavaOnevisionAdapter())

__all__ = ["LLAVA_ONEVISION", "ONEVISION_PINPOINTS", "HiredLlavaOnevisionModel", "HiredLlavaOnevisionProcessor",
           "LlavaOnevisionAdapter", "OnevisionGeometry", "max_tiles"]
