"""The early drop inside a native-resolution tower (Qwen2.5-VL's, Qwen3-VL's), as hooks on its blocks that both
engines install; like :func:`hired.signals.merged_runs`, it knows the tower's parts by name, no model class.

transformers' and vLLM's towers run the same blocks over the same patches in the same order; they
differ only in how a block is called (transformers: ``position_embeddings=(cos, sin)``; vLLM:
``rotary_pos_emb_cos`` / ``rotary_pos_emb_sin``, ``max_seqlen`` as a tensor), which :meth:`NativeTowerDrop.narrow`
handles for both.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .geometry import NativeGeometry
from .selecting import EarlyDrop
from .signals import TowerRun

# The keyword arguments of a block that hold one value per patch: transformers' pair, vLLM's two.
PER_PATCH_PAIRS = ("position_embeddings",)
PER_PATCH = ("rotary_pos_emb_cos", "rotary_pos_emb_sin")


def full_attention_blocks(visual, count: int) -> list[int]:
    """The blocks of a Qwen-VL tower that attend across the whole image (Qwen2.5-VL's ``fullatt_block_indexes``;
    every block of a tower without windows)."""
    return sorted(getattr(visual, "fullatt_block_indexes", range(count)))


def drop_block(drop_layer: int, depth: int, whole: Sequence[int], model: str) -> int:
    """The block index that ``drop_layer`` names in a tower of ``depth`` blocks of which ``whole`` attend across the
    whole image (:func:`full_attention_blocks`); ``model`` names the model in the error.

    Raises:
        ValueError: a layer out of range, or a block that attends within windows only.
    """
    if not -depth <= drop_layer < depth:
        raise ValueError(f"drop_layer={drop_layer} is out of range for a vision tower of {depth} blocks (valid: "
                         f"{-depth}..{depth - 1})")
    index = drop_layer % depth
    if index not in whole:
        raise ValueError(f"drop_layer={drop_layer}: block {index} of this {model} tower attends within windows, so its "
                         "scores rank tokens only inside each window; drop at a block that attends across the whole "
                         f"image: {', '.join(map(str, whole))}")
    return index


class NativeTowerDrop:
    """The hooks of one tower call that select at ``drop.layer`` and run the blocks after it over the kept tokens.

    At the drop block's output the method chooses each image's merged tokens from the runs at that
    block (a token's features: the mean of its patches there); the hidden states then shrink to the
    kept tokens' patches, in the tower's own order, and every later block gets them with their own
    rotary positions and the attention spans recounted over them: each image, and in a windowed
    tower each window, holds its kept patches. The merger (and each DeepStack merger from the drop
    block on) writes its kept tokens back into a tensor of every token, zeros elsewhere, so that the
    tower's own reordering and output stay as they are.

    Args:
        visual: the tower (its ``blocks``, ``merger`` and, in Qwen3-VL, DeepStack mergers).
        drop: the early drop; its choices are set when the drop block has run.
        geometries: each image's geometry, in the call's order.
        unit: patches per merge group.
        window: the tower's merge groups in its order, as raster indices (a windowed tower's permutation), or
            ``None`` for raster order; called when the drop block has run.
        runs: ``(merged tokens in raster order, planes)`` -> each image's run, with the queries and keys captured.
    """

    def __init__(self, visual, drop: EarlyDrop, geometries: list[NativeGeometry], unit: int,
                 window: Callable[[], torch.Tensor | None],
                 runs: Callable[[torch.Tensor, torch.Tensor | None], list[TowerRun]]) -> None:
        self.visual, self.drop, self.geometries, self.unit = visual, drop, geometries, unit
        self.window, self.runs = window, runs
        self.groups = self.patches = self.counted = None
        self.total = 0

    def install(self) -> list:
        """Hook the tower; returns the handles (remove them after the call)."""
        blocks = self.visual.blocks
        layer = self.drop.layer
        handles = [blocks[layer].register_forward_hook(self.select)]
        handles += [block.register_forward_pre_hook(self.narrow, with_kwargs=True) for block in list(blocks)[layer + 1:]]
        handles.append(self.visual.merger.register_forward_hook(self.widen))
        deepstack = zip(getattr(self.visual, "deepstack_visual_indexes", ()),
                        getattr(self.visual, "deepstack_merger_list", ()))
        handles += [merger.register_forward_hook(self.widen) for index, merger in deepstack if index >= layer]
        return handles

    def select(self, module, inputs, hidden: torch.Tensor) -> torch.Tensor:
        unit = self.unit
        window = self.window()
        groups = hidden.reshape(-1, unit, hidden.shape[-1]).mean(1)
        raster = groups if window is None else groups[torch.argsort(window.to(groups.device))]
        choices = self.drop.choose(self.runs(raster, None))
        self.drop.choices = choices
        keep = torch.zeros(groups.shape[0], dtype=torch.bool)
        start = 0
        for geometry, choice in zip(self.geometries, choices):
            count = geometry.tokens[0] * geometry.tokens[1]
            if choice is None:
                keep[start:start + count] = True
            else:
                rank = geometry.candidates[0].long().cumsum(0) - 1  # lattice position -> raster index
                keep[start + rank[choice.selection.kept[0].cpu()]] = True
            start += count
        if window is not None:
            keep = keep[window.cpu()]
        kept = keep.nonzero().flatten()
        self.total = groups.shape[0]
        self.groups = kept.to(hidden.device)
        self.patches = (kept[:, None] * unit + torch.arange(unit)).flatten().to(hidden.device)
        self.counted = torch.cat([torch.zeros(1, dtype=torch.long), keep.repeat_interleave(unit).long().cumsum(0)])
        return hidden[self.patches]

    def narrow(self, module, args, kwargs):
        spans = kwargs["cu_seqlens"]
        kept = torch.unique_consecutive(self.counted[spans.long().cpu()]).to(spans)
        kwargs["cu_seqlens"] = kept
        longest = (kept[1:] - kept[:-1]).max()
        if kwargs.get("max_seqlen") is not None:
            bound = kwargs["max_seqlen"]
            kwargs["max_seqlen"] = longest.to(bound) if isinstance(bound, torch.Tensor) else int(longest)
        for name in PER_PATCH_PAIRS:
            if kwargs.get(name) is not None:
                kwargs[name] = tuple(value[self.patches] for value in kwargs[name])
        for name in PER_PATCH:
            if kwargs.get(name) is not None:
                kwargs[name] = kwargs[name][self.patches]
        return args, kwargs

    def widen(self, module, inputs, output: torch.Tensor) -> torch.Tensor:
        every = output.new_zeros(self.total, *output.shape[1:])
        every[self.groups] = output
        return every


__all__ = ["NativeTowerDrop", "drop_block", "full_attention_blocks"]
