"""FasterVLM (arXiv 2412.01818): the global top-K by feature-layer CLS attention."""

from __future__ import annotations

from ..algorithm import top_k_indices
from .base import Method, NoOptions, Selection, VisionEvidence, register_method
from .common import candidate_positions, check_count, make_selection, split_rows


def select(evidence: VisionEvidence, tokens: int, options: NoOptions) -> Selection:
    geometry = evidence.geometry
    check_count("fastervlm", tokens, geometry)
    rows = candidate_positions(geometry)
    scores = evidence.selection_scores[rows[:, 0], rows[:, 1]]
    return make_selection(geometry, split_rows(geometry, rows[top_k_indices(scores, tokens)]))


FASTERVLM = register_method(
    Method(
        "fastervlm",
        "FasterVLM (arXiv 2412.01818): global top-K by feature-layer CLS attention",
        select=select,
        needs_cls=True,
        paper="FasterVLM, arXiv 2412.01818",
        signal="feature-layer CLS attention",
        partition_policy="global: top-K over all tokens of the image",
    )
)
