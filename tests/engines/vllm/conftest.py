"""Shared set-up of the vLLM plugin's tests: tiny random LLaVA models saved to folders, real vLLM engines on
them, and the transformers reference loaded from the same folders.

vLLM's CPU attention needs a head size of 32 or more, so the tiny decoder is 128 wide with 4 heads.
Engines run in this process and are shut down after use.
"""

from __future__ import annotations

import contextlib
import gc
import os
import tempfile

# Set before vLLM is imported: a private cache, a 1 GB KV cache, and the engine core in this process (an
# engine then starts in 3-6 s instead of 20-40 s; the tensor-parallel workers and the server still run in
# processes of their own). apply_model's functions reach the workers of those by pickle.
os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="hired-vllm-cache-"))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

import numpy as np
import pytest
import torch
from PIL import Image

import hired
from hired.families.internvl.tiny import tiny_internvl
from hired.families.llava.tiny import tiny_llava
from hired.families.llava_next.tiny import tiny_llava_next
from hired.families.llava_onevision.tiny import tiny_llava_onevision
from hired.families.qwen2_5_vl.tiny import QWEN_TOKENS, tiny_qwen2_5_vl
from hired.families.qwen3_vl.tiny import tiny_qwen3_vl
from hired.testing import tiny_tokenizer

PROMPT = "USER : <image> what is in the image ? ASSISTANT :"
NEW_TOKENS = 6
# Decoder wide enough for vLLM's CPU attention (head size 32).
SIZES = {"text_width": 128}


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def save_tiny(folder, family: str, seed: int = 0, **settings) -> str:
    """A tiny random model of ``family`` saved to ``folder``, after ``hired.apply(**settings)`` if given."""
    model, processor = (tiny_llava_next if family == "llava-next" else tiny_llava)(seed=seed, **SIZES)
    if settings:
        hired.apply(model, processor, **settings)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def save_tiny_qwen(folder, family: str, **settings) -> str:
    """A tiny random Qwen-VL of ``family`` (``qwen2.5-vl`` or ``qwen3-vl``) saved to ``folder``, after
    ``hired.apply(**settings)`` if given."""
    model, processor = (tiny_qwen2_5_vl if family == "qwen2.5-vl" else tiny_qwen3_vl)(seed=0, **SIZES)
    if family == "qwen2.5-vl":  # M-RoPE's sections must fill the rotary half of the wider decoder's head (32 / 2)
        model.config.text_config.rope_parameters["mrope_section"] = [4, 6, 6]
    if settings:
        hired.apply(model, processor, **settings)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def save_tiny_onevision(folder, **settings) -> str:
    """A tiny random LLaVA-OneVision saved to ``folder``, after ``hired.apply(**settings)`` if given."""
    model, processor = tiny_llava_onevision(seed=0, **SIZES)
    if settings:
        hired.apply(model, processor, **settings)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def save_tiny_internvl(folder, vision: dict | None = None, **settings) -> str:
    """A tiny random InternVL saved to ``folder`` (``vision``: more vision settings, such as ``use_qk_norm``), after
    ``hired.apply(**settings)`` if given."""
    model, processor = tiny_internvl(seed=0, **SIZES, **(vision or {}))
    if settings:
        hired.apply(model, processor, **settings)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def save_tiny_qwen2_vl(folder) -> str:
    """The configuration and processor of a tiny Qwen2-VL (an architecture the plugin does not serve) saved to
    ``folder``, without weights: serve it with ``load_format="dummy"``."""
    from transformers import Qwen2VLConfig, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer = tiny_tokenizer(named_tokens=QWEN_TOKENS)
    width = SIZES["text_width"]
    config = Qwen2VLConfig(
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": width, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        text_config={"vocab_size": len(tokenizer), "hidden_size": width, "intermediate_size": 2 * width,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 32768, "pad_token_id": 3, "bos_token_id": 1, "eos_token_id": 2,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}},
        **{f"{role}_id": tokenizer.convert_tokens_to_ids(token) for role, token in QWEN_TOKENS.items()},
    )
    config.architectures = ["Qwen2VLForConditionalGeneration"]
    config.save_pretrained(folder)
    Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                     video_processor=Qwen2VLVideoProcessor()).save_pretrained(folder)
    return str(folder)


