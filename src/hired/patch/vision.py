"""Reading CLS attention out of a transformers ViT without asking it for attention maps.

Forward hooks on the query/key projections of two layers capture what the layer computes anyway;
the CLS row of the attention follows from them in O(N d) (see :func:`hired.algorithm.cls_attention`),
under any attention backend (SDPA, flash, eager). The tower runs only up to the last layer needed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..algorithm import cls_attention

_QUERY_NAMES = ("q_proj", "query")
_KEY_NAMES = ("k_proj", "key")


@dataclass
class ProbeRun:
    """Outputs of one pass through the truncated tower, for ``B`` tiles of ``1 + N`` tokens."""

    features: torch.Tensor  # (B, 1 + N, D) output of the feature layer
    distribution_scores: torch.Tensor  # (B, N)
    selection_scores: torch.Tensor  # (B, N)
    keys: torch.Tensor  # (B, N, Dk) selection-layer keys of the patch tokens


def _find_submodule(layer: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    for name, module in layer.named_modules():
        if name.rsplit(".", 1)[-1] in names and isinstance(module, nn.Linear):
            return module
    return None


class VisionProbe:
    """Wraps a CLS-token ViT from transformers (CLIP, DINOv2, ViT, ...).

    Raises:
        ValueError: when the tower has no CLS token or its layers expose no query/key projections.
    """

    def __init__(self, tower: nn.Module) -> None:
        self.tower = tower
        # Some transformers releases wrap the ViT body (CLIPVisionModel.vision_model).
        body = getattr(tower, "vision_model", tower)
        embeddings = getattr(body, "embeddings", None)
        if not (hasattr(embeddings, "class_embedding") or hasattr(embeddings, "cls_token")):
            raise ValueError(
                f"the vision tower {type(tower).__name__} has no CLS token; HiRED scores tokens by CLS attention "
                "and needs a ViT with one (CLIP, DINOv2, ViT)"
            )
        self.encoder, self.layers_attribute = self._find_layers(body)
        self.num_heads = int(tower.config.num_attention_heads)
        self.queries, self.keys = [], []
        for index, layer in enumerate(self.layers):
            query, key = _find_submodule(layer, _QUERY_NAMES), _find_submodule(layer, _KEY_NAMES)
            if query is None or key is None:
                raise ValueError(
                    f"layer {index} of {type(tower).__name__} has no separate query/key projections "
                    f"(looked for {_QUERY_NAMES} and {_KEY_NAMES})"
                )
            self.queries.append(query)
            self.keys.append(key)

    @staticmethod
    def _find_layers(tower: nn.Module) -> tuple[nn.Module, str]:
        encoder = getattr(tower, "encoder", None)
        for attribute in ("layers", "layer"):
            if isinstance(getattr(encoder, attribute, None), nn.ModuleList):
                return encoder, attribute
        raise ValueError(f"cannot find the transformer layers of {type(tower).__name__} (expected encoder.layers)")

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.encoder, self.layers_attribute)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @contextlib.contextmanager
    def _truncated(self, depth: int):
        full = self.layers
        setattr(self.encoder, self.layers_attribute, nn.ModuleList(list(full)[:depth]))
        try:
            yield
        finally:
            setattr(self.encoder, self.layers_attribute, full)

    def run(
        self,
        pixel_values: torch.Tensor,
        feature_layer: int,
        distribution_layer: int,
        selection_layer: int,
        aggregation: str = "sum",
    ) -> ProbeRun:
        """Run the tower through ``max(layers) + 1`` layers and collect features and scores."""
        layers = [index % self.num_layers for index in (feature_layer, distribution_layer, selection_layer)]
        feature_layer, distribution_layer, selection_layer = layers
        captured: dict[str, torch.Tensor] = {}

        def keep(name):
            def hook(module, inputs, output):
                captured[name] = output[0] if isinstance(output, tuple) else output

            return hook

        handles = [
            self.layers[feature_layer].register_forward_hook(keep("features")),
            self.queries[distribution_layer].register_forward_hook(keep("q_distribution")),
            self.keys[distribution_layer].register_forward_hook(keep("k_distribution")),
            self.queries[selection_layer].register_forward_hook(keep("q_selection")),
            self.keys[selection_layer].register_forward_hook(keep("k_selection")),
        ]
        try:
            with self._truncated(max(layers) + 1):
                self.tower(pixel_values=pixel_values, output_hidden_states=False, return_dict=True)
        finally:
            for handle in handles:
                handle.remove()
        return ProbeRun(
            features=captured["features"],
            distribution_scores=cls_attention(
                captured["q_distribution"][:, :1], captured["k_distribution"], self.num_heads, aggregation
            ),
            selection_scores=cls_attention(
                captured["q_selection"][:, :1], captured["k_selection"], self.num_heads, aggregation
            ),
            keys=captured["k_selection"][:, 1:],
        )
