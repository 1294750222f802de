"""Full budget is the stock model on every call path of every family.

A configuration that keeps every token (``budget=1.0``, or ``tokens`` at or above the stock count) must leave
each public entry point bit-identical to the unpatched model, whatever the caller passes that the stock model
accepts: the outer and the inner model's ``forward``, ``get_image_features`` and ``generate``, fed by the stock
processor or by the processor ``hired.apply`` returns. Built from the family registry, so a new family is
covered by its tiny model alone.
"""

from __future__ import annotations

import copy
import inspect

import numpy as np
import pytest
import torch
from PIL import Image

import hired
from hired.testing import TINY_MODELS

IMAGE = Image.fromarray(np.random.RandomState(3).randint(0, 256, size=(500, 800, 3), dtype=np.uint8))
# A count above the stock count of any image of any tiny model (the largest grids stay below 10,000 tokens).
EVERY_TOKEN = {"budget": {"budget": 1.0}, "tokens": {"tokens": 100_000}}


def encode(processor) -> dict:
    text = f"USER: {processor.image_token} what is in the image ? ASSISTANT:"
    return dict(processor(images=[IMAGE], text=[text], return_tensors="pt"))


def accepted(function, inputs: dict) -> dict:
    """The entries of ``inputs`` that ``function`` takes by name (stock signatures decide what a stock caller passes)."""
    parameters = inspect.signature(function).parameters
    return {key: value for key, value in inputs.items() if key in parameters}


def image_inputs(inputs: dict) -> dict:
    return {key: value for key, value in inputs.items() if key not in ("input_ids", "attention_mask", "mm_token_type_ids")}


def outputs(model, inner_class, inputs: dict, image_keys: dict) -> dict:
    """Every entry point's output for ``inputs``; ``image_keys``: what get_image_features is given."""
    with torch.no_grad():
        return {
            "outer.forward": model(**inputs).logits,
            "inner.forward": model.model(**inputs).last_hidden_state,
            "outer.get_image_features": model.get_image_features(**image_keys),
            "inner.get_image_features": model.model.get_image_features(**image_keys),
            "outer.generate": model.generate(**inputs, max_new_tokens=3, do_sample=False),
        }


def assert_identical(got, expected, where: str) -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.shape == expected.shape and torch.equal(got, expected), where
    elif isinstance(expected, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(expected), where
        for index, (a, b) in enumerate(zip(got, expected)):
            assert_identical(a, b, f"{where}[{index}]")
    elif hasattr(expected, "keys"):  # ModelOutput
        assert set(got.keys()) == set(expected.keys()), where
        for key in expected.keys():
            assert_identical(got[key], expected[key], f"{where}.{key}")
    else:
        assert got == expected, where


@pytest.fixture(scope="module", params=sorted(TINY_MODELS))
def stock(request):
    """A tiny model of each family and the unpatched model's outputs for the stock processor's inputs."""
    model, processor = TINY_MODELS[request.param](text_layers=2)
    model.eval()
    inputs = encode(processor)
    family = hired.family_of(model)
    image_keys = accepted(family.inner_class.get_image_features, image_inputs(inputs))
    return model, processor, inputs, outputs(model, family.inner_class, inputs, image_keys)


@pytest.mark.parametrize("amount", sorted(EVERY_TOKEN))
@pytest.mark.parametrize("source", ["stock processor", "hired processor"])
def test_every_entry_point_is_stock_at_full_budget(stock, amount, source):
    model, processor, stock_inputs, expected = stock
    model, processor = copy.deepcopy(model), copy.deepcopy(processor)
    family = hired.family_of(model)
    hired.apply(model, processor, **EVERY_TOKEN[amount])
    if source == "stock processor":
        inputs = stock_inputs
        image_keys = accepted(family.inner_class.get_image_features, image_inputs(inputs))
    else:
        inputs = encode(processor)
        assert torch.equal(inputs["input_ids"], stock_inputs["input_ids"]), "full budget changed the prompt"
        image_keys = accepted(family.hired_inner_class.get_image_features, image_inputs(inputs))
    got = outputs(model, family.inner_class, inputs, image_keys)
    for where in expected:
        assert_identical(got[where], expected[where], f"{family.name} {where} with the {source}'s inputs")


def test_below_full_budget_a_call_without_the_layout_names_what_to_pass():
    """Selection needs what hired's processor adds; a stock caller below full budget is told so, in one error."""
    model, processor = TINY_MODELS["internvl"](text_layers=2)
    inputs = encode(processor)
    hired.apply(model, budget=0.5)
    with pytest.raises(ValueError, match="image_sizes with one \\(height, width, tile_rows, tile_cols\\) row"):
        model.get_image_features(pixel_values=inputs["pixel_values"])


@pytest.mark.parametrize("settings, stock_tokens, expected", [
    ({"budget": 1.0}, 576, None),
    ({"tokens": 576}, 576, None),
    ({"tokens": 100_000}, 576, None),
    ({"method": "full"}, 576, None),
    ({"method": "fastv", "budget": 0.2}, 576, None),  # prunes inside the LLM: the vision side keeps all
    ({"tokens": 575}, 576, 575),
    ({"budget": 0.25}, 576, 144),
])
def test_one_marker_says_every_token(settings, stock_tokens, expected):
    """HiredConfig.kept_count is the one place that says an image keeps every token (None); the processors
    of both engines read it."""
    from hired.engines.vllm.settings import EVERY_TOKEN as FIELD_EVERY_TOKEN
    from hired.engines.vllm.settings import field_count, kept_field

    config = hired.HiredConfig.create(**settings)
    assert config.kept_count(stock_tokens) == expected
    # vLLM's per-image tensor field carries None as one named value, and reads it back.
    assert (kept_field(expected) == FIELD_EVERY_TOKEN) == (expected is None)
    assert field_count(kept_field(expected)) == expected


def test_an_adaptive_method_has_no_count_before_it_runs():
    with pytest.raises(ValueError, match="adaptive mode"):
        hired.HiredConfig(method="prumerge", method_options={"adaptive": True}).kept_count(576)
