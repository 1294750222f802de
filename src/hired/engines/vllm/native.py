"""The mixins for vLLM's native-resolution families (Qwen2.5-VL, Qwen3-VL): one raster of merged tokens per image, placed
in the prompt with M-RoPE positions.

The processor gives each image its kept count from its patch grid (``image_grid_thw``), as for LLaVA
(:mod:`hired.engines.vllm.mixins`). The model runs vLLM's own vision tower once, reads the queries and
keys of two blocks (the fused ``qkv`` projection, and the same queries and keys after the block's
rotary embedding), and hands them to the path transformers runs too (:func:`hired.signals.merged_runs`,
then :func:`hired.selecting.select_images`).

Positions: a kept token keeps the (t, row, col) position stock vLLM gives it, and the text after an
image continues where stock vLLM continues it. vLLM fixes a request's positions when the request is
admitted, before the tower has chosen which tokens an image keeps:

1. At admission, :meth:`HiredNativeModel.get_mrope_input_positions` runs vLLM's own
   ``get_mrope_input_positions`` on the prompt with each pruned image grown back to all its tokens,
   and keeps the positions of the tokens present: the text keeps its stock positions, and an image's
   K tokens take, for now, the positions of its first K tokens in raster order (all of them the
   image's stock time and origin).
2. The model returns a pruned image's embeddings with :data:`OFFSET_CHANNELS` more channels: each kept
   token's row and column in the image's raster, in base-256 digits so that they stay exact in any
   float dtype.
3. ``embed_input_ids`` (the runner calls it with the step's embeddings just before ``forward``) strips
   those channels and notes, for each such token of the step, its row and column; ``forward`` then
   sets the token's row and column positions to the image's origin (its time position) plus its own
   row and column, in the runner's position buffer, before the language model runs.

vLLM's own pruning hook for positions (``SupportsMultiModalPruning.recompute_mrope_positions``) is
not used: the runner calls it only when ``video_pruning_rate`` is set (and never on CPU), and its
function (``vllm.multimodal.video_prune.evs.recompute_mrope_positions``) moves the text after a tall
image to where stock vLLM does not put it (``docs/vllm.md``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Mapping

import torch
from torch import nn
from vllm.distributed import tensor_model_parallel_all_gather

from ...geometry import NativeGeometry
from ...native_drop import NativeTowerDrop
from ...selecting import EarlyDrop, choose_images, name_drop_layer, select_images
from ...signals import TowerRun, merged_runs
from .internals import Internal
from .mixins import ENCODING, HiredEncoderModel, HiredMultiModalProcessor, HiredProcessingInfo
from .settings import KEPT_FIELD, field_count, native_tower_plan

# A pruned image's embeddings carry each token's (row, col) in its raster as base-256 digits
# (row // 256, row % 256, col // 256, col % 256): integers up to 256 are exact even in bfloat16.
OFFSET_CHANNELS = 4
DIGIT = 256
POSITIONS = "placing each kept token at its stock M-RoPE position"
DROPPING = "running the tower's later blocks over the kept patches (drop_layer)"
# The arguments of a tower block that the early drop narrows to the kept patches (hired.native_drop).
DROP_BLOCK_ARGUMENTS = ("cu_seqlens", "rotary_pos_emb_cos", "rotary_pos_emb_sin", "max_seqlen")


def grid_geometries(grids, vision_config) -> list[NativeGeometry]:
    """Each image's geometry from its patch grid ``(t, h, w)``."""
    return [NativeGeometry.from_patch_grid(grid, vision_config.patch_size, vision_config.spatial_merge_size)
            for grid in grids]


class HiredNativeProcessingInfo(HiredProcessingInfo):
    """Mixed into a native-resolution family's processing info: its tower plan, and the engine settings it
    refuses."""

    tower_plan = staticmethod(native_tower_plan)

    def check_engine(self) -> None:
        multimodal = self.ctx.get_mm_config()
        if getattr(multimodal, "mm_encoder_tp_mode", "weights") == "data":
            raise ValueError("hired reads the vision tower's attention on every tensor-parallel rank, but "
                             "mm_encoder_tp_mode='data' shards the images across ranks instead; serve with the "
                             "default mm_encoder_tp_mode='weights'")
        if (getattr(multimodal, "video_pruning_rate", None) or 0) > 0:
            raise ValueError("vLLM's video pruning (video_pruning_rate) rewrites the positions of every image of a "
                             "prompt after it is encoded, which would undo the positions of hired's kept tokens; serve "
                             "hired's images without video_pruning_rate, or video pruning without hired")


