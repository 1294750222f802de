"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``, every llava-hf v1.6 checkpoint): AnyRes tiles plus a base view."""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import LlavaNextForConditionalGeneration, LlavaNextModel, LlavaNextProcessor

from ...geometry import AnyresGeometry
from ...signals import VisionProbe
from ..adapter import FamilyAdapter
from ..mixins import HiredModel, HiredProcessor, ImageCall
from .geometry import LLAVA_NEXT_PINPOINTS, as_pair, tile_size


class HiredLlavaNextModel(HiredModel, LlavaNextModel):
    """``LlavaNextModel`` whose image features are the tokens the method keeps."""

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ):
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        sizes = [as_pair(s) for s in image_sizes]
        geometries = [self._hired.family.geometry(self.config, s) for s in sizes]
        if pixel_values.dim() == 5:
            if len(pixel_values) != len(geometries):
                raise ValueError(f"pixel_values holds {len(pixel_values)} images but image_sizes {len(geometries)}")
            short = [(s, g.num_partitions) for s, g in zip(sizes, geometries) if g.num_partitions > pixel_values.shape[1]]
            if short:
                raise ValueError(
                    f"pixel_values holds {pixel_values.shape[1]} tiles per image, but an image of size {short[0][0]} "
                    f"needs {short[0][1]}; pass the pixel_values and image_sizes the processor returned together"
                )
            tiles = [pixels[: g.num_partitions] for pixels, g in zip(pixel_values, geometries)]
        elif pixel_values.dim() == 4:
            counts = [g.num_partitions for g in geometries]
            if sum(counts) != pixel_values.shape[0]:
                raise ValueError(
                    f"pixel_values holds {pixel_values.shape[0]} tiles but the image sizes imply {sum(counts)}"
                )
            tiles = list(torch.split(pixel_values, counts))
        else:
            raise ValueError(f"pixel_values must have 4 or 5 dimensions, got shape {tuple(pixel_values.shape)}")

        def stock():
            return LlavaNextModel.get_image_features(
                self, pixel_values=pixel_values, image_sizes=image_sizes, vision_feature_layer=layer,
                vision_feature_select_strategy=strategy, **kwargs,
            )

        return self._hired_features(ImageCall(tiles, geometries, sizes, layer, stock))


class HiredLlavaNextProcessor(HiredProcessor, LlavaNextProcessor):
    """``LlavaNextProcessor`` that expands ``<image>`` into exactly the tokens the method keeps."""

    _stock_class = LlavaNextProcessor

    def hired_geometry(self, image_size: Sequence[int]) -> AnyresGeometry:
        return AnyresGeometry.create(image_size, tile_size(self.image_processor), self.patch_size,
                                     self.image_processor.image_grid_pinpoints)

    def _get_number_of_features(self, orig_height: int, orig_width: int, height: int, width: int) -> int:
        # The one count both the prompt expansion and the serving-side token count go through. Callers
        # subtract the CLS token afterwards under the "default" strategy, so it is added back here.
        count = self.hired_tokens((orig_height, orig_width))
        if count is None:
            return super()._get_number_of_features(orig_height, orig_width, height, width)
        return count + (1 if self.vision_feature_select_strategy == "default" else 0)


class LlavaNextAdapter(FamilyAdapter):
    name = "llava-next"
    tiny_model = ".tiny:tiny_llava_next"
    outer_class = LlavaNextForConditionalGeneration
    inner_class = LlavaNextModel
    hired_inner_class = HiredLlavaNextModel
    processor_class = LlavaNextProcessor
    hired_processor_class = HiredLlavaNextProcessor
    model_internals = ("get_image_features", "get_placeholder_mask", "pack_image_features", "multi_modal_projector")
    processor_internals = ("_get_number_of_features", "_get_num_multimodal_tokens")
    drops_early = True

    def geometry(self, config, image_size) -> AnyresGeometry:
        vision = config.vision_config
        return AnyresGeometry.create(image_size, vision.image_size, vision.patch_size, config.image_grid_pinpoints)

    def released_geometry(self, image_size) -> AnyresGeometry:
        return AnyresGeometry.create(image_size, 336, 14, LLAVA_NEXT_PINPOINTS)

    def vision_probe(self, inner) -> VisionProbe:
        return VisionProbe(inner.vision_tower)

    def check_call(self, inner, probe: VisionProbe) -> None:
        # The stock model must feed every patch token and nothing else: drop the CLS token where there is one.
        strategy = inner.config.vision_feature_select_strategy
        wanted = "default" if probe.has_cls else "full"
        if strategy != wanted:
            raise ValueError(
                f"hired needs vision_feature_select_strategy={wanted!r} for this vision tower (every patch token, "
                f"no CLS token, reaches the LLM); this model uses {strategy!r}"
            )

    def pack_stock(self, inner, run, geometry, image_size):
        packed, _ = inner.pack_image_features(
            [self.project(inner, run.features)], torch.as_tensor([image_size]), "default",
            image_newline=inner.image_newline,
        )
        return packed[0]

    def check_processor(self, inner, processor) -> None:
        vision = inner.config.vision_config
        if processor.patch_size != vision.patch_size:
            raise ValueError(f"processor.patch_size={processor.patch_size} differs from the vision tower's patch size "
                             f"{vision.patch_size}")
        self.check_tile(tile_size(processor.image_processor), vision.image_size)
        self.check_grid(inner, processor)

    def check_grid(self, inner, processor) -> None:
        ours = [list(p) for p in processor.image_processor.image_grid_pinpoints]
        theirs = [list(p) for p in inner.config.image_grid_pinpoints]
        if ours != theirs:
            raise ValueError(f"the processor's grid pinpoints {ours} differ from the model's {theirs}; use the processor "
                             "saved with this model")

