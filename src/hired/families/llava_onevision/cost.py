"""LLaVA-OneVision's shape for the benchmark's cost model: LLaVA-NeXT's, with a SigLIP tower (no CLS token)."""

from __future__ import annotations

from ...bench.cost import ModelShape


def model_shape(config) -> ModelShape:
    """The cost-model shape of a ``LlavaOnevisionConfig``."""
    return ModelShape.tiled(config, newline=True, has_cls=False)
