"""`hired show`: the picture of a selection, its size, and bad input."""

import numpy as np
import pytest
from PIL import Image

from hired.cli import main
from hired.config import HiredConfig
from hired.families.llava.tiny import tiny_llava
from hired.testing import TINY_MODELS
from hired.visualize import DROPPED_BRIGHTNESS, figure_size, select_tokens, selection_figure, show


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


# (width, height) of images of every orientation, up to the extreme aspect ratios every processor accepts
# (Qwen's refuse a ratio above 200); small enough that no LLaVA-OneVision mosaic is downsampled.
SHAPES = {"portrait": (300, 500), "landscape": (500, 300), "tall 1:4": (120, 480), "wide 5:1": (600, 120)}


@pytest.fixture(scope="module", params=sorted(TINY_MODELS))
def tiny_family(request):
    return TINY_MODELS[request.param]()


def _smooth_photo(width: int, height: int) -> Image.Image:
    """Colour gradients with texture, so that CLS attention and the drawn pixels vary across the image."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rng = np.random.default_rng(1)
    channels = [np.sin(6 * x + 2 * k) * np.cos(5 * y - k) for k in range(3)]
    pixels = 127 + 100 * np.stack(channels, axis=-1) + rng.normal(0, 20, size=(height, width, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def _axis(figure, label: str):
    (axis,) = [axis for axis in figure.axes if axis.get_label() == label]
    return axis


@pytest.mark.parametrize("shape", SHAPES)
def test_every_kept_token_is_drawn_on_its_own_pixels(tiny_family, shape):
    """Each partition's panel outlines exactly its kept tokens, each over the pixels the tower made it from.

    The oracle is the vision tower's own cut: a partition's pixels are a raster of square tokens
    ``pitch`` pixels wide, numbered row-major on a lattice ``side`` wide that spans the longer side of
    the partition (Qwen's native raster is ``rows x cols`` of it; SigLIP's 384 px tiles leave 6 px past
    their 27 patches).
    """
    model, processor = tiny_family
    image = _smooth_photo(*SHAPES[shape])
    record, tiles = select_tokens(model, processor, image, HiredConfig(budget=0.2))
    geometry = processor.hired_geometry((image.height, image.width))
    figure = selection_figure(image, record, geometry, tiles)
    side = geometry.side
    for p, pixels in enumerate(tiles):
        pitch = max(pixels.shape[:2]) // side

        def oracle(index: int) -> tuple[int, int, int, int]:
            row, col = divmod(index, side)
            return col * pitch, row * pitch, (col + 1) * pitch, (row + 1) * pitch

        kept = set(record.kept[p].tolist())
        top = _axis(figure, f"tokens {p}")
        outlines = {tuple(round(v) for v in (r.get_x() + 0.5, r.get_y() + 0.5, r.get_x() + 0.5 + r.get_width(),
                                             r.get_y() + 0.5 + r.get_height())) for r in top.patches}
        assert outlines == {oracle(index) for index in kept}, f"partition {p}"
        drawn = np.asarray(top.images[0].get_array())
        heat = np.ma.filled(_axis(figure, f"scores {p}").images[1].get_array(), np.nan)
        scores = record.selection_scores[p].float().numpy()
        for index in geometry.candidates[p].nonzero().flatten().tolist():
            x0, y0, x1, y1 = oracle(index)
            brightness = 1.0 if index in kept else DROPPED_BRIGHTNESS
            np.testing.assert_allclose(drawn[y0:y1, x0:x1], brightness * pixels[y0:y1, x0:x1], atol=1e-6,
                                       err_msg=f"partition {p}, token {index}")
            np.testing.assert_allclose(heat[y0:y1, x0:x1], scores[index], rtol=1e-6,
                                       err_msg=f"partition {p}, token {index}")


def test_a_downsampled_mosaic_outlines_each_kept_token_as_a_whole_cell():
    """LLaVA-OneVision interpolates a large mosaic down: a token is a cell of several patches, and its outline
    is the cell, not the one patch whose slot it takes."""
    model, processor = TINY_MODELS["llava-onevision"]()
    image = _smooth_photo(1200, 1200)
    record, tiles = select_tokens(model, processor, image, HiredConfig(budget=0.2))
    geometry = processor.hired_geometry((image.height, image.width))
    assert geometry.downsampled is not None
    patch = geometry.tile // geometry.side
    figure = selection_figure(image, record, geometry, tiles)
    for p in range(1, geometry.num_partitions):
        outlines = _axis(figure, f"tokens {p}").patches
        assert len(outlines) == int(record.partition_tokens[p]) > 0
        sizes = {(round(r.get_width(), 6), round(r.get_height(), 6)) for r in outlines}
        assert len(sizes) == 1 and min(sizes.pop()) > 1.2 * patch, f"partition {p}"


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_show_draws_a_tall_native_raster_from_the_command_line(tmp_path, family):
    path = tmp_path / "tall.png"
    _smooth_photo(150, 600).save(path)
    output = tmp_path / "selection.png"
    assert main(["show", str(path), "--model", f"tiny-random-{family}", "--budget", "0.2", "-o", str(output)]) == 0
    picture = Image.open(output)
    assert picture.format == "PNG" and picture.size == figure_size(1)
