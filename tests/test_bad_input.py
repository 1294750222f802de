"""Every bad input either works or gets a clear error that names the fix."""

import pytest
import torch
from PIL import Image
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    SiglipVisionConfig,
)

import hired
from hired.cli import main
from hired.families.llava.tiny import tiny_llava
from hired.families.llava_next.tiny import tiny_llava_next
from hired.images import open_image
from hired.loading import resolve_device

PROMPT = "USER: <image> what is in the image ? ASSISTANT:"


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(budget=0), "fraction in \\(0, 1\\]"),
        (dict(budget=-0.2), "fraction in \\(0, 1\\]"),
        (dict(budget=1.5), "fraction in \\(0, 1\\]"),
        (dict(budget=576), "tokens=576"),
        (dict(budget=float("inf")), "fraction in \\(0, 1\\]"),
        (dict(budget="0.2"), "must be a number"),
        (dict(tokens=0), "at least 1"),
        (dict(tokens=2.5), "whole number"),
        (dict(budget=0.3, tokens=100), "not both"),
        (dict(alpha=-0.1), "alpha"),
        (dict(alpha=1.5), "alpha"),
        (dict(head_aggregation="median"), "sum, mean, max"),
        (dict(method="nope"), "available methods: .*hired"),
        (dict(method_options={"colour": 1}), "has no options"),
        (dict(distribution_layer="first"), "layer index"),
    ],
)
def test_invalid_configuration(options, message):
    with pytest.raises(ValueError, match=message):
        hired.HiredConfig.create(**options)


@pytest.mark.parametrize("layer", [dict(distribution_layer=3), dict(selection_layer=-4), dict(selection_layer=99)])
def test_layer_index_out_of_range(layer):
    model, processor = tiny_llava_next(vision_layers=3)
    with pytest.raises(ValueError, match="out of range for a vision tower of 3 layers"):
        hired.apply(model, processor, **layer)


def test_vision_tower_without_cls_token():
    text = tiny_llava_next()[0].config.text_config
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=336, patch_size=14)
    model = LlavaNextForConditionalGeneration(LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=4))
    with pytest.raises(ValueError, match="no CLS token"):
        hired.apply(model)


def test_unsupported_model_class():
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=32))
    with pytest.raises(TypeError, match="LlavaNextForConditionalGeneration"):
        hired.apply(model)


def test_processor_of_the_wrong_family():
    model, _ = tiny_llava_next()
    _, llava_processor = tiny_llava()
    with pytest.raises(TypeError, match="needs a LlavaNextProcessor"):
        hired.apply(model, llava_processor)


@pytest.mark.parametrize("generate", [dict(), dict(num_beams=2)])
def test_stock_processor_with_a_hired_model(generate, make_image):
    model, _ = tiny_llava_next()
    _, stock_processor = tiny_llava_next()
    hired.apply(model, budget=0.2)
    inputs = stock_processor(images=make_image(1000, 500), text=PROMPT, return_tensors="pt")
    with pytest.raises(ValueError, match="expanded by the stock processor.*hired.apply"):
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, **generate)


def test_hired_processor_with_a_stock_model(make_image):
    model, processor = tiny_llava_next()
    other, _ = tiny_llava_next()
    hired.apply(other, processor, budget=0.2)  # the processor now expands to the HiRED count of `other`
    inputs = processor(images=make_image(1000, 500), text=PROMPT, return_tensors="pt")
    with pytest.raises(ValueError, match="do not match"):
        with torch.no_grad():
            model(**inputs)


def test_selections_of_an_unpatched_model():
    model, _ = tiny_llava_next()
    with pytest.raises(ValueError, match="hired.apply"):
        hired.selections(model)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "CMYK", "P", "I;16", "1"])
def test_image_modes_work(mode, tmp_path):
    model, processor = tiny_llava_next()
    hired.apply(model, processor, budget=0.2)
    path = tmp_path / ("image.tiff" if mode in ("CMYK", "I;16") else "image.png")
    Image.new(mode, (120, 90)).save(path)
    image = open_image(path)
    assert image.mode == "RGB" and image.size == (120, 90)
    inputs = processor(images=image, text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        model(**inputs)
    assert hired.selections(model)[0].visual_tokens == int((inputs["input_ids"] == 4).sum())


@pytest.mark.parametrize("size", [(1, 1), (4000, 50), (50, 4000)])
def test_degenerate_sizes_work(size, make_image):
    model, processor = tiny_llava_next()
    hired.apply(model, processor, budget=0.2)
    inputs = processor(images=make_image(*size), text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    record = hired.selections(model)[0]
    assert record.visual_tokens == int((inputs["input_ids"] == 4).sum()) > 0
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2


def test_unreadable_and_corrupt_images(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        open_image(tmp_path / "missing.png")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="cannot read"):
        open_image(text)
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), "red").save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ValueError, match="cannot read"):
        open_image(truncated)


def test_a_device_past_those_present_is_refused_with_what_to_pass():
    """What the lmms-eval model checks its ``device`` with (shared in hired.loading), on any machine."""
    past = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ValueError, match=f"device='{past}' is not available: .*; pass device=cpu"):
        resolve_device(past)
    with pytest.raises(ValueError, match="device='gpu' names no torch device .*; pass device=cpu, cuda or cuda:N"):
        resolve_device("gpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the refusal of a torch built without CUDA")
def test_cuda_on_a_cpu_only_torch_says_so_not_a_bare_assertion():
    with pytest.raises(ValueError, match=r"device='cuda' is not available: this torch \(.*\) is built without CUDA"):
        resolve_device("cuda")


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 nope")
    assert main(["inspect", str(bad)]) == 2
    assert "cannot read" in capsys.readouterr().err
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64)).save(good)
    assert main(["inspect", str(good), "--budget", "576"]) == 2
    assert "--tokens 576" in capsys.readouterr().err
