"""InternVL 2.5 / 3 / 3.5 (``InternVLForConditionalGeneration``): 448 px tiles of a dynamic grid plus a thumbnail.

Each tile's 32x32 InternViT patches are pixel-shuffled 2x2 into 256 LLM tokens, so a token here is
a 2x2 group of patches: its score is the sum of the group's patch scores, and budgets and records
count LLM tokens. The thumbnail (fed last by the stock model) is the base view.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn
from transformers import InternVLForConditionalGeneration, InternVLModel, InternVLProcessor
from transformers.image_utils import make_flat_list_of_images
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ...geometry import TiledGeometry, square_side
from ...images import image_size_of
from ...methods.common import candidate_positions
from ...signals import TowerRun, VisionProbe
from ..adapter import FamilyAdapter
from ..mixins import HiredModel, HiredProcessor, ImageCall
from ..patching import positional_names
from .geometry import processed_geometry, tile_grid


class HiredInternVLModel(HiredModel, InternVLModel):
    """``InternVLModel`` whose image features are the tokens the method keeps.

    The stock model sees only the flat list of tiles; the processor returned by ``hired.apply``
    adds ``image_sizes``, one row ``(height, width, tile_rows, tile_cols)`` per image: its size and
    the tile grid the processor chose, which say which tiles belong to which image and where they
    lie. (One key, because ``generate`` accepts only the model's own arguments, and ``image_sizes``
    is one of them.)
    """

    def forward(self, *args, image_sizes=None, **kwargs):
        arguments = {**dict(zip(positional_names(InternVLModel.forward), args)), **kwargs}
        pixel_values = arguments.pop("pixel_values", None)
        encoded = dict(arguments.pop("mm_encoder_outputs", None) or {})
        if pixel_values is not None:
            if encoded.get("image") is not None:
                raise ValueError("You cannot specify both pixel_values and mm_encoder_outputs at the same time")
            encoded["image"] = self.get_image_features(
                pixel_values, vision_feature_layer=arguments.get("vision_feature_layer"),
                vision_feature_select_strategy=arguments.get("vision_feature_select_strategy"),
                image_sizes=image_sizes,
            )
        image = encoded.get("image")
        if image is not None and isinstance(image.pooler_output, (list, tuple)):
            # Kept counts differ per image, so they travel as a list (generate splits it per sequence);
            # the stock forward scatters one tensor.
            encoded["image"] = BaseModelOutputWithPooling(last_hidden_state=image.last_hidden_state,
                                                          pooler_output=torch.cat(list(image.pooler_output)))
        return InternVLModel.forward(self, mm_encoder_outputs=encoded or None, **arguments)

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

        def stock():
            return InternVLModel.get_image_features(
                self, pixel_values=pixel_values, vision_feature_layer=layer,
                vision_feature_select_strategy=strategy, **kwargs,
            )

        if image_sizes is None:
            # Stock callers (the stock processor, transformers' own tests) pass no layout. No image of this call
            # can feed more than all of its tiles' tokens, so a configuration that keeps that many keeps everything
            # and needs none; there is then no per-image record to make either.
            every_tile = pixel_values.shape[0] * self._hired.family.geometry(self.config, (1, 1)).stock_tokens
            if self._hired.config.keeps_every_token(every_tile):
                return stock()
        rows = [] if image_sizes is None else [[int(v) for v in row] for row in image_sizes]
        if image_sizes is None or any(len(row) != 4 for row in rows):
            raise ValueError(
                "InternVL inputs for hired need image_sizes with one (height, width, tile_rows, tile_cols) row per "
                "image: prepare them with the processor returned by hired.apply(model, processor)"
            )
        sizes, grids = [tuple(row[:2]) for row in rows], [tuple(row[2:]) for row in rows]
        geometries = [self._hired.family.geometry(self.config, size, grid) for size, grid in zip(sizes, grids)]
        counts = [g.num_partitions for g in geometries]
        if pixel_values.dim() != 4 or sum(counts) != pixel_values.shape[0]:
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)} does not hold the {sum(counts)} tiles the image "
                "grids imply; pass the pixel_values, image_sizes and image_grids the processor returned together"
            )
        # The stock order is tiles then thumbnail; the geometry puts the thumbnail (the base view) first.
        tiles = [torch.cat([pixels[-1:], pixels[:-1]]) for pixels in torch.split(pixel_values, counts)]
        tower = self.vision_tower
        norm = tower.layernorm if layer == -1 and not isinstance(tower.layernorm, nn.Identity) else None
        return self._hired_features(ImageCall(tiles, geometries, sizes, layer, stock, feature_norm=norm))


class HiredInternVLProcessor(HiredProcessor, InternVLProcessor):
    """``InternVLProcessor`` that emits the kept number of ``<IMG_CONTEXT>`` tokens and each image's layout."""

    _stock_class = InternVLProcessor

    def hired_geometry(self, image_size: Sequence[int], images_kwargs: dict[str, Any] | None = None) -> TiledGeometry:
        """The geometry of an image of ``(height, width)``, under the image processor's settings and ``images_kwargs``."""
        return processed_geometry(self.image_processor, self.image_seq_length, image_size, images_kwargs)

    def _process_images(self, images, **kwargs):
        processed = self.image_processor(images, **kwargs)
        sizes = [image_size_of(image) for image in make_flat_list_of_images(images)]
        geometries = [self.hired_geometry(size, kwargs) for size in sizes]
        tiles = [int(n) for n in processed["num_patches"]]
        if tiles != [g.num_partitions for g in geometries]:
            raise ValueError(
                f"the image processor cut {tiles} tiles but the grid rule gives {[g.num_partitions for g in geometries]}; "
                "this image processor tiles differently from GotOcr2ImageProcessor, which hired supports"
            )
        processed["image_sizes"] = [[*size, *g.tiles] for size, g in zip(sizes, geometries)]
        replacements = []
        for geometry in geometries:
            count = self.kept_tokens(geometry)
            count = geometry.stock_tokens if count is None else count
            replacements.append(f"{self.start_image_token}{self.image_token * count}{self.end_image_token}")
        return processed, replacements

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        data = super()._get_num_multimodal_tokens(image_sizes=image_sizes, **kwargs)
        if image_sizes is not None:
            images_kwargs = self._merge_kwargs(**kwargs)["images_kwargs"]
            counts = [self.kept_tokens(self.hired_geometry(size, images_kwargs)) for size in image_sizes]
            data.num_image_tokens = [n if c is None else 2 + c for n, c in zip(data.num_image_tokens, counts)]
        return data


