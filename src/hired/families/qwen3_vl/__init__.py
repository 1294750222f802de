"""Qwen3-VL: Qwen2.5-VL's native-resolution raster, with 16 px patches and DeepStack planes.

:mod:`.geometry` holds its released settings, :mod:`.transformers` the swapped classes and the
adapter (Qwen2.5-VL's, extended), :mod:`.tiny` its tiny random test model.
"""

from ..registry import register_family
from .geometry import RELEASED
from .transformers import HiredQwen3VLModel, HiredQwen3VLProcessor, Qwen3VLAdapter

QWEN3_VL = register_family(Qwen3VLAdapter())

__all__ = ["QWEN3_VL", "RELEASED", "HiredQwen3VLModel", "HiredQwen3VLProcessor", "Qwen3VLAdapter"]
