"""LLaVA-NeXT's shape for the benchmark's cost model: a tiled CLIP tower whose mosaic rows end in a newline token."""

from __future__ import annotations

from ...bench.cost import ModelShape


def model_shape(config) -> ModelShape:
    """The cost-model shape of a ``LlavaNextConfig``."""
    return ModelShape.tiled(config, newline=True)
