"""Analytic cost of a VLM's forward pass: parameters, prefill FLOPs, KV cache, memory estimate.

The shape covers the tiled towers of LLaVA-1.5 / LLaVA-NeXT (CLIP), LLaVA-OneVision (SigLIP, no CLS
token) and InternVL (InternViT with CLS, 2x2 patches merged into one LLM token before the
projector), and the native-resolution tower of Qwen2.5-VL (one sequence of patches per image,
window attention except in a few full-attention layers, gated MLP, 2x2 merger). Each family reads
its config into a shape in its own folder (``hired/families/<family>/cost.py``) where it is more
than a tiled tower of patches (:meth:`ModelShape.tiled`).

FLOPs count the matrix products only (two FLOPs per multiply-add); norms, activations, softmax
and rotary embeddings are left out (under 1% of the total at these widths).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..geometry import NativeGeometry, PartitionGeometry, square_side

# Process overhead that does not scale with the model: interpreter, torch, transformers, kernels.
RUNTIME_BYTES = 700 * 2**20


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a VLM that its cost depends on.

    ``vision_layers_used`` is the depth up to the feature layer (23 of CLIP-L's 24 for layer -2): what
    a reducing method runs, while the stock model runs every layer. ``cls``: the tower prepends a CLS
    token; ``merge``: patches per LLM token (4 for InternVL's pixel shuffle), which also widens the
    projector's input; ``projector_hidden``: the projector's inner width (``0``: the text width).

    Native-resolution towers have ``tile = 0``; ``temporal_patch`` frames per patch,
    ``window`` the side of an attention window in LLM tokens (``0``: every layer attends globally)
    with ``full_attention_layers`` the exceptions, and ``gated_mlp`` three MLP matrices instead of two.
    """

    vision_width: int
    vision_mlp: int
    vision_layers: int
    vision_layers_used: int
    vision_heads: int
    tile: int
    patch: int
    text_width: int
    text_mlp: int
    text_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    newline: bool
    cls: bool = True
    merge: int = 1
    projector_hidden: int = 0
    temporal_patch: int = 1
    window: int = 0
    full_attention_layers: tuple[int, ...] = ()
    gated_mlp: bool = False

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """Read the transformers config of a model of a registered family.

        A family whose shape is more than a tiled tower of patches reads it in its folder's ``cost.py``
        (``model_shape(config)``: LLaVA-NeXT's newline token, SigLIP's missing CLS token, InternVL's
        merged patches, Qwen2.5-VL's native-resolution tower); the others are read by :meth:`tiled`.
        """
        family_shape = _family_model_shape(config.model_type)
        return cls.tiled(config) if family_shape is None else family_shape(config)

    @classmethod
    def tiled(cls, config, newline: bool = False, has_cls: bool = True, merge: int = 1) -> "ModelShape":
        """Read a config of a tiled tower of patches (``vision_config`` with ``image_size``, ``patch_size``,
        ``num_hidden_layers``; ``vision_feature_layer``) over a decoder; ``newline``, ``has_cls`` and
        ``merge`` as the fields ``newline``, ``cls`` and ``merge``."""
        vision = config.vision_config
        return cls(
            vision_width=vision.hidden_size,
            vision_mlp=vision.intermediate_size,
            vision_layers=vision.num_hidden_layers,
            vision_layers_used=config.vision_feature_layer % (vision.num_hidden_layers + 1),
            vision_heads=vision.num_attention_heads,
            tile=square_side(vision.image_size),
            patch=square_side(vision.patch_size),
            **decoder_shape(config.text_config),
            newline=newline,
            cls=has_cls,
            merge=merge,
        )

    @property
    def projector_width(self) -> int:
        return self.projector_hidden or self.text_width

    @property
    def patches_per_tile(self) -> int:
        return (self.tile // self.patch) ** 2 if self.tile else 0

    @property
    def tokens_per_tile(self) -> int:
        """LLM tokens one tile gives (patches, or merged groups of them)."""
        return self.patches_per_tile // self.merge

    @property
    def tower_tokens(self) -> int:
        """Tokens in the tower's sequence for one tile (the patches, and the CLS token where there is one)."""
        return self.patches_per_tile + (1 if self.cls else 0)


def decoder_shape(text) -> dict[str, int]:
    """The decoder fields of a :class:`ModelShape`, read from a transformers ``text_config``."""
    return dict(
        text_width=text.hidden_size,
        text_mlp=text.intermediate_size,
        text_layers=text.num_hidden_layers,
        heads=text.num_attention_heads,
        kv_heads=text.num_key_value_heads or text.num_attention_heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        vocab=text.vocab_size,
    )


def _family_model_shape(model_type: str) -> Callable[[Any], ModelShape] | None:
    """The ``model_shape`` of the ``cost.py`` of the registered family whose models have ``model_type``, if it has one."""
    from ..families import registered_families

    for family in registered_families():
        if family.outer_class.config_class.model_type == model_type:
            module = type(family).__module__.rpartition(".")[0] + ".cost"
            return importlib.import_module(module).model_shape if importlib.util.find_spec(module) else None
    return None


def parameter_count(shape: ModelShape) -> int:
    """Parameters of the ViT tower + projector (+ newline) + Llama/Mistral/Qwen2 decoder with untied head."""
    dv, mv, d, m = shape.vision_width, shape.vision_mlp, shape.text_width, shape.text_mlp
    mlp_matrices = 3 if shape.gated_mlp else 2
    vision_layer = 4 * (dv * dv + dv) + (mlp_matrices - 1) * (dv * mv + mv) + (mv * dv + dv) + 2 * 2 * dv
    # Native towers have rotary positions instead of a learned table.
    vision = 3 * shape.temporal_patch * shape.patch**2 * dv + dv + shape.tower_tokens * dv + 2 * 2 * dv
    vision += shape.vision_layers * vision_layer
    hidden = shape.projector_width
    projector = shape.merge * dv * hidden + hidden + hidden * d + d + (d if shape.newline else 0)
    attention = d * shape.heads * shape.head_dim * 2 + d * shape.kv_heads * shape.head_dim * 2
    text_layer = attention + 3 * d * m + 2 * d
    text = 2 * shape.vocab * d + shape.text_layers * text_layer + d
    return vision + projector + text


def vision_flops(shape: ModelShape, tiles: int, layers_run: int, drop: tuple[int, int] | None = None) -> int:
    """FLOPs of a tiled ViT tower on ``tiles`` tiles through ``layers_run`` layers (patch embedding included).

    ``drop``: ``(layer, kept)``, the layers after ``layer`` run over each tile's CLS token and the patches of
    ``kept`` LLM tokens of the image (the early drop), each tile holding the same share of them (the model
    counts an even spread; the kept tokens' own spread changes only the attention term).
    """
    tokens = shape.tower_tokens
    if drop is None:
        return tiles * _tower_flops(shape, shape.patches_per_tile, tokens, [[tokens]] * layers_run)
    layer, kept = drop
    after = (1 if shape.cls else 0) + kept * shape.merge / tiles
    return tiles * (_tower_flops(shape, shape.patches_per_tile, tokens, [[tokens]] * (layer + 1))
                    + _tower_flops(shape, 0, after, [[after]] * (layers_run - layer - 1)))


def native_vision_flops(shape: ModelShape, token_grid: tuple[int, int], layers_run: int,
                        drop: tuple[int, int] | None = None) -> int:
    """FLOPs of a native-resolution tower on one image of ``(rows, cols)`` LLM tokens through ``layers_run`` layers.

    A windowed layer attends within squares of ``window x window`` LLM tokens, cut from the top
    left corner (the last row and column of windows may be smaller); a full-attention layer over
    the whole image. ``drop``: ``(layer, kept)``, the layers after ``layer`` run over the patches of
    ``kept`` LLM tokens only (the early drop), each window holding the same share of them (the model
    counts an even spread; the kept tokens' own spread changes only the attention term).
    """
    rows, cols = token_grid
    patches = rows * cols * shape.merge
    if shape.window:
        windows = [height * width * shape.merge for height in _pieces(rows, shape.window)
                   for width in _pieces(cols, shape.window)]
    else:
        windows = [patches]
    sequences = [[patches] if layer in shape.full_attention_layers else windows for layer in range(layers_run)]
    if drop is None:
        return _tower_flops(shape, patches, patches, sequences)
    layer, kept = drop
    share = kept / (rows * cols)
    before = _tower_flops(shape, patches, patches, sequences[:layer + 1])
    after = [[n * share for n in spans] for spans in sequences[layer + 1:]]
    return before + _tower_flops(shape, 0, kept * shape.merge, after)


def _pieces(length: int, size: int) -> list[int]:
    return [min(size, length - start) for start in range(0, length, size)]


def _tower_flops(shape: ModelShape, patches: int, tokens: float, attention: list[list[float]]) -> int:
    """Patch embedding of ``patches``, then one layer per entry of ``attention`` on ``tokens`` tokens, each
    layer's attention split into independent sequences of the listed lengths."""
    dv, mv = shape.vision_width, shape.vision_mlp
    embedding = 2 * patches * 3 * shape.temporal_patch * shape.patch**2 * dv
    linear = 2 * tokens * 4 * dv * dv + 2 * (3 if shape.gated_mlp else 2) * tokens * dv * mv
    return int(embedding + sum(linear + 2 * 2 * dv * sum(n * n for n in layer) for layer in attention))


def image_vision_flops(shape: ModelShape, geometry: PartitionGeometry, layers_run: int,
                       drop: tuple[int, int] | None = None) -> int:
    """FLOPs of the tower on one image of ``geometry``: its tiles, or its native-resolution raster; ``drop`` as
    :func:`vision_flops`'s."""
    if isinstance(geometry, NativeGeometry):
        return native_vision_flops(shape, geometry.tokens, layers_run, drop)
    return vision_flops(shape, geometry.num_partitions, layers_run, drop)


def projected_tokens(shape: ModelShape, geometry: PartitionGeometry) -> int:
    """LLM tokens the stock projector sees for one image: every token of every tile, or of the raster."""
    if isinstance(geometry, NativeGeometry):
        return geometry.stock_tokens
    return geometry.num_partitions * shape.tokens_per_tile


def projector_flops(shape: ModelShape, tokens: int) -> int:
    """FLOPs of the two-layer projector on ``tokens`` LLM tokens (each of ``merge`` patches' width)."""
    hidden = shape.projector_width
    return 2 * tokens * (shape.merge * shape.vision_width * hidden + hidden * shape.text_width)


def llm_prefill_flops(shape: ModelShape, sequence: int, batch: int = 1) -> int:
    """FLOPs of the decoder's prefill of ``batch`` sequences of ``sequence`` tokens.

    Causal attention counts the ``S(S+1)/2`` visible query-key pairs; the LM head runs on the last
    position only, as ``generate`` does.
    """
    d, m, s = shape.text_width, shape.text_mlp, sequence
    query_width, kv_width = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    projections = 2 * s * d * (2 * query_width + 2 * kv_width)
    attention = 2 * 2 * query_width * (s * (s + 1) // 2)
    mlp = 2 * s * 3 * d * m
    head = 2 * d * shape.vocab
    return batch * (shape.text_layers * (projections + attention + mlp) + head)


def kv_cache_bytes(shape: ModelShape, cached_tokens: int, batch: int, bytes_per_value: int) -> int:
    """Size of the keys and values of every decoder layer for ``cached_tokens`` positions."""
    return 2 * shape.text_layers * shape.kv_heads * shape.head_dim * cached_tokens * batch * bytes_per_value


def memory_estimate(
    shape: ModelShape, sequence: int, batch: int, geometry: PartitionGeometry, new_tokens: int, bytes_per_value: int
) -> dict[str, int]:
    """Bytes a run is expected to need at its peak, by part (an upper bound, not a measurement).

    Activations take the larger of the vision phase and the prefill, assuming attention scores are
    materialised (the math kernel); the fused kernels need less.
    """
    dv, d, m = shape.vision_width, shape.text_width, shape.text_mlp
    if isinstance(geometry, NativeGeometry):
        vision_tokens = geometry.stock_tokens * shape.merge
        scores = vision_tokens**2  # a full-attention layer over the whole image
    else:
        vision_tokens = geometry.num_partitions * shape.tower_tokens
        scores = vision_tokens * shape.tower_tokens
    vision = batch * (
        (2 * vision_tokens * shape.vision_mlp + 6 * vision_tokens * dv) * bytes_per_value
        + shape.vision_heads * scores * 4
    )
    prefill = batch * (
        sequence * (3 * m + 6 * d) * bytes_per_value + shape.heads * sequence**2 * bytes_per_value + shape.vocab * 4
    )
    parts = {
        "weights": parameter_count(shape) * bytes_per_value,
        "kv_cache": kv_cache_bytes(shape, sequence + new_tokens, batch, bytes_per_value),
        "activations": max(vision, prefill),
        "runtime": RUNTIME_BYTES,
    }
    parts["total"] = sum(parts.values())
    return parts


def available_memory_bytes() -> int:
    """Memory the system can give a new process now (``MemAvailable``), or the physical total."""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
