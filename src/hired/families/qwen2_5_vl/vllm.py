"""vLLM's Qwen2.5-VL, with the tokens a hired method keeps: vLLM's classes with the plugin's native-resolution
mixins (:mod:`hired.engines.vllm.native`).

Imported by vLLM, through the plugin, when it loads a ``Qwen2_5_VLForConditionalGeneration``; nothing else
imports it (it needs vLLM).
"""

from __future__ import annotations

from vllm.model_executor.models import qwen2_5_vl
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...engines.vllm.internals import Internal
from ...engines.vllm.mixins import ENCODING
from ...engines.vllm.native import DROP_BLOCK_ARGUMENTS, DROPPING, HiredNativeModel, HiredNativeProcessingInfo, HiredNativeProcessor
from . import QWEN2_5_VL


class HiredQwen2_5_VLProcessingInfo(HiredNativeProcessingInfo, qwen2_5_vl.Qwen2_5_VLProcessingInfo):
    family = QWEN2_5_VL
    vllm_internals = HiredNativeProcessingInfo.internals_of(qwen2_5_vl.Qwen2_5_VLProcessingInfo)


class HiredQwen2_5_VLMultiModalProcessor(HiredNativeProcessor, qwen2_5_vl.Qwen2_5_VLMultiModalProcessor):
    vllm_internals = HiredNativeProcessor.internals_of(qwen2_5_vl.Qwen2_5_VLMultiModalProcessor)


@MULTIMODAL_REGISTRY.register_processor(HiredQwen2_5_VLMultiModalProcessor, info=HiredQwen2_5_VLProcessingInfo,
                                        dummy_inputs=qwen2_5_vl.Qwen2_5_VLDummyInputsBuilder)
class HiredQwen2_5_VLForConditionalGeneration(HiredNativeModel, qwen2_5_vl.Qwen2_5_VLForConditionalGeneration):
    """vLLM's ``Qwen2_5_VLForConditionalGeneration``, keeping the tokens hired's method selects."""

    hired_family = QWEN2_5_VL
    vllm_internals = (
        *HiredNativeModel.internals_of(qwen2_5_vl.Qwen2_5_VLForConditionalGeneration,
                                       qwen2_5_vl.Qwen2_5_VLImagePixelInputs),
        Internal.of(qwen2_5_vl.Qwen2_5_VisionTransformer, "prepare_encoder_metadata", ENCODING, ("grid_thw",)),
        Internal.of(qwen2_5_vl.Qwen2_5_VisionTransformer, "forward", ENCODING, ("x", "grid_thw", "encoder_metadata")),
        Internal.of(qwen2_5_vl.Qwen2_5_VisionBlock, "forward", DROPPING, DROP_BLOCK_ARGUMENTS),
    )


# The classes that replace vLLM's, each with the vLLM internals it declares (checked before an engine uses them).
SERVED_CLASSES = (HiredQwen2_5_VLProcessingInfo, HiredQwen2_5_VLMultiModalProcessor,
                  HiredQwen2_5_VLForConditionalGeneration)
