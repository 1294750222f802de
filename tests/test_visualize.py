"""`hired show`: the picture of a selection, its size, and bad input."""

import numpy as np
import pytest
from PIL import Image

from hired.cli import main
from hired.config import HiredConfig
from hired.testing import tiny_llava
from hired.visualize import figure_size, show


@pytest.fixture()
def photo(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, size=(500, 1000, 3), dtype=np.uint8)).save(path)
    return path


def test_show_writes_a_png_with_a_column_per_partition(tmp_path, photo, capsys):
    output = tmp_path / "selection.png"
    assert main(["show", str(photo), "--model", "tiny-random", "--budget", "0.1", "-o", str(output)]) == 0
    assert f"wrote {output}" in capsys.readouterr().out
    picture = Image.open(output)
    assert picture.format == "PNG"
    assert picture.size == figure_size(3)  # 1000 x 500 px: base view and a 1x2 grid, plus the overview
    assert figure_size(3) == (1200, 660)
    colours = np.asarray(picture.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(colours, axis=0)) > 100  # images and heat maps, not a blank canvas


def test_show_works_on_a_single_partition_model(tmp_path, photo):
    model, processor = tiny_llava()
    output = tmp_path / "llava.png"
    show(model, processor, Image.open(photo).convert("RGB"), HiredConfig(budget=0.25), output)
    assert Image.open(output).size == figure_size(1)


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda d, p: [str(d / "missing.png")], "image file not found"),
        (lambda d, p: [str(d / "text.png")], "cannot read"),
        (lambda d, p: [str(p), "--method", "nope"], "unknown method 'nope'"),
        (lambda d, p: [str(p), "--method", "full"], "selects no visual tokens"),
        (lambda d, p: [str(p), "--budget", "1.0"], "keeps every token"),
        (lambda d, p: [str(p), "-o", str(d / "out.jpg")], "ending in .png"),
        (lambda d, p: [str(p), "-o", str(d / "text.png" / "out.png")], "is a file, not a folder"),
    ],
)
def test_show_rejects_bad_input_clearly(tmp_path, photo, capsys, make_args, message):
    (tmp_path / "text.png").write_text("not an image")
    args = make_args(tmp_path, photo)
    if "-o" not in args:
        args += ["-o", str(tmp_path / "out.png")]
    assert main(["show", *args, "--model", "tiny-random"]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
