"""InternVL and LLaVA-OneVision: what is particular to each (``test_contract.py`` covers what every family shares).

Tiny random models of the real classes with the real geometry: InternVL's 448 px tiles of up to 12
plus a thumbnail, pixel-shuffled 2x2; OneVision's SigLIP (no CLS) over 384 px tiles, the 6x6
pinpoints and the "anyres_max_9" downsampling that large images reach.
"""

import pytest
import torch
from sample_inputs import image_prompt, noise_image
from transformers import InternVLModel, LlavaOnevisionModel

import hired
from hired.algorithm import allocate, tile_content_scores
from hired.families.internvl.tiny import tiny_internvl
from hired.families.llava_onevision import OnevisionGeometry
from hired.families.llava_onevision.tiny import tiny_llava_onevision
from hired.geometry import TiledGeometry

INTERNVL_SIZES = [(448, 448), (800, 600), (300, 1000), (1920, 1080), (2000, 200), (90, 60)]  # (width, height)
ONEVISION_SIZES = [(384, 384), (800, 600), (1000, 300), (1920, 1080), (2304, 2304), (500, 2000), (90, 60)]
BUDGETS = [{"budget": 0.05}, {"budget": 0.2}, {"budget": 0.5}, {"tokens": 300}]
FACTORIES = {"internvl": tiny_internvl, "llava-onevision": tiny_llava_onevision}
SIZES = {"internvl": INTERNVL_SIZES, "llava-onevision": ONEVISION_SIZES}


def prompt(processor, images=1):
    return image_prompt(processor.image_token, images)


