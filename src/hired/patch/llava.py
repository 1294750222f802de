"""Adapter for Hugging Face transformers' LLaVA-NeXT and LLaVA-1.5.

``apply`` swaps the class of the inner ``LlavaNextModel``/``LlavaModel`` and of the processor in
place (nothing is copied or re-initialised). The swapped model overrides ``get_image_features``,
the one method both ``forward`` and ``generate`` use to encode images; the swapped processor emits
exactly as many image placeholders as the model will return features.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from transformers import (
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaNextForConditionalGeneration,
    LlavaNextModel,
    LlavaNextProcessor,
    LlavaProcessor,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .. import compat
from ..algorithm import AnyresGeometry, stock_order
from ..config import HiredConfig
from ..methods import Selection, VisionEvidence, get_method
from .vision import VisionProbe

CONFIG_KEY = "hired"


@dataclass
class SelectionRecord:
    """What HiRED did to one image in the last call.

    Attributes:
        image_size: original ``(height, width)``.
        grid: AnyRes tile grid ``(rows, cols)``; ``(0, 0)`` for single-partition models.
        method: the method that chose the tokens.
        visual_tokens: features fed to the LLM for this image (newline tokens included when the
            stock model ran).
        stock_tokens: what the stock model would feed, newline tokens not counted.
        budgets: ``(P,)`` tokens kept per partition (base view first).
        kept: kept indices per partition, in that partition's ``s*s`` numbering.
        distribution_scores: ``(s*s,)`` distribution-layer CLS attention of the base view.
        selection_scores: ``(P, s*s)`` selection-layer CLS attention of every partition.
        extras: method-specific fields.
    """

    image_size: tuple[int, int]
    grid: tuple[int, int]
    method: str
    visual_tokens: int
    stock_tokens: int
    budgets: torch.Tensor
    kept: list[torch.Tensor]
    distribution_scores: torch.Tensor | None
    selection_scores: torch.Tensor | None
    extras: dict

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (no score maps)."""
        return {
            "image_size": list(self.image_size),
            "grid": list(self.grid),
            "method": self.method,
            "visual_tokens": self.visual_tokens,
            "stock_tokens": self.stock_tokens,
            "partition_budgets": [int(b) for b in self.budgets],
            **{k: v for k, v in self.extras.items() if isinstance(v, (int, float, str, bool, list))},
        }


class _HiredState:
    """Per-model state: the configuration, the probe of the vision tower, the last records, and the
    processor patched with the model (weakly held, so that ``remove(model)`` can restore it too)."""

    def __init__(self, config: HiredConfig, probe: VisionProbe, processor=None) -> None:
        self.config = config
        self.probe = probe
        self.records: list[SelectionRecord] = []
        self.processor = weakref.ref(processor) if processor is not None else None


# --------------------------------------------------------------------------------------------
# Model side


def _feature_layer_index(vision_feature_layer: Any, num_layers: int) -> int:
    if not isinstance(vision_feature_layer, int):
        raise ValueError(
            f"HiRED supports a single vision_feature_layer, got {vision_feature_layer!r}; "
            "set model.config.vision_feature_layer to one layer index"
        )
    layer = vision_feature_layer % (num_layers + 1) - 1
    if not -(num_layers + 1) <= vision_feature_layer <= num_layers or layer < 0:
        raise ValueError(
            f"vision_feature_layer={vision_feature_layer} does not select a transformer layer output of a "
            f"{num_layers}-layer vision tower"
        )
    return layer