class InternVLAdapter(FamilyAdapter):
    name = "internvl"
    tiny_model = ".tiny:tiny_internvl"
    outer_class = InternVLForConditionalGeneration
    inner_class = InternVLModel
    hired_inner_class = HiredInternVLModel
    processor_class = InternVLProcessor
    hired_processor_class = HiredInternVLProcessor
    model_internals = ("get_image_features", "get_placeholder_mask", "pixel_shuffle", "multi_modal_projector")
    processor_internals = ("_process_images", "_get_num_multimodal_tokens")
    drops_early = True

    def geometry(self, config, image_size, tiles=(1, 1)) -> TiledGeometry:
        """The geometry of an image of ``(height, width)`` cut into ``tiles`` ``(rows, cols)``."""
        vision = config.vision_config
        tile = square_side(vision.image_size)
        return TiledGeometry.create(image_size, tiles, round(tile // square_side(vision.patch_size) *
                                                             config.downsample_ratio), tile)

    def released_geometry(self, image_size) -> TiledGeometry:
        """InternVL 2.5 / 3 / 3.5: 448 px tiles, 1 to 12 of them, 256 tokens each."""
        return TiledGeometry.create(image_size, tile_grid(image_size), 16, 448)

    def vision_probe(self, inner) -> VisionProbe:
        return VisionProbe(inner.vision_tower)

    def check_call(self, inner, probe: VisionProbe) -> None:
        config = inner.config
        if config.vision_feature_select_strategy != "default":
            raise ValueError(
                "hired needs vision_feature_select_strategy='default' on InternVL (the CLS token dropped before the "
                f"pixel shuffle, as in every checkpoint); this model uses {config.vision_feature_select_strategy!r}"
            )
        patches = square_side(config.vision_config.image_size) // square_side(config.vision_config.patch_size)
        group = 1 / config.downsample_ratio
        if group != round(group) or patches % round(group):
            raise ValueError(f"downsample_ratio={config.downsample_ratio} does not merge whole groups of the "
                             f"{patches}x{patches} patches of a tile")

    @staticmethod
    def _shuffle(inner, tensor: torch.Tensor) -> torch.Tensor:
        """``(P, N, C)`` patches -> ``(P, N / g^2, C * g^2)`` LLM tokens, by the model's own pixel shuffle."""
        side = math.isqrt(tensor.shape[1])
        grouped = inner.pixel_shuffle(tensor.reshape(tensor.shape[0], side, side, -1),
                                      scale_factor=inner.config.downsample_ratio)
        return grouped.reshape(tensor.shape[0], -1, grouped.shape[-1])

    def token_patches(self, inner, patches: int) -> torch.Tensor:
        """The patches of each token: the model's own pixel shuffle applied to the patch indices."""
        index = torch.arange(patches, dtype=torch.float64)[None, :, None]
        return self._shuffle(inner, index)[0].round().long()

    def candidate_tokens(self, inner, run: TowerRun, geometry, image_size) -> TowerRun:
        def group_sum(scores: torch.Tensor | None) -> torch.Tensor | None:
            return None if scores is None else self._shuffle(inner, scores[..., None]).sum(dim=-1)

        return TowerRun(self._shuffle(inner, run.features), group_sum(run.distribution_scores),
                        group_sum(run.selection_scores), self._shuffle(inner, run.keys), run.hidden, run.score)

    def pack_stock(self, inner, run: TowerRun, geometry, image_size) -> torch.Tensor:
        projected = self.project(inner, self._shuffle(inner, run.features))
        order = candidate_positions(geometry)
        return projected[order[:, 0], order[:, 1]]

    def partition_pixels(self, inputs) -> torch.Tensor:
        rows, cols = (int(v) for v in inputs["image_sizes"][0, 2:])
        pixels = inputs["pixel_values"][: 1 if rows * cols == 1 else 1 + rows * cols]
        return torch.cat([pixels[-1:], pixels[:-1]])

    def check_processor(self, inner, processor) -> None:
        vision = inner.config.vision_config
        tile = int(processor.image_processor.size["height"])
        self.check_tile(tile, square_side(vision.image_size))
        expected = self.geometry(inner.config, (tile, tile)).side ** 2
        if processor.image_seq_length != expected:
            raise ValueError(f"processor.image_seq_length={processor.image_seq_length} differs from the {expected} "
                             "tokens per tile this model feeds; use the processor saved with this model")