def encode(processor, images, per_prompt=1):
    texts = [prompt(processor, per_prompt)] * (len(images) // per_prompt)
    if per_prompt > 1:  # nested per prompt: how the processors tell several images of one prompt
        images = [images[i:i + per_prompt] for i in range(0, len(images), per_prompt)]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def placeholders(inputs, model):
    return (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()


@pytest.fixture(scope="module", params=sorted(FACTORIES))
def family(request):
    model, processor = FACTORIES[request.param]()
    return request.param, model, processor


def stock_count(processor, image):
    """The placeholders the stock processor emits for one image (start and end markers not counted)."""
    inputs = encode(processor, [image])
    return int((inputs["input_ids"] == processor.image_token_id).sum())


def test_the_geometry_counts_what_the_stock_processor_emits(family):
    name, model, processor = family
    hired.remove(model, processor)
    for width, height in SIZES[name]:
        image = noise_image(width, height)
        hired.apply(model, processor, budget=0.2)
        geometry = processor.hired_geometry((height, width))
        hired.remove(model, processor)
        assert geometry.stock_tokens + geometry.newline_tokens == stock_count(processor, image), (width, height)


@pytest.mark.parametrize("amount", BUDGETS, ids=lambda a: "-".join(f"{k}{v}" for k, v in a.items()))
def test_placeholders_equal_features_equal_the_budget(family, amount):
    name, model, processor = family
    hired.apply(model, processor, **amount)
    config = hired.stored_config(model)
    images = [noise_image(w, h, seed) for seed, (w, h) in enumerate(SIZES[name])]
    inputs = encode(processor, images)
    with torch.no_grad():
        model(**inputs)  # the model refuses a count mismatch
    records = hired.selections(model)
    expected = [config.fed_tokens(processor.hired_geometry((im.height, im.width)).stock_tokens) for im in images]
    expected = [k + (r.extras["newline_tokens"] if r.extras.get("stock_model") else 0) for k, r in zip(expected, records)]
    assert placeholders(inputs, model) == [r.visual_tokens for r in records] == expected


def stock_sequence(name, inner, inputs, index, geometry):
    """The stock model's features of image ``index`` without separators, in stock order."""
    if name == "internvl":
        tiles = InternVLModel.get_image_features(inner, pixel_values=inputs["pixel_values"]).pooler_output
        start = sum(processor_tiles for processor_tiles in _tile_counts(inputs)[:index])
        return tiles[start:start + geometry.num_partitions].flatten(0, 1)
    features = LlavaOnevisionModel.get_image_features(
        inner, pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
        batch_num_images=inputs["batch_num_images"],
    ).pooler_output[index]
    base, mosaic = features[: geometry.side**2], features[geometry.side**2:]
    if geometry.num_partitions == 1:
        return base
    view = geometry.views()[1]
    return torch.cat([base, mosaic.view(view.height, view.width + 1, -1)[:, :-1].flatten(0, 1)])


def _tile_counts(inputs):
    return [1 if r * c == 1 else 1 + r * c for r, c in inputs["image_sizes"][:, 2:].tolist()]


@pytest.mark.parametrize("variant", ["stock", "qk-norm", "final-norm"])
def test_kept_features_are_the_stock_features_at_the_kept_positions(family, variant):
    name, model, processor = family
    if variant != "stock":
        if name != "internvl":
            pytest.skip("InternViT settings")
        model, processor = tiny_internvl(**({"use_qk_norm": True} if variant == "qk-norm" else {"use_mean_pooling": False}))
    hired.apply(model, processor, budget=0.2)
    images = [noise_image(w, h, seed) for seed, (w, h) in enumerate(SIZES[name][1:4])]
    inputs = encode(processor, images)
    keys = ("pixel_values", "image_sizes", "batch_num_images")
    with torch.no_grad():
        kept = model.model.get_image_features(**{k: inputs[k] for k in keys if k in inputs}).pooler_output
        records = hired.selections(model)
        for index, (features, record) in enumerate(zip(kept, records)):
            geometry = processor.hired_geometry(record.image_size)
            order = geometry.stock_order([row.nonzero().flatten() for row in geometry.candidates]).tolist()
            position = {tuple(row): i for i, row in enumerate(order)}
            picked = [position[tuple(row)] for row in geometry.stock_order(record.kept).tolist()]
            stock = stock_sequence(name, model.model, inputs, index, geometry)
            torch.testing.assert_close(features, stock[picked], atol=1e-5, rtol=1e-4)


def test_received_attention_is_the_column_mean_of_the_eager_attention():
    model, processor = tiny_llava_onevision(attn_implementation="eager")
    hired.apply(model, processor, budget=0.2, distribution_layer=0, selection_layer=1, score="received")
    image = noise_image(800, 600)
    inputs = encode(processor, [image])
    with torch.no_grad():
        model(**inputs)
        (record,) = hired.selections(model)
        attentions = model.model.vision_tower(inputs["pixel_values"][0, :1], output_attentions=True).attentions
    assert record.extras["score"] == "received"
    torch.testing.assert_close(record.distribution_scores, attentions[0][0].mean(dim=1).sum(dim=0))
    torch.testing.assert_close(record.selection_scores[0], attentions[1][0].mean(dim=1).sum(dim=0))


def test_received_attention_runs_on_a_cls_tower_and_skips_the_cls_column():
    model, processor = tiny_internvl(attn_implementation="eager")
    hired.apply(model, processor, budget=0.2, score="received", distribution_layer=0, selection_layer=0)
    inputs = encode(processor, [noise_image(448, 448)])
    with torch.no_grad():
        model(**inputs)
        (record,) = hired.selections(model)
        attention = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions[0]
    received = attention[0].mean(dim=1).sum(dim=0)[1:]  # mean over every query, the CLS token's included
    assert record.extras["score"] == "received"
    torch.testing.assert_close(record.selection_scores[0], received.view(16, 2, 16, 2).sum(dim=(1, 3)).flatten())


def test_internvl_scores_a_token_by_the_sum_of_its_2x2_group_of_cls_attention():
    model, processor = tiny_internvl(attn_implementation="eager")
    hired.apply(model, processor, budget=0.2, distribution_layer=0, selection_layer=1)
    inputs = encode(processor, [noise_image(1000, 500)])
    with torch.no_grad():
        model(**inputs)
        (record,) = hired.selections(model)
        pixels = inputs["pixel_values"]
        tiles = torch.cat([pixels[-1:], pixels[:-1]])  # the thumbnail (fed last) is the base view
        attentions = model.model.vision_tower(tiles, output_attentions=True).attentions
    assert record.extras["score"] == "cls" and record.grid == (1, 2) and record.selection_scores.shape == (3, 256)

    def groups(cls_row):  # (P, 1024) patches -> (P, 256) tokens, patch rows 2r..2r+1 and columns 2c..2c+1
        return cls_row.view(-1, 16, 2, 16, 2).sum(dim=(2, 4)).flatten(1)

    torch.testing.assert_close(record.distribution_scores, groups(attentions[0][:1, :, 0, 1:].sum(1))[0])
    torch.testing.assert_close(record.selection_scores, groups(attentions[1][:, :, 0, 1:].sum(1)))


def left_half(side):
    scores = torch.zeros(side, side)
    scores[:, : side // 2] = 1.0
    return scores.flatten()


def receiving_tiles(geometry, scores):
    budgets = allocate(200, 0.5, tile_content_scores(scores, geometry), geometry.candidates.sum(1))[1:]
    return set(torch.nonzero(budgets).flatten().tolist())


@pytest.mark.parametrize("size,tiles,expected", [
    ((896, 896), (2, 2), {0, 2}),  # the left column
    ((448, 1344), (1, 3), {0, 1}),  # the left half: tile 0 and half of tile 1
    ((1344, 448), (3, 1), {0, 1, 2}),
])
def test_internvl_budget_goes_to_the_tiles_that_cover_the_attended_region(size, tiles, expected):
    geometry = TiledGeometry.create(size, tiles, 16, 448)
    assert receiving_tiles(geometry, left_half(16)) == expected


@pytest.mark.parametrize("size,expected", [((768, 768), {0, 2}), ((2304, 2304), {0, 1, 2, 6, 7, 8, 12, 13, 14,
                                                                                18, 19, 20, 24, 25, 26, 30, 31, 32})])
def test_onevision_budget_goes_to_the_tiles_that_cover_the_attended_region(size, expected):
    geometry = OnevisionGeometry.create(size, 384, 14, [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)])
    assert receiving_tiles(geometry, left_half(27)) == expected


def test_onevision_downsampling_keeps_one_slot_per_fed_token():
    pinpoints = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
    geometry = OnevisionGeometry.create((2304, 2304), 384, 14, pinpoints)
    rows, cols = geometry.downsampled
    assert geometry.grid == (6, 6) and (rows, cols) == (81, 81)  # 162x162 patches interpolated to nine tiles' worth
    assert geometry.stock_tokens == 729 + rows * cols and geometry.newline_tokens == rows
    assert len({tuple(r) for r in geometry.views()[1].rows.tolist()}) == rows * cols
    boxes = geometry.footprints()[geometry.candidates]
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


# Sizes (width, height) just past a multiple of 384 px, where hired once chose its grid from pinpoints
# scaled by 384/378 and picked one row or column fewer than the stock processor; the stock model then
# failed to reshape the tiles (333x777: "shape '[3, 1, 27, 27, -1]' is invalid"). 1243x778 is downsampled.
@pytest.mark.parametrize("width,height,grid", [(333, 777, (3, 1)), (1243, 778, (3, 4)), (385, 4, (1, 2))])
def test_onevision_images_just_past_a_tile_multiple_run_with_the_stock_grid(width, height, grid):
    model, processor = tiny_llava_onevision()
    image = noise_image(width, height)
    stock_count = placeholders(encode(processor, [image]), model)[0]
    hired.apply(model, processor, budget=0.2)
    inputs = encode(processor, [image])
    with torch.no_grad():
        model(**inputs)
    (record,) = hired.selections(model)
    geometry = processor.hired_geometry((height, width))
    assert record.grid == grid and geometry.stock_tokens + geometry.newline_tokens == stock_count
    assert placeholders(inputs, model) == [record.visual_tokens] == [round(0.2 * record.stock_tokens)]
    assert hired.family_of(model).released_geometry((height, width)).grid == grid  # what `hired inspect` prints


def test_beam_search_and_sampling(family):
    name, model, processor = family
    hired.apply(model, processor, budget=0.2)
    inputs = encode(processor, [noise_image(800, 600), noise_image(1000, 300, 1)])
    with torch.no_grad():
        beams = model.generate(**inputs, max_new_tokens=3, num_beams=3, do_sample=False)
        torch.manual_seed(0)
        sampled = model.generate(**inputs, max_new_tokens=3, do_sample=True, top_k=5, num_return_sequences=2)
    assert beams.shape[0] == 2 and sampled.shape[0] == 4
    assert [r.visual_tokens for r in hired.selections(model)] == placeholders(inputs, model)


def test_onevision_several_images_in_one_prompt_are_fed_as_base_views():
    model, processor = tiny_llava_onevision()
    hired.apply(model, processor, budget=0.2)
    images = [noise_image(800, 600), noise_image(1000, 300, 1)]
    inputs = encode(processor, images, per_prompt=2)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    records = hired.selections(model)
    assert [r.grid for r in records] == [(0, 0), (0, 0)] and [r.stock_tokens for r in records] == [729, 729]
    assert sum(placeholders(inputs, model)) == sum(r.visual_tokens for r in records) == 2 * round(0.2 * 729)


def test_internvl_inputs_of_the_stock_processor_are_refused_with_the_fix():
    model, processor = tiny_internvl()
    inputs = encode(processor, [noise_image(800, 600)])
    hired.apply(model, budget=0.2)
    with pytest.raises(ValueError, match="need image_sizes with one .* row per image: prepare them with the processor"):
        model.model.get_image_features(pixel_values=inputs["pixel_values"])


def test_cls_scores_are_refused_on_siglip_and_cls_free_methods_run():
    model, processor = tiny_llava_onevision()
    with pytest.raises(ValueError, match="score='cls' reads CLS attention, but this SiglipVisionModel has no CLS token"):
        hired.apply(model, processor, budget=0.2, score="cls")
    for method in ("hired", "visionzip"):
        hired.apply(model, processor, method=method, budget=0.2)
        with torch.no_grad():
            model(**encode(processor, [noise_image(800, 600)]))
        assert hired.selections(model)[0].extras["score"] == "distinct"


# --------------------------------------------------------------------------------------------
# The command line on both families


def test_inspect_lays_out_both_families(capsys, tmp_path):
    import json

    from hired.cli import main

    path = tmp_path / "wide.png"
    noise_image(1920, 1080).save(path)
    expected = {"internvl": ([2, 4], 2304, 0, 461), "llava-onevision": ([3, 5], 7209, 60, 1442)}
    for name, (grid, stock, newlines, kept) in expected.items():
        assert main(["inspect", str(path), "--family", name, "--budget", "0.2", "--json"]) == 0
        (row,) = json.loads(capsys.readouterr().out)
        assert (row["grid"], row["stock_tokens"], row["newline_tokens"], row["kept_tokens"]) == (grid, stock, newlines,
                                                                                                  kept)
    assert main(["inspect", str(path), "--family", "internvl", "--tile", "448"]) == 2
    assert "--tile and --patch scale the LLaVA-NeXT grid" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_show_and_generate_run_on_both_families(name, capsys, tmp_path):
    import json

    from PIL import Image

    from hired.cli import main

    path = tmp_path / "image.png"
    noise_image(1000, 500).save(path)
    assert main(["show", str(path), "--model", f"tiny-random-{name}", "--budget", "0.2",
                 "--out", str(tmp_path / "show.png")]) == 0
    assert Image.open(tmp_path / "show.png").size[0] > 600
    capsys.readouterr()
    assert main(["generate", str(path), "--model", f"tiny-random-{name}", "--budget", "0.2", "--max-new-tokens", "2",
                 "--dtype", "float32", "--json"]) == 0
    (record,) = json.loads(capsys.readouterr().out)["images"]
    assert record["kept_tokens"] == round(0.2 * record["stock_tokens"])


def test_hired_imports_and_runs_without_torchvision(tmp_path):
    # The new families' processors need torchvision; the library must not (a fresh interpreter where
    # torchvision cannot be imported, as on a machine without one).
    import os
    import subprocess
    import sys

    noise_image(800, 600).save(tmp_path / "image.png")
    script = f"""
import sys
sys.modules["torchvision"] = None
import torch, hired
from PIL import Image
from hired.cli import main
from hired.families.llava_next.tiny import tiny_llava_next
model, processor = tiny_llava_next()
hired.apply(model, processor, budget=0.2)
inputs = processor(images=[Image.open({str(tmp_path / "image.png")!r})], text=["USER: <image> what ? ASSISTANT:"],
                   return_tensors="pt")
with torch.no_grad():
    model.generate(**inputs, max_new_tokens=1)
assert main(["inspect", {str(tmp_path / "image.png")!r}, "--family", "internvl", "--json"]) == 0
print(hired.selections(model)[0].visual_tokens)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "461"