class _HiredMixin:
    """Shared by both model families: encode, score, select, project, record."""

    _hired: _HiredState

    def _pack_stock(self, projected: torch.Tensor, image_size) -> torch.Tensor:
        """One image's projected tokens arranged as the stock model feeds them (newlines included)."""
        raise NotImplementedError

    def _hired_image_features(
        self,
        tiles: list[torch.Tensor],
        geometries: list[AnyresGeometry],
        image_sizes: Sequence | None,
        vision_feature_layer: Any,
        vision_feature_select_strategy: str,
        stock_call,
    ) -> BaseModelOutputWithPooling:
        state = self._hired
        config = state.config
        method = get_method(config.method)
        budgets = [config.budget_for(g.stock_tokens) for g in geometries]

        if method.select is None or all(b >= g.stock_tokens for b, g in zip(budgets, geometries)):
            output = stock_call()
            state.records = [
                _full_record(g, method.name, len(features))
                for g, features in zip(geometries, output.pooler_output)
            ]
            return output

        if vision_feature_select_strategy != "default":
            raise ValueError(
                "HiRED needs vision_feature_select_strategy='default' (the CLS token is dropped from the "
                f"features); this model uses {vision_feature_select_strategy!r}"
            )
        probe = state.probe
        feature_layer = _feature_layer_index(vision_feature_layer, probe.num_layers)
        selection_layer = feature_layer if config.selection_layer is None else config.selection_layer
        run = probe.run(
            torch.cat(tiles),
            feature_layer=feature_layer,
            distribution_layer=config.distribution_layer,
            selection_layer=selection_layer,
            aggregation=config.head_aggregation,
        )
        features = run.features[:, 1:]
        outputs, records, start = [], [], 0
        for geometry, budget, image_size in zip(geometries, budgets, image_sizes or [None] * len(geometries)):
            stop = start + geometry.num_partitions
            if budget >= geometry.stock_tokens:
                projected = self.multi_modal_projector(features[start:stop])
                packed = self._pack_stock(projected, image_size)
                outputs.append(packed)
                records.append(_full_record(geometry, method.name, len(packed)))
                start = stop
                continue
            evidence = VisionEvidence(
                geometry=geometry,
                features=features[start:stop],
                distribution_scores=run.distribution_scores[start:stop],
                selection_scores=run.selection_scores[start:stop],
                keys=run.keys[start:stop],
            )
            selection = method.select(evidence, budget, config)
            chosen = _selected_features(evidence, selection)
            if method.has_fixed_budget(config) and chosen.shape[0] != budget:
                raise RuntimeError(
                    f"method {method.name!r} returned {chosen.shape[0]} tokens for a budget of {budget}; "
                    "this is a bug in the method"
                )
            outputs.append(self.multi_modal_projector(chosen))
            records.append(_record(evidence, selection, method.name, chosen.shape[0]))
            start = stop
        state.records = records
        return BaseModelOutputWithPooling(last_hidden_state=run.features, pooler_output=outputs)

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features):
        if input_ids is None:
            image_embedding = self.get_input_embeddings()(
                torch.full((), self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
            )
            mask = (inputs_embeds == image_embedding).all(-1)
        else:
            mask = input_ids == self.config.image_token_id
        _check_counts(self._hired.records, int(mask.sum()), int(image_features.shape[0]))
        return mask.unsqueeze(-1).expand_as(inputs_embeds).to(inputs_embeds.device)


def _check_counts(records: list[SelectionRecord], placeholders: int, features: int) -> None:
    """Fail clearly when the prompt's image placeholders do not match the features produced."""
    if placeholders == features:
        return
    fed = sum(r.visual_tokens for r in records)
    stock = sum(r.stock_tokens + r.extras.get("newline_tokens", 0) for r in records)
    copies = features // fed if fed and features % fed == 0 else 1  # beam search repeats the images
    cause = (
        "the prompt was expanded by the stock processor"
        if placeholders == stock * copies
        else "the prompt and the images do not match"
    )
    raise ValueError(
        f"the prompt holds {placeholders} image placeholders but HiRED produced {features} image features "
        f"({', '.join(str(r.visual_tokens) for r in records)} per image): {cause}. Prepare inputs with the "
        "processor returned by hired.apply(model, processor), with one <image> token per image."
    )


def _checked_expand(model):
    """Wrap generate's per-sequence split of image features with the count check (beam search)."""
    stock_expand = type(model)._expand_multimodal_outputs

    def expand(input_ids, mm_encoder_output, expand_size=1, inputs_embeds=None):
        image = mm_encoder_output.get("image")
        if image is not None and input_ids is not None and input_ids.numel():
            placeholders = int((input_ids == model.config.image_token_id).sum())
            _check_counts(model.model._hired.records, placeholders, sum(len(f) for f in image.pooler_output))
        return stock_expand(model, input_ids, mm_encoder_output, expand_size=expand_size, inputs_embeds=inputs_embeds)

    return expand


def _selected_features(evidence: VisionEvidence, selection: Selection) -> torch.Tensor:
    if selection.features is not None:
        return selection.features
    order = stock_order(evidence.geometry, selection.kept).to(evidence.features.device)
    return evidence.features[order[:, 0], order[:, 1]]


def _full_record(geometry: AnyresGeometry, method: str, fed: int) -> SelectionRecord:
    candidates = geometry.candidates
    kept = [row.nonzero().flatten() for row in candidates]
    return _make_record(geometry, method, fed, candidates.sum(dim=1), kept, None, None, {"stock_model": True})


def _record(evidence: VisionEvidence, selection: Selection, method: str, fed: int) -> SelectionRecord:
    return _make_record(
        evidence.geometry, method, fed, selection.budgets, selection.kept,
        evidence.distribution_scores[0].detach(), evidence.selection_scores.detach(), selection.extras,
    )


def _make_record(geometry, method, fed, budgets, kept, distribution, selection, extras) -> SelectionRecord:
    return SelectionRecord(
        image_size=geometry.image_size,
        grid=geometry.grid,
        method=method,
        visual_tokens=fed,
        stock_tokens=geometry.stock_tokens,
        budgets=budgets,
        kept=kept,
        distribution_scores=distribution,
        selection_scores=selection,
        extras={"newline_tokens": geometry.newline_tokens, **extras},
    )


class HiredLlavaNextModel(_HiredMixin, LlavaNextModel):
    """``LlavaNextModel`` whose image features are the tokens HiRED keeps."""

    def _geometry(self, image_size) -> AnyresGeometry:
        vision = self.config.vision_config
        return AnyresGeometry.create(
            _as_pair(image_size), vision.image_size, vision.patch_size, self.config.image_grid_pinpoints
        )

    def _pack_stock(self, projected, image_size):
        packed, _ = self.pack_image_features(
            [projected], torch.as_tensor([image_size]), "default", image_newline=self.image_newline
        )
        return packed[0]

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        sizes = [_as_pair(s) for s in image_sizes]
        geometries = [self._geometry(s) for s in sizes]
        if pixel_values.dim() == 5:
            tiles = [pixels[: g.num_partitions] for pixels, g in zip(pixel_values, geometries)]
        elif pixel_values.dim() == 4:
            counts = [g.num_partitions for g in geometries]
            if sum(counts) != pixel_values.shape[0]:
                raise ValueError(
                    f"pixel_values holds {pixel_values.shape[0]} tiles but the image sizes imply {sum(counts)}"
                )
            tiles = list(torch.split(pixel_values, counts))
        else:
            raise ValueError(f"pixel_values must have 4 or 5 dimensions, got shape {tuple(pixel_values.shape)}")
        return self._hired_image_features(
            tiles,
            geometries,
            sizes,
            layer,
            strategy,
            lambda: LlavaNextModel.get_image_features(
                self, pixel_values=pixel_values, image_sizes=image_sizes, vision_feature_layer=layer,
                vision_feature_select_strategy=strategy, **kwargs,
            ),
        )


class HiredLlavaModel(_HiredMixin, LlavaModel):
    """``LlavaModel`` (LLaVA-1.5, one partition) whose image features are the tokens HiRED keeps."""

    def _geometry(self, image_size=None) -> AnyresGeometry:
        vision = self.config.vision_config
        return AnyresGeometry.create((vision.image_size, vision.image_size), vision.image_size, vision.patch_size)

    def _pack_stock(self, projected, image_size):
        return projected[0]

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        if image_sizes is not None:
            raise ValueError("HiRED on LLaVA-1.5 expects square tiles from the stock processor (no image_sizes)")
        geometries = [self._geometry() for _ in range(pixel_values.shape[0])]

        return self._hired_image_features(
            list(pixel_values.unsqueeze(1)), geometries, None, layer, strategy,
            lambda: LlavaModel.get_image_features(
                self, pixel_values=pixel_values, vision_feature_layer=layer,
                vision_feature_select_strategy=strategy, **kwargs,
            ),
        )


def _as_pair(size) -> tuple[int, int]:
    values = size.tolist() if hasattr(size, "tolist") else list(size)
    return int(values[0]), int(values[1])


# --------------------------------------------------------------------------------------------
# Processor side


class _HiredProcessorMixin:
    hired_config: HiredConfig
    _stock_class: type

    def _tile_size(self) -> int:
        crop = getattr(self.image_processor, "crop_size", None)
        crop = dict(crop) if crop is not None and not isinstance(crop, dict) else crop
        if crop and crop.get("height"):
            return int(crop["height"])
        size = self.image_processor.size
        size = dict(size) if not isinstance(size, dict) else size
        return int(size.get("shortest_edge") or size["height"])

    def _pinpoints(self):
        return None

    def hired_tokens(self, image_size: Sequence[int]) -> int | None:
        """Placeholders HiRED needs for an image of this ``(height, width)``; ``None`` for stock."""
        geometry = AnyresGeometry.create(image_size, self._tile_size(), self.patch_size, self._pinpoints())
        budget = self.hired_config.budget_for(geometry.stock_tokens)
        return None if budget >= geometry.stock_tokens else budget

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["processor_class"] = self._stock_class.__name__
        return output


class HiredLlavaNextProcessor(_HiredProcessorMixin, LlavaNextProcessor):
    """``LlavaNextProcessor`` that expands ``<image>`` into exactly the tokens HiRED keeps."""

    _stock_class = LlavaNextProcessor

    def _pinpoints(self):
        return self.image_processor.image_grid_pinpoints

    def _get_number_of_features(self, orig_height: int, orig_width: int, height: int, width: int) -> int:
        # The one count both the prompt expansion and the serving-side token count go through. Callers
        # subtract the CLS token afterwards under the "default" strategy, so it is added back here.
        count = self.hired_tokens((orig_height, orig_width))
        if count is None:
            return super()._get_number_of_features(orig_height, orig_width, height, width)
        return count + (1 if self.vision_feature_select_strategy == "default" else 0)


class HiredLlavaProcessor(_HiredProcessorMixin, LlavaProcessor):
    """``LlavaProcessor`` that expands ``<image>`` into exactly the tokens HiRED keeps."""

    _stock_class = LlavaProcessor

    def _square(self) -> tuple[int, int]:
        return (self._tile_size(), self._tile_size())

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


# --------------------------------------------------------------------------------------------
# apply / remove

_FAMILIES = {
    LlavaNextModel: (HiredLlavaNextModel, LlavaNextProcessor, HiredLlavaNextProcessor),
    LlavaModel: (HiredLlavaModel, LlavaProcessor, HiredLlavaProcessor),
}
_STOCK_OF = {hired: stock for stock, (hired, _, _) in _FAMILIES.items()}


def _inner_model(model) -> LlavaModel | LlavaNextModel:
    if isinstance(model, (LlavaNextForConditionalGeneration, LlavaForConditionalGeneration)):
        return model.model
    if isinstance(model, (LlavaNextModel, LlavaModel)):
        return model
    raise TypeError(
        f"hired supports LlavaNextForConditionalGeneration and LlavaForConditionalGeneration (and their inner "
        f"models), got {type(model).__name__}"
    )


def _stock_family(inner) -> type:
    for hired_class, stock in _STOCK_OF.items():
        if isinstance(inner, hired_class):
            return stock
    for stock in _FAMILIES:
        if type(inner) is stock:
            return stock
    raise TypeError(f"hired cannot patch a subclass it does not know: {type(inner).__name__}")


# Stock methods the swapped classes override or call; private ones may move between releases.
_MODEL_INTERNALS = {
    LlavaNextModel: ("get_image_features", "get_placeholder_mask", "pack_image_features", "multi_modal_projector"),
    LlavaModel: ("get_image_features", "get_placeholder_mask", "multi_modal_projector"),
}
_PROCESSOR_INTERNALS = {
    LlavaNextProcessor: ("_get_number_of_features", "_get_num_multimodal_tokens"),
    LlavaProcessor: ("replace_image_token", "_get_num_multimodal_tokens"),
}


def _check_internals(model, inner, stock: type, processor) -> None:
    """Raise a clear error when an internal the adapter relies on is gone from this transformers."""
    for name in _MODEL_INTERNALS[stock]:
        compat.require_attribute(inner if name == "multi_modal_projector" else stock, name,
                                 "selecting image features")
    if model is not inner:
        compat.require_attribute(type(model), "_expand_multimodal_outputs",
                                 "checking placeholder and feature counts in generate")
    if processor is not None:
        for name in _PROCESSOR_INTERNALS[_FAMILIES[stock][1]]:
            compat.require_attribute(type(processor), name, "emitting the kept number of image placeholders")
    compat.warn_if_untested()


def apply(model, processor=None, config: HiredConfig | None = None):
    """Patch ``model`` (and ``processor``) in place; see :func:`hired.apply`."""
    inner = _inner_model(model)
    stock = _stock_family(inner)
    hired_model_class, stock_processor_class, hired_processor_class = _FAMILIES[stock]
    _check_internals(model, inner, stock, processor if isinstance(processor, stock_processor_class) else None)
    method = get_method(config.method)
    if processor is not None and not method.has_fixed_budget(config):
        raise ValueError(
            f"method {config.method!r} in this mode decides its token count from the pixels, so the processor "
            "cannot emit placeholders ahead of the model; use its fixed-budget mode, or apply it without a "
            "processor and build inputs with hired.patch.adaptive.prepare_inputs(model, processor, images, text)"
        )
    probe = VisionProbe(inner.vision_tower)
    feature_layer = _feature_layer_index(inner.config.vision_feature_layer, probe.num_layers)
    for name in ("distribution_layer", "selection_layer"):
        value = getattr(config, name)
        if value is not None and not -probe.num_layers <= value < probe.num_layers:
            raise ValueError(
                f"{name}={value} is out of range for a vision tower of {probe.num_layers} layers "
                f"(valid: {-probe.num_layers}..{probe.num_layers - 1}; the feature layer is {feature_layer})"
            )
    if processor is not None:
        if not isinstance(processor, stock_processor_class):
            raise TypeError(
                f"{type(inner).__name__} needs a {stock_processor_class.__name__}, got {type(processor).__name__}"
            )
        if processor.patch_size != inner.config.vision_config.patch_size:
            raise ValueError(
                f"processor.patch_size={processor.patch_size} differs from the vision tower's patch size "
                f"{inner.config.vision_config.patch_size}"
            )
        processor.__class__ = hired_processor_class
        processor.hired_config = config
    _uninstall_llm_method(inner)
    inner.__class__ = hired_model_class
    inner._hired = _HiredState(config, probe, processor)
    if method.install is not None:
        method.install(inner, config)
    if model is not inner:
        model._expand_multimodal_outputs = _checked_expand(model)
    model.config.hired = config.to_dict()
    if model.config is not inner.config:
        inner.config.hired = config.to_dict()
    return model, processor


def remove(model, processor=None):
    """Restore the stock classes of ``model`` and of ``processor``.

    Without ``processor``, the processor that ``apply`` patched together with this model is
    restored as well (unless it was patched again for another configuration since), so that a
    stock model is never left beside a processor that emits HiRED's token count.
    """
    inner = _inner_model(model)
    state = getattr(inner, "_hired", None)
    if processor is None and state is not None and state.processor is not None:
        paired = state.processor()
        if paired is not None and getattr(paired, "hired_config", None) is state.config:
            processor = paired
    stock = _stock_family(inner)
    _uninstall_llm_method(inner)
    model.__dict__.pop("_expand_multimodal_outputs", None)
    if type(inner) is not stock:
        inner.__class__ = stock
        del inner._hired
    for config in {id(model.config): model.config, id(inner.config): inner.config}.values():
        if hasattr(config, CONFIG_KEY):
            delattr(config, CONFIG_KEY)
    if processor is not None and isinstance(processor, _HiredProcessorMixin):
        processor.__class__ = processor._stock_class
        del processor.hired_config
    return model, processor


def _uninstall_llm_method(inner) -> None:
    state = getattr(inner, "_hired", None)
    if state is not None:
        method = get_method(state.config.method)
        if method.uninstall is not None:
            method.uninstall(inner)


def _patched_state(model) -> _HiredState:
    state = getattr(_inner_model(model), "_hired", None)
    if state is None:
        raise ValueError("this model is not patched; call hired.apply(model, processor) first")
    return state


def selections(model) -> list[SelectionRecord]:
    """Records of the images in the last call of a patched model."""
    return list(_patched_state(model).records)


def share_tower_runs(model, runs: dict) -> None:
    """Make the patched ``model`` reuse the vision-tower runs kept in ``runs``.

    The tower's output for given pixels and layers does not depend on the method or the budget, so
    a caller that sweeps settings over the same images (``hired eval``, ``hired evidence``) passes
    the same dict after each ``hired.apply``, and the tower runs once per distinct pixel batch. The
    selection itself still runs for every setting.
    """
    state = _patched_state(model)
    compute = state.probe.run

    def run(pixel_values: torch.Tensor, **layers: Any):
        pixels = pixel_values.detach().cpu().contiguous()
        digest = hashlib.sha1(pixels.view(torch.uint8).numpy().tobytes()).hexdigest()
        key = (digest, tuple(pixels.shape), str(pixels.dtype), tuple(sorted(layers.items())))
        if key not in runs:
            runs[key] = compute(pixel_values, **layers)
        return runs[key]

    state.probe.run = run


def stored_config(model) -> HiredConfig | None:
    """The configuration saved on the model config by a previous ``apply``, if any."""
    data = getattr(model.config, CONFIG_KEY, None)
    return None if data is None else HiredConfig.from_dict(dict(data))
