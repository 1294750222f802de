"""What a model family declares: the :class:`FamilyAdapter` protocol, checked when an adapter is made.

A family writes the required hooks (marked abstract) and class attributes; the optional hooks have
defaults that fit a LLaVA-like model (one ViT over a batch of equal tiles, a projector, patches fed
as LLM tokens). An adapter missing a required part is refused when it is made, in the line that
registers it, with one error naming the family and all it lacks.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..geometry import PartitionGeometry
from ..selecting import Choice, EarlyDrop, runs_per_image
from ..signals import TowerRun, VisionProbe
from ..state import ModelState
from .mixins import HiredModel, HiredProcessor, ImageCall

# The class attributes every adapter sets; the others have defaults.
REQUIRED_ATTRIBUTES = ("name", "outer_class", "inner_class", "hired_inner_class", "processor_class",
                       "hired_processor_class")


class FamilyAdapter(ABC):
    """What one model family declares; subclass it in the family's folder and register an instance.

    Required hooks (abstract): :meth:`geometry`, :meth:`released_geometry`, :meth:`vision_probe`,
    :meth:`pack_stock`; the swapped classes must write ``get_image_features`` (model) and
    ``hired_geometry`` (processor). Optional hooks, with defaults: :meth:`inner`,
    :meth:`processor_geometry`, :meth:`feature_layer`, :meth:`check_call`, :meth:`project`,
    :meth:`tower_runs`, :meth:`image_output`, :meth:`install`, :meth:`candidate_tokens`,
    :meth:`partition_pixels`, :meth:`check_processor`.

    Class attributes (the first six required):
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
        drops_early: whether the default :meth:`tower_runs` may select inside the tower and run the later
            layers over the kept patches only (``HiredConfig.drop_layer``); needs each LLM token to be a
            gather of patches (:meth:`token_patches`).
        tiny_model: where the builder of the family's tiny random test model is, as ``"module:function"``
            with the module relative to the adapter's package (``".tiny:tiny_llava_next"``); it is
            imported on first use only, and :data:`hired.testing.TINY_MODELS` lists it. ``None``: none.
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
    tiny_model: ClassVar[str | None] = None
    drops_early: ClassVar[bool] = False

    def __new__(cls, *args: Any, **kwargs: Any) -> FamilyAdapter:
        # Before Python's own refusal of an abstract class, which names neither the family nor its attributes.
        missing = missing_parts(cls)
        if missing:
            name = getattr(cls, "name", None)
            family = f"{name!r} ({cls.__name__})" if isinstance(name, str) else cls.__name__
            raise TypeError(f"family {family} cannot be registered: it lacks {'; '.join(missing)}")
        return super().__new__(cls)

    # ---- the model side
    def inner(self, model):
        """The inner model of ``model`` (which may be the inner model itself)."""
        return model.model if isinstance(model, self.outer_class) else model

    @abstractmethod
    def geometry(self, config, image_size) -> PartitionGeometry:
        """The partition geometry of an image of ``(height, width)`` under the model ``config``."""

    def processor_geometry(self, processor, image_size) -> PartitionGeometry:
        """The geometry this family's processor (stock or patched) gives an image of ``(height, width)``."""
        return self.hired_processor_class.hired_geometry(processor, image_size)

    @abstractmethod
    def released_geometry(self, image_size) -> PartitionGeometry:
        """The geometry of an image under the settings of the family's released checkpoints (no model needed)."""

    @abstractmethod
    def vision_probe(self, inner) -> VisionProbe:
        """The probe of the inner model's vision tower (which layers, CLS or not, heads)."""

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

    def drop_layer(self, inner, probe: VisionProbe, drop_layer: int | None, feature_layer: int) -> int:
        """The tower layer index the method selects at: ``drop_layer`` (``HiredConfig.drop_layer``) resolved, or
        ``feature_layer`` when it is ``None``. By default any layer up to the feature layer in a family that
        :attr:`drops_early`, none in the others.

        Raises:
            ValueError: a layer this family cannot drop at.
        """
        if drop_layer is None:
            return feature_layer
        if not self.drops_early:
            raise ValueError(f"drop_layer={drop_layer}: the early drop inside the vision tower is not offered for "
                             f"{self.name} models (its LLM tokens are not gathers of the tower's patches); drop the "
                             "setting")
        count = probe.num_layers
        if not -count <= drop_layer < count or drop_layer % count > feature_layer:
            raise ValueError(f"drop_layer={drop_layer} is out of range: this {self.name} model takes its features from "
                             f"layer {feature_layer} of {count}, so drop at a layer from {-count} to {feature_layer}")
        return drop_layer % count

    def token_patches(self, inner, patches: int) -> torch.Tensor:
        """``(T, m)``: the tower patches (of ``patches`` per tile) that make each LLM token of a tile, in the
        geometry's token numbering; by default each token is its patch."""
        return torch.arange(patches)[:, None]

    def check_call(self, inner, probe: VisionProbe) -> None:
        """Refuse model settings the selection cannot honour (called before selecting)."""

    def project(self, inner, features: torch.Tensor) -> torch.Tensor:
        """Features of the tower -> LLM embeddings."""
        return inner.multi_modal_projector(features)

    def tower_runs(self, inner, call: ImageCall, probe: VisionProbe, **settings: Any) -> list[TowerRun]:
        """One :class:`TowerRun` per image of ``call``, its partitions in the order of its geometry.

        The default runs every image's partitions through ``probe`` as one batch of tiles; a family
        whose tower takes whole images of different sizes (Qwen2.5-VL) runs its own.
        ``settings``: the keywords of :meth:`VisionProbe.run`, and ``drop`` (a
        :class:`hired.selecting.EarlyDrop`) in a family whose :meth:`drop_layer` accepts one.
        """
        drop: EarlyDrop | None = settings.pop("drop", None)
        tiles = torch.cat(call.tiles)
        if drop is None:
            return runs_per_image(probe.run(tiles, **settings), call.geometries)
        feature_layer = settings.pop("feature_layer")
        run = probe.run(tiles, feature_layer=drop.layer, **settings)
        drop.choices = drop.choose(runs_per_image(run, call.geometries))
        keep = self.kept_patches(inner, run.features.shape[1], call.geometries, drop.choices)
        features = probe.resume(run.hidden, keep, drop.layer, feature_layer)
        return runs_per_image(dataclasses.replace(run, features=features, hidden=features), call.geometries)

    def kept_patches(self, inner, patches: int, geometries, choices: list[Choice | None]) -> list[torch.Tensor]:
        """Per tile of the call, the patches that run on past the drop: those of its kept tokens, or every patch of
        an image fed whole (which then runs as in the stock tower)."""
        parts = self.token_patches(inner, patches)
        keep = []
        for geometry, choice in zip(geometries, choices):
            for partition in range(geometry.num_partitions):
                if choice is None:
                    keep.append(torch.arange(patches))
                else:
                    keep.append(torch.sort(parts[choice.selection.kept[partition]].flatten()).values)
        return keep

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

    @abstractmethod
    def pack_stock(self, inner, run: TowerRun, geometry: PartitionGeometry, image_size) -> torch.Tensor:
        """One image's tokens, from its tower run, as the stock model feeds them (separators included)."""

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


