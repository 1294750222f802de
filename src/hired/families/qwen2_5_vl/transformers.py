"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): a ViT over the whole image at native resolution.

There are no tiles: the processor resizes the image to a multiple of 28 px keeping its aspect
ratio, the ViT (window attention, full attention in ``fullatt_block_indexes``, no CLS token) sees
every 14 px patch, and its merger fuses each 2x2 group into one LLM token. Selection therefore acts
on the merged tokens (:class:`~hired.geometry.NativeGeometry`): a token's score is the sum of its
four patches' scores at the selection layer (a full-attention layer by default, the last), and the
kept tokens are fed in raster order.

The LLM places image tokens with 3D rotary positions (M-RoPE: time, row, column). A kept token must
keep the position the stock model gives it, and the text after an image must continue where the
stock model continues: :meth:`NativeResolutionModel.get_rope_index` computes the stock positions of
the prompt as it would be with every token of each image, keeps those of the tokens present, and
the stock ``rope_deltas``; once the selection is known, a hook on the language model gives each
kept token its own row and column.

Videos (``pixel_values_videos``) are not pruned: they are encoded and fed as the stock model does,
leave the image records as they are, and keep their stock positions beside pruned images.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, ClassVar, Sequence

import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel, Qwen2_5_VLProcessor
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

from ... import compat
from ...geometry import NativeGeometry
from ...native_drop import NativeTowerDrop, drop_block, full_attention_blocks
from ...selecting import EarlyDrop
from ...signals import TowerRun, VisionProbe, merged_runs
from ...state import ModelState
from ..adapter import FamilyAdapter
from ..mixins import HiredModel, HiredProcessor, ImageCall
from ..records import check_counts
from .geometry import RELEASED, image_geometry, pixel_limits, token_grid

# ModelState.call_data keys: this call's image geometries, and where its image tokens sit in the prompt.
GEOMETRIES, SLOTS = "geometries", "image_slots"


