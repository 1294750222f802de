"""The sweep: every (batch, image size, variant), variants interleaved, medians and spread."""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from ..config import HiredConfig
from ..families import registered_families
from ..geometry import NativeGeometry, PartitionGeometry
from ..methods import available_methods, get_method
from .cost import (
    ModelShape,
    available_memory_bytes,
    image_vision_flops,
    kv_cache_bytes,
    llm_prefill_flops,
    memory_estimate,
    projected_tokens,
    projector_flops,
)
from .measure import Sample, time_request
from .models import DTYPES, ModelSpec, build_model, build_processor, load_model_spec, synthetic_image

STOCK = "stock"
GiB = 2**30


class ProbeFailed(RuntimeError):
    """A memory probe process failed (typically killed for lack of memory)."""


def default_methods() -> list[str]:
    """Every registered method that can run through ``hired.apply``, except ``full`` (the stock model)."""
    return [name for name in available_methods() if get_method(name).stage != "none"]


@dataclass
class BenchSpec:
    """What to measure.

    Args:
        model: a stored architecture (see ``hired.bench.models.known_models``).
        layers: decoder layers to build (``None``: all of them, as the checkpoint has).
        dtype: ``bfloat16``, ``float32`` or ``float16``.
        methods: method names; ``None`` means :func:`default_methods`.
        budgets: fractions of the stock visual tokens, in ``(0, 1]``.
        image_sizes: ``(width, height)`` pairs; each picks an AnyRes grid.
        batches: batch sizes; a batch holds that many images of the same size, one prompt each.
        new_tokens: tokens generated per request (>= 2: decode speed excludes the first).
        warmup: untimed requests per variant before timing.
        repeats: timed requests per variant, interleaved across variants.
        peak_memory: measure each variant's peak RSS in a fresh process.
        max_memory_gb: refuse runs estimated above this; ``None`` means the memory available now.
        seed: seed of the random weights and images.
    """

    model: str = "llava-v1.6-vicuna-7b-hf"
    layers: int | None = None
    dtype: str = "bfloat16"
    methods: list[str] | None = None
    budgets: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.4, 1.0])
    image_sizes: list[tuple[int, int]] = field(default_factory=lambda: [(672, 672)])
    batches: list[int] = field(default_factory=lambda: [1])
    new_tokens: int = 8
    warmup: int = 1
    repeats: int = 3
    peak_memory: bool = True
    max_memory_gb: float | None = None
    seed: int = 0

    def validate(self) -> ModelSpec:
        """Check every field; return the architecture. Raises ValueError with the fix."""
        spec = load_model_spec(self.model)
        if self.layers is not None and not 1 <= self.layers <= spec.full_layers:
            raise ValueError(f"--layers must be between 1 and {spec.full_layers} for {spec.name}, got {self.layers}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        depth = self.layers or spec.full_layers
        has_cls = ModelShape.from_config(spec.config()).cls
        if self.methods is None:
            self.methods = []
            for method in default_methods():
                try:
                    _check_depth(method, depth, spec.full_layers)
                    get_method(method).check_tower(has_cls, f"the vision tower of {spec.name}")
                    self.methods.append(method)
                except ValueError as error:
                    warnings.warn(f"leaving {method} out of the default methods: {error}", stacklevel=2)
        if not self.methods or not self.budgets or not self.image_sizes or not self.batches:
            raise ValueError("give at least one method, budget, image size and batch size")
        for method in self.methods:
            if method == STOCK or get_method(method).stage == "none":
                raise ValueError(f"{method!r} is the reference every run measures; list only reducing methods")
            for budget in self.budgets:
                HiredConfig(budget=budget, method=method)
            _check_depth(method, depth, spec.full_layers)
            get_method(method).check_tower(has_cls, f"the vision tower of {spec.name}")
        for width, height in self.image_sizes:
            if width < 1 or height < 1:
                raise ValueError(f"image sizes must be positive, got {width}x{height}")
        for name, value, low in (("batch", min(self.batches), 1), ("new tokens", self.new_tokens, 2),
                                 ("repeats", self.repeats, 1), ("warmup", self.warmup, 0)):
            if value < low:
                raise ValueError(f"{name} must be at least {low}, got {value}")
        return spec

    def variants(self) -> list[tuple[str, float]]:
        return [(STOCK, 1.0)] + [(method, budget) for method in self.methods for budget in self.budgets]


def _check_depth(method: str, depth: int, full_layers: int) -> None:
    """Refuse an LLM-side method whose pruning layer the decoder built for the run does not have."""
    layer = getattr(get_method(method).make_options(), "layer", None)
    if get_method(method).stage == "llm" and layer is not None and layer >= depth:
        fix = f"build more with --layers {layer + 1} or more, or" if layer < full_layers else "so"
        raise ValueError(f"{method} prunes before decoder layer {layer}, and the model of this run has {depth} "
                         f"decoder layers; {fix} leave {method} out")



def check_memory(spec: ModelSpec, bench: BenchSpec) -> dict[str, int]:
    """Estimate the largest request of the run from the config; refuse before building anything."""
    shape = ModelShape.from_config(spec.config(bench.layers))
    processor = build_processor(spec)
    geometries = [_geometry(spec, processor, size) for size in bench.image_sizes]
    largest = max(geometries, key=lambda g: g.stock_tokens + g.newline_tokens)
    sequence = largest.stock_tokens + largest.newline_tokens + len(spec.prompt.split())
    estimate = memory_estimate(shape, sequence, max(bench.batches), largest, bench.new_tokens,
                               DTYPES[bench.dtype].itemsize)
    limit = bench.max_memory_gb * GiB if bench.max_memory_gb is not None else available_memory_bytes()
    if estimate["total"] > limit:
        parts = ", ".join(f"{name} {value / GiB:.1f}" for name, value in estimate.items() if name != "total")
        depth = bench.layers or spec.full_layers
        raise ValueError(
            f"this run would need about {estimate['total'] / GiB:.1f} GiB ({parts} GiB) for {spec.name} with "
            f"{depth} decoder layers at batch {max(bench.batches)}, but only {limit / GiB:.1f} GiB is available; "
            "use fewer --layers, a smaller --batch or a smaller --dtype"
        )
    return estimate


def _family(spec: ModelSpec):
    families = {family.name: family for family in registered_families()}
    if spec.family not in families:
        raise ValueError(f"{spec.name} is of family {spec.family!r}, which is not registered; known: {', '.join(families)}")
    return families[spec.family]


def _geometry(spec: ModelSpec, processor, size: tuple[int, int]) -> PartitionGeometry:
    """The geometry the checkpoint's processor gives an image of ``(width, height)``."""
    width, height = size
    return _family(spec).processor_geometry(processor, (height, width))


def _probe(bench: BenchSpec, spec: ModelSpec, batch: int, size, method: str, budget: float) -> dict[str, float]:
    request = {"model": spec.name, "layers": bench.layers, "dtype": bench.dtype, "seed": bench.seed,
               "method": method, "budget": budget, "batch": batch, "image_size": list(size),
               "prompt": spec.prompt, "new_tokens": bench.new_tokens}
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "hired.bench.probe", json.dumps(request)],
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        cause = "killed by the system (out of memory?)" if result.returncode < 0 else result.stderr.strip()[-2000:]
        raise ProbeFailed(f"the memory probe of {method}@{budget} (batch {batch}, {size[0]}x{size[1]}) failed: {cause}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _switch(model, processor, method: str, budget: float) -> None:
    import hired

    hired.remove(model, processor)
    if method != STOCK:
        hired.apply(model, processor, method=method, budget=budget)


def run_benchmark(bench: BenchSpec, progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Measure every variant and return one record per (batch, image size, method, budget).

    ``progress`` is called once per finished step (memory probe or request) with a short label.
    """
    spec = bench.validate()
    check_memory(spec, bench)
    step = progress or (lambda label: None)
    variants = bench.variants()
    processor = build_processor(spec)
    model = build_model(spec, bench.layers, bench.dtype, processor, seed=bench.seed)
    shape = ModelShape.from_config(model.config)
    records = []
    for batch in bench.batches:
        for size in bench.image_sizes:
            images = [synthetic_image(size[0], size[1], bench.seed + index) for index in range(batch)]
            samples: dict[tuple[str, float], list[Sample]] = {variant: [] for variant in variants}
            for _ in range(bench.warmup):
                for method, budget in variants:
                    _switch(model, processor, method, budget)
                    time_request(model, processor, images, spec.prompt, bench.new_tokens)
                    step(f"warm-up {method}@{budget}")
            for round_index in range(bench.repeats):
                shift = round_index % len(variants)
                for method, budget in variants[shift:] + variants[:shift]:
                    _switch(model, processor, method, budget)
                    samples[method, budget].append(
                        time_request(model, processor, images, spec.prompt, bench.new_tokens))
                    step(f"{method}@{budget}")
            geometry = _geometry(spec, processor, size)
            records += [_record(bench, spec, shape, geometry, batch, size, method, budget, samples)
                        for method, budget in variants]
    # The probes build their own copy of the model: free this one first so that both never coexist.
    del model, processor
    gc.collect()
    for record in records:
        size = tuple(int(v) for v in record["image_size"].split("x"))
        if bench.peak_memory:
            record.update(_probe(bench, spec, record["batch"], size, record["method"], record["budget"]))
            step(f"memory {record['method']}@{record['budget']}")
        else:
            record.update({"peak_rss_mb": None, "model_rss_mb": None})
    return records


def _record(bench, spec, shape, geometry, batch, size, method, budget, samples) -> dict[str, Any]:
    runs, stock_runs = samples[method, budget], samples[STOCK, 1.0]
    first = runs[0]
    speedups = [s.ttft_s / r.ttft_s for s, r in zip(stock_runs, runs)]
    value_bytes = DTYPES[bench.dtype].itemsize
    projects_all = _family(spec).selects_projected
    flops = prefill_cost(shape, geometry, first, batch, method, bench.new_tokens, value_bytes, projects_all)
    stock_flops = prefill_cost(shape, geometry, stock_runs[0], batch, STOCK, bench.new_tokens, value_bytes,
                               projects_all)
    ideal = stock_flops["prefill_flops"] / flops["prefill_flops"] if flops["prefill_flops"] else None
    speedup = statistics.median(speedups)
    ttft = [r.ttft_s for r in runs]
    median = statistics.median
    record = {
        "model": spec.checkpoint,
        "layers": bench.layers or spec.full_layers,
        "full_layers": spec.full_layers,
        "dtype": bench.dtype,
        "batch": batch,
        "image_size": f"{size[0]}x{size[1]}",
        "grid": grid_label(geometry),
        "method": method,
        "budget": budget,
        "visual_tokens": first.visual_tokens,
        "stock_visual_tokens": stock_runs[0].visual_tokens,
        "prompt_tokens": first.prompt_tokens,
        "new_tokens": bench.new_tokens,
        "warmup": bench.warmup,
        "repeats": len(runs),
        "ttft_s": median(ttft),
        "ttft_s_min": min(ttft),
        "ttft_s_max": max(ttft),
        "preprocess_s": median([r.preprocess_s for r in runs]),
        "vision_s": median([r.vision_s for r in runs]),
        "selection_s": median([r.selection_s for r in runs]),
        "projector_s": median([r.projector_s for r in runs]),
        "prefill_s": median([r.prefill_s for r in runs]),
        "other_s": median([r.other_s for r in runs]),
        "selection_share_of_vision": median([r.selection_s / r.vision_s for r in runs]),
        "ttft_speedup": speedup,
        "ttft_speedup_min": min(speedups),
        "ttft_speedup_max": max(speedups),
        "ttft_speedup_ideal": ideal,
        "ttft_speedup_of_ideal": speedup / ideal if ideal else None,
        "decode_tok_s": median([batch * (r.new_tokens - 1) / r.decode_s for r in runs]),
        "e2e_tok_s": median([batch * r.new_tokens / r.total_s for r in runs]),
        "e2e_s": median([r.total_s for r in runs]),
        **flops,
    }
    return record


def grid_label(geometry: PartitionGeometry) -> str:
    """Tiles as ``rows x cols`` (``0x0``: one view), or a native-resolution raster as ``rows x cols tokens``."""
    if isinstance(geometry, NativeGeometry):
        return "x".join(map(str, geometry.tokens)) + " tokens"
    return "x".join(map(str, geometry.grid))


def prefill_cost(shape: ModelShape, geometry: PartitionGeometry, sample: Sample, batch: int, method: str,
                 new_tokens: int, value_bytes: int, projects_all: bool = False,
                 drop_layer: int | None = None) -> dict[str, Any]:
    """FLOPs up to the first token and the exact KV cache after ``new_tokens`` tokens, for this request.

    Methods that prune inside the decoder change both in ways only they know: reported as ``None``.
    ``projects_all``: the family selects among projected tokens (LLaVA-OneVision, the Qwen-VL towers'
    merger), so every token is projected whatever the method keeps. ``drop_layer``: the tower layer the
    method selected at (``HiredConfig.drop_layer``, resolved), after which the tower runs over the kept
    tokens only.
    """
    if method != STOCK and not get_method(method).selects_before_llm:
        return {"prefill_flops": None, "vision_flops": None, "llm_prefill_flops": None, "kv_cache_mb": None}
    # The last token generated is never fed back, so the cache ends one short of the output length.
    kv = kv_cache_bytes(shape, sample.prompt_tokens + new_tokens - 1, batch, value_bytes)
    reduced = sample.visual_tokens < geometry.stock_tokens + geometry.newline_tokens
    # The stock path runs every tower layer and projects every patch; a reducing method runs the tower
    # up to the feature layer and projects only the tokens it keeps.
    layers_run = shape.vision_layers_used if reduced else shape.vision_layers
    drop = (drop_layer, sample.visual_tokens) if reduced and drop_layer is not None else None
    # A native tower's merger runs after the drop, over the kept groups only.
    projects_all = projects_all and not (drop is not None and isinstance(geometry, NativeGeometry))
    stock_projected = projected_tokens(shape, geometry) * batch
    projected = sample.visual_tokens * batch if reduced and not projects_all else stock_projected
    vision = batch * image_vision_flops(shape, geometry, layers_run, drop) + projector_flops(shape, projected)
    llm = llm_prefill_flops(shape, sample.prompt_tokens, batch)
    return {"prefill_flops": vision + llm, "vision_flops": vision, "llm_prefill_flops": llm, "kv_cache_mb": kv / 2**20}
