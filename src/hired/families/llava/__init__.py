"""LLaVA-1.5: one 336 px partition, no tiles; LLaVA-NeXT's adapter with what one partition changes.

:mod:`.transformers` holds the swapped classes and the adapter, :mod:`.tiny` its tiny random test
model; the tile rules are LLaVA-NeXT's (:mod:`hired.families.llava_next`).
"""

from ..registry import register_family
from .transformers import HiredLlavaModel, HiredLlavaProcessor, LlavaAdapter

LLAVA = register_family(LlavaAdapter())

__all__ = ["LLAVA", "HiredLlavaModel", "HiredLlavaProcessor", "LlavaAdapter"]
