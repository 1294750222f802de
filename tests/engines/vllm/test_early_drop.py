"""The early drop (``drop_layer``) in the vLLM plugin: the method selects inside vLLM's own vision tower of every
served family and the later layers run over the kept tokens only (Qwen-VL: with their rotary positions and
windows), with the same prompt length, greedy ids, log-probabilities and records as transformers; settings it
cannot honour are refused when the engine starts.
"""

from __future__ import annotations

import functools

import pytest
from conftest import (
    assert_same_generation,
    engine_generate,
    engine_selections,
    load_reference,
    noise_image,
    reference_generate,
    running_engine,
    save_tiny,
    save_tiny_internvl,
    save_tiny_onevision,
    save_tiny_qwen,
)

import hired
from hired.engines.vllm.settings import UnservableConfig

pytestmark = pytest.mark.filterwarnings("ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning")

PROMPT = "USER: {} what is in the image ? ASSISTANT:"
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
# Each family's tiny model and two images: for InternVL and OneVision one of several tiles and a larger one (for
# OneVision a mosaic past the downsampling threshold, whose kept tokens read patches of neighbouring tiles).
FAMILIES = {
    "llava": (functools.partial(save_tiny, family="llava"), "<image>", [(500, 400)]),
    "llava-next": (functools.partial(save_tiny, family="llava-next"), "<image>", [(700, 500), (336, 900)]),
    "internvl": (save_tiny_internvl, "<IMG_CONTEXT>", [(900, 450), (1300, 1000)]),
    "llava-onevision": (save_tiny_onevision, "<image>", [(700, 500), (2000, 1500)]),
    "qwen2.5-vl": (functools.partial(save_tiny_qwen, family="qwen2.5-vl"), QWEN_IMAGE, [(300, 120), (90, 300)]),
    "qwen3-vl": (functools.partial(save_tiny_qwen, family="qwen3-vl"), QWEN_IMAGE, [(300, 120), (90, 300)]),
}
# The earliest drop of each tiny tower: layer 0 of 3 (LLaVA, InternVL), block 0 of 4 (Qwen3-VL), block 1 of 4 (the
# first full-attention block of Qwen2.5-VL's).
EARLIEST = {"qwen2.5-vl": 1}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_drop_matches_transformers(family, tmp_path):
    save, placeholder, sizes = FAMILIES[family]
    prompt = PROMPT.format(placeholder)
    layer = EARLIEST.get(family, 0)
    drop = {"budget": 0.2, "drop_layer": layer}
    folder = save(tmp_path / family)
    model, processor = load_reference(folder)
    hired.apply(model, processor, **drop)
    with running_engine(folder, hf_overrides={"hired": drop}) as llm:
        engine_selections(llm)  # forget the dummy images of memory profiling
        for index, size in enumerate(sizes):
            image = noise_image(*size, seed=11 + index)
            [result] = engine_generate(llm, [(image, None)], prompt)
            assert_same_generation(result, reference_generate(model, processor, image, prompt))
            [record], [expected] = engine_selections(llm), hired.selections(model)
            assert same_record(record, expected, sized=family != "llava")
            assert record.extras["drop_layer"] == layer and record.visual_tokens < record.stock_tokens
        # a request that keeps every token runs the stock tower, and one with its own budget drops at the same layer
        image = noise_image(*sizes[0], seed=3)
        whole, budgeted = engine_generate(llm, [(image, {"budget": 1.0}), (image, {"budget": 0.5})], prompt)
        records = engine_selections(llm)
    hired.apply(model, processor, budget=1.0, drop_layer=layer)
    assert_same_generation(whole, reference_generate(model, processor, image, prompt))
    hired.apply(model, processor, budget=0.5, drop_layer=layer)
    assert_same_generation(budgeted, reference_generate(model, processor, image, prompt))
    assert [record.extras.get("drop_layer") for record in records if not record.extras.get("stock_model")] == [layer]


def same_record(record: hired.SelectionRecord, expected: hired.SelectionRecord, sized: bool) -> bool:
    """Whether two records agree (``sized=False``: but for the image size, which vLLM's LLaVA-1.5 is not told)."""
    ours, theirs = record.to_dict(), expected.to_dict()
    if not sized:
        ours.pop("image_size"), theirs.pop("image_size")
    return ours == theirs


@pytest.mark.parametrize("save, settings, message", [
    (functools.partial(save_tiny_qwen, family="qwen2.5-vl"), {"budget": 0.2, "drop_layer": 0},
     "block 0 of this qwen2_5_vl tower attends within windows"),
    (functools.partial(save_tiny, family="llava-next"), {"budget": 0.2, "drop_layer": 2},
     "drop at a layer from -3 to 1"),
    (save_tiny_onevision, {"budget": 0.2, "drop_layer": 0, "method_options": {"selection_layer": 1}},
     "lies after drop_layer=0"),
], ids=["windowed-block", "after-the-feature-layer", "selection-after-the-drop"])
def test_a_drop_the_engine_cannot_make_is_refused_at_start(tmp_path, save, settings, message):
    from vllm import LLM

    folder = save(tmp_path / "model")
    with pytest.raises(UnservableConfig, match=message):
        LLM(model=folder, dtype="float32", enforce_eager=True, hf_overrides={"hired": settings})
