"""HiRED on the real transformers classes (tiny random weights, real geometry and processors)."""

import pytest
import torch
from transformers import (
    Dinov2Config,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

import hired
from hired.families.llava.tiny import tiny_llava
from hired.families.llava_next import LLAVA_NEXT_PINPOINTS
from hired.families.llava_next.tiny import tiny_llava_next

PROMPT = "USER: <image> what is in the image ? ASSISTANT:"
GRID_SIZES = {  # (width, height) -> grid
    "2x2": (672, 672),
    "1x2": (1000, 500),
    "2x1": (500, 1000),
    "1x3": (1000, 300),
    "3x1": (300, 1000),
    "padded-4:3": (800, 600),
    "padded-3:4": (600, 800),
}


def image_tokens(inputs, processor):
    return int((inputs["input_ids"] == processor.image_token_id).sum())


def run(model, processor, images, prompts=PROMPT, generate=True):
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False) if generate else None
    return inputs, logits, tokens


@pytest.mark.parametrize("grid", list(GRID_SIZES))
def test_full_budget_is_the_stock_model(grid, make_image):
    image = make_image(*GRID_SIZES[grid])
    model, processor = tiny_llava_next()
    stock_inputs, stock_logits, stock_tokens = run(model, processor, image)
    hired.apply(model, processor, budget=1.0)
    inputs, logits, tokens = run(model, processor, image)
    assert torch.equal(inputs["input_ids"], stock_inputs["input_ids"])
    assert torch.equal(logits, stock_logits)
    assert torch.equal(tokens, stock_tokens)
    record = hired.selections(model)[0]
    assert record.visual_tokens == image_tokens(inputs, processor)


def test_token_count_at_or_above_stock_is_the_stock_model(make_image):
    image = make_image(800, 600)
    model, processor = tiny_llava_next()
    _, stock_logits, _ = run(model, processor, image)
    hired.apply(model, processor, tokens=100_000)
    _, logits, _ = run(model, processor, image)
    assert torch.equal(logits, stock_logits)


def test_full_budget_is_the_stock_model_on_llava_1_5(make_image):
    image = make_image(640, 480)
    model, processor = tiny_llava()
    _, stock_logits, stock_tokens = run(model, processor, image)
    hired.apply(model, processor, budget=1.0)
    _, logits, tokens = run(model, processor, image)
    assert torch.equal(logits, stock_logits) and torch.equal(tokens, stock_tokens)


@pytest.mark.parametrize("size", [(672, 672), (1000, 500), (500, 1000), (1000, 300), (300, 1000), (800, 600),
                                  (1, 1), (4000, 50), (50, 4000), (1920, 1080), (333, 517)])