def load_reference(folder: str):
    """transformers' model and processor from ``folder`` (float32, eager attention), stock classes."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    hired.remove(model)
    return model, AutoProcessor.from_pretrained(folder)


def reference_generate(model, processor, image, prompt: str = PROMPT, new_tokens: int = NEW_TOKENS, **inputs):
    """Greedy token ids, their log-probabilities and the prompt length, as transformers computes them; ``inputs``:
    more arguments of the processor (videos)."""
    inputs = processor(images=image, text=prompt, return_tensors="pt", **inputs)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
    ids = output.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    logprobs = [float(torch.log_softmax(logits[0].float(), dim=-1)[token]) for logits, token in zip(output.logits, ids)]
    return ids, logprobs, int(inputs["input_ids"].shape[1])


def engine_generate(llm, requests, prompt_text: str = PROMPT):
    """``[(ids, logprobs, prompt length)]`` of greedy requests ``[(image or images, mm_processor_kwargs or None)]`` in
    one batch (in place of the image, a ``multi_modal_data`` dict of images and videos)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, logprobs=0)
    prompts = []
    for image, kwargs in requests:
        data = image if isinstance(image, dict) else {"image": image}
        prompt = {"prompt": prompt_text, "multi_modal_data": data}
        if kwargs:
            prompt["mm_processor_kwargs"] = kwargs
        prompts.append(prompt)
    results = []
    for output in llm.generate(prompts, params, use_tqdm=False):
        completion = output.outputs[0]
        ids = list(completion.token_ids)
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs, ids)]
        results.append((ids, logprobs, len(output.prompt_token_ids)))
    return results


def engine_selections(llm) -> list[hired.SelectionRecord]:
    """The records of the images the engine encoded since the last call (from every worker: the first's)."""
    return workers_selections(llm)[0]


def records_match(llm, model, images: int) -> None:
    """The engine's records since the last call equal those of transformers' ``model`` (its last call), ``images``
    of them."""
    records = engine_selections(llm)
    expected = hired.selections(model)
    assert len(records) == len(expected) == images
    for record, reference in zip(records, expected):
        assert record.to_dict() == reference.to_dict()


def workers_selections(llm) -> list[list[hired.SelectionRecord]]:
    """Per worker (tensor-parallel rank), the records of the images it encoded since the last call."""
    return llm.apply_model(_take_selections)


def _take_selections(model) -> list[hired.SelectionRecord]:
    taken = list(model.hired_selections)
    model.hired_selections.clear()
    return taken


def assert_same_generation(engine, reference, tolerance: float = 1e-5) -> None:
    ids, logprobs, length = engine
    ref_ids, ref_logprobs, ref_length = reference
    assert length == ref_length, f"prompt of {length} tokens in vLLM, {ref_length} in transformers"
    assert ids == ref_ids
    assert np.allclose(logprobs, ref_logprobs, atol=tolerance, rtol=0), (logprobs, ref_logprobs)


@contextlib.contextmanager
def running_engine(folder: str, **options):
    """A real vLLM engine on ``folder`` (CPU, float32, eager), shut down afterwards."""
    from vllm import LLM
    from vllm.distributed import cleanup_dist_env_and_memory

    llm = LLM(model=folder, dtype="float32", enforce_eager=True, max_model_len=4096, seed=0,
              limit_mm_per_prompt={"image": 2}, **options)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    """Saved tiny models: LLaVA-NeXT after hired.apply (budget 0.2), and stock LLaVA-NeXT and LLaVA-1.5."""
    root = tmp_path_factory.mktemp("vllm-models")
    return {
        "next-hired": save_tiny(root / "next-hired", "llava-next", budget=0.2),
        "next": save_tiny(root / "next", "llava-next"),
        "llava": save_tiny(root / "llava", "llava"),
    }
