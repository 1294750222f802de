"""The early drop (``HiredConfig.drop_layer``): select inside the vision tower, run the later layers over the kept
tokens only.

The reference of a kept token's feature is the stock tower run by hand. Qwen-VL: the stock blocks up to
the drop block over every patch, then each later block over only the kept patches, window by window
(image by image in a full-attention block), each patch with its own rotary position, then the merger.
Tiled towers: the stock tower's hidden states at the drop layer, then the tower's own encoder with
only the later layers over each tile's CLS token and kept patches (LLaVA-OneVision's downsampled
mosaics: the patches its interpolation weighs in the kept tokens).
"""

from __future__ import annotations

import pytest
import torch
from sample_inputs import image_prompt, noise_image
from transformers.vision_utils import get_vision_window_index

import hired
from hired.engines.vllm.settings import check_servable, native_tower_plan, tower_plan
from hired.families.internvl.tiny import tiny_internvl
from hired.families.llava.tiny import tiny_llava
from hired.families.llava_next.tiny import tiny_llava_next
from hired.families.llava_onevision.tiny import tiny_llava_onevision
from hired.families.qwen2_5_vl.tiny import tiny_qwen2_5_vl
from hired.families.qwen3_vl.tiny import tiny_qwen3_vl
from hired.methods.common import candidate_positions
from hired.signals import VisionProbe

FACTORIES = {"qwen2.5-vl": tiny_qwen2_5_vl, "qwen3-vl": tiny_qwen3_vl}
# The earliest block each tiny tower can drop at (Qwen2.5-VL's tiny tower attends across the image in blocks 1 and 3).
EARLIEST = {"qwen2.5-vl": 1, "qwen3-vl": 0}
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def prompt(images=1):
    return image_prompt(IMAGE, images)


@pytest.fixture(scope="module", params=sorted(FACTORIES))
def tiny(request):
    model, processor = FACTORIES[request.param]()
    return request.param, model, processor


@pytest.fixture
def family(tiny):
    name, model, processor = tiny
    yield name, model, processor
    hired.remove(model, processor)


def image_features(model, inputs):
    with torch.no_grad():
        output = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    return torch.cat(list(output.pooler_output))


