"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): Qwen2.5-VL's native-resolution raster, with DeepStack.

As Qwen2.5-VL (:mod:`hired.families.qwen2_5_vl`: one raster of merged tokens per image, scores summed over each
2x2 group, kept tokens at their stock M-RoPE positions), with 16 px patches, global attention in
every block, and DeepStack: the mergers of a few intermediate blocks give one more plane of
features per token, which the first decoder layers add to the image tokens' hidden states. Those
planes are pruned with the same indices as the main features, so each kept token carries its own
planes (for a method that merges tokens, the planes of the token it keeps in that place).
"""

from __future__ import annotations

import torch
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLModel, Qwen3VLProcessor
from transformers.models.qwen3_vl import modeling_qwen3_vl

from ...signals import TowerRun
from ..qwen2_5_vl import NativeResolutionModel, NativeResolutionProcessor, Qwen2_5_VLAdapter
from .geometry import RELEASED


class HiredQwen3VLModel(NativeResolutionModel, Qwen3VLModel):
    """``Qwen3VLModel`` whose image features and DeepStack planes are those of the tokens the method keeps."""

    stock_model = Qwen3VLModel


class HiredQwen3VLProcessor(NativeResolutionProcessor, Qwen3VLProcessor):
    """``Qwen3VLProcessor`` that expands ``<|image_pad|>`` into exactly the tokens the method keeps."""

    _stock_class = Qwen3VLProcessor


class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    """Qwen2.5-VL's adapter with Qwen3-VL's classes, its rotary function and its DeepStack planes."""

    name = "qwen3-vl"
    tiny_model = ".tiny:tiny_qwen3_vl"
    outer_class = Qwen3VLForConditionalGeneration
    inner_class = Qwen3VLModel
    hired_inner_class = HiredQwen3VLModel
    processor_class = Qwen3VLProcessor
    hired_processor_class = HiredQwen3VLProcessor
    released = RELEASED

    @staticmethod
    def rotate(query, key, cos, sin):
        return modeling_qwen3_vl.apply_rotary_pos_emb_vision(query, key, cos, sin)

    def image_output(self, inner, output, runs: list[TowerRun], kept: list[torch.Tensor]):
        planes = [run.planes[0][rows[:, 1].to(run.planes.device)] for run, rows in zip(runs, kept)]  # (K, L, D) each
        layers = planes[0].shape[1] if planes else 0
        return modeling_qwen3_vl.BaseModelOutputWithDeepstackFeatures(
            last_hidden_state=output.last_hidden_state,
            pooler_output=output.pooler_output,
            deepstack_features=[tuple(image[:, layer] for image in planes) for layer in range(layers)],
        )

