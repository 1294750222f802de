"""hired's geometry equals the stock processor's and model's for every image size, on every family.

For random image sizes (tiny, large, extreme aspect ratios, and sides just around multiples of the
tile, where grids change), each registered family's tiny model of ``hired.testing.TINY_MODELS`` is
asked what the stock processor does with an image of that size: how many placeholder tokens it
expands ``<image>`` into, how many ViT inputs it makes, and the tile grid or token raster where its
outputs say (``image_sizes`` read by the stock model's own grid rule, ``image_grid_thw``). hired's
geometry of the same size must agree. A new family is covered by naming its tiny model in its
adapter's ``tiny_model``, which ``TINY_MODELS`` lists.
"""

import importlib

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

import hired
from hired.testing import TINY_MODELS

MAX_SIDE = 2400  # past the largest grid of every family (LLaVA-OneVision's 6x6 tiles of 384 px)
# Wider than every grid's aspect ratio (InternVL's 1x12 tiles at most), narrower than the 1:200 the Qwen-VL processors
# refuse; LLaVA-1.5 resizes the short side to 336 px, so a 1:100 image already costs 11 M pixels.
MAX_ASPECT = 100
NEAR_MULTIPLE = 12  # pixels either side of a multiple of the tile side
# A size a user reported, (height, width): 333 px wide, 777 tall; LLaVA-OneVision's stock processor cuts
# 3x1 tiles, hired once chose 2x1 and the model then failed to reshape the tiles.
REPORTED_SIZE = (777, 333)


@pytest.fixture(scope="module", params=sorted(TINY_MODELS))
def family(request):
    """Each family's tiny model and stock processor, built once, with the side of its tiles (``None``: no tiles)."""
    model, processor = TINY_MODELS[request.param]()
    adapter = hired.family_of(model)
    assert adapter.name == request.param, "TINY_MODELS must map each family name to its own model"
    pixels = stock_inputs(processor, 64, 48)["pixel_values"]
    tile = int(pixels.shape[-1]) if pixels.dim() >= 4 else None
    return adapter, model, processor, tile


def stock_inputs(processor, width: int, height: int) -> dict:
    image = Image.new("RGB", (width, height), "gray")  # the geometry depends on the size only
    return processor(images=[image], text=[f"{processor.image_token} what is in the image ?"], return_tensors="pt")


@st.composite
def image_sizes(draw, tile: int | None) -> tuple[int, int]:
    """``(height, width)``: any size up to MAX_SIDE, tiny ones, and sides near a multiple of ``tile``."""
    kinds = [st.integers(1, 64), st.integers(1, MAX_SIDE)]
    if tile is not None:
        kinds.append(st.builds(lambda count, offset: max(1, count * tile + offset),
                               st.integers(1, MAX_SIDE // tile), st.integers(-NEAR_MULTIPLE, NEAR_MULTIPLE)))
    height, width = draw(st.one_of(*kinds)), draw(st.one_of(*kinds))
    short = min(height, width)
    return min(height, short * MAX_ASPECT), min(width, short * MAX_ASPECT)


def stock_layout(model, processor, inputs: dict) -> dict:
    """What the stock processor (and the stock model's grid rule) did with the one image of ``inputs``."""
    pixels = inputs["pixel_values"]
    layout = {"placeholders": int((inputs["input_ids"] == model.config.image_token_id).sum())}
    if "image_grid_thw" in inputs:  # one raster of merged patches at the image's own resolution
        _, rows, cols = (int(v) for v in inputs["image_grid_thw"][0])
        merge = processor.image_processor.merge_size
        layout["partitions"], layout["raster"] = 1, (rows // merge, cols // merge)
    else:
        layout["partitions"] = int(pixels.shape[1] if pixels.dim() == 5 else pixels.shape[0])
    pinpoints = getattr(model.config, "image_grid_pinpoints", None)
    if pinpoints is not None and "image_sizes" in inputs:  # AnyRes: the model picks the grid from the size
        modeling = importlib.import_module(type(model).__module__)
        rows, cols = modeling.get_anyres_image_grid_shape(inputs["image_sizes"][0], pinpoints,
                                                          model.config.vision_config.image_size)
        layout["grid"] = (int(rows), int(cols))
    return layout


def hired_layout(geometry, stock: dict) -> dict:
    """The same facts from hired's geometry (only those the stock outputs reveal)."""
    layout = {"placeholders": geometry.stock_tokens + geometry.newline_tokens, "partitions": geometry.num_partitions}
    if "raster" in stock:
        view = geometry.views()[0]
        layout["raster"] = (view.height, view.width)
    if "grid" in stock:
        layout["grid"] = tuple(geometry.grid)
    return layout


def hired_geometries(adapter, model, processor, size: tuple[int, int]) -> dict:
    """hired's geometries of an image of ``size``: the processor's and, where the model picks the grid
    from the size itself (AnyRes), the model's."""
    geometries = {"processor": adapter.processor_geometry(processor, size)}
    if getattr(model.config, "image_grid_pinpoints", None) is not None:
        geometries["model"] = adapter.geometry(model.config, size)
    return geometries


@settings(max_examples=30, deadline=None)
@given(data=st.data())
@example(data=None)  # None: REPORTED_SIZE, on every family
def test_geometry_equals_the_stock_processor_for_every_image_size(family, data):
    adapter, model, processor, tile = family
    height, width = REPORTED_SIZE if data is None else data.draw(image_sizes(tile), label="(height, width)")
    stock = stock_layout(model, processor, stock_inputs(processor, width, height))
    for source, geometry in hired_geometries(adapter, model, processor, (height, width)).items():
        assert hired_layout(geometry, stock) == stock, f"{adapter.name}, {source} geometry, {width}x{height} (w x h)"