class HiredNativeProcessor(HiredMultiModalProcessor):
    """Mixed into a native-resolution family's multimodal processor: counts from each image's patch grid."""

    def hired_geometries(self, outputs: Mapping[str, Any]) -> list:
        return grid_geometries(outputs["image_grid_thw"].tolist(), self.info.get_hf_config().vision_config)

    def hired_image_token(self) -> int:
        return self.info.get_hf_config().image_token_id


class HiredNativeModel(HiredEncoderModel):
    """Mixed into a native-resolution family's vLLM model: images with a kept count are encoded through the method,
    and their kept tokens placed at their stock positions (see the module doc)."""

    tower_plan = staticmethod(native_tower_plan)

    @staticmethod
    def internals_of(model: type, image_inputs: type) -> tuple[Internal, ...]:
        """What this mixin overrides or calls on ``model``, the vLLM model class under it, and reads of its
        ``image_inputs``."""
        return (
            Internal.of(model, "__init__", ENCODING, ("vllm_config", "prefix")),
            Internal.of(model, "embed_multimodal", ENCODING),
            Internal.of(model, "_process_image_input", ENCODING, ("image_input",)),
            Internal.of(model, "get_mrope_input_positions", POSITIONS, ("input_tokens", "mm_features")),
            Internal.of(model, "embed_input_ids", POSITIONS, ("input_ids", "multimodal_embeddings", "is_multimodal")),
            Internal.of(model, "forward", POSITIONS, ("input_ids", "positions", "intermediate_tensors",
                                                      "inputs_embeds")),
            *(Internal.of(image_inputs, field, ENCODING) for field in ("type", "pixel_values", "image_grid_thw")),
            Internal("vllm.multimodal.inputs:MultiModalFeatureSpec", "mm_position", POSITIONS),
            Internal("vllm.multimodal.inputs:PlaceholderRange", "offset", POSITIONS),
            Internal("vllm.distributed", "tensor_model_parallel_all_gather", "gathering the heads of tensor-parallel "
                     "ranks", ("input_", "dim")),
        )

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        vision = vllm_config.model_config.hf_config.vision_config
        # A stock image embedding: the merger's output, then one plane per DeepStack merger (Qwen3-VL).
        self.hired_planes = len(getattr(vision, "deepstack_visual_indexes", None) or ())
        self.hired_width = vision.out_hidden_size * (1 + self.hired_planes)
        self.hired_moves: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # for the next forward

    def check_model(self, vllm_config) -> None:
        compilation = vllm_config.compilation_config
        compiled = [name for name in ("compile_mm_encoder", "cudagraph_mm_encoder") if getattr(compilation, name, False)]
        if compiled:  # vLLM compiles the Qwen-VL towers only
            raise ValueError(f"hired reads the vision tower's attention through hooks that a compiled or graphed "
                             f"tower skips; serve without {' and '.join(compiled)}")
        if getattr(self, "is_multimodal_pruning_enabled", False):
            raise ValueError("vLLM's video pruning (video_pruning_rate) adds position channels to every image's "
                             "embeddings and rewrites their positions; serve hired without video_pruning_rate")
        backend = getattr(getattr(self.visual, "attn_backend", None), "name", None)
        if self.hired_config.drop_layer is not None and backend == "FLASHINFER":
            raise ValueError("drop_layer runs the tower's later blocks over the kept patches, with each image's attention "
                             "spans recounted in patches, but vLLM's FlashInfer vision attention counts its spans in "
                             "other units; serve with another mm_encoder_attn_backend, or without drop_layer")
        graphs = getattr(vllm_config.compilation_config, "cudagraph_mode", None)
        if graphs is not None and graphs.mixed_mode().name == "FULL":
            # forward places the kept tokens in Python, which a full graph of a prefill batch would skip
            raise ValueError(f"cudagraph_mode={graphs.name} replays whole CUDA graphs for prefill batches, which "
                             "would skip the placing of the kept image tokens; serve with the default "
                             "FULL_AND_PIECEWISE (full graphs for decoding only) or PIECEWISE")

    # Encoding

    def _process_image_input(self, image_input):
        diverted = self._hired_divert(image_input)
        return super()._process_image_input(image_input) if diverted is None else diverted

    def _hired_encode(self, image_input, counts: list[int | None]) -> list[torch.Tensor]:
        """Each image's embeddings: its kept tokens with their offsets, or every token where its count is ``None``."""
        visual, plan, config = self.visual, self.hired_plan, self.hired_config
        grids = image_input["image_grid_thw"].tolist()
        geometries = grid_geometries(grids, self.config.vision_config)
        metadata = visual.prepare_encoder_metadata(grids)
        unit = visual.spatial_merge_size ** 2
        drop = None if plan.drop is None else EarlyDrop(plan.drop, functools.partial(
            choose_images, geometries=geometries, image_sizes=[None] * len(geometries), counts=counts, config=config))
        with self._hired_capture() as read:
            def read_runs(merged: torch.Tensor, planes: torch.Tensor | None) -> list[TowerRun]:
                # A windowed tower (Qwen2.5-VL) attends over its merge groups permuted; the metadata holds the way back.
                return merged_runs(merged, planes, *read(), geometries, unit=unit,
                                   order=metadata.get("reverse_indices"), score=plan.score,
                                   num_heads=self._hired_heads(), aggregation=plan.aggregation)

            with _hookable_tower(visual, drop is not None):
                handles = [] if drop is None else NativeTowerDrop(
                    visual, drop, geometries, unit, lambda: metadata.get("window_index"), read_runs).install()
                try:
                    merged = visual(image_input["pixel_values"], grid_thw=grids, encoder_metadata=metadata)
                finally:
                    for handle in handles:
                        handle.remove()
            width = self.config.vision_config.out_hidden_size
            planes = merged[:, width:].reshape(merged.shape[0], self.hired_planes, width) if self.hired_planes else None
            runs = read_runs(merged[:, :width], planes)
        # As in transformers, the model sees only the resized image: its records give no original size.
        selected = select_images(runs, geometries, [None] * len(geometries), counts, config,
                                 pack_stock=functools.partial(self.hired_family.pack_stock, self), project=None,
                                 drop=drop)
        if config.drop_layer is not None:
            name_drop_layer(selected.records, plan.feature if drop is None else drop.layer)
        self.hired_selections.extend(selected.records)
        embeddings = []
        for features, rows, run, geometry, count in zip(selected.features, selected.kept_rows, runs, geometries,
                                                        counts):
            if run.planes is not None:  # each token's DeepStack planes follow its features, as the tower returns them
                features = torch.cat([features, run.planes[0][rows[:, 1].to(features.device)].flatten(1)], dim=1)
            if count is None:
                embeddings.append(features)
                continue
            index = rows[:, 1].to(features.device)
            offsets = torch.stack([index // geometry.side // DIGIT, index // geometry.side % DIGIT,
                                   index % geometry.side // DIGIT, index % geometry.side % DIGIT], dim=1)
            embeddings.append(torch.cat([features, offsets.to(features.dtype)], dim=1))
        return embeddings

    def _hired_heads(self) -> int:
        return self.config.vision_config.num_heads

    @contextlib.contextmanager
    def _hired_capture(self):
        """Keep, per layer the method reads, the queries and keys of one tower call; yields a function that returns,
        once those layers have run, ``(query, key, raw_key)`` of every patch for the distribution layer and for the
        selection layer, ``(patches, heads * head_dim)`` each, in the tower's order (gathered across
        tensor-parallel ranks)."""
        plan = self.hired_plan
        raw: dict[int, torch.Tensor] = {}
        rotated: dict[int, torch.Tensor] = {}
        handles = []

        def keep_qkv(layer, module, inputs, output):
            raw[layer] = output[0] if isinstance(output, tuple) else output

        def keep_rotated(layer, module, inputs, output):
            rotated[layer] = output

        for layer in {plan.distribution, plan.selection}:
            attention = self.visual.blocks[layer].attn
            handles.append(attention.qkv.register_forward_hook(functools.partial(keep_qkv, layer)))
            handles.append(attention.apply_rotary_emb.register_forward_hook(functools.partial(keep_rotated, layer)))
        local_heads = self.visual.blocks[plan.selection].attn.num_attention_heads_per_partition

        def read(layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            fused = raw[layer].reshape(raw[layer].shape[0], 3, local_heads, -1)  # (patches, q/k/v, heads, head_dim)
            both = rotated[layer]  # (2, patches, heads, head_dim): the rotated queries, then keys
            parts = [both[0].flatten(1), both[1].flatten(1), fused[:, 1].flatten(1)]
            if local_heads != self._hired_heads():  # this rank holds a share of the heads
                parts = [tensor_model_parallel_all_gather(part.contiguous(), dim=-1) for part in parts]
            return tuple(parts)

        try:
            yield lambda: (read(plan.distribution), read(plan.selection))
        finally:
            for handle in handles:
                handle.remove()

    # Positions

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
        """vLLM's positions of the prompt with each pruned image grown back to all its tokens, for the tokens
        present: the text at its stock positions, a pruned image's tokens for now at its first ones."""
        merge = self.config.vision_config.spatial_merge_size
        grown: list[int] = []  # the prompt's tokens with every image whole
        present: list[int] = []  # where each token of the prompt is in it
        features, cursor = [], 0
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            position = feature.mm_position
            kept = field_count(_field_value(feature.data, KEPT_FIELD)) if feature.modality == "image" else None
            full = position.length if kept is None else int(feature.data["image_grid_thw"].data.prod()) // merge ** 2
            present.extend(range(len(grown), len(grown) + position.offset - cursor))
            grown.extend(input_tokens[cursor:position.offset])
            features.append(dataclasses.replace(
                feature, mm_position=dataclasses.replace(position, offset=len(grown), length=full)))
            present.extend(range(len(grown), len(grown) + position.length))  # for now, its first tokens' positions
            end = position.offset + position.length
            grown.extend(input_tokens[position.offset:end])
            grown.extend(input_tokens[position.offset:position.offset + 1] * (full - position.length))
            cursor = end
        added = len(grown) - cursor
        if not added:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        present.extend(range(len(grown), len(grown) + len(input_tokens) - cursor))
        grown.extend(input_tokens[cursor:])
        positions, delta = super().get_mrope_input_positions(grown, features)
        return positions[:, torch.as_tensor(present)], delta + added

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        self.hired_moves = None
        # Only embeddings this model made carry the offsets (with video pruning on it makes none: hired_plan is None).
        if (self.hired_plan is not None and multimodal_embeddings is not None
                and any(e.shape[-1] != self.hired_width for e in multimodal_embeddings)):
            tokens = is_multimodal.nonzero().flatten()
            moved, rows, cols, start = [], [], [], 0
            stripped = []
            for embedding in multimodal_embeddings:
                length = embedding.shape[0]
                if embedding.shape[-1] != self.hired_width:
                    digits = embedding[:, self.hired_width:].round().long()
                    moved.append(tokens[start:start + length])
                    rows.append(digits[:, 0] * DIGIT + digits[:, 1])
                    cols.append(digits[:, 2] * DIGIT + digits[:, 3])
                    embedding = embedding[:, :self.hired_width]
                stripped.append(embedding)
                start += length
            multimodal_embeddings = stripped
            self.hired_moves = torch.cat(moved), torch.cat(rows), torch.cat(cols)
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        moves, self.hired_moves = self.hired_moves, None
        if moves is not None and positions.dim() == 2:
            tokens, rows, cols = (part.to(positions.device) for part in moves)
            origin = positions[0, tokens]  # an image's tokens share its time position, the raster's origin
            positions[1, tokens] = origin + rows  # in place: the runner's buffer, which the model reads
            positions[2, tokens] = origin + cols
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)


class _Hookable(nn.Module):
    """A tower module behind one whose hooks run: vLLM's compilable blocks and mergers call their ``forward`` from a
    ``__call__`` of their own, which skips the hooks registered on them."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.block(*args, **kwargs)


@contextlib.contextmanager
def _hookable_tower(visual, wanted: bool):
    """While it lasts, the tower's blocks and mergers (those :class:`hired.native_drop.NativeTowerDrop`
    hooks) each behind a :class:`_Hookable`, when ``wanted``."""
    names = [name for name in ("blocks", "merger", "deepstack_merger_list") if hasattr(visual, name)]
    modules = {name: getattr(visual, name) for name in names}
    if wanted:
        for name, module in modules.items():
            setattr(visual, name, nn.ModuleList(_Hookable(part) for part in module)
                    if isinstance(module, nn.ModuleList) else _Hookable(module))
    try:
        yield
    finally:
        for name, module in modules.items():
            setattr(visual, name, module)


def _field_value(data, key: str) -> int | None:
    element = data.get(key) if data is not None else None
    return None if element is None else int(element.data)


__all__ = ["DROPPING", "DROP_BLOCK_ARGUMENTS", "HiredNativeModel", "HiredNativeProcessingInfo", "HiredNativeProcessor", "OFFSET_CHANNELS"]