@pytest.mark.parametrize("budget", [dict(budget=0.05), dict(budget=0.2), dict(budget=0.6), dict(tokens=300)])
def test_placeholders_equal_features_equal_budget(size, budget, make_image):
    model, processor = tiny_llava_next()
    hired.apply(model, processor, alpha=0.5, **budget)
    image = make_image(*size)
    inputs = processor(images=image, text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    record = hired.selections(model)[0]
    geometry = hired.AnyresGeometry.create(size[::-1], 336, 14, LLAVA_NEXT_PINPOINTS)
    expected = processor.hired_tokens(size[::-1]) or geometry.stock_tokens + geometry.newline_tokens
    assert image_tokens(inputs, processor) == len(features[0]) == record.visual_tokens == expected
    counts = processor._get_num_multimodal_tokens(image_sizes=[size[::-1]])["num_image_tokens"]
    assert counts == [expected]
    if not record.extras.get("stock_model"):
        assert int(record.partition_tokens.sum()) == expected == sum(len(k) for k in record.kept)


@pytest.mark.parametrize("budget", [0.05, 0.25, 0.5])
def test_llava_1_5_keeps_round_r_times_576(budget, make_image):
    model, processor = tiny_llava()
    hired.apply(model, processor, budget=budget)
    inputs, logits, _ = run(model, processor, make_image(500, 400), generate=False)
    expected = int(budget * 576 + 0.5)
    assert image_tokens(inputs, processor) == expected == hired.selections(model)[0].visual_tokens


def test_records(make_image):
    model, processor = tiny_llava_next()
    hired.apply(model, processor, budget=0.2)
    run(model, processor, make_image(1000, 500))
    (record,) = hired.selections(model)
    assert record.grid == (1, 2) and record.image_size == (500, 1000)
    assert record.visual_tokens == round(0.2 * 1728)
    assert [len(k) for k in record.kept] == record.partition_tokens.tolist()
    assert record.distribution_scores.shape == (576,) and record.selection_scores.shape == (3, 576)
    assert record.to_dict()["partition_tokens"] == record.partition_tokens.tolist()


def test_batch_of_mixed_sizes_equals_each_image_alone(make_image):
    model, processor = tiny_llava_next()
    hired.apply(model, processor, budget=0.2)
    images = [make_image(1000, 500, seed=1), make_image(672, 672, seed=2), make_image(300, 1000, seed=3)]
    prompts = [PROMPT, "USER: <image> describe it ASSISTANT:", PROMPT]
    _, _, batch = run(model, processor, images, prompts)
    batch_records = hired.selections(model)
    prompt_length = batch.shape[1] - 4
    for index, (image, prompt) in enumerate(zip(images, prompts)):
        _, _, alone = run(model, processor, image, prompt)
        assert torch.equal(batch[index, prompt_length:], alone[0, -4:])
        assert hired.selections(model)[0].kept[1].tolist() == batch_records[index].kept[1].tolist()


def test_beam_search_and_sampling(make_image):
    model, processor = tiny_llava_next()
    hired.apply(model, processor, budget=0.2)
    inputs = processor(images=[make_image(1000, 500), make_image(672, 672)], text=[PROMPT, PROMPT],
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        beams = model.generate(**inputs, max_new_tokens=3, num_beams=3, num_return_sequences=2, do_sample=False)
        torch.manual_seed(0)
        sampled = model.generate(**inputs, max_new_tokens=3, do_sample=True, top_k=5)
    assert beams.shape[0] == 4 and sampled.shape[0] == 2


def test_bfloat16(make_image):
    model, processor = tiny_llava_next()
    model.to(torch.bfloat16)
    hired.apply(model, processor, budget=0.2)
    inputs = processor(images=make_image(800, 600), text=PROMPT, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    assert hired.selections(model)[0].visual_tokens == image_tokens(inputs, processor)


def test_vision_layers_after_the_feature_layer_do_not_run(make_image):
    model, processor = tiny_llava_next(vision_layers=4)
    calls = []
    model.model.vision_tower.encoder.layers[-1].register_forward_hook(lambda *args: calls.append(1))
    run(model, processor, make_image(672, 672), generate=False)
    assert calls  # the stock model runs every layer
    calls.clear()
    hired.apply(model, processor, budget=0.2)
    run(model, processor, make_image(672, 672), generate=False)
    assert not calls
    assert len(model.model.vision_tower.encoder.layers) == 4


def test_scores_from_hooks_equal_the_eager_attention_row(make_image):
    model, processor = tiny_llava_next(attn_implementation="eager")
    hired.apply(model, processor, budget=0.2, distribution_layer=0, selection_layer=1)
    inputs, _, _ = run(model, processor, make_image(672, 672), generate=False)
    record = hired.selections(model)[0]
    tower = model.model.vision_tower
    with torch.no_grad():
        attentions = tower(inputs["pixel_values"][0], output_attentions=True).attentions
    torch.testing.assert_close(record.distribution_scores, attentions[0][0, :, 0, 1:].sum(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(record.selection_scores, attentions[1][:, :, 0, 1:].sum(1), atol=1e-6, rtol=1e-5)


def test_sdpa_scores_equal_eager_scores(make_image):
    image = make_image(800, 600)
    records = []
    for implementation in ("sdpa", "eager"):
        model, processor = tiny_llava_next(attn_implementation=implementation)
        hired.apply(model, processor, budget=0.2)
        run(model, processor, image, generate=False)
        records.append(hired.selections(model)[0])
    torch.testing.assert_close(records[0].selection_scores, records[1].selection_scores)
    assert records[0].partition_tokens.tolist() == records[1].partition_tokens.tolist()


def test_dinov2_tower(make_image):
    config = LlavaNextConfig(
        vision_config=Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                   image_size=336, patch_size=14),
        text_config=tiny_llava_next()[0].config.text_config,
        image_token_id=4, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
    )
    _, processor = tiny_llava_next()
    model = LlavaNextForConditionalGeneration(config).eval()
    hired.apply(model, processor, budget=0.1)
    inputs, logits, _ = run(model, processor, make_image(1000, 500), generate=False)
    assert hired.selections(model)[0].visual_tokens == image_tokens(inputs, processor) == round(0.1 * 1728)


def test_save_and_load_round_trip(tmp_path, make_image):
    model, processor = tiny_llava_next()
    hired.apply(model, processor, budget=0.3, alpha=0.25, head_aggregation="mean")
    _, logits, tokens = run(model, processor, make_image(800, 600))
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = hired.from_pretrained(str(tmp_path))
    assert loaded.model._hired.config == model.model._hired.config
    _, loaded_logits, loaded_tokens = run(loaded.eval(), loaded_processor, make_image(800, 600))
    torch.testing.assert_close(loaded_logits, logits)
    assert torch.equal(loaded_tokens, tokens)


def test_from_pretrained_without_config_says_what_to_do(tmp_path):
    model, processor = tiny_llava_next()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="hired.apply"):
        hired.from_pretrained(str(tmp_path))


def test_remove_restores_the_stock_model(make_image):
    image = make_image(800, 600)
    model, processor = tiny_llava_next()
    stock_inputs, stock_logits, _ = run(model, processor, image, generate=False)
    hired.apply(model, processor, budget=0.2)
    run(model, processor, image, generate=False)
    hired.remove(model, processor)
    inputs, logits, _ = run(model, processor, image, generate=False)
    assert type(model.model).__name__ == "LlavaNextModel" and type(processor).__name__ == "LlavaNextProcessor"
    assert not hasattr(model.config, "hired")
    assert torch.equal(inputs["input_ids"], stock_inputs["input_ids"]) and torch.equal(logits, stock_logits)


def test_remove_without_the_processor_restores_the_one_patched_with_the_model(make_image):
    image = make_image(800, 600)
    model, processor = tiny_llava_next()
    _, stock_logits, _ = run(model, processor, image, generate=False)
    hired.apply(model, processor, budget=0.2)
    hired.remove(model)
    assert type(processor).__name__ == "LlavaNextProcessor" and not hasattr(processor, "hired_config")
    _, logits, _ = run(model, processor, image, generate=False)
    assert torch.equal(logits, stock_logits)
    # A processor patched again for another model is that model's: removing the first leaves it alone.
    other, _ = tiny_llava_next()
    hired.apply(model, processor, budget=0.2)
    hired.apply(other, processor, budget=0.1)
    hired.remove(model)
    assert processor.hired_config.budget == 0.1


def test_apply_twice_updates_the_configuration(make_image):
    model, processor = tiny_llava_next()
    hired.apply(model, processor, budget=0.2)
    hired.apply(model, processor, budget=0.1)
    inputs, _, _ = run(model, processor, make_image(672, 672), generate=False)
    assert image_tokens(inputs, processor) == round(0.1 * 2880)
    assert model.config.hired["budget"] == 0.1


def test_shared_tower_runs_encode_each_image_once_across_settings(make_image):
    from hired import share_tower_runs

    model, processor = tiny_llava_next()
    calls = []
    model.model.vision_tower.register_forward_hook(lambda *_: calls.append(1))
    images = [make_image(800, 600), make_image(300, 1000)]
    runs: dict = {}
    logits = {}
    for budget in (0.1, 0.3):
        hired.apply(model, processor, budget=budget)
        share_tower_runs(model, runs)
        for index, image in enumerate(images):
            _, logits[budget, index], _ = run(model, processor, image, generate=False)
    assert len(calls) == len(runs) == len(images)  # one tower run per image, not per setting
    # Each setting still selects its own tokens, exactly as without sharing.
    hired.apply(model, processor, budget=0.3)
    _, unshared, _ = run(model, processor, images[1], generate=False)
    assert torch.equal(unshared, logits[0.3, 1])
    assert logits[0.1, 1].shape[1] < logits[0.3, 1].shape[1]
    hired.remove(model, processor)
    with pytest.raises(ValueError, match="not patched"):
        share_tower_runs(model, runs)
