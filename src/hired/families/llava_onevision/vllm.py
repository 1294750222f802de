"""vLLM's LLaVA-OneVision, with the tokens a hired method keeps: vLLM's classes with the plugin's mixins.

The selection acts on the fed tokens, as in transformers: the family adapter packs the projected tile
features, and the scores and keys, through vLLM's own mosaic packing (unpadding, downsampling), and the
method keeps some of the packed tokens. Videos pass through stock. Imported by vLLM, through the plugin,
when it loads a ``LlavaOnevisionForConditionalGeneration``; nothing else imports it (it needs vLLM).
"""

from __future__ import annotations

from typing import Sequence

import torch
from vllm.model_executor.models import llava_onevision
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...engines.vllm.internals import Internal
from ...engines.vllm.mixins import COUNTING, HiredMultiModalProcessor, HiredProcessingInfo, HiredVisionModel
from ...engines.vllm.settings import split_request_kwargs
from . import LLAVA_ONEVISION
from .geometry import ASPECT_PREFIX

# vLLM's OneVision counts and packs every image as "anyres_max_9", whatever the model's configuration says.
VLLM_ASPECT_RATIO = f"{ASPECT_PREFIX}9"
PACKING = "packing an image's tokens as vLLM's LLaVA-OneVision does"


class HiredLlavaOnevisionProcessingInfo(HiredProcessingInfo, llava_onevision.LlavaOnevisionProcessingInfo):
    family = LLAVA_ONEVISION
    vllm_internals = HiredProcessingInfo.internals_of(llava_onevision.LlavaOnevisionProcessingInfo)

    def check_engine(self) -> None:
        aspect = self.get_hf_config().vision_aspect_ratio
        if aspect != VLLM_ASPECT_RATIO:
            raise ValueError(f"vLLM counts and packs every LLaVA-OneVision image as vision_aspect_ratio="
                             f"{VLLM_ASPECT_RATIO!r}, but this model's configuration says {aspect!r}, so hired's counts "
                             "would not match the tokens vLLM feeds; serve this model stock, or with hired in "
                             "transformers")


class HiredLlavaOnevisionMultiModalProcessor(HiredMultiModalProcessor,
                                             llava_onevision.LlavaOnevisionMultiModalProcessor):
    vllm_internals = (
        *HiredMultiModalProcessor.internals_of(llava_onevision.LlavaOnevisionMultiModalProcessor),
        Internal.of(llava_onevision.LlavaOnevisionMultiModalProcessor, "_apply_hf_processor_main", COUNTING,
                    ("mm_items", "hf_kwargs")),
    )

    # vLLM's OneVision processor calls the Hugging Face processor here, not through _call_hf_processor.
    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        request, rest = split_request_kwargs(hf_kwargs)
        return self.hired_count(super()._apply_hf_processor_main(mm_items, rest), request)


@MULTIMODAL_REGISTRY.register_processor(HiredLlavaOnevisionMultiModalProcessor,
                                        info=HiredLlavaOnevisionProcessingInfo,
                                        dummy_inputs=llava_onevision.LlavaOnevisionDummyInputsBuilder)
class HiredLlavaOnevisionForConditionalGeneration(HiredVisionModel,
                                                  llava_onevision.LlavaOnevisionForConditionalGeneration):
    """vLLM's ``LlavaOnevisionForConditionalGeneration``, keeping the tokens hired's method selects."""

    hired_family = LLAVA_ONEVISION
    vllm_internals = (
        *HiredVisionModel.internals_of(llava_onevision.LlavaOnevisionForConditionalGeneration,
                                       llava_onevision.LlavaOnevisionImagePixelInputs,
                                       ("type", "pixel_values", "image_sizes")),
        Internal.of(llava_onevision.LlavaOnevisionDummyInputsBuilder, "get_dummy_mm_data",
                    "profiling memory with vLLM's own dummy images"),
        Internal.of(llava_onevision.LlavaOnevisionForConditionalGeneration, "_merge_image_patch_embeddings", PACKING,
                    ("image_size", "patch_embeddings", "image_newline", "vision_aspect_ratio", "strategy")),
    )

    def _hired_tiles(self, image_input):
        sizes = [tuple(int(v) for v in size) for size in image_input["image_sizes"]]
        return list(image_input["pixel_values"]), sizes

    def pack_image_features(self, image_features: Sequence[torch.Tensor], image_sizes: torch.Tensor,
                            image_newline: torch.Tensor | None = None,
                            vision_aspect_ratio: str = VLLM_ASPECT_RATIO) -> tuple[list[torch.Tensor], torch.Tensor]:
        """transformers' ``LlavaOnevisionModel.pack_image_features`` made of vLLM's packing, as the family adapter
        calls it: per image, its ``(tiles, tokens, channels)`` values packed as the LLM reads them."""
        packed = []
        for values, size in zip(image_features, image_sizes):
            if values.shape[0] > 1:
                packed.append(self._merge_image_patch_embeddings(
                    torch.as_tensor(size), values, image_newline=image_newline,
                    vision_aspect_ratio=vision_aspect_ratio, strategy="spatial_unpad"))
            else:  # vLLM's packing of a lone tile appends the model's newline even when given none
                base = values[0]
                packed.append(base if image_newline is None else torch.cat([base, image_newline[None].to(base)]))
        return packed, torch.tensor([len(values) for values in packed])


# The classes that replace vLLM's, each with the vLLM internals it declares (checked before an engine uses them).
SERVED_CLASSES = (HiredLlavaOnevisionProcessingInfo, HiredLlavaOnevisionMultiModalProcessor,
                  HiredLlavaOnevisionForConditionalGeneration)
