"""Qwen2.5-VL: a ViT over the whole image at native resolution, merged 2x2, M-RoPE positions kept.

:mod:`.geometry` holds its resize rule and released settings, :mod:`.transformers` the swapped
classes and the adapter (with the native-resolution mixins Qwen3-VL builds on), :mod:`.tiny` its
tiny random test model.
"""

from ..registry import register_family
from .geometry import RELEASED, image_geometry, pixel_limits, token_grid
from .transformers import (
    HiredQwen2_5_VLModel,
    HiredQwen2_5_VLProcessor,
    NativeResolutionModel,
    NativeResolutionProcessor,
    Qwen2_5_VLAdapter,
)

QWEN2_5_VL = register_family(Qwen2_5_VLAdapter())

__all__ = ["QWEN2_5_VL", "RELEASED", "HiredQwen2_5_VLModel", "HiredQwen2_5_VLProcessor", "NativeResolutionModel",
           "NativeResolutionProcessor", "Qwen2_5_VLAdapter", "image_geometry", "pixel_limits", "token_grid"]
