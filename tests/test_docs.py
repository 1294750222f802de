"""The documentation that is generated from the code stays in step with it."""

from pathlib import Path

import pytest
from PIL import Image

from hired.cli.methods import BEGIN, END, markdown_table

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("page", ["README.md", "docs/methods.md"])
def test_methods_table_is_the_registry(page):
    text = (ROOT / page).read_text()
    table = text.split(BEGIN + "\n", 1)[1].split("\n" + END, 1)[0]
    assert table == markdown_table(), "run: hired methods --update README.md docs/methods.md"


def test_the_worked_example_of_a_new_method_runs_on_every_family():
    import torch

    import hired
    from hired.methods import unregister_method
    from hired.testing import TINY_MODELS

    page = (ROOT / "docs/architecture.md").read_text()
    code = page.split("```python\n# my_methods/corners.py\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "docs/architecture.md", "exec"), {})
    try:
        for factory in TINY_MODELS.values():
            model, processor = factory()
            hired.apply(model, processor, method="corners", budget=0.1, margin=3)
            image = Image.new("RGB", (800, 600), "white")
            inputs = processor(images=[image], text=[f"USER: {processor.image_token} what ? ASSISTANT:"], return_tensors="pt")
            with torch.no_grad():
                model(**inputs)
            (record,) = hired.selections(model)
            assert record.method == "corners" and record.visual_tokens == round(0.1 * record.stock_tokens)
        with pytest.raises(ValueError, match="has no options"):
            hired.HiredConfig.create(method="corners", alpha=0.5)
    finally:
        unregister_method("corners")
