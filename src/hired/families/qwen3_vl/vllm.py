"""vLLM's Qwen3-VL, with the tokens a hired method keeps: vLLM's classes with the plugin's native-resolution
mixins (:mod:`hired.engines.vllm.native`); each kept token carries its own DeepStack planes.

Imported by vLLM, through the plugin, when it loads a ``Qwen3VLForConditionalGeneration``; nothing else
imports it (it needs vLLM).
"""

from __future__ import annotations

from vllm.model_executor.models import qwen2_5_vl, qwen3_vl
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...engines.vllm.internals import Internal
from ...engines.vllm.mixins import COUNTING, ENCODING
from ...engines.vllm.native import DROP_BLOCK_ARGUMENTS, DROPPING, HiredNativeModel, HiredNativeProcessingInfo, HiredNativeProcessor
from ...engines.vllm.settings import split_request_kwargs
from . import QWEN3_VL


class HiredQwen3VLProcessingInfo(HiredNativeProcessingInfo, qwen3_vl.Qwen3VLProcessingInfo):
    family = QWEN3_VL
    vllm_internals = HiredNativeProcessingInfo.internals_of(qwen3_vl.Qwen3VLProcessingInfo)


class HiredQwen3VLMultiModalProcessor(HiredNativeProcessor, qwen3_vl.Qwen3VLMultiModalProcessor):
    vllm_internals = (
        *HiredNativeProcessor.internals_of(qwen3_vl.Qwen3VLMultiModalProcessor),
        Internal.of(qwen3_vl.Qwen3VLMultiModalProcessor, "_apply_hf_processor_main", COUNTING,
                    ("mm_items", "hf_kwargs")),
    )

    # vLLM's Qwen3-VL processor calls the Hugging Face processor here, not through _call_hf_processor.
    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        request, rest = split_request_kwargs(hf_kwargs)
        return self.hired_count(super()._apply_hf_processor_main(mm_items, rest), request)


@MULTIMODAL_REGISTRY.register_processor(HiredQwen3VLMultiModalProcessor, info=HiredQwen3VLProcessingInfo,
                                        dummy_inputs=qwen3_vl.Qwen3VLDummyInputsBuilder)
class HiredQwen3VLForConditionalGeneration(HiredNativeModel, qwen3_vl.Qwen3VLForConditionalGeneration):
    """vLLM's ``Qwen3VLForConditionalGeneration``, keeping the tokens hired's method selects and their planes."""

    hired_family = QWEN3_VL
    vllm_internals = (
        *HiredNativeModel.internals_of(qwen3_vl.Qwen3VLForConditionalGeneration, qwen2_5_vl.Qwen2_5_VLImagePixelInputs),
        Internal.of(qwen3_vl.Qwen3_VisionTransformer, "prepare_encoder_metadata", ENCODING, ("grid_thw_list",)),
        Internal.of(qwen3_vl.Qwen3_VisionTransformer, "forward", ENCODING, ("x", "grid_thw", "encoder_metadata")),
        Internal.of(qwen3_vl.Qwen3_VisionBlock, "forward", DROPPING, DROP_BLOCK_ARGUMENTS),
    )


# The classes that replace vLLM's, each with the vLLM internals it declares (checked before an engine uses them).
SERVED_CLASSES = (HiredQwen3VLProcessingInfo, HiredQwen3VLMultiModalProcessor, HiredQwen3VLForConditionalGeneration)
