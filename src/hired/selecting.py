"""The one path from a vision tower's outputs to the features an LLM is fed, shared by every engine.

An engine runs its tower its own way (transformers through :class:`hired.signals.VisionProbe` and the
family's hooks, vLLM through its own CLIP modules) into one :class:`~hired.signals.TowerRun` per image,
then hands the runs to :func:`select_images` with two callbacks: how it packs an image that keeps
every token (the stock model's way), and how it projects kept tower features into LLM embeddings.
Everything in between is here, once: each image's count, the method's choice over its
:class:`~hired.methods.VisionEvidence`, and the :class:`~hired.state.SelectionRecord` of each image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .config import HiredConfig
from .geometry import PartitionGeometry
from .methods import Selection, VisionEvidence, get_method
from .methods.common import candidate_positions
from .signals import TowerRun
from .state import SelectionRecord

ImageSize = tuple[int, int] | None
# (an image's tower run, its geometry, its original (height, width) or None) -> what the engine feeds for it.
ImageHook = Callable[[TowerRun, PartitionGeometry, ImageSize], torch.Tensor]


@dataclass
class SelectedImages:
    """What one image call feeds the LLM.

    Attributes:
        features: per image, its ``(K, D)`` LLM embeddings (an image kept whole: as the stock model packs it).
        records: per image, what the method did to it.
        kept_rows: per image, the ``(K, 2)`` ``(partition, index)`` rows of its kept tokens in feeding order.
    """

    features: list[torch.Tensor]
    records: list[SelectionRecord]
    kept_rows: list[torch.Tensor]


@dataclass
class Choice:
    """A method's choice for one image: what it saw and what it kept."""

    evidence: VisionEvidence
    selection: Selection


@dataclass
class EarlyDrop:
    """The early drop of one tower call (``HiredConfig.drop_layer``), handed to a family's tower run.

    The family runs its tower up to :attr:`layer`, hands each image's run at that layer to
    :attr:`choose`, stores the result in :attr:`choices`, and runs the layers after it over the kept
    tokens only (an image fed whole: over every token). Its runs then hold the feature layer's
    output at the kept tokens.

    Attributes:
        layer: the tower layer index the method selects at (the selection layer).
        choose: per image run at that layer -> per image its :class:`Choice`, ``None`` for an image fed whole.
        choices: what :attr:`choose` returned, once the tower ran.
    """

    layer: int
    choose: Callable[[Sequence[TowerRun]], list[Choice | None]]
    choices: list[Choice | None] | None = field(default=None)


def runs_per_image(run: TowerRun, geometries: Sequence[PartitionGeometry]) -> list[TowerRun]:
    """The runs of the images of one tower call over their partitions, concatenated in image order."""
    runs, start = [], 0
    for geometry in geometries:
        runs.append(run[start:start + geometry.num_partitions])
        start += geometry.num_partitions
    return runs


def kept_counts(config: HiredConfig, geometries: Sequence[PartitionGeometry]) -> list[int | None] | None:
    """Per image, the tokens ``config`` keeps of it (``None``: every token, see :meth:`HiredConfig.kept_count`);
    ``None`` altogether for a method in adaptive mode, which chooses each image's count from its pixels."""
    if not config.fixes_count:
        return None
    return [config.kept_count(geometry.stock_tokens) for geometry in geometries]


def all_fed_whole(counts: Sequence[int | None] | None) -> bool:
    """Whether every image of a call keeps all its tokens (:func:`kept_counts`), so that the engine's stock
    image path serves the call."""
    return counts is not None and all(count is None for count in counts)


