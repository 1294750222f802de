"""vLLM's LLaVA-1.5, with the tokens a hired method keeps: vLLM's classes with the plugin's mixins.

vLLM's ``LlavaForConditionalGeneration`` also serves Pixtral, which keeps vLLM's own processing. Imported by
vLLM, through the plugin, when it loads a ``LlavaForConditionalGeneration``; nothing else imports it (it
needs vLLM).
"""

from __future__ import annotations

import torch
from transformers import LlavaConfig, PixtralVisionConfig
from vllm.model_executor.models import llava
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...engines.vllm.internals import Internal
from ...engines.vllm.mixins import HiredMultiModalProcessor, HiredProcessingInfo, HiredVisionModel
from ...engines.vllm.settings import UnservableConfig, unserved_config
from ...geometry import PartitionGeometry
from ...signals import TowerRun
from ...state import CONFIG_KEY
from . import LLAVA


class HiredLlavaProcessingInfo(HiredProcessingInfo, llava.LlavaProcessingInfo):
    family = LLAVA
    vllm_internals = HiredProcessingInfo.internals_of(llava.LlavaProcessingInfo)


class HiredLlavaMultiModalProcessor(HiredMultiModalProcessor, llava.LlavaMultiModalProcessor):
    vllm_internals = HiredMultiModalProcessor.internals_of(llava.LlavaMultiModalProcessor)


def _llava_info(ctx):
    hf_config = ctx.get_hf_config(LlavaConfig)
    if isinstance(hf_config.vision_config, PixtralVisionConfig):
        if getattr(hf_config, CONFIG_KEY, None) is not None:
            raise UnservableConfig(unserved_config("LlavaForConditionalGeneration with a Pixtral vision tower"))
        return llava.PixtralHFProcessingInfo(ctx)
    return HiredLlavaProcessingInfo(ctx)


def _llava_processor(info, dummy_inputs):
    if isinstance(info, HiredLlavaProcessingInfo):
        return HiredLlavaMultiModalProcessor(info, dummy_inputs)
    return llava.PixtralHFMultiModalProcessor(info, dummy_inputs)


@MULTIMODAL_REGISTRY.register_processor(_llava_processor, info=_llava_info, dummy_inputs=llava.LlavaDummyInputsBuilder)
class HiredLlavaForConditionalGeneration(HiredVisionModel, llava.LlavaForConditionalGeneration):
    """vLLM's ``LlavaForConditionalGeneration``, keeping the tokens hired's method selects."""

    hired_family = LLAVA
    vllm_internals = (
        *HiredVisionModel.internals_of(llava.LlavaForConditionalGeneration, llava.LlavaImagePixelInputs,
                                       ("type", "pixel_values")),
        Internal.of(llava.LlavaDummyInputsBuilder, "get_dummy_mm_data", "profiling memory with vLLM's own dummy images"),
        # _llava_info and _llava_processor, bound with this class, leave Pixtral to vLLM's own processing.
        Internal.of(llava.PixtralHFProcessingInfo, "get_hf_config", "leaving Pixtral to vLLM's own processing"),
        Internal.of(llava.PixtralHFMultiModalProcessor, "apply", "leaving Pixtral to vLLM's own processing"),
    )

    def _hired_tiles(self, image_input):
        pixels = image_input["pixel_values"]
        return [image.unsqueeze(0) for image in pixels], [None] * len(pixels)

    def _hired_pack_stock(self, run: TowerRun, geometry: PartitionGeometry, size) -> torch.Tensor:
        return self.multi_modal_projector(run.features)[0]


# The classes that replace vLLM's, each with the vLLM internals it declares (checked before an engine uses them).
SERVED_CLASSES = (HiredLlavaProcessingInfo, HiredLlavaMultiModalProcessor, HiredLlavaForConditionalGeneration)
