"""The one generic apply / remove path, and what a model family's adapter declares.

``apply`` swaps the class of the inner model (the module that holds the vision tower, the projector
and the language model) and of the processor in place: nothing is copied or re-initialised. The
swapped model overrides ``get_image_features``, the one method both ``forward`` and ``generate``
use to encode images; the swapped processor emits exactly as many image placeholders as the model
will return features. A family adapter (one file in this package) says how its classes do that.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import weakref
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .. import compat
from ..config import HiredConfig
from ..geometry import PartitionGeometry
from ..methods import Method, Selection, VisionEvidence, get_method
from ..signals import TowerRun, VisionProbe
from ..state import CONFIG_KEY, ModelState, SelectionRecord
from . import decoder_pruning


@dataclass
class ImageCall:
    """One ``get_image_features`` call, normalised by the family adapter.

    Attributes:
        tiles: per image, its ``(P, C, T, T)`` partitions in the order of its geometry.
        geometries: per image, its partition geometry.
        image_sizes: per image, its original ``(height, width)``, ``None`` where the model was not told
            (LLaVA-1.5 inputs made by a stock processor); used for the stock packing and the records.
        vision_feature_layer: the layer the call asks features from.
        stock: runs the stock ``get_image_features`` with the same arguments.
        feature_norm: a norm the stock model applies to the feature layer's output (InternViT's final
            norm when it takes the last layer), ``None`` when it takes the output as it is.
    """

    tiles: list[torch.Tensor]
    geometries: list[PartitionGeometry]
    image_sizes: list[tuple[int, int] | None]
    vision_feature_layer: Any
    stock: Callable[[], BaseModelOutputWithPooling]
    feature_norm: Callable[[torch.Tensor], torch.Tensor] | None = None


class FamilyAdapter:
    """What one model family declares; subclass it in one file and register an instance.

    Class attributes:
        name: the family's name (``"llava-next"``).
        outer_class: the ``...ForConditionalGeneration`` class users load.
        inner_class: the stock inner model class (holds ``vision_tower``, the projector, the LLM).
        hired_inner_class: the swapped inner class, a subclass of ``inner_class`` and :class:`HiredModel`.
        processor_class: the stock processor class.
        hired_processor_class: the swapped processor class, a subclass of ``processor_class`` and
            :class:`HiredProcessor`.
        model_internals: attributes of the inner class the adapter relies on (checked at apply).
        processor_internals: attributes of the processor class it relies on.
        selects_projected: whether :meth:`candidate_tokens` returns LLM embeddings (the stock model
            mixes tokens after projecting them, as LLaVA-OneVision's downsampling does); then
            nothing is projected after selection.
        released_has_cls: whether the vision tower of the family's released checkpoints has a CLS
            token; ``hired inspect``, which loads no model, checks methods against it (``apply`` reads
            the loaded tower instead).
    """

    name: ClassVar[str]
    outer_class: ClassVar[type]
    inner_class: ClassVar[type]
    hired_inner_class: ClassVar[type]
    processor_class: ClassVar[type]
    hired_processor_class: ClassVar[type]
    model_internals: ClassVar[tuple[str, ...]] = ("get_image_features", "get_placeholder_mask")
    processor_internals: ClassVar[tuple[str, ...]] = ()
    selects_projected: ClassVar[bool] = False
    released_has_cls: ClassVar[bool] = True

    # ---- the model side
    def inner(self, model):
        """The inner model of ``model`` (which may be the inner model itself)."""
        return model.model if isinstance(model, self.outer_class) else model

    def geometry(self, config, image_size) -> PartitionGeometry:
        """The partition geometry of an image of ``(height, width)`` under the model ``config``."""
        raise NotImplementedError

    def processor_geometry(self, processor, image_size) -> PartitionGeometry:
        """The geometry this family's processor (stock or patched) gives an image of ``(height, width)``."""
        return self.hired_processor_class.hired_geometry(processor, image_size)

    def released_geometry(self, image_size) -> PartitionGeometry:
        """The geometry of an image under the settings of the family's released checkpoints (no model needed)."""
        raise NotImplementedError

    def vision_probe(self, inner) -> VisionProbe:
        """The probe of the inner model's vision tower (which layers, CLS or not, heads)."""
        raise NotImplementedError

    def feature_layer(self, inner, probe: VisionProbe, vision_feature_layer: Any = None) -> int:
        """The tower layer index whose output the VLM uses as image features."""
        layer = inner.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(
                f"hired supports a single vision_feature_layer, got {layer!r}; set model.config.vision_feature_layer "
                "to one layer index"
            )
        index = layer % (probe.num_layers + 1) - 1
        if not -(probe.num_layers + 1) <= layer <= probe.num_layers or index < 0:
            raise ValueError(
                f"vision_feature_layer={layer} does not select a transformer layer output of a "
                f"{probe.num_layers}-layer vision tower"
            )
        return index

    def check_call(self, inner, probe: VisionProbe) -> None:
        """Refuse model settings the selection cannot honour (called before selecting)."""

    def project(self, inner, features: torch.Tensor) -> torch.Tensor:
        """Features of the tower -> LLM embeddings."""
        return inner.multi_modal_projector(features)

    def tower_runs(self, inner, call: "ImageCall", probe: VisionProbe, **settings: Any) -> list[TowerRun]:
        """One :class:`TowerRun` per image of ``call``, its partitions in the order of its geometry.

        The default runs every image's partitions through ``probe`` as one batch of tiles; a family
        whose tower takes whole images of different sizes (Qwen2.5-VL) runs its own.
        ``settings``: the keywords of :meth:`VisionProbe.run`.
        """
        run = probe.run(torch.cat(call.tiles), **settings)
        runs, start = [], 0
        for geometry in call.geometries:
            runs.append(run[start:start + geometry.num_partitions])
            start += geometry.num_partitions
        return runs

    def image_output(self, inner, output: BaseModelOutputWithPooling, runs: list[TowerRun],
                     kept: list[torch.Tensor]) -> BaseModelOutputWithPooling:
        """The output of ``get_image_features`` from the kept features; ``kept``: per image, the
        ``(K, 2)`` ``(partition, index)`` rows of its kept tokens in feeding order. A family whose LLM
        reads more than the features (Qwen3-VL's DeepStack planes) adds them here."""
        return output

    def install(self, inner, state: ModelState) -> list:
        """Hooks a family needs beyond the generic ones, installed at apply; returns their handles (removed with them)."""
        return []

    def candidate_tokens(self, inner, run: TowerRun, geometry: PartitionGeometry, image_size) -> TowerRun:
        """One image's tower run in its geometry's token numbering; as it is where a token is a patch.

        Families whose LLM tokens are not patches (merged groups, interpolated mosaics) rearrange the
        features, scores and keys here, with the stock model's own arithmetic.
        """
        return run

    def pack_stock(self, inner, run: TowerRun, geometry: PartitionGeometry, image_size) -> torch.Tensor:
        """One image's tokens, from its tower run, as the stock model feeds them (separators included)."""
        raise NotImplementedError

    # ---- the processor side
    def partition_pixels(self, inputs) -> torch.Tensor:
        """``(P, C, T, T)``: the first image's partitions in ``inputs`` (a processor's output), in geometry order."""
        pixels = inputs["pixel_values"]
        return pixels[0] if pixels.dim() == 5 else pixels

    def check_processor(self, inner, processor) -> None:
        """Refuse a processor that does not match the model (called at apply)."""

    @staticmethod
    def check_tile(processor_tile: int, tower_tile: int) -> None:
        """Refuse a processor whose tiles are not the size the vision tower takes."""
        if processor_tile != tower_tile:
            raise ValueError(f"the processor cuts {processor_tile} px tiles but the vision tower takes {tower_tile} px; "
                             "use the processor saved with this model")


class HiredModel:
    """Mixed into the swapped inner model: select, project, record. Families call :meth:`_hired_features`."""

    _hired: ModelState

    def _begin_image_call(self) -> None:
        """Families call this first in ``get_image_features``: a call that fails leaves no records of an earlier one."""
        self._hired.records = []

    def _hired_features(self, call: ImageCall) -> BaseModelOutputWithPooling:
        state = self._hired
        config = state.config
        family = state.family
        method = get_method(config.method)
        budgets = [config.budget_for(g.stock_tokens) for g in call.geometries]

        if not method.selects_before_llm or all(_keeps_all(b, g) for b, g in zip(budgets, call.geometries)):
            output = call.stock()
            state.records = [_full_record(g, size, method.name, g.stock_tokens + g.newline_tokens)
                             for g, size in zip(call.geometries, call.image_sizes)]
            return output

        family.check_call(self, state.probe)
        probe = state.probe
        feature_layer = family.feature_layer(self, probe, call.vision_feature_layer)
        layers = config.method_options.signal_layers()
        runs = family.tower_runs(
            self, call, probe,
            feature_layer=feature_layer,
            distribution_layer=layers.distribution,
            selection_layer=feature_layer if layers.selection is None else layers.selection,
            aggregation=layers.aggregation,
            score=layers.score,
        )
        if call.feature_norm is not None:  # runs may be shared: no edits in place
            runs = [dataclasses.replace(run, features=call.feature_norm(run.features)) for run in runs]
        outputs, records, kept_rows = [], [], []
        for run, geometry, budget, image_size in zip(runs, call.geometries, budgets, call.image_sizes):
            if _keeps_all(budget, geometry):
                packed = family.pack_stock(self, run, geometry, image_size)
                outputs.append(packed)
                records.append(_full_record(geometry, image_size, method.name, len(packed)))
                kept_rows.append(geometry.stock_order([row.nonzero().flatten() for row in geometry.candidates]))
                continue
            tokens = family.candidate_tokens(self, run, geometry, image_size)
            evidence = VisionEvidence(
                geometry=geometry,
                features=tokens.features,
                distribution_scores=tokens.distribution_scores,
                selection_scores=tokens.selection_scores,
                keys=tokens.keys,
            )
            selection, chosen = method.choose(evidence, budget, config.method_options)
            outputs.append(chosen if family.selects_projected else family.project(self, chosen))
            records.append(_record(evidence, image_size, selection, method.name, chosen.shape[0], run.score))
            kept_rows.append(geometry.stock_order(selection.kept))
        state.records = records
        output = BaseModelOutputWithPooling(last_hidden_state=torch.cat([run.hidden for run in runs]), pooler_output=outputs)
        return family.image_output(self, output, runs, kept_rows)

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features):
        if input_ids is None:
            image_embedding = self.get_input_embeddings()(
                torch.full((), self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
            )
            mask = (inputs_embeds == image_embedding).all(-1)
        else:
            mask = input_ids == self.config.image_token_id
        check_counts(self._hired.records, int(mask.sum()), image_features.shape[:-1].numel())  # InternVL's are per tile
        return mask.unsqueeze(-1).expand_as(inputs_embeds).to(inputs_embeds.device)


class HiredProcessor:
    """Mixed into the swapped processor: the placeholder count for an image size.

    Videos are never pruned. A family whose model takes videos as an input of their own
    (``pixel_values_videos``, encoded by ``get_video_features``, which the patched model leaves stock)
    sets ``passes_videos``: its processor expands them with the stock count, so that one prompt may hold
    pruned images and stock videos, as the patched model feeds them. The other families' processors
    refuse videos, since their models have no video input to leave stock: the stock LLaVA and
    LLaVA-NeXT processors would drop the videos without a word, and InternVL's feeds a video's frames
    as image tiles, which its model cannot tell from images.
    """

    hired_config: HiredConfig
    _stock_class: ClassVar[type]
    passes_videos: ClassVar[bool] = False

    def hired_geometry(self, image_size: Sequence[int]) -> PartitionGeometry:
        """The geometry of an image of this ``(height, width)`` under this processor's settings."""
        raise NotImplementedError

    def hired_tokens(self, image_size: Sequence[int]) -> int | None:
        """Placeholders needed for an image of this ``(height, width)``; ``None`` for the stock count."""
        return self.kept_tokens(self.hired_geometry(image_size))

    def kept_tokens(self, geometry: PartitionGeometry) -> int | None:
        """Placeholders needed for an image of this geometry; ``None`` for the stock count."""
        self.hired_config.require_fixed_count()  # hired.apply checks this; a config set by hand is caught here
        budget = self.hired_config.budget_for(geometry.stock_tokens)
        return None if budget >= geometry.stock_tokens else budget

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is None:
            return super().__call__(images=images, text=text, **kwargs)
        if not self.passes_videos:
            raise ValueError(
                f"hired prunes the tokens of images, not of videos, and passes videos through to the stock model "
                f"only where it takes them as videos, which a {self._stock_class.__name__}'s model does not; pass "
                "the frames as images, or run videos on the stock model (hired.remove(model, processor))"
            )
        return super().__call__(images=images, text=text, videos=videos, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["processor_class"] = self._stock_class.__name__
        return output


def _keeps_all(budget: int | None, geometry: PartitionGeometry) -> bool:
    return budget is not None and budget >= geometry.stock_tokens


def check_counts(records: list[SelectionRecord], placeholders: int, features: int) -> None:
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


def _checked_expand(model, input_ids, mm_encoder_output, expand_size=1, inputs_embeds=None):
    """generate's per-sequence split of image features (beam search), with the count check first.

    Installed on the outer model as a ``functools.partial`` (not a closure), so that ``torch.save``
    and ``copy.deepcopy`` of a patched model work and a copy checks against its own records.
    """
    image = mm_encoder_output.get("image")
    if image is not None and input_ids is not None and input_ids.numel():
        placeholders = int((input_ids == model.config.image_token_id).sum())
        check_counts(model.model._hired.records, placeholders, sum(len(f) for f in image.pooler_output))
    return type(model)._expand_multimodal_outputs(model, input_ids, mm_encoder_output, expand_size=expand_size,
                                                  inputs_embeds=inputs_embeds)


def _forget_records_of_earlier_calls(state: ModelState, positional: tuple[str, ...], module, args, kwargs):
    """Forward pre-hook: a call that starts a sequence forgets the records of earlier calls.

    Its own images are encoded after this (from ``pixel_values``), or were just encoded for it
    (``generate`` passes them as ``mm_encoder_outputs``), or are already in ``inputs_embeds``
    without ``input_ids`` (``hired.adaptive.prepare_inputs``); only the first two kinds of call
    and text-only calls can be told apart, so the last keeps its records. ``positional`` names the
    forward's positional parameters, for callers that pass them so.
    """
    arguments = {**dict(zip(positional, args)), **kwargs}
    encoded = arguments.get("mm_encoder_outputs") or {}
    if encoded.get("image") is not None or (arguments.get("input_ids") is None and arguments.get("inputs_embeds") is not None):
        return None
    cache = compat.cache_from_kwargs(arguments)
    if cache is None or cache.get_seq_length() == 0:
        state.records = []
    return None


def positional_names(function) -> tuple[str, ...]:
    """The names of a method's positional parameters, ``self`` left out."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in inspect.signature(function).parameters.values() if p.kind in kinds]
    return tuple(names[1:])  # without self


def _full_record(geometry: PartitionGeometry, image_size, method: str, fed: int) -> SelectionRecord:
    candidates = geometry.candidates
    kept = [row.nonzero().flatten() for row in candidates]
    return _make_record(geometry, image_size, method, fed, candidates.sum(dim=1), kept, None, None,
                        {"stock_model": True})


def _record(evidence: VisionEvidence, image_size, selection: Selection, method: str, fed: int,
            score: str | None) -> SelectionRecord:
    distribution = None if evidence.distribution_scores is None else evidence.distribution_scores[0].detach()
    scores = None if evidence.selection_scores is None else evidence.selection_scores.detach()
    return _make_record(evidence.geometry, image_size, method, fed, selection.budgets, selection.kept, distribution,
                        scores, {"score": score, **selection.extras})


def _make_record(geometry, image_size, method, fed, budgets, kept, distribution, selection, extras) -> SelectionRecord:
    return SelectionRecord(
        image_size=None if image_size is None else tuple(image_size),
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


# --------------------------------------------------------------------------------------------
# apply / remove


def check_cls_need(method: Method, has_cls: bool, tower: str) -> None:
    """Refuse a method that scores tokens by CLS attention for a vision tower without a CLS token.

    ``tower`` names the tower in the message (``"the vision tower of this qwen2.5-vl model"``).
    """
    if method.needs_cls and not has_cls:
        raise ValueError(
            f"method {method.name!r} scores tokens by CLS attention and has no CLS-free form, but {tower} has no CLS "
            "token; choose a method that needs none (hired and visionzip use a CLS-free score there; divprune, random "
            "and spatial need no attention)"
        )


def _check_internals(family: FamilyAdapter, model, inner, processor) -> None:
    """Raise a clear error when an internal the adapter relies on is gone from this transformers."""
    for name in family.model_internals:
        compat.require_attribute(inner if name == "multi_modal_projector" else family.inner_class, name,
                                 "selecting image features")
    if model is not inner:
        compat.require_attribute(type(model), "_expand_multimodal_outputs",
                                 "checking placeholder and feature counts in generate")
    if processor is not None:
        for name in family.processor_internals:
            compat.require_attribute(family.processor_class, name, "emitting the kept number of image placeholders")
    compat.warn_if_untested()


def apply(family: FamilyAdapter, model, processor, config: HiredConfig):
    """Patch ``model`` (and ``processor``) in place; see :func:`hired.apply`."""
    inner = family.inner(model)
    if processor is not None and not isinstance(processor, family.processor_class):
        raise TypeError(f"{type(inner).__name__} needs a {family.processor_class.__name__}, got {type(processor).__name__}")
    _check_internals(family, model, inner, processor)
    method = get_method(config.method)
    options = config.method_options
    if processor is not None:
        config.require_fixed_count()
    probe = family.vision_probe(inner)
    check_cls_need(method, probe.has_cls, f"the vision tower of this {family.name} model")
    feature_layer = family.feature_layer(inner, probe)
    layers = options.signal_layers()
    if method.selects_before_llm:
        family.check_call(inner, probe)  # settings of the model itself, refused here rather than at generate
        probe.resolve_score(layers.score)  # score='cls' on a tower without a CLS token is refused here
    for name, value in (("distribution_layer", layers.distribution), ("selection_layer", layers.selection)):
        if value is not None and not -probe.num_layers <= value < probe.num_layers:
            raise ValueError(
                f"{name}={value} is out of range for a vision tower of {probe.num_layers} layers "
                f"(valid: {-probe.num_layers}..{probe.num_layers - 1}; the feature layer is {feature_layer})"
            )
    if processor is not None:
        family.check_processor(inner, processor)
    llm_pruning = decoder_pruning.prepare(inner, method, options) if method.stage == "llm" else None

    previous = getattr(inner, "_hired", None)
    earlier_processor = previous.paired_processor() if isinstance(previous, ModelState) else None
    if earlier_processor is not None and earlier_processor is not processor:
        _restore_processor(earlier_processor)  # it would emit the old count beside the new configuration
    _uninstall_hooks(inner)
    if isinstance(processor, HiredProcessor):
        processor.__class__ = processor._stock_class
    if processor is not None:
        processor.__class__ = family.hired_processor_class
        processor.hired_config = config
    compat.save_under_stock_names(family.inner_class, family.hired_inner_class)
    inner.__class__ = family.hired_inner_class
    state = ModelState(family, config, probe, weakref.ref(processor) if processor is not None else None)
    inner._hired = state
    if llm_pruning is not None:
        state.llm_pruning = llm_pruning
        decoder_pruning.install(inner, llm_pruning, config, records=functools.partial(getattr, state, "records"))
    state.handles.append(inner.register_forward_pre_hook(
        functools.partial(_forget_records_of_earlier_calls, state, positional_names(family.inner_class.forward)),
        with_kwargs=True,
    ))
    state.handles.extend(family.install(inner, state))
    if model is not inner:
        model._expand_multimodal_outputs = functools.partial(_checked_expand, model)
    for holder in {id(model.config): model.config, id(inner.config): inner.config}.values():
        setattr(holder, CONFIG_KEY, config.to_dict())
    return model, processor


def remove(family: FamilyAdapter, model, processor=None):
    """Restore the stock classes of ``model`` and of ``processor``; see :func:`hired.remove`."""
    inner = family.inner(model)
    state = getattr(inner, "_hired", None)
    if processor is None and isinstance(state, ModelState):
        processor = state.paired_processor()
    _uninstall_hooks(inner)
    model.__dict__.pop("_expand_multimodal_outputs", None)
    if type(inner) is not family.inner_class:
        inner.__class__ = family.inner_class
        inner.__dict__.pop("_hired", None)
    for holder in {id(model.config): model.config, id(inner.config): inner.config}.values():
        if hasattr(holder, CONFIG_KEY):
            delattr(holder, CONFIG_KEY)
    if isinstance(processor, HiredProcessor):
        _restore_processor(processor)
    return model, processor


def _restore_processor(processor: HiredProcessor) -> None:
    processor.__class__ = processor._stock_class
    del processor.hired_config


def _uninstall_hooks(inner) -> None:
    state = getattr(inner, "_hired", None)
    if not isinstance(state, ModelState):
        return
    if state.llm_pruning is not None:
        decoder_pruning.uninstall(state.llm_pruning)
        state.llm_pruning = None
    for handle in state.handles:
        handle.remove()
    state.handles = []


__all__ = ["FamilyAdapter", "HiredModel", "HiredProcessor", "ImageCall", "apply", "check_cls_need", "check_counts",
           "positional_names", "remove"]