def select_images(
    runs: Sequence[TowerRun],
    geometries: Sequence[PartitionGeometry],
    image_sizes: Sequence[ImageSize],
    counts: Sequence[int | None] | None,
    config: HiredConfig,
    *,
    pack_stock: ImageHook,
    project: Callable[[torch.Tensor], torch.Tensor] | None,
    candidate_tokens: Callable[[TowerRun, PartitionGeometry, ImageSize], TowerRun] | None = None,
    drop: EarlyDrop | None = None,
) -> SelectedImages:
    """Select each image's tokens from its tower run, and record what was selected.

    Args:
        runs: per image, its tower run, its partitions in the order of its geometry.
        geometries: per image, its partition geometry.
        image_sizes: per image, its original ``(height, width)``, ``None`` where the engine was not told.
        counts: per image, the tokens to keep, ``None`` for every token (:func:`kept_counts` of the
            configuration, or counts an engine fixed per request before the tower ran); ``None``
            altogether when the method chooses each count from the pixels (adaptive mode).
        config: the method and its options.
        pack_stock: an image that keeps every token, as the stock model feeds it (separators included).
        project: kept tower features -> LLM embeddings; ``None`` when the candidates are LLM embeddings
            already (a family that selects projected tokens).
        candidate_tokens: an image's run in its geometry's token numbering (families whose LLM tokens are
            not patches rearrange it); by default the run as it is.
        drop: the early drop the tower made (its choices were made at its layer, ``runs`` hold the feature
            layer's output at the kept tokens); ``None`` when the method chooses here, from ``runs``.

    Raises:
        RuntimeError: a fixed-budget method returned another count than asked (a bug in the method).
    """
    method = get_method(config.method)
    choices = drop.choices if drop is not None else choose_images(runs, geometries, image_sizes, counts, config,
                                                                  candidate_tokens)
    selected = SelectedImages([], [], [])
    for run, geometry, image_size, choice in zip(runs, geometries, image_sizes, choices):
        if choice is None:
            packed = pack_stock(run, geometry, image_size)
            selected.features.append(packed)
            selected.records.append(full_record(geometry, image_size, method.name, len(packed)))
            selected.kept_rows.append(candidate_positions(geometry))
            continue
        tokens = run if candidate_tokens is None else candidate_tokens(run, geometry, image_size)
        chosen = method.feed(choice.selection, tokens.features, geometry)
        selected.features.append(chosen if project is None else project(chosen))
        selected.records.append(selection_record(choice.evidence, image_size, choice.selection, method.name,
                                                 chosen.shape[0], run.score))
        selected.kept_rows.append(geometry.stock_order(choice.selection.kept))
    return selected


def choose_images(
    runs: Sequence[TowerRun],
    geometries: Sequence[PartitionGeometry],
    image_sizes: Sequence[ImageSize],
    counts: Sequence[int | None] | None,
    config: HiredConfig,
    candidate_tokens: Callable[[TowerRun, PartitionGeometry, ImageSize], TowerRun] | None = None,
) -> list[Choice | None]:
    """The method's choice for each image from its tower run (the arguments as for :func:`select_images`);
    ``None`` for an image fed whole."""
    method = get_method(config.method)
    per_image = [None] * len(runs) if counts is None else counts
    choices: list[Choice | None] = []
    for run, geometry, image_size, count in zip(runs, geometries, image_sizes, per_image):
        if counts is not None and count is None:
            choices.append(None)
            continue
        tokens = run if candidate_tokens is None else candidate_tokens(run, geometry, image_size)
        evidence = VisionEvidence(
            geometry=geometry,
            features=tokens.features,
            distribution_scores=tokens.distribution_scores,
            selection_scores=tokens.selection_scores,
            keys=tokens.keys,
        )
        selection = method.decide(evidence, count, config.method_options)
        choices.append(Choice(evidence, selection))
    return choices


def name_drop_layer(records: Sequence[SelectionRecord], layer: int) -> None:
    """Say in each record of an image whose tokens a method chose (not one fed whole) the tower layer it chose them
    at (``HiredConfig.drop_layer`` resolved), in its ``extras``."""
    for record in records:
        if not record.extras.get("stock_model"):
            record.extras["drop_layer"] = layer


def full_record(geometry: PartitionGeometry, image_size: ImageSize, method: str, fed: int) -> SelectionRecord:
    """The record of an image fed whole: every candidate kept, no scores."""
    candidates = geometry.candidates
    kept = [row.nonzero().flatten() for row in candidates]
    return _make_record(geometry, image_size, method, fed, candidates.sum(dim=1), kept, None, None,
                        {"stock_model": True})


def selection_record(evidence: VisionEvidence, image_size: ImageSize, selection: Selection, method: str, fed: int,
                     score: str | None) -> SelectionRecord:
    """The record of an image whose tokens a method selected, with the scores it selected by."""
    distribution = None if evidence.distribution_scores is None else evidence.distribution_scores[0].detach()
    scores = None if evidence.selection_scores is None else evidence.selection_scores.detach()
    return _make_record(evidence.geometry, image_size, method, fed, selection.partition_tokens, selection.kept, distribution,
                        scores, {"score": score, **selection.extras})


def _make_record(geometry, image_size, method, fed, partition_tokens, kept, distribution, selection,
                 extras) -> SelectionRecord:
    return SelectionRecord(
        image_size=None if image_size is None else tuple(image_size),
        grid=geometry.grid,
        method=method,
        visual_tokens=fed,
        stock_tokens=geometry.stock_tokens,
        partition_tokens=partition_tokens,
        kept=kept,
        distribution_scores=distribution,
        selection_scores=selection,
        extras={"newline_tokens": geometry.newline_tokens, **extras},
    )


__all__ = ["Choice", "EarlyDrop", "ImageHook", "SelectedImages", "all_fed_whole", "choose_images", "full_record",
           "kept_counts", "name_drop_layer", "runs_per_image", "select_images", "selection_record"]
