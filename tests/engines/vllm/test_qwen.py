"""Qwen-VL's own check in the vLLM plugin (the checks every served family shares are in test_families.py): a video
beside a pruned image keeps every token at its stock M-RoPE positions, against transformers.
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
    reference_generate,
    running_engine,
    save_tiny_qwen,
)

import hired

pytestmark = pytest.mark.filterwarnings("ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning")

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def test_a_video_beside_a_pruned_image_is_fed_whole(tmp_path):
    """The video keeps every token at its stock positions, after an image with fewer tokens than stock."""
    from transformers.video_utils import VideoMetadata

    folder = save_tiny_qwen(tmp_path / "qwen", "qwen2.5-vl", budget=0.25)
    model, processor = load_reference(folder)
    hired.apply(model, processor, budget=0.25)
    prompt = f"<|im_start|>user\n{IMAGE}and <|vision_start|><|video_pad|><|vision_end|>what?<|im_end|>\n<|im_start|>assistant\n"
    image = noise_image(200, 90, seed=1)
    frames = np.random.RandomState(3).randint(0, 256, size=(4, 112, 112, 3), dtype=np.uint8)
    timing = {"fps": 2.0, "duration": 2.0, "total_num_frames": 4, "frames_indices": [0, 1, 2, 3]}
    expected = reference_generate(model, processor, image, prompt, videos=[frames], do_sample_frames=False,
                                  video_metadata=[VideoMetadata(**timing)])
    video = (frames, {**timing, "video_backend": "opencv", "do_sample_frames": False})
    with running_engine(folder) as llm:
        engine_selections(llm)
        [result] = engine_generate(llm, [({"image": image, "video": video}, None)], prompt)
        records = engine_selections(llm)
    assert_same_generation(result, expected)
    assert [record.to_dict() for record in records] == [hired.selections(model)[0].to_dict()]  # the image alone
    assert records[0].visual_tokens < records[0].stock_tokens
