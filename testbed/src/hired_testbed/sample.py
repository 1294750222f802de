"""One generated example: an image, a question about it, its answer and where the evidence is."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

Box = tuple[float, float, float, float]


@dataclass
class Sample:
    """A generated image with a question whose evidence regions are known because we drew them.

    Attributes:
        image: the RGB image.
        question: the question text.
        answer: the exact-match answer.
        evidence: boxes ``(x0, y0, x1, y1)`` in pixels of ``image`` that hold the answer; an item
            is one box.
        kind: ``"scene"`` or ``"document"``.
        question_type: e.g. ``"shape"``, ``"colour"``, ``"count"``, ``"read"``.
        meta: generator-specific details (seed, background, ...).
    """

    image: Image.Image
    question: str
    answer: str
    evidence: list[Box]
    kind: str
    question_type: str
    meta: dict = field(default_factory=dict)
