"""InternVL 2.5 / 3 / 3.5: 448 px tiles of a dynamic grid plus a thumbnail, pixel-shuffled 2x2.

:mod:`.geometry` holds its tile rule, :mod:`.transformers` the swapped classes and the adapter,
:mod:`.tiny` its tiny random test model.
"""

from ..registry import register_family
from .geometry import tile_grid
from .transformers import HiredInternVLModel, HiredInternVLProcessor, InternVLAdapter

INTERNVL = register_family(InternVLAdapter())

__all__ = ["INTERNVL", "HiredInternVLModel", "HiredInternVLProcessor", "InternVLAdapter", "tile_grid"]
