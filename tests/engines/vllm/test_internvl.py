"""InternVL's own checks in the vLLM plugin (the checks every served family shares are in test_families.py), against
transformers: a request's tile settings change its image's grid and count, and a tower with query and key norms.
"""

from __future__ import annotations

import pytest
from conftest import (
    assert_same_generation,
    engine_generate,
    engine_selections,
    load_reference,
    noise_image,
    records_match,
    reference_generate,
    running_engine,
    save_tiny_internvl,
)

import hired

pytestmark = pytest.mark.filterwarnings("ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning")

PROMPT = "USER: <IMG_CONTEXT> what is in the image ? ASSISTANT:"


def test_a_request_with_its_own_tile_limit(tmp_path):
    """max_patches in one request cuts its image into fewer tiles; the count and selection follow, beside a request
    at the engine's settings."""
    folder = save_tiny_internvl(tmp_path / "internvl", budget=0.2)
    model, processor = load_reference(folder)
    image = noise_image(1400, 500, seed=2)
    with running_engine(folder) as llm:
        engine_selections(llm)
        results = engine_generate(llm, [(image, {"tokens": 40, "max_patches": 2}), (image, None)], PROMPT)
        records = engine_selections(llm)
    hired.apply(model, processor, tokens=40)
    assert_same_generation(results[0], reference_generate(model, processor, image, PROMPT, max_patches=2))
    assert records[0].to_dict() == hired.selections(model)[0].to_dict()
    hired.apply(model, processor, budget=0.2)
    assert_same_generation(results[1], reference_generate(model, processor, image, PROMPT))
    assert records[0].grid == (1, 2) and records[1].grid != (1, 2)


def test_a_tower_with_query_key_norms(tmp_path):
    folder = save_tiny_internvl(tmp_path / "qk-norm", vision={"use_qk_norm": True}, budget=0.2)
    model, processor = load_reference(folder)
    image = noise_image(900, 450, seed=9)
    with running_engine(folder) as llm:
        engine_selections(llm)
        [result] = engine_generate(llm, [(image, None)], PROMPT)
        hired.apply(model, processor, budget=0.2)
        assert_same_generation(result, reference_generate(model, processor, image, PROMPT))
        records_match(llm, model, 1)
