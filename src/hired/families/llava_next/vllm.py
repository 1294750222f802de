"""vLLM's LLaVA-NeXT, with the tokens a hired method keeps: vLLM's classes with the plugin's mixins.

Imported by vLLM, through the plugin, when it loads a ``LlavaNextForConditionalGeneration``; nothing else
imports it (it needs vLLM).
"""

from __future__ import annotations

import torch
from vllm.model_executor.models import llava, llava_next
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...engines.vllm.internals import Internal
from ...engines.vllm.mixins import HiredMultiModalProcessor, HiredProcessingInfo, HiredVisionModel
from ...geometry import PartitionGeometry
from ...signals import TowerRun
from . import LLAVA_NEXT


class HiredLlavaNextProcessingInfo(HiredProcessingInfo, llava_next.LlavaNextProcessingInfo):
    family = LLAVA_NEXT
    vllm_internals = HiredProcessingInfo.internals_of(llava_next.LlavaNextProcessingInfo)


class HiredLlavaNextMultiModalProcessor(HiredMultiModalProcessor, llava_next.LlavaNextMultiModalProcessor):
    vllm_internals = HiredMultiModalProcessor.internals_of(llava_next.LlavaNextMultiModalProcessor)


@MULTIMODAL_REGISTRY.register_processor(
    HiredLlavaNextMultiModalProcessor, info=HiredLlavaNextProcessingInfo, dummy_inputs=llava.LlavaDummyInputsBuilder
)
class HiredLlavaNextForConditionalGeneration(HiredVisionModel, llava_next.LlavaNextForConditionalGeneration):
    """vLLM's ``LlavaNextForConditionalGeneration``, keeping the tokens hired's method selects."""

    hired_family = LLAVA_NEXT
    vllm_internals = (
        *HiredVisionModel.internals_of(llava_next.LlavaNextForConditionalGeneration,
                                       llava_next.LlavaNextImagePixelInputs, ("type", "pixel_values", "image_sizes")),
        Internal.of(llava.LlavaDummyInputsBuilder, "get_dummy_mm_data", "profiling memory with vLLM's own dummy images"),
        Internal.of(llava_next.LlavaNextForConditionalGeneration, "_merge_image_patch_embeddings",
                    "packing an image fed whole beside pruned ones", ("image_size", "patch_embeddings", "strategy")),
    )

    def _hired_tiles(self, image_input):
        sizes = [tuple(int(v) for v in size) for size in image_input["image_sizes"]]
        return list(image_input["pixel_values"]), sizes

    def _hired_pack_stock(self, run: TowerRun, geometry: PartitionGeometry, size) -> torch.Tensor:
        return self._merge_image_patch_embeddings(torch.as_tensor(size), self.multi_modal_projector(run.features),
                                                  strategy="spatial_unpad")


# The classes that replace vLLM's, each with the vLLM internals it declares (checked before an engine uses them).
SERVED_CLASSES = (HiredLlavaNextProcessingInfo, HiredLlavaNextMultiModalProcessor, HiredLlavaNextForConditionalGeneration)
