"""InternVL's shape for the benchmark's cost model: a tiled tower whose patches the pixel shuffle merges."""

from __future__ import annotations

from ...bench.cost import ModelShape


def model_shape(config) -> ModelShape:
    """The cost-model shape of an ``InternVLConfig``: ``1 / downsample_ratio**2`` patches per LLM token."""
    return ModelShape.tiled(config, merge=round(1 / config.downsample_ratio**2))
