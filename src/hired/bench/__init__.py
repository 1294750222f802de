"""Efficiency benchmark: time to first token, decode speed and memory of every method and budget.

The real LLaVA architectures are rebuilt from configurations stored with the package, with random
weights; see ``hired bench --help`` and :func:`run_benchmark`.
"""

from .cost import ModelShape, kv_cache_bytes, llm_prefill_flops, memory_estimate, parameter_count, vision_flops
from .models import build_model, build_processor, known_models, load_model_spec
from .report import markdown_table, write_outputs
from .runner import BenchSpec, prefill_cost, run_benchmark

__all__ = [
    "BenchSpec",
    "ModelShape",
    "build_model",
    "build_processor",
    "known_models",
    "kv_cache_bytes",
    "llm_prefill_flops",
    "load_model_spec",
    "markdown_table",
    "memory_estimate",
    "parameter_count",
    "prefill_cost",
    "run_benchmark",
    "vision_flops",
    "write_outputs",
]
