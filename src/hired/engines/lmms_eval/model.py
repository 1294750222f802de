"""lmms-eval's ``hired`` model: a checkpoint of any family hired supports, with a method applied.

Model arguments (``--model_args key=value,...``):

``pretrained``
    a hub id, a folder written by ``save_pretrained`` (one saved after ``hired.apply`` keeps its
    configuration, and the arguments below replace only what they name), ``tiny-random[-FAMILY]``,
    or a name of the ``hired.models`` entry points (the testbed's ``testbed`` and ``offline``).
``method``, ``budget`` | ``tokens``, ``method_options`` (a JSON object), and any option of the method by name (``alpha=0.3``)
    the :class:`hired.HiredConfig`, validated before the model loads with its own messages.
    ``method=full`` is the stock model.
``dtype`` (``float32``, ``bfloat16``, ``float16``) and ``device`` (``cpu``, ``cuda``, ``cuda:1``, ...)
    a device this torch or machine lacks (``cuda`` on a CPU-only torch) is refused before the model loads.
``on_error``
    ``raise`` (default): a sample whose generation raises stops the evaluation with
    :class:`SampleFailed`, naming the task, the document and the cause. ``record``: the evaluation
    goes on; the sample's answer is the text ``[hired: failed: ...]`` (never an empty string), its
    per-sample log entry carries the error, and the failures are counted in the results.

Prompts: the processor's chat template with the images before the task's text where the processor
has one; ``USER: <image>\\n{text} ASSISTANT:`` (LLaVA-1.5's) otherwise; a text that already holds
``<image>`` markers is used as it is.

Records: every request's ``token_counts`` in lmms-eval's per-sample log carries ``visual_tokens``
(fed to the LLM, newline tokens included) and ``kept_tokens`` (after a method that prunes inside
the LLM; otherwise equal), as ``hired.selections`` reports them; the results' ``throughput`` section
carries their means (``avg_visual_tokens``, ``avg_kept_tokens``) and ``avg_failed_samples``.

``loglikelihood`` returns, as lmms-eval's own LLaVA models do and as its multiple-choice scoring
expects (it picks the smallest value), the mean negative log-likelihood of the continuation's
tokens, and whether greedy decoding would produce them.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from loguru import logger
from PIL import Image
from tqdm import tqdm

import hired
from hired.loading import DTYPES, chat_prompt, load_model, resolve_device

ON_ERROR = ("raise", "record")
# What lmms-eval's generation settings may hold that the model honours; anything else is reported once.
GENERATION_KEYS = ("until", "max_new_tokens", "temperature", "do_sample", "num_beams", "top_p")
DEFAULT_MAX_NEW_TOKENS = 1024  # as lmms-eval's own LLaVA models, for tasks that do not set it


class SampleFailed(RuntimeError):
    """A sample's generation raised; the evaluation stops (``on_error=raise``)."""


@dataclass
class HiredTokenCounts(TokenCounts):
    """lmms-eval's per-request token counts, with the visual tokens hired fed and kept, or the error."""

    visual_tokens: int | None = None
    kept_tokens: int | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        counts: dict[str, Any] = super().to_dict()
        for name in ("visual_tokens", "kept_tokens", "error"):
            if getattr(self, name) is not None:
                counts[name] = getattr(self, name)
        return counts


def hired_settings(method: str | None, budget: Any, tokens: Any, method_options: Any, options: dict[str, Any]) -> dict[str, Any]:
    """The model arguments that configure the method, as keywords of :meth:`hired.HiredConfig.create`,
    checked now (with the library's messages), before any model loads.

    Raises:
        ValueError: malformed ``method_options`` JSON, or any setting ``HiredConfig`` refuses.
    """
    settings: dict[str, Any] = {}
    if method is not None:
        settings["method"] = method
    if budget is not None:
        settings["budget"] = budget
    if tokens is not None:
        settings["tokens"] = tokens
    if method_options is not None:
        if isinstance(method_options, str):
            try:
                method_options = json.loads(method_options)
            except json.JSONDecodeError as error:
                raise ValueError(f"method_options must be a JSON object, e.g. method_options={{\"alpha\":0.3}}; "
                                 f"got {method_options!r} ({error.msg})") from None
        if not isinstance(method_options, dict):
            raise ValueError(f"method_options must be a JSON object, e.g. method_options={{\"alpha\":0.3}}; got {method_options!r}")
        clash = sorted(set(method_options) & set(options))
        if clash:
            raise ValueError(f"{', '.join(clash)} given both in method_options and as a model argument; give each once")
        options = {**method_options, **options}
    settings.update(options)
    config = hired.HiredConfig.create(**settings)
    config.require_fixed_count()
    return settings


