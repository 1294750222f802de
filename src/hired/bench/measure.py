"""Timing one request, stage by stage, and the peak memory of one request in a fresh process.

The stages are read from outside the model: forward hooks on the vision tower, the projector and
the language model, a timing wrapper around the inner model's ``get_image_features`` (the call
``generate`` makes to encode images) and a streamer that stamps each generated token. Nothing in
the model or in HiRED knows it is being timed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import torch


@dataclass
class Sample:
    """Wall times (seconds) of one request, from the processor call to the last token."""

    preprocess_s: float
    image_features_s: float
    vision_s: float
    projector_s: float
    prefill_s: float
    ttft_s: float
    decode_s: float
    total_s: float
    new_tokens: int
    prompt_tokens: int
    visual_tokens: int

    @property
    def selection_s(self) -> float:
        """Image-feature work that is neither the tower nor the projector: token selection (or the
        stock model's unpadding and newline packing)."""
        return self.image_features_s - self.vision_s - self.projector_s

    @property
    def other_s(self) -> float:
        """Time to first token outside the measured stages: embedding, scatter, LM head, generate's own work."""
        return self.ttft_s - self.preprocess_s - self.image_features_s - self.prefill_s


class _TokenClock:
    """A ``generate`` streamer that records when each new token arrives (the prompt is skipped)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.times.append(perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


class StageClock:
    """Context manager timing the vision tower, projector, image-feature call and prefill of a model."""

    def __init__(self, model) -> None:
        self.inner = model.model
        self.spans = {"vision": 0.0, "projector": 0.0, "image_features": 0.0}
        self.projector_in_tower = False
        self.prefill_s: float | None = None
        self._starts: dict[str, float] = {}
        self._handles: list = []

    def _span(self, name: str, module: torch.nn.Module) -> None:
        def before(*_):
            self._starts[name] = perf_counter()

        def after(*_):
            self.spans[name] += perf_counter() - self._starts.pop(name)

        self._handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def __enter__(self) -> "StageClock":
        # LLaVA-style models hold the tower and the projector side by side; Qwen-VL's tower holds its merger.
        tower = getattr(self.inner, "vision_tower", None) or self.inner.visual
        projector = getattr(self.inner, "multi_modal_projector", None) or tower.merger
        self.projector_in_tower = any(module is projector for module in tower.modules())
        self._span("vision", tower)
        self._span("projector", projector)

        def before_llm(*_):
            self._starts.setdefault("llm", perf_counter())

        def after_llm(*_):
            if self.prefill_s is None:
                self.prefill_s = perf_counter() - self._starts["llm"]

        language_model = self.inner.language_model
        self._handles += [
            language_model.register_forward_pre_hook(before_llm),
            language_model.register_forward_hook(after_llm),
        ]
        encode = self.inner.get_image_features  # the bound method of the current (stock or patched) class

        @functools.wraps(encode)
        def timed(*args, **kwargs):
            start = perf_counter()
            try:
                return encode(*args, **kwargs)
            finally:
                self.spans["image_features"] += perf_counter() - start

        self.inner.get_image_features = timed
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        del self.inner.get_image_features

    @property
    def vision_s(self) -> float:
        """The tower's own time, without the projector where the tower runs it."""
        return self.spans["vision"] - (self.spans["projector"] if self.projector_in_tower else 0.0)


def prepare_inputs(processor, images: list, prompt: str, dtype: torch.dtype) -> dict:
    """Processor call for one prompt per image (a batch), pixels cast to the model's dtype.

    ``<image>`` in ``prompt`` stands for the processor's image token.
    """
    prompt = prompt.replace("<image>", processor.image_token)
    inputs = processor(images=images, text=[prompt] * len(images), return_tensors="pt", padding=True)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


def generate_kwargs(new_tokens: int) -> dict[str, Any]:
    """Greedy decoding of exactly ``new_tokens`` tokens (random weights must not stop early at EOS)."""
    return {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}


def time_request(model, processor, images: list, prompt: str, new_tokens: int) -> Sample:
    """Run one request and split its time to first token into stages."""
    clock = _TokenClock()
    image_token_id = model.config.image_token_id
    with StageClock(model) as stages, torch.inference_mode():
        start = perf_counter()
        inputs = prepare_inputs(processor, images, prompt, model.dtype)
        preprocessed = perf_counter()
        model.generate(**inputs, streamer=clock, **generate_kwargs(new_tokens))
        end = perf_counter()
    if len(clock.times) != new_tokens or stages.prefill_s is None:
        raise RuntimeError(f"expected {new_tokens} streamed tokens and one prefill, got {len(clock.times)} tokens")
    input_ids = inputs["input_ids"]
    return Sample(
        preprocess_s=preprocessed - start,
        image_features_s=stages.spans["image_features"],
        vision_s=stages.vision_s,
        projector_s=stages.spans["projector"],
        prefill_s=stages.prefill_s,
        ttft_s=clock.times[0] - start,
        decode_s=clock.times[-1] - clock.times[0],
        total_s=end - start,
        new_tokens=new_tokens,
        prompt_tokens=int(input_ids.shape[1]),
        visual_tokens=int((input_ids[0] == image_token_id).sum()),
    )
