"""The records of one image call, and the check that the prompt's placeholders match the features fed.

The records are built on the selection path every engine shares (:mod:`hired.selecting`); the family
modules import the builders from here.
"""

from __future__ import annotations

from ..selecting import full_record, selection_record
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


__all__ = ["check_counts", "full_record", "selection_record"]
