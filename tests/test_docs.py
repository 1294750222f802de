"""The documentation that is generated from the code stays in step with it."""

from pathlib import Path

import pytest

from hired.cli.methods import BEGIN, END, markdown_table

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("page", ["README.md", "docs/methods.md"])
def test_methods_table_is_the_registry(page):
    text = (ROOT / page).read_text()
    table = text.split(BEGIN + "\n", 1)[1].split("\n" + END, 1)[0]
    assert table == markdown_table(), "run: hired methods --update README.md docs/methods.md"
