"""Model families: one small adapter each over the one generic apply / remove path of :mod:`.patching`.

A new family is one file here: its swapped model and processor classes, a :class:`FamilyAdapter`
subclass, and a ``register_family`` call; add the module to the import below.
"""

from . import internvl, llava, llava_next, llava_onevision, qwen2_5_vl, qwen3_vl  # noqa: F401  (registration)
from .adapter import FamilyAdapter
from .mixins import HiredModel, HiredProcessor, ImageCall
from .registry import family_of, register_family, registered_families

__all__ = ["FamilyAdapter", "HiredModel", "HiredProcessor", "ImageCall", "family_of", "register_family",
           "registered_families"]