def missing_parts(cls: type[FamilyAdapter]) -> list[str]:
    """What an adapter class lacks of the protocol: required hooks and class attributes, the swapped classes' methods."""
    missing = [f"the hook {name}" for name in sorted(getattr(cls, "__abstractmethods__", ()))]
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        missing.append("the class attribute name (a non-empty str)")
    classes = {attribute: getattr(cls, attribute, None) for attribute in REQUIRED_ATTRIBUTES[1:]}
    missing += [f"the class attribute {attribute} (a class)" for attribute, value in classes.items()
                if not isinstance(value, type)]
    swapped = (("hired_inner_class", "inner_class", HiredModel, "get_image_features"),
               ("hired_processor_class", "processor_class", HiredProcessor, "hired_geometry"))
    for attribute, stock_attribute, mixin, method in swapped:
        hired, stock = classes[attribute], classes[stock_attribute]
        if not isinstance(hired, type) or not isinstance(stock, type):
            continue
        if not (issubclass(hired, stock) and issubclass(hired, mixin)):
            missing.append(f"{attribute} as a subclass of {stock_attribute} and {mixin.__name__}")
        elif getattr(hired, method) in (getattr(stock, method, None), getattr(mixin, method, None)):
            missing.append(f"{attribute}.{method} of its own")
    return missing


__all__ = ["REQUIRED_ATTRIBUTES", "FamilyAdapter", "missing_parts"]
