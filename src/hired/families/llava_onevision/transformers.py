"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP over 384 px AnyRes tiles, large mosaics downsampled.

The tower has no CLS token, so HiRED and VisionZip score tokens by the attention they receive. The
stock model projects every tile, unpads the mosaic and, past nine tiles' worth, interpolates it
down; the tokens it feeds are then mixtures of patches. Selection therefore acts on the fed tokens
themselves: the tower's outputs go through the stock packing (projected features, and the scores
and keys by the same interpolation), and the kept ones are fed as they are. With the early drop, the
patches a kept token interpolates run on past the drop layer.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel, LlavaOnevisionProcessor

from ...methods.common import candidate_positions
from ...signals import TowerRun
from ..llava_next import LlavaNextAdapter, as_pair, tile_size
from ..mixins import HiredModel, HiredProcessor, ImageCall
from ..records import check_counts
from .geometry import ASPECT_PREFIX, ONEVISION_PINPOINTS, OnevisionGeometry, max_tiles


def multi_image_flags(batch_num_images, count: int) -> list[bool]:
    """Per image, whether its prompt holds several images (the stock model then feeds its base view only)."""
    if batch_num_images is None:
        return [False] * count
    return [int(n) != 1 for n in batch_num_images for _ in range(int(n))]


class HiredLlavaOnevisionModel(HiredModel, LlavaOnevisionModel):
    """``LlavaOnevisionModel`` whose image features are the tokens the method keeps."""

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        vision_aspect_ratio: str | None = None,
        batch_num_images: torch.Tensor | None = None,
        **kwargs,
    ):
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        aspect = vision_aspect_ratio or self.config.vision_aspect_ratio
        sizes = [as_pair(s) for s in image_sizes]
        multi = multi_image_flags(batch_num_images, len(sizes))
        if len(multi) != len(sizes):
            raise ValueError(f"batch_num_images counts {len(multi)} images but image_sizes holds {len(sizes)}")
        geometries = [self._hired.family.geometry(self.config, s, multi_image=m, vision_aspect_ratio=aspect)
                      for s, m in zip(sizes, multi)]
        counts = [g.num_partitions for g in geometries]
        if pixel_values.dim() == 5:
            if len(pixel_values) != len(geometries) or pixel_values.shape[1] < max(counts):
                raise ValueError(
                    f"pixel_values of shape {tuple(pixel_values.shape)} does not hold the tiles of the {len(sizes)} "
                    "images of image_sizes; pass the pixel_values and image_sizes the processor returned together"
                )
            tiles = [pixels[:n] for pixels, n in zip(pixel_values, counts)]
        elif pixel_values.dim() == 4 and pixel_values.shape[0] == sum(counts):
            tiles = list(torch.split(pixel_values, counts))
        else:
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)} does not hold the {sum(counts)} tiles "
                             "the image sizes imply")

        def stock():
            return LlavaOnevisionModel.get_image_features(
                self, pixel_values=pixel_values, image_sizes=image_sizes, vision_feature_layer=layer,
                vision_feature_select_strategy=strategy, vision_aspect_ratio=aspect, batch_num_images=batch_num_images,
                **kwargs,
            )

        return self._hired_features(ImageCall(tiles, geometries, sizes, layer, stock))

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features=None, video_features=None):
        # The stock masks (videos checked by the stock code), with hired's count check for images.
        image_mask, video_mask = LlavaOnevisionModel.get_placeholder_mask(self, input_ids, inputs_embeds,
                                                                          video_features=video_features)
        if image_features is not None:
            check_counts(self._hired.records, int(image_mask.sum()), image_features.shape[:-1].numel())
        return image_mask, video_mask


