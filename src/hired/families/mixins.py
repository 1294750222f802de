"""The classes mixed into the swapped model and processor: transformers' side of the selection path, and
the placeholder count.

A family's swapped inner model subclasses :class:`HiredModel` and its stock inner class, and writes
``get_image_features``: it normalises the call into an :class:`ImageCall` and hands it to
:meth:`HiredModel._hired_features`, which runs the tower through the family's hooks and hands the
runs to the selection path every engine shares (:func:`hired.selecting.select_images`). The records
of the previous call are forgotten before that method runs, whatever it does, so that a call that
fails leaves none behind.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..config import HiredConfig
from ..geometry import PartitionGeometry
from ..selecting import (EarlyDrop, SelectedImages, all_fed_whole, choose_images, full_record, kept_counts,
                         name_drop_layer, select_images)
from ..signals import TowerRun
from ..state import ModelState
from .records import check_counts


@dataclass
class ImageCall:
    """One ``get_image_features`` call, normalised by the family adapter.

    Attributes:
        tiles: per image, its ``(P, C, T, T)`` partitions in the order of its geometry.
        geometries: per image, its partition geometry.
        image_sizes: per image, its original ``(height, width)``, ``None`` where the model was not told
            (LLaVA-1.5 inputs made by a stock processor); used for the stock packing and the records.
        vision_feature_layer: the layer the call asks features from.
        stock: runs the stock ``get_image_features`` with the same arguments; ``None`` where the engine serves
            images kept whole itself (vLLM decides before it builds the call).
        feature_norm: a norm the stock model applies to the feature layer's output (InternViT's final
            norm when it takes the last layer), ``None`` when it takes the output as it is.
    """

    tiles: list[torch.Tensor]
    geometries: list[PartitionGeometry]
    image_sizes: list[tuple[int, int] | None]
    vision_feature_layer: Any
    stock: Callable[[], BaseModelOutputWithPooling] | None = None
    feature_norm: Callable[[torch.Tensor], torch.Tensor] | None = None


def select_call(family, inner, probe, call: ImageCall, counts: Sequence[int | None] | None,
                config: HiredConfig) -> tuple[list[TowerRun], SelectedImages]:
    """Each image's tower run and selection for ``call``: the path from a family's tower to the kept features that
    both engines take (transformers' :class:`HiredModel`, and vLLM's model of a family whose tower the probe runs).

    Args:
        family: the family adapter (its tower hooks, packing and projection).
        inner: the model its hooks read (transformers' inner model, or vLLM's model class).
        probe: the probe of the model's vision tower.
        call: the images, normalised.
        counts: per image, the tokens to keep (``None`` for every token).
        config: the method and its options.
    """
    family.check_call(inner, probe)
    feature_layer = family.feature_layer(inner, probe, call.vision_feature_layer)
    layers = config.method_options.signal_layers()
    drop_layer = family.drop_layer(inner, probe, config.drop_layer, feature_layer)
    selection_layer = drop_layer if layers.selection is None else layers.selection
    candidate_tokens = functools.partial(family.candidate_tokens, inner)
    drop = None
    if drop_layer != feature_layer:
        drop = EarlyDrop(drop_layer, functools.partial(choose_images, geometries=call.geometries,
                                                       image_sizes=call.image_sizes, counts=counts, config=config,
                                                       candidate_tokens=candidate_tokens))
    settings = {} if drop is None else {"drop": drop}
    runs = family.tower_runs(
        inner, call, probe,
        feature_layer=feature_layer,
        distribution_layer=layers.distribution,
        selection_layer=selection_layer,
        aggregation=layers.aggregation,
        score=layers.score,
        **settings,
    )
    if call.feature_norm is not None:  # runs may be shared: no edits in place
        runs = [dataclasses.replace(run, features=call.feature_norm(run.features)) for run in runs]
    selected = select_images(
        runs, call.geometries, call.image_sizes, counts, config,
        pack_stock=functools.partial(family.pack_stock, inner),
        project=None if family.selects_projected else functools.partial(family.project, inner),
        candidate_tokens=candidate_tokens,
        drop=drop,
    )
    if config.drop_layer is not None:
        name_drop_layer(selected.records, drop_layer)
    return runs, selected


def _beginning_an_image_call(get_image_features: Callable[..., Any]) -> Callable[..., Any]:
    """A family's ``get_image_features`` that first forgets the records of the previous call."""

    # wraps keeps the signature visible: generate picks the arguments it encodes by their names.
    @functools.wraps(get_image_features)
    def wrapper(self: HiredModel, *args: Any, **kwargs: Any) -> Any:
        self._begin_image_call()
        return get_image_features(self, *args, **kwargs)

    return wrapper


class HiredModel:
    """Mixed into the swapped inner model: select, project, record. Families call :meth:`_hired_features`.

    A subclass's own ``get_image_features`` is wrapped when the class is made, so that every call
    starts by forgetting the records of the previous one (:meth:`_begin_image_call`); a family does
    not have to remember to.
    """

    _hired: ModelState

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("get_image_features")
        if own is not None:
            cls.get_image_features = _beginning_an_image_call(own)

    def _begin_image_call(self) -> None:
        """Forget the records of the previous call: a call that fails leaves no records of an earlier one."""
        self._hired.records = []

    def _hired_features(self, call: ImageCall) -> BaseModelOutputWithPooling:
        """The output of ``get_image_features`` for ``call``: the kept tokens of each image, recorded."""
        state = self._hired
        config = state.config
        family = state.family
        counts = kept_counts(config, call.geometries)

        if all_fed_whole(counts):
            output = call.stock()
            state.records = [full_record(g, size, config.method, g.stock_tokens + g.newline_tokens)
                             for g, size in zip(call.geometries, call.image_sizes)]
            return output

        runs, selected = select_call(family, self, state.probe, call, counts, config)
        state.records = selected.records
        output = BaseModelOutputWithPooling(last_hidden_state=torch.cat([run.hidden for run in runs]),
                                            pooler_output=selected.features)
        return family.image_output(self, output, runs, selected.kept_rows)

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
        """The geometry of an image of this ``(height, width)`` under this processor's settings.

        Every family's processor writes it: an adapter whose processor does not is refused when made.
        """
        raise NotImplementedError

    def hired_tokens(self, image_size: Sequence[int]) -> int | None:
        """Placeholders needed for an image of this ``(height, width)``; ``None`` for the stock count."""
        return self.kept_tokens(self.hired_geometry(image_size))

    def kept_tokens(self, geometry: PartitionGeometry) -> int | None:
        """Placeholders needed for an image of this geometry; ``None`` for the stock count."""
        # Refuses adaptive mode: hired.apply checks this already; a config set by hand is caught here.
        return self.hired_config.kept_count(geometry.stock_tokens)

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


__all__ = ["HiredModel", "HiredProcessor", "ImageCall"]
