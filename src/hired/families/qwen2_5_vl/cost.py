"""Qwen2.5-VL's shape for the benchmark's cost model: a native-resolution tower (no tiles, no CLS token) with
window attention except in a few full-attention blocks, a gated MLP and a 2x2 merger."""

from __future__ import annotations

from ...bench.cost import ModelShape, decoder_shape


def model_shape(config) -> ModelShape:
    """The cost-model shape of a ``Qwen2_5_VLConfig``."""
    vision = config.vision_config
    merge = vision.spatial_merge_size
    return ModelShape(
        vision_width=vision.hidden_size,
        vision_mlp=vision.intermediate_size,
        vision_layers=vision.depth,
        vision_layers_used=vision.depth,  # the merger reads the last block
        vision_heads=vision.num_heads,
        tile=0,
        patch=vision.patch_size,
        **decoder_shape(config.text_config),
        newline=False,
        cls=False,
        merge=merge * merge,
        projector_hidden=merge * merge * vision.hidden_size,
        temporal_patch=vision.temporal_patch_size,
        window=vision.window_size // (vision.patch_size * merge),
        full_attention_layers=tuple(vision.fullatt_block_indexes),
        gated_mlp=True,
    )
