"""What methods read from a vision tower: features, attention scores and keys, under any attention backend.

Forward hooks on a layer's query/key projections (separate, or one fused q/k/v projection; after
the query/key norms where the layer has them) capture what the layer computes anyway. The scores
follow from them: the CLS row of the attention in O(N d) (:func:`hired.algorithm.cls_attention`)
and, for towers without a CLS token, CLS-free ones (the attention each token receives, one head's
map at a time; attention from the mean query; key norms; key distinctiveness). None needs the
backend (SDPA, flash, eager) to return attention maps. The tower runs only up to the deepest layer
needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .algorithm import CLS_FREE_SCORE, SCORES, token_scores

QUERY_NAMES = ("q_proj", "query")
KEY_NAMES = ("k_proj", "key")
FUSED_NAMES = ("qkv", "qkv_proj")
# Normalisations applied to queries and keys after their projections (InternViT's qk-norm); hooked instead.
QUERY_NORM_NAMES = ("q_norm",)
KEY_NORM_NAMES = ("k_norm",)


@dataclass
class TowerRun:
    """Outputs of one pass through the truncated tower, for ``B`` tiles of ``[1 +] N`` tokens.

    Attributes:
        features: ``(B, N, D)`` patch tokens of the feature layer's output (CLS removed).
        distribution_scores: ``(B, N)`` attention scores of the distribution layer, or ``None``.
        selection_scores: ``(B, N)`` attention scores of the selection layer, or ``None``.
        keys: ``(B, N, Dk)`` selection-layer keys of the patch tokens.
        hidden: ``(B, [1 +] N, D)`` the feature layer's whole output.
        score: which score they are (one of :data:`hired.algorithm.SCORES` but ``"auto"``);
            ``None`` when no score was asked for.
        planes: ``(B, N, L, D)`` features of other layers that the LLM also reads, token by token
            (Qwen3-VL's DeepStack), or ``None``.
    """

    features: torch.Tensor
    distribution_scores: torch.Tensor | None
    selection_scores: torch.Tensor | None
    keys: torch.Tensor
    hidden: torch.Tensor
    score: str | None = None
    planes: torch.Tensor | None = None

    def __getitem__(self, rows: slice) -> "TowerRun":
        """The run of a contiguous range of tiles (one image's partitions)."""
        pick = lambda tensor: None if tensor is None else tensor[rows]  # noqa: E731
        return TowerRun(self.features[rows], pick(self.distribution_scores), pick(self.selection_scores),
                        self.keys[rows], self.hidden[rows], self.score, pick(self.planes))


@dataclass
class _Projection:
    """Where one layer's queries and keys come from."""

    query: nn.Module
    key: nn.Module | None  # None: ``query`` is a fused q/k/v projection

    def split(self, captured: dict[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.key is not None:
            return captured[f"{prefix}_q"], captured[f"{prefix}_k"]
        return split_fused(captured[f"{prefix}_q"])


def split_fused(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The queries and keys of a fused q/k/v projection's output (its last dimension: queries, keys, values)."""
    query, key, _ = qkv.chunk(3, dim=-1)
    return query, key


def run_from_attention(
    features: torch.Tensor,
    hidden: torch.Tensor,
    distribution: tuple[torch.Tensor, torch.Tensor],
    selection: tuple[torch.Tensor, torch.Tensor],
    *,
    score: str,
    num_heads: int,
    aggregation: str,
    skip: int,
) -> TowerRun:
    """The :class:`TowerRun` of one tower call from what it captured; every engine reads its tower through this.

    The scores of the patch tokens in the distribution and selection layers
    (:func:`hired.algorithm.token_scores`) and the selection layer's keys, each without the ``skip``
    leading tokens that are no patch (a CLS token).

    Args:
        features: ``(B, N, D)`` the feature layer's patch tokens.
        hidden: the feature layer's output as the tower returned it.
        distribution: ``(query, key)``, ``(B, skip + N, heads * head_dim)`` each, of the distribution layer.
        selection: the same of the selection layer.
        score: a resolved score (one of :data:`hired.algorithm.SCORES` but ``"auto"``).
        num_heads: attention heads in ``query`` and ``key``.
        aggregation: how the heads' scores combine.
        skip: leading tokens that are no patch.
    """
    distribution_scores = token_scores(score, *distribution, num_heads, aggregation, skip=skip)
    selection_scores = token_scores(score, *selection, num_heads, aggregation, skip=skip)
    return TowerRun(
        features=features,
        distribution_scores=distribution_scores,
        selection_scores=selection_scores,
        keys=selection[1][:, skip:],
        hidden=hidden,
        score=score,
    )


def merged_runs(
    merged: torch.Tensor,
    planes: torch.Tensor | None,
    distribution: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    selection: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    geometries: list,
    *,
    unit: int,
    order: torch.Tensor | None,
    score: str,
    num_heads: int,
    aggregation: str,
) -> list[TowerRun]:
    """The :class:`TowerRun` of each image of one call to a tower that merges ``unit`` patches into one LLM token
    (Qwen-VL's ViT); both engines read such a tower through this.

    A merged token's score is the sum of its patches' scores, its key their mean; runs lie on each
    image's lattice (:class:`hired.geometry.NativeGeometry`), zeros past its raster.

    Args:
        merged: ``(tokens, D)`` the merger's output, every image's tokens in raster order, one image after another.
        planes: ``(tokens, L, D)`` features of other layers the LLM also reads (Qwen3-VL's DeepStack), or ``None``.
        distribution: ``(query, key, raw_key)`` of the distribution layer, ``(patches, heads * head_dim)`` each,
            the queries and keys rotated, ``raw_key`` not; in the tower's order of merge groups.
        selection: the same of the selection layer.
        geometries: each image's :class:`hired.geometry.NativeGeometry`.
        unit: patches per merged token.
        order: the tower's merge groups in raster order (the inverse of a windowed tower's permutation), or
            ``None`` when the tower keeps raster order.
        score: a resolved score (not ``"auto"``).
        num_heads: attention heads in the queries and keys.
        aggregation: how the heads' scores combine.
    """

    def raster(values: torch.Tensor) -> torch.Tensor:
        if order is None:
            return values
        return values.reshape(-1, unit, *values.shape[1:])[order].reshape(values.shape)

    layers = {name: [raster(value) for value in values]
              for name, values in (("distribution", distribution), ("selection", selection))}
    runs, patch_start, token_start = [], 0, 0
    for geometry in geometries:
        rows, cols = geometry.tokens
        tokens = rows * cols
        patches = slice(patch_start, patch_start + tokens * unit)
        picked = {}
        for name, (query, key, raw_key) in layers.items():
            patch_scores = token_scores(score, query[patches][None], key[patches][None], num_heads, aggregation,
                                        raw_key=raw_key[patches][None])
            picked[name] = patch_scores.reshape(tokens, unit).sum(-1)
        features = merged[token_start:token_start + tokens]
        runs.append(TowerRun(
            features=lattice(features, geometry),
            distribution_scores=lattice(picked["distribution"], geometry),
            selection_scores=lattice(picked["selection"], geometry),
            keys=lattice(layers["selection"][2][patches].reshape(tokens, unit, -1).mean(1), geometry),
            hidden=features,  # (tokens, D): images of different sizes concatenate along the tokens
            score=score,
            planes=None if planes is None else lattice(planes[token_start:token_start + tokens], geometry),
        ))
        patch_start += tokens * unit
        token_start += tokens
    return runs


def lattice(values: torch.Tensor, geometry) -> torch.Tensor:
    """``(rows*cols, ...)`` raster values -> ``(1, side*side, ...)`` on a native geometry's lattice, zeros past the
    raster."""
    out = values.new_zeros(geometry.side * geometry.side, *values.shape[1:])
    out[geometry.candidates[0]] = values
    return out[None]


def _output(value):
    return value[0] if isinstance(value, tuple) else value


def _required_after_input(layer: nn.Module) -> int:
    """How many required positional arguments a layer's ``forward`` takes after its input (CLIP's and SigLIP's
    ``attention_mask``; none for InternViT and DINOv2): each is passed ``None``, as the towers' encoders do."""
    parameters = list(inspect.signature(layer.forward).parameters.values())[1:]
    return sum(1 for p in parameters
               if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _find(layer: nn.Module, names: tuple[str, ...], kind: type = nn.Linear) -> nn.Module | None:
    for name, module in layer.named_modules():
        if name.rsplit(".", 1)[-1] in names and isinstance(module, kind):
            return module
    return None


def _first(*modules: nn.Module | None) -> nn.Module | None:
    return next((module for module in modules if module is not None), None)


def tower_has_cls(tower: nn.Module) -> bool:
    """Whether a transformers ViT prepends a CLS token (CLIP's ``class_embedding``, DINOv2/ViT's ``cls_token``)."""
    embeddings = getattr(getattr(tower, "vision_model", tower), "embeddings", None)
    return hasattr(embeddings, "class_embedding") or hasattr(embeddings, "cls_token")


def resume_layers(layers: Sequence[nn.Module], hidden: torch.Tensor, keep: list[torch.Tensor],
                  has_cls: bool) -> torch.Tensor:
    """Run a tower's ``layers`` over each tile's kept patches only (the early drop), in any engine.

    Args:
        layers: the tower layers after the one the tokens were chosen at, up to the feature layer.
        hidden: ``(B, [1 +] N, D)`` the output of the layer the tokens were chosen at, for ``B`` tiles (its CLS
            token first where the tower has one).
        keep: per tile, the ascending patch indices (in ``0..N-1``) that go on; the CLS token always does.
        has_cls: whether token 0 of ``hidden`` is a CLS token.

    Returns:
        ``(B, N, D)`` the last layer's output at each tile's kept patches, zeros at the others. Tiles that keep
        as many patches run as one batch; each layer is called as the tower's encoder calls it (with no
        attention mask: a vision tower attends to every token of its tile).
    """
    first = 1 if has_cls else 0
    batch, _, width = hidden.shape
    out = hidden.new_zeros(batch, hidden.shape[1] - first, width)
    sizes: dict[int, list[int]] = {}
    for tile, patches in enumerate(keep):
        sizes.setdefault(len(patches), []).append(tile)
    for size, tiles in sizes.items():
        if size == 0:
            continue  # a tile whose share is nothing runs no further
        rows = torch.tensor(tiles, device=hidden.device)
        patches = torch.stack([keep[tile] for tile in tiles]).to(hidden.device)
        tokens = patches + first
        if first:
            tokens = torch.cat([tokens.new_zeros(len(tiles), 1), tokens], dim=1)
        states = hidden[rows[:, None], tokens]
        for layer in layers:
            states = _output(layer(states, *[None] * _required_after_input(layer)))
        out[rows[:, None], patches] = states[:, first:]
    return out


class VisionProbe:
    """Reads features, keys and CLS attention out of a ViT from transformers (CLIP, DINOv2, SigLIP, ...).

    Args:
        tower: the vision tower module, called as ``tower(pixel_values=...)``.
        num_heads: attention heads per layer (default: the tower config's ``num_attention_heads``).
        has_cls: whether token 0 of every layer is a CLS token (default: read off the embeddings).
        call: runs the tower on pixel values (default: as a transformers model is called; vLLM's towers take
            other arguments).

    Raises:
        ValueError: the tower's layers or their query/key projections cannot be found.
    """

    def __init__(self, tower: nn.Module, num_heads: int | None = None, has_cls: bool | None = None,
                 call: Callable[[torch.Tensor], Any] | None = None) -> None:
        self.tower = tower
        self.call = call  # None: as a transformers model (kept picklable: a patched model is saved with it)
        self.num_heads = int(tower.config.num_attention_heads if num_heads is None else num_heads)
        self.has_cls = tower_has_cls(tower) if has_cls is None else has_cls
        # Runs reused across settings over the same pixels (see hired.share_tower_runs); None: no reuse.
        self.shared_runs: dict | None = None
        body = getattr(tower, "vision_model", tower)
        self.encoder, self.layers_attribute = self._find_layers(body)
        self.projections = []
        for index, layer in enumerate(self.layers):
            query = _first(_find(layer, QUERY_NORM_NAMES, nn.Module), _find(layer, QUERY_NAMES))
            key = _first(_find(layer, KEY_NORM_NAMES, nn.Module), _find(layer, KEY_NAMES))
            if query is None or key is None:
                fused = _find(layer, FUSED_NAMES)
                if fused is None:
                    raise ValueError(
                        f"layer {index} of {type(tower).__name__} has neither separate query/key projections "
                        f"(looked for {QUERY_NAMES} and {KEY_NAMES}) nor a fused one ({FUSED_NAMES})"
                    )
                self.projections.append(_Projection(fused, None))
            else:
                self.projections.append(_Projection(query, key))

    @staticmethod
    def _find_layers(body: nn.Module) -> tuple[nn.Module, str]:
        encoder = getattr(body, "encoder", None)
        for attribute in ("layers", "layer"):
            if isinstance(getattr(encoder, attribute, None), nn.ModuleList):
                return encoder, attribute
        if isinstance(getattr(body, "blocks", None), nn.ModuleList):  # Qwen2.5-VL's ViT
            return body, "blocks"
        raise ValueError(f"cannot find the transformer layers of {type(body).__name__} (expected encoder.layers "
                         "or blocks)")

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

    def resume(self, hidden: torch.Tensor, keep: list[torch.Tensor], start: int, end: int) -> torch.Tensor:
        """Run layers ``start + 1`` to ``end`` over each tile's kept patches only (the early drop): see
        :func:`resume_layers`, whose arguments ``hidden`` and ``keep`` are; ``start`` is the layer the tokens were
        chosen at, ``end`` the last layer to run (the feature layer)."""
        return resume_layers(list(self.layers)[start + 1:end + 1], hidden, keep, self.has_cls)

    def resolve_score(self, score: str) -> str:
        """``"auto"`` -> ``"cls"`` on a tower with a CLS token, the CLS-free default without; others as given.

        Raises:
            ValueError: an unknown score, or ``"cls"`` on a tower without a CLS token.
        """
        if score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
        if score == "auto":
            return "cls" if self.has_cls else CLS_FREE_SCORE
        if score == "cls" and not self.has_cls:
            raise ValueError(
                f"score='cls' reads CLS attention, but this {type(self.tower).__name__} has no CLS token; use "
                f"score='auto' (here {CLS_FREE_SCORE!r}) or another CLS-free score: "
                f"{', '.join(s for s in SCORES if s not in ('auto', 'cls'))}"
            )
        return score

    def run(
        self,
        pixel_values: torch.Tensor,
        feature_layer: int,
        distribution_layer: int,
        selection_layer: int,
        aggregation: str = "sum",
        score: str = "auto",
    ) -> TowerRun:
        """Run the tower through ``max(layers) + 1`` layers and collect what methods read.

        ``score`` picks the attention scores (see :meth:`resolve_score`). With :attr:`shared_runs`
        set, a run for the same pixels and settings is computed once.
        """
        arguments = (feature_layer, distribution_layer, selection_layer, aggregation, self.resolve_score(score))
        if self.shared_runs is None:
            return self._run(pixel_values, *arguments)
        pixels = pixel_values.detach().cpu().contiguous()
        digest = hashlib.sha1(pixels.view(torch.uint8).numpy().tobytes()).hexdigest()
        key = (digest, tuple(pixels.shape), str(pixels.dtype), arguments)
        if key not in self.shared_runs:
            self.shared_runs[key] = self._run(pixel_values, *arguments)
        return self.shared_runs[key]

    def _run(self, pixel_values, feature_layer, distribution_layer, selection_layer, aggregation, score) -> TowerRun:
        layers = [index % self.num_layers for index in (feature_layer, distribution_layer, selection_layer)]
        feature_layer, distribution_layer, selection_layer = layers
        captured: dict[str, torch.Tensor] = {}

        def keep(name):
            def hook(module, inputs, output):
                captured[name] = _output(output)

            return hook

        handles = [self.layers[feature_layer].register_forward_hook(keep("features"))]
        for prefix, layer in (("distribution", distribution_layer), ("selection", selection_layer)):
            projection = self.projections[layer]
            handles.append(projection.query.register_forward_hook(keep(f"{prefix}_q")))
            if projection.key is not None:
                handles.append(projection.key.register_forward_hook(keep(f"{prefix}_k")))
        try:
            with self._truncated(max(layers) + 1):
                if self.call is None:
                    self.tower(pixel_values=pixel_values, output_hidden_states=False, return_dict=True)
                else:
                    self.call(pixel_values)
        finally:
            for handle in handles:
                handle.remove()
        first = 1 if self.has_cls else 0
        hidden = captured["features"]
        return run_from_attention(
            hidden[:, first:], hidden,
            self.projections[distribution_layer].split(captured, "distribution"),
            self.projections[selection_layer].split(captured, "selection"),
            score=score, num_heads=self.num_heads, aggregation=aggregation, skip=first,
        )