class NativeResolutionModel(HiredModel):
    """Mixed into a swapped Qwen-VL inner model: kept merged tokens, at their stock M-RoPE positions.

    ``stock_model`` is the stock inner class, whose methods this one wraps.
    """

    stock_model: ClassVar[type]

    def get_video_features(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.LongTensor | None = None,
                           **kwargs):
        """The stock video features: videos are not pruned, and the image records stay those of the images.

        The parameters are named as the stock ones: ``generate`` picks the arguments it encodes by them.
        """
        # Qwen3-VL's stock method encodes the frames through self.get_image_features, which must then be the stock
        # one and leave the image records alone: an instance attribute hides the class's method for this call.
        self.get_image_features = functools.partial(self.stock_model.get_image_features, self)
        try:
            return self.stock_model.get_video_features(self, pixel_values_videos, video_grid_thw, **kwargs)
        finally:
            del self.get_image_features

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.LongTensor | None = None, **kwargs):
        if image_grid_thw is None:
            raise ValueError("Qwen2.5-VL needs image_grid_thw beside pixel_values; pass the processor's whole output")
        merge, patch = self.visual.spatial_merge_size, self.visual.patch_size
        if bool((image_grid_thw[:, 0] != 1).any()):
            raise ValueError("hired prunes still images (one temporal patch each); pass a video as pixel_values_videos "
                             "and video_grid_thw, which the patched model encodes as the stock model does")
        # The model sees the resized image only: its geometry is in the resized image's pixels.
        geometries = [NativeGeometry.from_patch_grid(grid, patch, merge) for grid in image_grid_thw.tolist()]
        counts = (image_grid_thw.prod(-1)).tolist()
        if sum(counts) != pixel_values.shape[0]:
            raise ValueError(f"pixel_values holds {pixel_values.shape[0]} patches, image_grid_thw {sum(counts)}; pass "
                             "the pixel_values and image_grid_thw the processor returned together")
        tiles = list(torch.split(pixel_values, counts))
        self._hired.call_data[GEOMETRIES] = geometries

        def stock():
            return self.stock_model.get_image_features(self, pixel_values, image_grid_thw, **kwargs)

        return self._hired_features(ImageCall(tiles, geometries, [None] * len(geometries), None, stock))

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features=None, video_features=None):
        image_mask, video_mask = self.stock_model.get_placeholder_mask(self, input_ids, inputs_embeds,
                                                                       video_features=video_features)
        if image_features is not None:
            check_counts(self._hired.records, int(image_mask.sum()), image_features.shape[:-1].numel())
            if input_ids is not None:
                self._hired.call_data[SLOTS] = input_ids == self.config.image_token_id
        return image_mask, video_mask

    def get_rope_index(self, input_ids, *args, **kwargs):
        """The stock positions of this prompt as if every image had all its tokens, for the tokens present.

        Each image's tokens take, for now, the positions of its first tokens in raster order; the
        language model's hook moves them to the kept tokens' own rows and columns. ``rope_deltas``
        is the stock one, so that decoding continues at the stock positions.
        """
        stock = self.stock_model.get_rope_index
        arguments = inspect.signature(stock).bind(self, input_ids, *args, **kwargs).arguments
        arguments.pop("self")
        extra = arguments.pop("kwargs", {})
        grid = arguments.get("image_grid_thw")
        if grid is None or input_ids is None:
            return stock(self, **arguments, **extra)
        full = (grid.prod(-1) // self.visual.spatial_merge_size**2).tolist()
        expanded, mask, types, index = _expand_images(input_ids, arguments.get("attention_mask"),
                                                      self.config.image_token_id, full,
                                                      arguments.get("mm_token_type_ids"))
        arguments.update(input_ids=expanded, attention_mask=mask)
        if "mm_token_type_ids" in arguments:
            arguments["mm_token_type_ids"] = types
        positions, deltas = stock(self, **arguments, **extra)
        present = index.clamp(min=0)[None].expand(positions.shape[0], -1, -1)
        kept = torch.gather(positions, 2, present).masked_fill((index < 0)[None], 0)  # padding as the stock model leaves it
        grown = (mask.sum(1) - (index >= 0).sum(1))[:, None]
        return kept, deltas + grown.to(deltas)


class HiredQwen2_5_VLModel(NativeResolutionModel, Qwen2_5_VLModel):
    """``Qwen2_5_VLModel`` whose image features are the tokens the method keeps, at their stock positions."""

    stock_model = Qwen2_5_VLModel


def _expand_images(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_token: int, full: list[int],
                   token_types: torch.Tensor | None = None):
    """The prompt with every image's run of placeholders grown to its stock length.

    ``token_types``: the prompt's ``mm_token_type_ids`` (text 0, image 1, video 2), grown with it so that
    a video's tokens stay video tokens to ``get_rope_index``.

    Returns:
        ``(input_ids, attention_mask, mm_token_type_ids, index)`` of the grown prompt (each row's tokens
        first, padding after; ``mm_token_type_ids`` ``None`` when ``token_types`` is), and ``index``: per
        original token, where it went (``-1`` for padding).
    """
    valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    known_types = token_types if token_types is not None else torch.zeros_like(input_ids)
    rows, row_types, indices, image = [], [], [], 0
    for row, keep, kinds in zip(input_ids.tolist(), valid.tolist(), known_types.tolist()):
        tokens: list[int] = []
        types: list[int] = []
        where: list[int] = []
        j = 0
        while j < len(row):
            if not keep[j]:
                where.append(-1)
                j += 1
            elif row[j] == image_token:
                end = j
                while end < len(row) and keep[end] and row[end] == image_token:
                    end += 1
                if image >= len(full) or end - j > full[image]:
                    raise ValueError(f"the prompt's image placeholders do not match the {len(full)} images of "
                                     "image_grid_thw; prepare inputs with the processor returned by hired.apply")
                where.extend(range(len(tokens), len(tokens) + end - j))
                tokens.extend([image_token] * full[image])
                types.extend([kinds[j]] * full[image])
                image += 1
                j = end
            else:
                where.append(len(tokens))
                tokens.append(row[j])
                types.append(kinds[j])
                j += 1
        rows.append(tokens)
        row_types.append(types)
        indices.append(where)
    if image != len(full):
        raise ValueError(f"the prompt holds {image} images' placeholders for the {len(full)} images of image_grid_thw")
    width = max(len(tokens) for tokens in rows)
    expanded = input_ids.new_zeros((len(rows), width))
    mask = input_ids.new_zeros((len(rows), width))
    grown_types = known_types.new_zeros((len(rows), width))
    for b, (tokens, types) in enumerate(zip(rows, row_types)):
        expanded[b, :len(tokens)] = torch.as_tensor(tokens, dtype=input_ids.dtype)
        mask[b, :len(tokens)] = 1
        grown_types[b, :len(types)] = torch.as_tensor(types, dtype=known_types.dtype)
    index = torch.as_tensor(indices, dtype=torch.long, device=input_ids.device)
    return expanded, mask, None if token_types is None else grown_types, index


def _image_runs(slots: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the ``(start, length)`` of each run of image tokens."""
    runs = []
    for row in slots.tolist():
        found, j = [], 0
        while j < len(row):
            if row[j]:
                end = j
                while end < len(row) and row[end]:
                    end += 1
                found.append((j, end - j))
                j = end
            else:
                j += 1
        runs.append(found)
    return runs


def restore_kept_positions(state: ModelState, module, args, kwargs):
    """Forward pre-hook of the language model: each kept image token gets its own stock (t, row, col).

    ``get_rope_index`` gave the tokens of an image the positions of its first tokens in raster
    order; the selection of this call says which tokens they are. Beam search repeats each prompt
    row: the rows of one prompt follow each other and share its images.
    """
    slots = state.call_data.pop(SLOTS, None)
    geometries = state.call_data.pop(GEOMETRIES, None)
    position_ids = kwargs.get("position_ids")
    if slots is None or geometries is None or position_ids is None or position_ids.dim() != 3:
        return None
    runs = _image_runs(slots)
    total = sum(len(row) for row in runs)
    if not state.records or total % len(state.records):
        raise RuntimeError(f"the prompt holds {total} runs of image tokens for {len(state.records)} selected images; "
                           "this is a bug in hired")
    copies = total // len(state.records)
    positions = position_ids.clone()
    mrope = positions[-3:]
    image = 0
    for b, row in enumerate(runs):
        first = image
        for (start, length), record, geometry in zip(row, state.records[first:], geometries[first:]):
            kept = torch.sort(record.kept[0]).values.to(positions.device)
            if len(kept) != length:
                raise ValueError(f"an image of the prompt has {length} tokens where hired kept {len(kept)}")
            origin = mrope[0, b, start]
            mrope[0, b, start:start + length] = origin
            mrope[1, b, start:start + length] = origin + kept // geometry.side
            mrope[2, b, start:start + length] = origin + kept % geometry.side
            image += 1
        if (b + 1) % copies:  # the next row repeats this prompt: the same images again
            image = first
    kwargs["position_ids"] = positions
    return args, kwargs


class NativeResolutionProcessor(HiredProcessor):
    """Mixed into a swapped Qwen-VL processor: ``<|image_pad|>`` expands into exactly the tokens the method keeps.

    ``<|video_pad|>`` expands into the stock count: the patched model feeds videos as the stock model does.
    """

    passes_videos = True

    def hired_geometry(self, image_size: Sequence[int]) -> NativeGeometry:
        return image_geometry(self.image_processor, image_size)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        geometry = NativeGeometry.from_patch_grid(image_inputs["image_grid_thw"][image_idx].tolist(),
                                                  self.image_processor.patch_size, self.image_processor.merge_size)
        count = self.kept_tokens(geometry)
        if count is None:
            return super().replace_image_token(image_inputs, image_idx, **kwargs)
        return self.image_token * count

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs):
        data = super()._get_num_multimodal_tokens(image_sizes=image_sizes, video_sizes=video_sizes, **kwargs)
        if image_sizes is not None:
            counts = [self.hired_tokens(size) for size in image_sizes]
            data.num_image_tokens = [n if c is None else c for n, c in zip(data.num_image_tokens, counts)]
        return data


class HiredQwen2_5_VLProcessor(NativeResolutionProcessor, Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` that expands ``<|image_pad|>`` into exactly the tokens the method keeps."""

    _stock_class = Qwen2_5_VLProcessor


class Qwen2_5_VLAdapter(FamilyAdapter):
    """One raster of merged patches per image, M-RoPE positions kept (see the module doc)."""

    name = "qwen2.5-vl"
    tiny_model = ".tiny:tiny_qwen2_5_vl"
    outer_class = Qwen2_5_VLForConditionalGeneration
    inner_class = Qwen2_5_VLModel
    hired_inner_class = HiredQwen2_5_VLModel
    processor_class = Qwen2_5_VLProcessor
    hired_processor_class = HiredQwen2_5_VLProcessor
    model_internals = ("get_image_features", "get_placeholder_mask", "get_rope_index")
    processor_internals = ("replace_image_token", "_get_num_multimodal_tokens")
    selects_projected = True
    released_has_cls = False
    released = RELEASED  # the released checkpoints' image-processor settings

    def geometry(self, config, image_size) -> NativeGeometry:
        vision = config.vision_config
        grid = token_grid(image_size, vision.patch_size, vision.spatial_merge_size, self.released["min_pixels"],
                          self.released["max_pixels"])
        return NativeGeometry.create(image_size, grid)

    def processor_geometry(self, processor, image_size) -> NativeGeometry:
        return image_geometry(processor.image_processor, image_size)

    def released_geometry(self, image_size) -> NativeGeometry:
        released = self.released
        grid = token_grid(image_size, released["patch"], released["merge"], released["min_pixels"], released["max_pixels"])
        return NativeGeometry.create(image_size, grid)

    def vision_probe(self, inner) -> VisionProbe:
        return VisionProbe(inner.visual, num_heads=inner.visual.config.num_heads, has_cls=False)

    def feature_layer(self, inner, probe: VisionProbe, vision_feature_layer: Any = None) -> int:
        return probe.num_layers - 1  # the merger reads the last block

    def install(self, inner, state: ModelState) -> list:
        return [inner.language_model.register_forward_pre_hook(functools.partial(restore_kept_positions, state),
                                                                with_kwargs=True)]

    def drop_layer(self, inner, probe: VisionProbe, drop_layer: int | None, feature_layer: int) -> int:
        """Any block the tower attends across the whole image in (Qwen2.5-VL: its full-attention blocks; Qwen3-VL:
        every block)."""
        if drop_layer is None:
            return feature_layer
        visual = inner.visual
        purpose = "running the tower's later blocks over the kept tokens (drop_layer)"
        compat.require_arguments(type(visual.blocks[0]).forward, ("cu_seqlens", "position_embeddings"), purpose)
        compat.require_attribute(visual, "merger", purpose)
        count = probe.num_layers
        index = drop_block(drop_layer, count, full_attention_blocks(visual, count), self.name)
        return index

    def tower_runs(self, inner, call: ImageCall, probe: VisionProbe, feature_layer: int, distribution_layer: int,
                   selection_layer: int, aggregation: str = "sum", score: str = "auto",
                   drop: EarlyDrop | None = None) -> list[TowerRun]:
        score = probe.resolve_score(score)
        visual = inner.visual
        merge = visual.spatial_merge_size
        unit = merge * merge
        heads = probe.num_heads
        layers = {"distribution": distribution_layer % probe.num_layers, "selection": selection_layer % probe.num_layers}
        grid = torch.tensor([[1, g.tokens[0] * merge, g.tokens[1] * merge] for g in call.geometries],
                            device=call.tiles[0].device)
        captured: dict[str, Any] = {}

        def keep_rotary(layer, module, args, kwargs):
            captured[f"rotary{layer}"] = kwargs["position_embeddings"]

        def keep_qkv(layer, module, inputs, output):
            captured[f"qkv{layer}"] = output

        def keep_window(input_tensor, window_index, seq_len):
            captured["window"] = window_index
            return type(visual).permute_input_for_window_attn(visual, input_tensor, window_index, seq_len)

        def runs(merged: torch.Tensor, planes: torch.Tensor | None) -> list[TowerRun]:
            read = {}
            for name, layer in layers.items():
                qkv = captured[f"qkv{layer}"]
                query, key, _ = qkv.reshape(qkv.shape[0], 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
                rotated_query, rotated_key = self.rotate(query, key, *captured[f"rotary{layer}"])
                read[name] = rotated_query.flatten(1), rotated_key.flatten(1), key.flatten(1)
            order = torch.argsort(captured["window"]) if "window" in captured else None
            return merged_runs(merged, planes, read["distribution"], read["selection"], call.geometries, unit=unit,
                               order=order, score=score, num_heads=heads, aggregation=aggregation)

        handles = []
        for layer in set(layers.values()):
            block = visual.blocks[layer]
            handles.append(block.attn.register_forward_pre_hook(functools.partial(keep_rotary, layer), with_kwargs=True))
            handles.append(block.attn.qkv.register_forward_hook(functools.partial(keep_qkv, layer)))
        windowed = hasattr(type(visual), "permute_input_for_window_attn")  # Qwen2.5-VL; Qwen3-VL attends globally
        if windowed:
            visual.permute_input_for_window_attn = keep_window
        if drop is not None:
            handles += NativeTowerDrop(visual, drop, call.geometries, unit, lambda: captured.get("window"), runs).install()
        try:
            output = visual(torch.cat(call.tiles).type(visual.dtype), grid_thw=grid)
        finally:
            if windowed:
                del visual.permute_input_for_window_attn
            for handle in handles:
                handle.remove()
        planes = getattr(output, "deepstack_features", None)  # Qwen3-VL: (tokens, D) per layer, raster order
        return runs(output.pooler_output, torch.stack(planes, dim=1) if planes else None)

    @staticmethod
    def rotate(query, key, cos, sin):
        """The vision block's rotary embedding of queries and keys, with the model's own function."""
        return modeling_qwen2_5_vl.apply_rotary_pos_emb_vision(query, key, cos, sin)

    def pack_stock(self, inner, run: TowerRun, geometry: NativeGeometry, image_size) -> torch.Tensor:
        return run.features[0][geometry.candidates[0]]

    def partition_pixels(self, inputs) -> torch.Tensor:
        """``(1, 3, H, W)``: the first image, rebuilt from the processor's patches (first temporal frame).

        The processor flattens each ``(3, temporal, patch, patch)`` patch, merge group by merge group
        in raster order; the released and the tiny processors have 2 temporal frames and 2x2 groups.
        """
        _, height, width = (int(v) for v in inputs["image_grid_thw"][0])
        patches = inputs["pixel_values"][: height * width]
        merge, frames = self.released["merge"], 2
        patch = int(round((patches.shape[1] / (3 * frames)) ** 0.5))
        grid = patches.reshape(height // merge, width // merge, merge, merge, 3, frames, patch, patch)[:, :, :, :, :, 0]
        return grid.permute(4, 0, 2, 5, 1, 3, 6).reshape(1, 3, height * patch, width * patch)

    def check_processor(self, inner, processor) -> None:
        vision = inner.config.vision_config
        image = processor.image_processor
        if (image.patch_size, image.merge_size) != (vision.patch_size, vision.spatial_merge_size):
            raise ValueError(f"the processor's patch_size {image.patch_size} and merge_size {image.merge_size} differ from "
                             f"the vision tower's {vision.patch_size} and {vision.spatial_merge_size}; use the processor "
                             "saved with this model")
        pixel_limits(image)

