"""Qwen2.5-VL and Qwen3-VL: exact counts at native resolution, every token at the M-RoPE position the
stock model gives it, and Qwen3-VL's DeepStack planes pruned with the same indices.

The tiny models have the real classes and geometry (Qwen2.5-VL: 14 px patches merged 2x2, 112 px
windows, full attention every other block; Qwen3-VL: 16 px patches, global attention, DeepStack
planes; both: M-RoPE sections); positions are compared with the stock ``get_rope_index`` on the
unpruned prompt, attention with the eager attention maps, DeepStack with the stock model fed the
kept features, planes and positions by hand.
"""

import numpy as np
import pytest
import torch
from sample_inputs import image_prompt, noise_image

import hired
from hired.families.qwen2_5_vl import token_grid
from hired.families.qwen2_5_vl.tiny import tiny_qwen2_5_vl
from hired.families.qwen3_vl.tiny import tiny_qwen3_vl

FACTORIES = {"qwen2.5-vl": tiny_qwen2_5_vl, "qwen3-vl": tiny_qwen3_vl}

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
SIZES = [(28, 28), (60, 1000), (1000, 60), (300, 500), (777, 333), (1080, 1920), (3000, 4000)]  # (height, width)


def prompt(images=1):
    return image_prompt(IMAGE, images)


@pytest.fixture(scope="module", params=sorted(FACTORIES))
def tiny(request):
    return FACTORIES[request.param](text_layers=3)  # FastV prunes after layer 2


@pytest.fixture
def model(tiny):
    model, processor = tiny
    yield model, processor
    hired.remove(model, processor)


def language_positions(model, inputs):
    """The position ids the language model receives for ``inputs`` (after hired's own hook)."""
    captured = {}

    def keep(module, args, kwargs):
        captured["positions"] = kwargs["position_ids"].clone()

    handle = model.model.language_model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return captured["positions"][-3:]


def stock_positions(model, processor, images, texts, videos=None):
    inputs = processor(images=images, text=texts, videos=videos, return_tensors="pt", padding=True)
    positions, deltas = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"], inputs.get("video_grid_thw"),
        attention_mask=inputs["attention_mask"], second_per_grid_ts=inputs.get("second_per_grid_ts"))
    return inputs, positions, deltas