class HiredLlavaOnevisionProcessor(HiredProcessor, LlavaOnevisionProcessor):
    """``LlavaOnevisionProcessor`` that expands ``<image>`` into exactly the tokens the method keeps.

    ``<video>`` expands into the stock count: the stock ``get_video_features``, which the patched model
    leaves as it is, encodes videos.
    """

    _stock_class = LlavaOnevisionProcessor
    passes_videos = True

    def hired_geometry(self, image_size: Sequence[int], multi_image: bool = False) -> OnevisionGeometry:
        tile = tile_size(self.image_processor)
        side = math.isqrt(self.num_image_tokens)
        return OnevisionGeometry.create(image_size, tile, tile // side, self.image_processor.image_grid_pinpoints,
                                        max_tiles=max_tiles(self.vision_aspect_ratio), multi_image=multi_image)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        multi = multi_image_flags(image_inputs["batch_num_images"], len(image_inputs["image_sizes"]))[image_idx]
        count = self.kept_tokens(self.hired_geometry(as_pair(image_inputs["image_sizes"][image_idx]), multi))
        if count is None:
            return super().replace_image_token(image_inputs, image_idx, **kwargs)
        return self.image_token * count

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs):
        data = super()._get_num_multimodal_tokens(image_sizes=image_sizes, video_sizes=video_sizes, **kwargs)
        if image_sizes is not None:
            counts = [self.hired_tokens(size) for size in image_sizes]
            data.num_image_tokens = [n if c is None else c for n, c in zip(data.num_image_tokens, counts)]
        return data


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """As LLaVA-NeXT (AnyRes tiles, unpadding, newlines), with SigLIP, downsampling and selection after projection."""

    name = "llava-onevision"
    tiny_model = ".tiny:tiny_llava_onevision"
    outer_class = LlavaOnevisionForConditionalGeneration
    inner_class = LlavaOnevisionModel
    hired_inner_class = HiredLlavaOnevisionModel
    processor_class = LlavaOnevisionProcessor
    hired_processor_class = HiredLlavaOnevisionProcessor
    model_internals = ("get_image_features", "get_placeholder_mask", "pack_image_features", "multi_modal_projector")
    processor_internals = ("replace_image_token", "_get_num_multimodal_tokens")
    selects_projected = True
    drops_early = True
    released_has_cls = False  # SigLIP

    def geometry(self, config, image_size, multi_image: bool = False,
                 vision_aspect_ratio: str | None = None) -> OnevisionGeometry:
        vision = config.vision_config
        aspect = config.vision_aspect_ratio if vision_aspect_ratio is None else vision_aspect_ratio
        return OnevisionGeometry.create(image_size, vision.image_size, vision.patch_size, config.image_grid_pinpoints,
                                        max_tiles=max_tiles(aspect), multi_image=multi_image)

    def released_geometry(self, image_size) -> OnevisionGeometry:
        return OnevisionGeometry.create(image_size, 384, 14, ONEVISION_PINPOINTS)

    def check_call(self, inner, probe) -> None:
        super().check_call(inner, probe)
        max_tiles(inner.config.vision_aspect_ratio)

    def _pack(self, inner, values: torch.Tensor, geometry: OnevisionGeometry, image_size, newline=None):
        packed, _ = inner.pack_image_features([values], torch.as_tensor([image_size]), image_newline=newline,
                                              vision_aspect_ratio=f"{ASPECT_PREFIX}{geometry.max_tiles}")
        return packed[0]

    def candidate_tokens(self, inner, run: TowerRun, geometry: OnevisionGeometry, image_size) -> TowerRun:
        slots = candidate_positions(geometry)

        def slotted(values: torch.Tensor) -> torch.Tensor:  # (P, N, C) -> the fed tokens, each in its slot
            out = values.new_zeros(values.shape)
            out[slots[:, 0], slots[:, 1]] = self._pack(inner, values, geometry, image_size).to(values.dtype)
            return out

        def slotted_scores(scores: torch.Tensor | None) -> torch.Tensor | None:
            return None if scores is None else slotted(scores[..., None])[..., 0]

        return TowerRun(slotted(self.project(inner, run.features)), slotted_scores(run.distribution_scores),
                        slotted_scores(run.selection_scores), slotted(run.keys), run.hidden, run.score)

    def kept_patches(self, inner, patches: int, geometries, choices) -> list[torch.Tensor]:
        # A token of a downsampled mosaic interpolates up to four patches, possibly of neighbouring tiles: those run on.
        keep = []
        for geometry, choice in zip(geometries, choices):
            if choice is None or geometry.downsampled is None:
                keep += super().kept_patches(inner, patches, [geometry], [choice])
            else:
                keep += self.read_patches(inner, geometry, choice.selection.kept, patches)
        return keep

    def read_patches(self, inner, geometry: OnevisionGeometry, kept: list[torch.Tensor],
                     patches: int) -> list[torch.Tensor]:
        """Per tile, the ascending patches (of ``patches`` per tile) that the stock packing weighs above zero in the
        tokens of slots ``kept`` (per partition): the gradient of their sum through the model's own packing."""
        slots = candidate_positions(geometry)
        wanted = torch.zeros(geometry.num_partitions, patches)
        for partition, indices in enumerate(kept):
            wanted[partition, indices.cpu()] = 1
        with torch.inference_mode(False), torch.enable_grad():
            mosaic = torch.zeros(geometry.num_partitions, patches, 1, requires_grad=True)
            packed = self._pack(inner, mosaic, geometry, geometry.image_size)
            (packed[:, 0] * wanted[slots[:, 0], slots[:, 1]]).sum().backward()
        return [row.nonzero().flatten() for row in mosaic.grad[..., 0] != 0]

    def pack_stock(self, inner, run: TowerRun, geometry: OnevisionGeometry, image_size) -> torch.Tensor:
        return self._pack(inner, self.project(inner, run.features), geometry, image_size, newline=inner.image_newline)

    def check_processor(self, inner, processor) -> None:
        vision = inner.config.vision_config
        self.check_tile(tile_size(processor.image_processor), vision.image_size)
        side = vision.image_size // vision.patch_size
        if processor.num_image_tokens != side * side:
            raise ValueError(f"processor.num_image_tokens={processor.num_image_tokens} differs from the {side * side} "
                             "tokens per tile of this vision tower; use the processor saved with this model")
        if processor.vision_aspect_ratio != inner.config.vision_aspect_ratio:
            raise ValueError(f"the processor's vision_aspect_ratio {processor.vision_aspect_ratio!r} differs from the "
                             f"model's {inner.config.vision_aspect_ratio!r}; use the processor saved with this model")
        self.check_grid(inner, processor)