class HiredLmms(lmms):
    """lmms-eval's ``hired`` model (see the module doc for its arguments)."""

    def __init__(
        self,
        pretrained: str,
        method: str | None = None,
        budget: float | None = None,
        tokens: int | None = None,
        method_options: str | dict | None = None,
        dtype: str = "float32",
        device: str | None = None,
        on_error: str = "raise",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        if str(batch_size) != "1":
            raise ValueError(f"batch_size {batch_size}: the hired model answers one sample at a time, as in the "
                             "paper's setting; pass --batch_size 1")
        settings = hired_settings(method, budget, tokens, method_options, options)
        self.device = resolve_device(device)
        self.model, self.processor = load_model(str(pretrained), dtype)
        stored = hired.stored_config(self.model)
        self.config = stored.updated(**settings) if stored is not None else hired.HiredConfig.create(**settings)
        self.config.require_fixed_count()
        hired.apply(self.model, self.processor, self.config)
        self.model.to(self.device)
        # The requests of one document (a multiple-choice task's choices) share its image: its tower run
        # is computed once and kept until the next document.
        self._tower_runs: dict = {}
        self._runs_document: tuple | None = None
        hired.share_tower_runs(self.model, self._tower_runs)
        self.on_error = on_error
        self.failures: list[dict[str, Any]] = []
        self._reported_keys: set[str] = set()
        if os.environ.get("VERBOSITY", "DEBUG").upper() != "DEBUG":  # set by lmms-eval's command line
            logger.warning("hired: lmms-eval's command line exits with status 0 even when an evaluation fails; add "
                           "--verbosity DEBUG to make a failure end the run with a non-zero status")
        logger.info(f"hired: {pretrained} with {self.config.to_dict()}")

    # ----------------------------------------------------------------------------------------
    # lmms-eval's interface

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        return self._each(requests, "generating", self._generate)

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        # A (loss, greedy) pair inside a GenerationResult: lmms-eval 0.7 turns a bare tuple into its
        # string before scoring, and the wrapper carries the token counts as for generation.
        return self._each(requests, "scoring choices", self._score)

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the hired model answers single-round tasks (generate_until, loglikelihood)")

    # ----------------------------------------------------------------------------------------

    def _each(self, requests: list[Instance], what: str, run: Callable) -> list[GenerationResult]:
        results, visual, kept, failed, generated = [], [], [], 0, 0
        start = time.perf_counter()
        for request in tqdm(requests, desc=f"hired: {what}", disable=self.rank != 0):
            try:
                result = run(*request.args)
            except Exception as error:  # the one boundary: raised as SampleFailed, or recorded, never hidden
                result = self._failed(request, error)
                failed += 1
            else:
                visual.append(result.token_counts.visual_tokens)
                kept.append(result.token_counts.kept_tokens)
                generated += result.token_counts.output_tokens or 0
            results.append(result)
        if results:
            elapsed = time.perf_counter() - start
            log_metrics(elapsed, generated, generated / elapsed if elapsed > 0 else 0.0, additional_metrics={
                "visual_tokens": sum(visual) / len(visual) if visual else 0.0,
                "kept_tokens": sum(kept) / len(kept) if kept else 0.0,
                "failed_samples": failed,
            })
        if failed:
            logger.error(f"hired: {failed} of {len(requests)} requests failed and were recorded (on_error=record); "
                         "their per-sample log entries carry the error")
        return results

    def _failed(self, request: Instance, error: Exception) -> GenerationResult:
        task, doc_id = request.args[4], request.args[3]
        cause = f"{type(error).__name__}: {error}"
        if self.on_error == "raise":
            raise SampleFailed(f"hired: task {task}, doc_id {doc_id} failed: {cause} (the evaluation stops; pass "
                               "on_error=record in --model_args to count failures and go on)") from error
        self.failures.append({"task": task, "doc_id": doc_id, "error": cause})
        logger.error(f"hired: task {task}, doc_id {doc_id} failed (recorded): {cause}")
        value: Any = f"[hired: failed: {cause}]" if request.request_type != "loglikelihood" else (float("inf"), False)
        return GenerationResult(text=value, token_counts=HiredTokenCounts(error=cause))

    def _inputs(self, context: str, doc_to_visual: Callable, doc_id: int, task: str, split: str):
        doc = self.task_dict[task][split][doc_id]
        if self._runs_document != (task, split, doc_id):
            self._tower_runs.clear()
            self._runs_document = (task, split, doc_id)
        images = _images(doc_to_visual(doc))
        prompt = chat_prompt(self.processor, context, len(images))
        inputs = self.processor(images=images or None, text=prompt, return_tensors="pt").to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return doc, inputs

    def _counts(self, input_tokens: int, output_tokens: int | None = None) -> HiredTokenCounts:
        records = hired.selections(self.model)
        return HiredTokenCounts(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            visual_tokens=sum(r.visual_tokens for r in records),
            kept_tokens=sum(r.kept_tokens for r in records),
        )

    def _generate(self, context: str, generation: dict, doc_to_visual: Callable, doc_id: int, task: str, split: str):
        _, inputs = self._inputs(context, doc_to_visual, doc_id, task, split)
        settings, stops = self._generation_settings(generation or {})
        with torch.inference_mode():
            output = self.model.generate(**inputs, **settings)
        new_tokens = output[0, inputs["input_ids"].shape[1]:]
        text = self.processor.decode(new_tokens, skip_special_tokens=True)
        for stop in stops:
            text = text.split(stop)[0]
        return GenerationResult(text=text.strip(), token_counts=self._counts(inputs["input_ids"].shape[1], len(new_tokens)))

    def _score(self, context: str, target: str | Callable, doc_to_visual: Callable, doc_id: int, task: str, split: str):
        doc, inputs = self._inputs(context, doc_to_visual, doc_id, task, split)
        continuation = target if isinstance(target, str) else target(doc)
        if not isinstance(continuation, str) or not continuation:
            raise ValueError(f"the continuation to score must be a non-empty text, got {continuation!r}")
        tokenizer = self.processor.tokenizer
        added = tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.device)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], added], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        with torch.inference_mode():
            # Counted from the end: a method that prunes inside the LLM (FastV) returns fewer positions,
            # all of them visual tokens before the text.
            logits = self.model(**inputs).logits[0, -added.shape[1] - 1 : -1].float()
        log_probs = torch.log_softmax(logits, dim=-1).gather(1, added[0, :, None])[:, 0]
        greedy = bool((logits.argmax(dim=-1) == added[0]).all())
        return GenerationResult(text=(float(-log_probs.mean()), greedy),
                                token_counts=self._counts(inputs["input_ids"].shape[1]))

    def _generation_settings(self, generation: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        unknown = sorted(set(generation) - set(GENERATION_KEYS) - self._reported_keys)
        if unknown:
            logger.warning(f"hired: generation settings {', '.join(unknown)} are not used by the hired model "
                           f"(it honours {', '.join(GENERATION_KEYS)})")
            self._reported_keys.update(unknown)
        stops = generation.get("until") or []
        stops = [stops] if isinstance(stops, str) else list(stops)
        temperature = float(generation.get("temperature", 0) or 0)
        sample = bool(generation.get("do_sample", False)) or temperature > 0
        settings: dict[str, Any] = {
            "max_new_tokens": int(generation.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
            "do_sample": sample,
            "num_beams": int(generation.get("num_beams", 1) or 1),
        }
        if sample:
            settings["temperature"] = temperature
            if generation.get("top_p") is not None:
                settings["top_p"] = float(generation["top_p"])
        return settings, [stop for stop in stops if stop]


def _images(visuals: Any) -> list[Image.Image]:
    """The task's visuals as a list of images; anything else (a video, a path) is refused."""
    if visuals is None:
        return []
    visuals = visuals if isinstance(visuals, (list, tuple)) else [visuals]
    refused = [type(v).__name__ if not isinstance(v, str) else repr(v) for v in visuals if not isinstance(v, Image.Image)]
    if refused:
        raise ValueError(f"the hired model takes images (PIL), and this task gives {', '.join(refused)}; videos and "
                         "paths are not supported")
    return list(visuals)
