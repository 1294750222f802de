"""The records of one image call, and the check that the prompt's placeholders match the features fed."""

from __future__ import annotations

from ..geometry import PartitionGeometry
from ..methods import Selection, VisionEvidence
from ..state import SelectionRecord


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


def full_record(geometry: PartitionGeometry, image_size, method: str, fed: int) -> SelectionRecord:
    """The record of an image fed whole: every candidate kept, no scores."""
    candidates = geometry.candidates
    kept = [row.nonzero().flatten() for row in candidates]
    return _make_record(geometry, image_size, method, fed, candidates.sum(dim=1), kept, None, None,
                        {"stock_model": True})


def selection_record(evidence: VisionEvidence, image_size, selection: Selection, method: str, fed: int,
                     score: str | None) -> SelectionRecord:
    """The record of an image whose tokens a method selected, with the scores it selected by."""
    distribution = None if evidence.distribution_scores is None else evidence.distribution_scores[0].detach()
    scores = None if evidence.selection_scores is None else evidence.selection_scores.detach()
    return _make_record(evidence.geometry, image_size, method, fed, selection.partition_tokens, selection.kept, distribution,
                        scores, {"score": score, **selection.extras})


def _make_record(geometry, image_size, method, fed, partition_tokens, kept, distribution, selection, extras) -> SelectionRecord:
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


__all__ = ["check_counts", "full_record", "selection_record"]
