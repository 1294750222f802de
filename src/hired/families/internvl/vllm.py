"""vLLM's InternVL (``InternVLForConditionalGeneration``, which vLLM serves with its Intern-S1 classes), with the
tokens a hired method keeps: vLLM's classes with the plugin's mixins.

vLLM's processor gives each image only its tile count, which cannot tell a 2x3 grid from a 3x2 one, so the
processor adds each image's layout, ``(height, width, tile_rows, tile_cols)``, as one more field: the grid
the image processor's rule gives under the request's settings, checked against the tiles it cut. The
model runs vLLM's own InternViT through the probe transformers uses (thumbnail first, as there) and takes
the same path from the tower to the kept features (:func:`hired.families.mixins.select_call`), with this
family's adapter reading vLLM's model. Videos pass through stock. Imported by vLLM, through the plugin,
when it loads an ``InternVLForConditionalGeneration``; nothing else imports it (it needs vLLM).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
from vllm.model_executor.models import interns1
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageProcessorItems
from vllm.multimodal.processing import PromptUpdateDetails, cached_encode

from ...engines.vllm import internals
from ...engines.vllm.internals import Internal
from ...engines.vllm.mixins import COUNTING, ENCODING, HiredEncoderModel, HiredMultiModalProcessor, HiredProcessingInfo
from ...engines.vllm.settings import split_request_kwargs
from ...images import image_size_of
from ...signals import VisionProbe
from ..mixins import ImageCall, select_call
from . import INTERNVL
from .geometry import processed_geometry

# The per-image field that carries each image's (height, width, tile_rows, tile_cols) to the model.
LAYOUT_FIELD = "hired_image_layout"
# Set by the constructors of vLLM's InternVL model and its InternViT: (path from the model, attributes).
TOWER = (
    ("", ("vision_tower", "multi_modal_projector", "config")),
    ("vision_tower", ("embeddings", "encoder", "layernorm", "config")),
    ("vision_tower.encoder", ("layer",)),
    ("vision_tower.encoder.layer.0.attention", ("q_proj", "k_proj", "num_heads")),
)


class HiredInternVLProcessingInfo(HiredProcessingInfo, interns1.InternS1ProcessingInfo):
    family = INTERNVL
    vllm_internals = HiredProcessingInfo.internals_of(interns1.InternS1ProcessingInfo)

    def check_engine(self) -> None:
        hf_config = self.get_hf_config()
        if hf_config.vision_feature_layer != -1:
            raise ValueError(f"vLLM feeds InternVL the last layer of its vision tower, but this model's configuration "
                             f"says vision_feature_layer={hf_config.vision_feature_layer}, which transformers honours, "
                             "so the two engines feed different features; serve this model stock, or with hired in "
                             "transformers")
        processor = self.get_hf_processor()
        geometry = INTERNVL.geometry(hf_config, (1, 1))
        tile = int(processor.image_processor.size["height"])
        if tile != geometry.tile or processor.image_seq_length != geometry.side ** 2:
            raise ValueError(f"the processor cuts {tile} px tiles of {processor.image_seq_length} tokens, but the "
                             f"model's tower takes {geometry.tile} px tiles of {geometry.side ** 2} tokens; use the "
                             "processor saved with this model")


class HiredInternVLMultiModalProcessor(HiredMultiModalProcessor, interns1.InternS1MultiModalProcessor):
    vllm_internals = (
        *HiredMultiModalProcessor.internals_of(interns1.InternS1MultiModalProcessor),
        Internal.of(interns1.InternS1MultiModalProcessor, "_apply_hf_processor_main", COUNTING,
                    ("mm_items", "hf_kwargs")),
        Internal.of(interns1.InternS1ProcessingInfo, "get_tokenizer", COUNTING),
        Internal("vllm.multimodal.processing", "cached_encode", COUNTING, ("tokenizer", "text", "add_special_tokens")),
        Internal.of(PromptUpdateDetails, "select_token_id", COUNTING, ("seq", "embed_token_id")),
        Internal.of(ImageProcessorItems, "get", COUNTING, ("index",)),
    )

    # vLLM's InternVL processor calls the Hugging Face processor here, once per image, not through
    # _call_hf_processor.
    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        request, rest = split_request_kwargs(hf_kwargs)
        outputs = super()._apply_hf_processor_main(mm_items, rest)
        if "pixel_values" in outputs:
            outputs[LAYOUT_FIELD] = self.hired_layouts(mm_items, rest, outputs["image_num_patches"].tolist())
        return self.hired_count(outputs, request)

    def hired_layouts(self, mm_items, hf_kwargs: Mapping[str, Any], tiles: list[int]) -> torch.Tensor:
        """Each image's ``(height, width, tile_rows, tile_cols)``, under the request's processor settings.

        Raises:
            ValueError: the grid rule does not give the tiles the image processor cut.
        """
        settings = dict(self.info.ctx.get_merged_mm_kwargs(hf_kwargs))
        settings.update(settings.pop("images_kwargs", None) or {})
        processor = self.info.get_hf_processor()
        images = mm_items.get_items("image", ImageProcessorItems)
        layouts = []
        for index, count in enumerate(tiles):
            size = image_size_of(images.get(index))
            geometry = processed_geometry(processor.image_processor, processor.image_seq_length, size, settings)
            if geometry.num_partitions != count:
                raise ValueError(f"the image processor cut an image of size {size} into {count} tiles, but the grid "
                                 f"rule gives {geometry.num_partitions}; this image processor tiles differently from "
                                 "GotOcr2ImageProcessor, which hired supports")
            layouts.append([*size, *geometry.tiles])
        return torch.tensor(layouts)

    def hired_geometries(self, outputs: Mapping[str, Any]) -> list:
        hf_config = self.info.get_hf_config()
        return [INTERNVL.geometry(hf_config, row[:2], tuple(row[2:])) for row in outputs[LAYOUT_FIELD].tolist()]

    def hired_replacement(self, count: int) -> Any:
        # The image's tokens stay between <img> and </img>, as transformers' processor writes them.
        processor = self.info.get_hf_processor()
        text = processor.start_image_token + processor.image_token * count + processor.end_image_token
        ids = cached_encode(self.info.get_tokenizer(), text, add_special_tokens=False)
        return PromptUpdateDetails.select_token_id(ids, processor.image_token_id)

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        fields[LAYOUT_FIELD] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        return fields


@MULTIMODAL_REGISTRY.register_processor(HiredInternVLMultiModalProcessor, info=HiredInternVLProcessingInfo,
                                        dummy_inputs=interns1.InternS1DummyInputsBuilder)
class HiredInternVLForConditionalGeneration(HiredEncoderModel, interns1.InternS1ForConditionalGeneration):
    """vLLM's ``InternS1ForConditionalGeneration`` serving InternVL, keeping the tokens hired's method selects."""

    hired_family = INTERNVL
    vllm_internals = (
        Internal.of(interns1.InternS1ForConditionalGeneration, "__init__", ENCODING, ("vllm_config", "prefix")),
        Internal.of(interns1.InternS1ForConditionalGeneration, "embed_multimodal", ENCODING),
        Internal.of(interns1.InternS1ForConditionalGeneration, "_process_vision_input", ENCODING, ("image_input",)),
        Internal.of(interns1.InternS1ForConditionalGeneration, "pixel_shuffle", ENCODING, ("x", "scale_factor")),
        *(Internal.of(interns1.InternS1ImagePixelInputs, field, ENCODING)
          for field in ("type", "pixel_values", "num_patches")),
        Internal.of(interns1.InternS1DummyInputsBuilder, "get_dummy_mm_data", "profiling memory with vLLM's own "
                    "dummy images"),
        Internal("vllm.multimodal:MULTIMODAL_REGISTRY", "register_processor", "binding the plugin's processors",
                 ("processor", "info", "dummy_inputs")),
    )

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        internals.check_tower(self, TOWER)
        tower = self.vision_tower
        # vLLM's InternViT takes the pixels alone; the probe truncates and hooks it as it does transformers'.
        self.hired_probe = VisionProbe(tower, call=lambda pixels: tower(pixel_values=pixels))
        self.hired_layouts: list[list[int]] | None = None  # the layouts of the images being encoded

    def embed_multimodal(self, **kwargs: object):
        layouts = kwargs.pop(LAYOUT_FIELD, None)
        self.hired_layouts = None if layouts is None else [[int(v) for v in row] for row in layouts]
        try:
            return super().embed_multimodal(**kwargs)
        finally:
            self.hired_layouts = None

    def _process_vision_input(self, image_input):
        diverted = self._hired_divert(image_input)
        return super()._process_vision_input(image_input) if diverted is None else diverted

    def _hired_encode(self, image_input, counts: list[int | None]) -> list[torch.Tensor]:
        layouts = self.hired_layouts
        if layouts is None or len(layouts) != len(counts):
            raise RuntimeError(f"{len(counts)} images came with kept counts but {0 if layouts is None else len(layouts)} "
                               "with layouts; the plugin's processor gives every image both")
        geometries = [self.hired_family.geometry(self.config, row[:2], tuple(row[2:])) for row in layouts]
        tiles = [int(n) for n in image_input["num_patches"]]
        if tiles != [geometry.num_partitions for geometry in geometries]:
            raise RuntimeError(f"the images hold {tiles} tiles but their layouts imply "
                               f"{[geometry.num_partitions for geometry in geometries]}")
        # vLLM's order is tiles then thumbnail; the geometry puts the thumbnail (the base view) first.
        pixels = [torch.cat([part[-1:], part[:-1]]) for part in torch.split(image_input["pixel_values"], tiles)]
        norm = self.vision_tower.layernorm
        call = ImageCall(pixels, geometries, [tuple(row[:2]) for row in layouts], self.config.vision_feature_layer,
                         feature_norm=None if isinstance(norm, nn.Identity) else norm)
        _, selected = select_call(self.hired_family, self, self.hired_probe, call, counts, self.hired_config)
        self.hired_selections.extend(selected.records)
        return selected.features


# The classes that replace vLLM's, each with the vLLM internals it declares (checked before an engine uses them).
SERVED_CLASSES = (HiredInternVLProcessingInfo, HiredInternVLMultiModalProcessor, HiredInternVLForConditionalGeneration)
