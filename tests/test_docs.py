"""The documentation that is generated from the code stays in step with it."""

import re
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


# ---- links

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _without_code(text: str) -> str:
    """The page without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} +(.+?) *$", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M),
                              flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_points_to_an_existing_file_and_heading(page):
    broken = []
    for target in LINK.findall(_without_code(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target}: no such heading")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


# ---- the code in docs/architecture.md

PYTHON_BLOCK = re.compile(r"(?:<!-- not runnable: (?P<reason>[^>]+) -->\n)?```python\n(?P<code>.*?)```", re.S)


def test_every_python_block_of_the_architecture_page_runs_in_the_suite():
    """A block is the worked example (run above), a module of the package verbatim, or says why it cannot run."""
    page = (ROOT / "docs/architecture.md").read_text()
    blocks = list(PYTHON_BLOCK.finditer(page))
    assert blocks
    for block in blocks:
        code, first_line = block["code"], block["code"].split("\n", 1)[0]
        if block["reason"]:
            continue
        if first_line == "# my_methods/corners.py":
            continue  # run on every family by test_the_worked_example_of_a_new_method_runs_on_every_family
        assert first_line.startswith("# src/hired/"), (
            f"a python block of docs/architecture.md neither runs nor says why not:\n{code[:200]}")
        source = ROOT / first_line[2:]
        assert code.split("\n", 1)[1] == source.read_text(), f"docs/architecture.md's copy of {source.name} is out of date"
