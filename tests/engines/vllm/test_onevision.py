"""LLaVA-OneVision's own check in the vLLM plugin (the checks every served family shares are in test_families.py):
a video beside a pruned image is encoded as stock vLLM encodes it, against transformers.
"""

from __future__ import annotations

import numpy as np
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
    save_tiny_onevision,
)

import hired

pytestmark = pytest.mark.filterwarnings("ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning")


def test_a_video_beside_a_pruned_image_is_fed_whole(tmp_path):
    folder = save_tiny_onevision(tmp_path / "onevision", budget=0.2)
    model, processor = load_reference(folder)
    hired.apply(model, processor, budget=0.2)
    prompt = "USER: <image> and <video> what ? ASSISTANT:"
    image = noise_image(700, 500, seed=4)
    frames = np.random.RandomState(3).randint(0, 256, size=(4, 96, 96, 3), dtype=np.uint8)
    expected = reference_generate(model, processor, image, prompt, videos=[frames])
    with running_engine(folder) as llm:
        engine_selections(llm)
        [result] = engine_generate(llm, [({"image": image, "video": frames}, None)], prompt)
        assert_same_generation(result, expected)
        records_match(llm, model, 1)  # the image alone