def run(model, processor, images, **settings):
    hired.apply(model, processor, **settings)
    inputs = processor(images=images, text=prompt(len(images)), return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    return inputs, logits, hired.selections(model)


@pytest.mark.parametrize("height, width", [(28, 28), (300, 500), (777, 333), (60, 1000)])
def test_placeholders_equal_features_equal_the_budget_with_the_early_drop(family, height, width):
    name, model, processor = family
    inputs, _, (record,) = run(model, processor, [noise_image(width, height)], budget=0.2, drop_layer=EARLIEST[name])
    expected = hired.HiredConfig(budget=0.2).fed_tokens(record.stock_tokens)
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == record.visual_tokens == expected
    assert image_features(model, inputs).shape[0] == expected
    assert record.extras["drop_layer"] == EARLIEST[name]


def test_dropping_at_the_feature_layer_equals_no_drop_bit_for_bit(family):
    name, model, processor = family
    images = [noise_image(500, 300, 1), noise_image(160, 200, 2)]
    _, plain, plain_records = run(model, processor, images, budget=0.3)
    last = model.model.visual.blocks.__len__() - 1
    for layer in (last, -1):
        _, dropped, records = run(model, processor, images, budget=0.3, drop_layer=layer)
        assert torch.equal(plain, dropped)
        assert [r.kept[0].tolist() for r in records] == [r.kept[0].tolist() for r in plain_records]
        assert all(r.extras["drop_layer"] == last for r in records)
        assert all("drop_layer" not in r.extras for r in plain_records)


def by_hand(model, inputs, records, layer):
    """Each image's kept features in raster order: the stock tower up to ``layer``, then the later blocks over the
    kept patches only (window by window, image by image), each with its own rotary position, then the merger."""
    visual = model.model.visual
    unit = visual.spatial_merge_size ** 2
    grid = inputs["image_grid_thw"]
    seen = {}

    def keep_inputs(index, module, args, kwargs):
        seen[index] = (kwargs["cu_seqlens"].tolist(), kwargs["position_embeddings"])

    def keep_output(module, args, output):
        seen["hidden"] = output

    handles = [block.register_forward_pre_hook(lambda m, a, k, i=i: keep_inputs(i, m, a, k), with_kwargs=True)
               for i, block in enumerate(visual.blocks)]
    handles.append(visual.blocks[layer].register_forward_hook(keep_output))
    try:
        with torch.no_grad():
            visual(inputs["pixel_values"].type(visual.dtype), grid_thw=grid)
    finally:
        for handle in handles:
            handle.remove()
    # The tower's order of merge groups: windows for Qwen2.5-VL, the raster for Qwen3-VL.
    if hasattr(visual, "fullatt_block_indexes"):
        window, _ = get_vision_window_index(grid, spatial_merge_size=visual.spatial_merge_size,
                                            window_size=visual.window_size, patch_size=visual.patch_size)
        window = window.tolist()
    else:
        window = list(range(int(grid.prod(-1).sum()) // unit))
    kept_raster, start = set(), 0
    for record, (_, rows, cols) in zip(records, grid.tolist()):
        side = max(rows, cols) // 2
        for position in record.kept[0].tolist():
            kept_raster.add(start + (position // side) * (cols // 2) + position % side)
        start += rows * cols // unit
    kept = [position for position, group in enumerate(window) if group in kept_raster]  # tower order
    patches = torch.tensor([group * unit + offset for group in kept for offset in range(unit)])
    hidden = seen["hidden"][patches]
    with torch.no_grad():
        for index in range(layer + 1, len(visual.blocks)):
            spans, (cos, sin) = seen[index]
            out = torch.empty_like(hidden)
            for begin, end in zip(spans[:-1], spans[1:]):
                mine = [i for i, patch in enumerate(patches.tolist()) if begin <= patch < end]
                if not mine:
                    continue
                picked = patches[mine]
                out[mine] = visual.blocks[index](hidden[mine], cu_seqlens=torch.tensor([0, len(mine)], dtype=torch.int32),
                                                 position_embeddings=(cos[picked], sin[picked]))
            hidden = out
        merged = visual.merger(hidden)
    order = torch.argsort(torch.tensor([window[position] for position in kept]))
    return merged[order]


def test_kept_features_equal_the_stock_tower_run_by_hand_over_the_kept_tokens(family):
    name, model, processor = family
    images = [noise_image(500, 300, 1), noise_image(260, 420, 2)]
    layer = EARLIEST[name]
    inputs, _, records = run(model, processor, images, budget=0.3, drop_layer=layer)
    fed = image_features(model, inputs)
    hired.remove(model, processor)
    expected = by_hand(model, inputs, records, layer)
    assert fed.shape == expected.shape
    torch.testing.assert_close(fed, expected, atol=1e-5, rtol=1e-4)


def test_a_batch_equals_its_images_alone_with_the_early_drop(family):
    name, model, processor = family
    images = [noise_image(500, 300, 1), noise_image(260, 420, 2)]
    settings = {"budget": 0.25, "drop_layer": EARLIEST[name]}
    together, _, records = run(model, processor, images, **settings)
    joint = image_features(model, together)
    alone = []
    for image, record in zip(images, records):
        inputs, _, (single,) = run(model, processor, [image], **settings)
        assert single.kept[0].tolist() == record.kept[0].tolist()
        alone.append(image_features(model, inputs))
    torch.testing.assert_close(joint, torch.cat(alone), atol=1e-5, rtol=1e-4)


def test_an_image_fed_whole_beside_a_pruned_one_keeps_its_stock_features(family):
    name, model, processor = family
    small, large = noise_image(56, 56, 1), noise_image(560, 420, 2)
    stock_inputs = processor(images=[small], text=prompt(), return_tensors="pt")
    stock = image_features(model, stock_inputs)
    inputs, _, records = run(model, processor, [small, large], tokens=stock.shape[0], drop_layer=EARLIEST[name])
    assert records[0].extras.get("stock_model") and "drop_layer" in records[1].extras
    torch.testing.assert_close(image_features(model, inputs)[:stock.shape[0]], stock, atol=1e-5, rtol=1e-4)


def test_a_windowed_block_or_a_layer_out_of_range_is_refused(family):
    name, model, processor = family
    blocks = len(model.model.visual.blocks)
    with pytest.raises(ValueError, match="out of range"):
        hired.apply(model, processor, budget=0.2, drop_layer=blocks)
    if name == "qwen2.5-vl":
        with pytest.raises(ValueError, match="attends within windows"):
            hired.apply(model, processor, budget=0.2, drop_layer=0)
    with pytest.raises(ValueError, match="lie after drop_layer"):
        hired.apply(model, processor, budget=0.2, drop_layer=EARLIEST[name], selection_layer=blocks - 1)


def test_settings_the_early_drop_cannot_take_are_refused():
    with pytest.raises(ValueError, match="merges tokens"):
        hired.HiredConfig(method="prumerge", drop_layer=1)
    with pytest.raises(ValueError, match="does not select on the vision side"):
        hired.HiredConfig(method="fastv", drop_layer=1)
    with pytest.raises(ValueError, match="layer index"):
        hired.HiredConfig(drop_layer="7")


def test_the_vllm_plan_places_the_drop_in_the_tower_vllm_builds():
    config = tiny_llava_next()[0].config  # 3 CLIP layers, features from layer 1 (vision_feature_layer=-2)
    check_servable(hired.HiredConfig(drop_layer=0))  # served now, for the tiled towers
    plan = tower_plan(hired.HiredConfig(budget=0.2, drop_layer=-3), config)
    assert (plan.drop, plan.feature, plan.distribution, plan.selection) == (0, 1, 0, 0)
    assert tower_plan(hired.HiredConfig(budget=0.2, drop_layer=1), config).drop is None  # the feature layer: no drop
    with pytest.raises(ValueError, match="drop at a layer from -3 to 1"):
        tower_plan(hired.HiredConfig(budget=0.2, drop_layer=2), config)
    qwen = tiny_qwen2_5_vl()[0].config  # 4 blocks, full attention in blocks 1 and 3
    plan = native_tower_plan(hired.HiredConfig(budget=0.2, drop_layer=1), qwen)
    assert (plan.drop, plan.feature, plan.selection) == (1, 3, 1)
    with pytest.raises(ValueError, match="block 0 of this qwen2_5_vl tower attends within windows"):
        native_tower_plan(hired.HiredConfig(budget=0.2, drop_layer=0), qwen)
    with pytest.raises(ValueError, match="lies after drop_layer=1"):
        native_tower_plan(hired.HiredConfig.create(budget=0.2, drop_layer=1, selection_layer=2), qwen)


def test_the_drop_layer_is_stored_and_read_back(tmp_path):
    config = hired.HiredConfig(budget=0.2, drop_layer=15)
    assert config.to_dict()["drop_layer"] == 15
    assert hired.HiredConfig.from_dict(config.to_dict()) == config
    assert "drop_layer" not in hired.HiredConfig(budget=0.2).to_dict()
    assert config.updated(budget=0.4).drop_layer == 15
    model, processor = tiny_qwen2_5_vl()
    hired.apply(model, processor, budget=0.2, drop_layer=1)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert hired.stored_config(loaded).drop_layer == 1


# ---- tiled towers: LLaVA-NeXT, LLaVA-1.5 (CLIP, features of layer -2), InternVL (InternViT, pixel shuffle)

TILED = {"llava-next": tiny_llava_next, "llava": tiny_llava, "internvl": tiny_internvl,
         "llava-onevision": tiny_llava_onevision}
# (width, height); OneVision downsamples the mosaic of 1280x960 (3x4 tiles)
TILED_SIZES = [(336, 336), (800, 600), (300, 1000), (90, 60), (1280, 960)]


def tiled_prompt(processor, images=1):
    return image_prompt(processor.image_token, images)


@pytest.fixture(scope="module", params=sorted(TILED))
def tiled(request):
    model, processor = TILED[request.param]()
    yield request.param, model, processor
    hired.remove(model, processor)


def tiled_run(model, processor, images, **settings):
    hired.apply(model, processor, **settings)
    inputs = processor(images=images, text=[tiled_prompt(processor)] * len(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits
    return inputs, logits, hired.selections(model)


def test_tiled_placeholders_equal_features_equal_the_budget_with_the_early_drop(tiled):
    name, model, processor = tiled
    images = [noise_image(w, h, seed) for seed, (w, h) in enumerate(TILED_SIZES)]
    for amount in ({"budget": 0.2}, {"tokens": 1}):  # one token: every tile but the base view keeps none
        inputs, _, records = tiled_run(model, processor, images, drop_layer=0, **amount)
        config = hired.stored_config(model)
        expected = [config.fed_tokens(r.stock_tokens) for r in records]
        assert (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist() == expected
        assert [r.visual_tokens for r in records] == expected
        assert all(r.extras["drop_layer"] == 0 for r in records)


def test_tiled_dropping_at_the_feature_layer_equals_no_drop_bit_for_bit(tiled):
    name, model, processor = tiled
    images = [noise_image(800, 600, 1), noise_image(300, 1000, 2)]
    _, plain, plain_records = tiled_run(model, processor, images, budget=0.3)
    layers = VisionProbe(model.model.vision_tower).num_layers
    last = model.config.vision_feature_layer % (layers + 1) - 1
    _, dropped, records = tiled_run(model, processor, images, budget=0.3, drop_layer=last)
    assert torch.equal(plain, dropped)
    assert [[k.tolist() for k in r.kept] for r in records] == [[k.tolist() for k in r.kept] for r in plain_records]
    assert all(r.extras["drop_layer"] == last for r in records)


@pytest.mark.parametrize("name", ["llava-next", "llava"])
def test_tiled_kept_features_equal_the_stock_tower_run_by_hand_over_the_kept_patches(name):
    model, processor = TILED[name](vision_layers=4)
    inner = model.model
    image = noise_image(800, 600, 3)
    hired.apply(model, processor, budget=0.3, drop_layer=0)
    inputs = processor(images=[image], text=[tiled_prompt(processor)], return_tensors="pt")
    arguments = {key: inputs[key] for key in ("pixel_values", "image_sizes") if key in inputs}
    with torch.no_grad():
        fed = inner.get_image_features(**arguments).pooler_output
    fed = torch.cat(list(fed)) if isinstance(fed, (list, tuple)) else fed.flatten(0, -2)
    (record,) = hired.selections(model)
    order = processor.hired_geometry(image.size[::-1]).stock_order(record.kept).tolist()
    hired.remove(model, processor)
    pixels = inputs["pixel_values"]
    pixels = pixels[0] if pixels.dim() == 5 else pixels
    tower = getattr(inner.vision_tower, "vision_model", inner.vision_tower)
    encoder_layers = tower.encoder.layers
    feature = model.config.vision_feature_layer % (len(encoder_layers) + 1) - 1
    with torch.no_grad():
        states = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[1]  # layer 0's output
        later = torch.nn.ModuleList(list(encoder_layers)[1:feature + 1])
        tower.encoder.layers = later
        try:
            features = {}
            for partition, kept in enumerate(record.kept):
                if len(kept) == 0:
                    continue
                tokens = torch.cat([torch.zeros(1, dtype=torch.long), kept + 1])
                out = tower.encoder(inputs_embeds=states[partition, tokens][None]).last_hidden_state[0, 1:]
                features.update({(partition, int(i)): row for i, row in zip(kept, out)})
        finally:
            tower.encoder.layers = encoder_layers
        expected = inner.multi_modal_projector(torch.stack([features[tuple(row)] for row in order]))
    torch.testing.assert_close(fed, expected, atol=1e-5, rtol=1e-4)


def test_tiled_a_batch_equals_its_images_alone_with_the_early_drop(tiled):
    name, model, processor = tiled
    images = [noise_image(1280, 960, 1), noise_image(300, 1000, 2)]
    settings = {"budget": 0.25, "drop_layer": 0}
    together, _, records = tiled_run(model, processor, images, **settings)
    for index, image in enumerate(images):
        _, _, (single,) = tiled_run(model, processor, [image], **settings)
        assert [k.tolist() for k in single.kept] == [k.tolist() for k in records[index].kept]
    hired.apply(model, processor, **settings)
    arguments = {key: together[key] for key in ("pixel_values", "image_sizes") if key in together}
    with torch.no_grad():
        joint = model.model.get_image_features(**arguments).pooler_output
        joint = torch.cat(list(joint)) if isinstance(joint, (list, tuple)) else joint
    alone = []
    for image in images:
        inputs = processor(images=[image], text=[tiled_prompt(processor)], return_tensors="pt")
        arguments = {key: inputs[key] for key in ("pixel_values", "image_sizes") if key in inputs}
        with torch.no_grad():
            one = model.model.get_image_features(**arguments).pooler_output
        alone.append(torch.cat(list(one)) if isinstance(one, (list, tuple)) else one)
    torch.testing.assert_close(joint, torch.cat(alone), atol=1e-5, rtol=1e-4)


def test_onevision_kept_features_equal_the_stock_tower_run_by_hand_over_the_patches_they_interpolate():
    # Reference: the stock interpolation's weights, read one tile at a time by packing an identity; the later layers
    # over each tile's patches that a kept token weighs above zero; then the stock projector and packing.
    model, processor = tiny_llava_onevision(vision_layers=4)
    inner = model.model
    image = noise_image(1280, 960, 3)
    hired.apply(model, processor, budget=0.3, drop_layer=0)
    inputs = processor(images=[image], text=[tiled_prompt(processor)], return_tensors="pt")
    with torch.no_grad():
        fed = torch.cat(list(inner.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output))
    (record,) = hired.selections(model)
    geometry = processor.hired_geometry(image.size[::-1])
    hired.remove(model, processor)
    assert geometry.downsampled is not None
    count, patches = geometry.num_partitions, geometry.side ** 2

    def pack(values):
        packed, _ = inner.pack_image_features([values], torch.as_tensor([image.size[::-1]]), image_newline=None,
                                              vision_aspect_ratio=model.config.vision_aspect_ratio)
        return packed[0]

    slot_row = {tuple(slot): row for row, slot in enumerate(candidate_positions(geometry).tolist())}
    rows = [slot_row[tuple(slot)] for slot in geometry.stock_order(record.kept).tolist()]
    read = []
    for partition in range(count):
        basis = torch.zeros(count, patches, patches)
        basis[partition] = torch.eye(patches)
        read.append(pack(basis)[rows].ne(0).any(0).nonzero().flatten())
    assert sum(len(r) for r in read) > len(rows)  # tokens that mix patches run on with each of them
    tower = getattr(inner.vision_tower, "vision_model", inner.vision_tower)
    encoder_layers = tower.encoder.layers
    with torch.no_grad():
        pixels = inputs["pixel_values"][0, :count]
        states = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[1]  # layer 0's output
        features = torch.zeros_like(states)
        tower.encoder.layers = torch.nn.ModuleList(list(encoder_layers)[1:])  # feature layer -1: every later layer
        try:
            for partition, patches_read in enumerate(read):
                if len(patches_read):
                    out = tower.encoder(inputs_embeds=states[partition, patches_read][None]).last_hidden_state[0]
                    features[partition, patches_read] = out
        finally:
            tower.encoder.layers = encoder_layers
        expected = pack(inner.multi_modal_projector(features))[rows]
    torch.testing.assert_close(fed, expected, atol=1e-5, rtol=1e-4)
