"""Model families: one small adapter each over the one generic apply / remove path of :mod:`.patching`.

The framework is the modules here: :mod:`.adapter` (what a family declares), :mod:`.mixins` (the
swapped-class mixins), :mod:`.records`, :mod:`.patching` (apply / remove) and :mod:`.registry`. It imports no family. A family is one folder, a package that imports the
framework::

    <family>/
      __init__.py      the register_family(...) call and the family's public names
      geometry.py      its tile rules (grid pinpoints, resize rules, a geometry class of its own)
      transformers.py  its swapped model and processor classes and its FamilyAdapter subclass
      tiny.py          its tiny random test model (hired.testing.TINY_MODELS lists it)
      cost.py          where it needs one, model_shape(config): its shape for the benchmark's cost model
      vllm.py          where the vLLM plugin serves it: its vLLM classes (imported by vLLM only)

A family that builds on another imports that family's package (LLaVA-1.5 and LLaVA-OneVision build
on LLaVA-NeXT, Qwen3-VL on Qwen2.5-VL). Adding a family is adding its folder and its import below.
"""

from . import internvl, llava, llava_next, llava_onevision, qwen2_5_vl, qwen3_vl  # noqa: F401  (registration)
from .adapter import FamilyAdapter
from .mixins import HiredModel, HiredProcessor, ImageCall
from .registry import family_of, register_family, registered_families

__all__ = ["FamilyAdapter", "HiredModel", "HiredProcessor", "ImageCall", "family_of", "register_family",
           "registered_families"]
