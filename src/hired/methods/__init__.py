"""Token-reduction methods, one module each, registered by name.

``register_method`` adds a user's own method; the built-ins below register on import.
"""

from . import divprune, fastervlm, fastv, full, hired, prumerge, random, spatial, visionzip  # noqa: F401  (registration)
from .base import (
    HEAD_AGGREGATIONS,
    Method,
    MethodOptions,
    NoOptions,
    Selection,
    SignalLayers,
    VisionEvidence,
    available_methods,
    get_method,
    register_method,
    registered_methods,
    unregister_method,
    vision_methods,
)

__all__ = [
    "HEAD_AGGREGATIONS",
    "Method",
    "MethodOptions",
    "NoOptions",
    "Selection",
    "SignalLayers",
    "VisionEvidence",
    "available_methods",
    "get_method",
    "register_method",
    "registered_methods",
    "unregister_method",
    "vision_methods",
]
