"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one 336 px partition, no tiles."""

from __future__ import annotations

import torch
from transformers import LlavaForConditionalGeneration, LlavaModel, LlavaProcessor
from transformers.image_utils import make_flat_list_of_images

from ...geometry import AnyresGeometry
from ...images import image_size_of
from ..llava_next import LlavaNextAdapter, as_pair, tile_size
from ..mixins import HiredModel, HiredProcessor, ImageCall


class HiredLlavaModel(HiredModel, LlavaModel):
    """``LlavaModel`` whose image features are the tokens the method keeps."""

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs,
    ):
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        geometries = [self._hired.family.geometry(self.config) for _ in range(pixel_values.shape[0])]
        # The processor returned by hired.apply passes the original sizes (for the records only: the
        # tower sees one square view whatever the size); a stock processor does not.
        sizes = [as_pair(size) for size in image_sizes] if image_sizes is not None else [None] * len(geometries)
        if len(sizes) != len(geometries):
            raise ValueError(f"image_sizes holds {len(sizes)} sizes for {len(geometries)} images")

        def stock():
            return LlavaModel.get_image_features(
                self, pixel_values=pixel_values, vision_feature_layer=layer,
                vision_feature_select_strategy=strategy, **kwargs,
            )

        return self._hired_features(ImageCall(list(pixel_values.unsqueeze(1)), geometries, sizes, layer, stock))


class HiredLlavaProcessor(HiredProcessor, LlavaProcessor):
    """``LlavaProcessor`` that expands ``<image>`` into exactly the tokens the method keeps."""

    _stock_class = LlavaProcessor

    def hired_geometry(self, image_size=None) -> AnyresGeometry:
        side = tile_size(self.image_processor)
        return AnyresGeometry.create((side, side), side, self.patch_size)

    def _square(self) -> tuple[int, int]:
        side = tile_size(self.image_processor)
        return (side, side)

    def _process_images(self, images, **kwargs):
        processed, replacements = super()._process_images(images, **kwargs)
        processed["image_sizes"] = [list(image_size_of(image)) for image in make_flat_list_of_images(images)]
        return processed, replacements

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        count = self.hired_tokens(self._square())
        if count is None:
            return super().replace_image_token(image_inputs, image_idx, **kwargs)
        return self.image_token * count

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        data = super()._get_num_multimodal_tokens(image_sizes=image_sizes, **kwargs)
        count = self.hired_tokens(self._square())
        if image_sizes is not None and count is not None:
            data.num_image_tokens = [count] * len(image_sizes)
        return data


class LlavaAdapter(LlavaNextAdapter):
    """As LLaVA-NeXT (same tower, projector and processor settings), with one partition and no packing."""

    name = "llava"
    tiny_model = ".tiny:tiny_llava"
    outer_class = LlavaForConditionalGeneration
    inner_class = LlavaModel
    hired_inner_class = HiredLlavaModel
    processor_class = LlavaProcessor
    hired_processor_class = HiredLlavaProcessor
    model_internals = ("get_image_features", "get_placeholder_mask", "multi_modal_projector")
    processor_internals = ("replace_image_token", "_get_num_multimodal_tokens", "_process_images")

    def geometry(self, config, image_size=None) -> AnyresGeometry:
        vision = config.vision_config
        return AnyresGeometry.create((vision.image_size, vision.image_size), vision.image_size, vision.patch_size)

    def released_geometry(self, image_size) -> AnyresGeometry:
        return AnyresGeometry.create((336, 336), 336, 14)

    def pack_stock(self, inner, run, geometry, image_size):
        return self.project(inner, run.features)[0]

    def check_grid(self, inner, processor) -> None:
        """One partition: no grid to match."""

