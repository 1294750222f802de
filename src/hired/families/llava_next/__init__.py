"""LLaVA-NeXT (every llava-hf v1.6 checkpoint): AnyRes tiles plus a base view.

:mod:`.geometry` holds its tile rules, :mod:`.transformers` the swapped classes and the adapter,
:mod:`.tiny` its tiny random test model.
"""

from ..registry import register_family
from .geometry import LLAVA_NEXT_PINPOINTS, as_pair, scaled_pinpoints, tile_size
from .transformers import HiredLlavaNextModel, HiredLlavaNextProcessor, LlavaNextAdapter

LLAVA_NEXT = register_family(LlavaNextAdapter())

__all__ = ["LLAVA_NEXT", "LLAVA_NEXT_PINPOINTS", "HiredLlavaNextModel", "HiredLlavaNextProcessor", "LlavaNextAdapter",
           "as_pair", "scaled_pinpoints", "tile_size"]