def kept_stock_positions(stock_ids, stock, image_grids, records, image_token):
    """The stock positions ``stock`` of the unpruned prompt ``stock_ids`` (one row, padding removed), of the
    tokens hired keeps: every image's kept tokens (``records``, one per image, in order) and every other token."""
    expected, j, image = [], 0, 0
    while j < len(stock_ids):
        if stock_ids[j] == image_token:
            rows, cols = int(image_grids[image][1]) // 2, int(image_grids[image][2]) // 2
            side = max(rows, cols)
            kept = torch.sort(records[image].kept[0]).values
            expected.append(stock[:, j + (kept // side) * cols + kept % side])
            j += rows * cols
            image += 1
        else:
            expected.append(stock[:, j:j + 1])
            j += 1
    return torch.cat(expected, dim=1)


@pytest.mark.parametrize("height, width", SIZES)
def test_placeholders_equal_features_equal_the_budget_at_native_resolution(model, height, width):
    model, processor = model
    hired.apply(model, processor, budget=0.2)
    image = noise_image(width, height)
    inputs = processor(images=image, text=prompt(), return_tensors="pt")
    with torch.no_grad():
        model(**inputs)
    image_processor = processor.image_processor
    limits = image_processor.size["shortest_edge"], image_processor.size["longest_edge"]
    rows, cols = token_grid((height, width), image_processor.patch_size, 2, *limits)
    (record,) = hired.selections(model)
    assert record.stock_tokens == rows * cols == int(inputs["image_grid_thw"][0, 1:].prod()) // 4
    expected = hired.HiredConfig(budget=0.2).fed_tokens(rows * cols)
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == record.visual_tokens == expected
    assert processor.hired_geometry((height, width)).stock_tokens == rows * cols


@pytest.mark.parametrize("method", ["hired", "divprune", "random", "fastv"])
def test_kept_tokens_and_the_text_after_keep_their_stock_positions(model, method):
    """Two prompts (one with two images of different sizes), left padded: every kept token's (t, row, col)
    is the stock one of the same token of the unpruned prompt, every text token's too."""
    model, processor = model
    images = [noise_image(500, 300, 1), noise_image(260, 420, 2), noise_image(300, 500, 3)]
    texts = [prompt(2), prompt(1)]
    stock_inputs, stock, stock_deltas = stock_positions(model, processor, images, texts)
    hired.apply(model, processor, method=method, budget=0.2)
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    positions = language_positions(model, inputs)
    records = hired.selections(model)
    image_token = processor.image_token_id
    for row, images_of_row in enumerate([slice(0, 2), slice(2, 3)]):
        valid, stock_valid = inputs["attention_mask"][row].bool(), stock_inputs["attention_mask"][row].bool()
        ids, stock_ids = inputs["input_ids"][row][valid], stock_inputs["input_ids"][row][stock_valid]
        expected = kept_stock_positions(stock_ids, stock[:, row][:, stock_valid],
                                        stock_inputs["image_grid_thw"][images_of_row], records[images_of_row],
                                        image_token)
        assert torch.equal(positions[:, row][:, valid], expected)
        assert ids.tolist().count(image_token) == sum(len(r.kept[0]) for r in records[images_of_row])
    # decoding continues where the stock model continues
    pruned = inputs["attention_mask"].sum(1, keepdim=True)
    full = stock_inputs["attention_mask"].sum(1, keepdim=True)
    assert torch.equal(pruned + model.model.rope_deltas, full + stock_deltas)


def test_generation_with_beams_and_sampling_uses_the_kept_positions(model):
    model, processor = model
    hired.apply(model, processor, budget=0.2)
    inputs = processor(images=[noise_image(500, 300), noise_image(640, 200, 1)], text=[prompt(), prompt()],
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        greedy = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        beams = model.generate(**inputs, max_new_tokens=4, do_sample=False, num_beams=2)
        torch.manual_seed(0)
        sampled = model.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=5)
    assert greedy.shape == beams.shape == sampled.shape == (2, inputs["input_ids"].shape[1] + 4)
    # The first new token of greedy decoding is the argmax of the logits at the kept positions.
    with torch.no_grad():
        first = model(**inputs).logits[:, -1].argmax(-1)
    assert torch.equal(greedy[:, inputs["input_ids"].shape[1]], first)


@pytest.mark.parametrize("family", sorted(FACTORIES))
def test_the_received_score_of_a_token_is_its_groups_eager_attention_column_means(monkeypatch, family):
    """At the last (full-attention) block: the attention each patch receives, averaged over the image's
    queries and summed over heads, summed over the 2x2 group the merger fuses. The eager attention
    function is observed (wrapped, not replaced) to read the maps the stock block computes."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
    from transformers.models.qwen3_vl import modeling_qwen3_vl
    from transformers.vision_utils import get_vision_window_index

    modeling = modeling_qwen2_5_vl if family == "qwen2.5-vl" else modeling_qwen3_vl
    model, processor = FACTORIES[family](text_layers=1, attn_implementation="eager")
    inputs = processor(images=noise_image(500, 300), text=prompt(), return_tensors="pt")
    last = model.model.visual.blocks[-1].attn
    maps = []
    eager = modeling.eager_attention_forward

    def observed(module, *args, **kwargs):
        output, weights = eager(module, *args, **kwargs)
        if module is last:
            maps.append(weights)
        return output, weights

    monkeypatch.setattr(modeling, "eager_attention_forward", observed)
    with torch.no_grad():
        model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    (weights,) = maps  # (1, heads, patches, patches): one full-attention chunk
    received = weights[0].mean(dim=1).sum(dim=0)  # column means, summed over heads
    groups = received.reshape(-1, 4)
    if family == "qwen2.5-vl":  # its patches run in window order
        window, _ = get_vision_window_index(inputs["image_grid_thw"], spatial_merge_size=2, window_size=112,
                                            patch_size=14)
        groups = groups[torch.argsort(window)]
    hired.apply(model, processor, budget=0.2, score="received")
    with torch.no_grad():
        model(**processor(images=noise_image(500, 300), text=prompt(), return_tensors="pt"))
    (record,) = hired.selections(model)
    geometry = processor.hired_geometry((300, 500))
    assert record.extras["score"] == "received"
    torch.testing.assert_close(record.selection_scores[0][geometry.candidates[0]], groups.sum(-1), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["hired", "visionzip"])
def test_deepstack_planes_are_pruned_with_the_main_features(method):
    """The stock Qwen3-VL, fed by hand the kept tokens' features and DeepStack planes (taken from its own
    vision tower at the kept indices) and hired's positions, gives hired's logits."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    model, processor = tiny_qwen3_vl(text_layers=2)
    images = [noise_image(500, 300), noise_image(260, 420, 1)]
    hired.apply(model, processor, method=method, budget=0.2)
    inputs = processor(images=images, text=[prompt(2)], return_tensors="pt")
    captured = {}

    def keep(module, args, kwargs):
        captured["positions"] = kwargs["position_ids"].clone()

    handle = model.model.language_model.register_forward_pre_hook(keep, with_kwargs=True)
    with torch.no_grad():
        pruned = model(**inputs).logits
    handle.remove()
    records = hired.selections(model)
    hired.remove(model, processor)
    with torch.no_grad():
        tower = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    counts = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    features, planes = [], [[] for _ in tower.deepstack_features]
    for image, (record, grid) in enumerate(zip(records, inputs["image_grid_thw"])):
        rows, cols = int(grid[1]) // 2, int(grid[2]) // 2
        kept = torch.sort(record.kept[0]).values
        raster = sum(counts[:image]) + (kept // max(rows, cols)) * cols + kept % max(rows, cols)
        if method == "hired":  # a selection, not a merge: the main features are the tower's too
            features.append(tower.pooler_output[raster])
        for layer, plane in enumerate(tower.deepstack_features):
            planes[layer].append(plane[raster])
    if method != "hired":  # VisionZip merges its contextual tokens: the main features come from hired's call
        with torch.no_grad():
            hired.apply(model, processor, method=method, budget=0.2)
            features = list(model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
            hired.remove(model, processor)
    encoded = BaseModelOutputWithDeepstackFeatures(pooler_output=tuple(features),
                                                   deepstack_features=[tuple(p) for p in planes])
    by_hand = {k: v for k, v in inputs.items() if k not in ("pixel_values",)}
    with torch.no_grad():
        stock = model(**by_hand, position_ids=captured["positions"], mm_encoder_outputs={"image": encoded}).logits
    torch.testing.assert_close(stock, pruned, atol=1e-5, rtol=1e-5)


def test_a_video_beside_pruned_images_keeps_its_stock_positions(model):
    """One prompt with an image, a video and another image: the video's tokens keep their stock (t, row, col)
    and type, the kept image tokens and the text theirs, decoding continues where the stock model does, and
    generate runs on it."""
    model, processor = model
    images = [noise_image(500, 300, 1), noise_image(260, 420, 2)]
    videos = [np.random.RandomState(3).randint(0, 256, size=(4, 84, 112, 3), dtype=np.uint8)]
    video = "<|vision_start|><|video_pad|><|vision_end|>"
    text = f"USER: {IMAGE} and {video} and {IMAGE} what is in the image ? ASSISTANT:"
    stock_inputs, stock, stock_deltas = stock_positions(model, processor, images, [text], videos)
    hired.apply(model, processor, budget=0.2)
    inputs = processor(images=images, text=[text], videos=videos, return_tensors="pt")
    positions = language_positions(model, inputs)
    records = hired.selections(model)
    fed_video = inputs["input_ids"][0] == processor.video_token_id
    stock_video = stock_inputs["input_ids"][0] == processor.video_token_id
    assert len(records) == 2 and int(fed_video.sum()) == int(stock_video.sum()) > 0
    assert torch.equal(inputs["mm_token_type_ids"][0][fed_video], stock_inputs["mm_token_type_ids"][0][stock_video])
    expected = kept_stock_positions(stock_inputs["input_ids"][0], stock[:, 0], stock_inputs["image_grid_thw"], records,
                                    processor.image_token_id)
    assert torch.equal(positions[:, 0], expected)
    assert inputs["input_ids"].shape[1] + model.model.rope_deltas == stock_inputs["input_ids"].shape[1] + stock_deltas
    with torch.no_grad():  # generate encodes the image and the video before the prefill
        first = model(**inputs).logits[:, -1].argmax(-1)
        generated = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert torch.equal(generated[:, inputs["input_ids"].shape[1]], first)
