"""What the plugin does for the models it does not prune: refuse hired's settings instead of ignoring them.

vLLM serves such a model with its own classes, which never read a ``hired`` entry of the model's
configuration, and hands a request's ``mm_processor_kwargs`` to a Hugging Face processor that drops
keys it does not know: the model would be served stock while its configuration or the request asks
for pruning. :func:`install` (called by ``register``, in every vLLM process) wraps two methods of
vLLM's global registries:

- ``ModelRegistry.inspect_model_cls``, which every engine calls when it builds its model
  configuration, for every architecture: it refuses a ``hired`` entry on an architecture the plugin
  does not serve (before vLLM probes a multimodal processor, whose ``ValueError`` would mean
  "text-only"), and checks the plugin's model internals before vLLM imports the plugin's classes
  (vLLM logs and hides an error raised while importing them);
- ``MULTIMODAL_REGISTRY.create_processor``: a processor that is not the plugin's refuses, per
  request, hired's keys.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from ...state import CONFIG_KEY
from . import internals
from .settings import SERVED_ARCHITECTURES, UnservableConfig, check_unserved_request, unserved_config

# Marks the plugin's wrappers (register may run more than once in a process) and its own processors,
# which check requests themselves.
GUARD_MARK = "hired_guard"


def install() -> None:
    """Wrap vLLM's model and processor registries (once per process)."""
    from vllm import ModelRegistry
    from vllm.multimodal import MULTIMODAL_REGISTRY

    if not getattr(ModelRegistry.inspect_model_cls, GUARD_MARK, False):
        ModelRegistry.inspect_model_cls = _guard_inspection(ModelRegistry.inspect_model_cls)
    if not getattr(MULTIMODAL_REGISTRY.create_processor, GUARD_MARK, False):
        MULTIMODAL_REGISTRY.create_processor = _guard_processors(MULTIMODAL_REGISTRY.create_processor)


def _guard_inspection(inspect_model_cls: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(inspect_model_cls)
    def guarded(architectures, model_config):
        names = [architectures] if isinstance(architectures, str) else list(architectures)
        if any(name in SERVED_ARCHITECTURES for name in names):
            internals.check(internals.MODELS)
        model_info, architecture = inspect_model_cls(architectures, model_config)
        if architecture not in SERVED_ARCHITECTURES and getattr(model_config.hf_config, CONFIG_KEY, None) is not None:
            raise UnservableConfig(unserved_config(architecture))
        return model_info, architecture

    setattr(guarded, GUARD_MARK, True)
    return guarded


def _guard_processors(create_processor: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(create_processor)
    def guarded(model_config, *args, **kwargs):
        processor = create_processor(model_config, *args, **kwargs)
        if not getattr(processor, GUARD_MARK, False):
            _refuse_hired_requests(processor, f"{model_config.architecture} ({type(processor).__name__})")
        return processor

    setattr(guarded, GUARD_MARK, True)
    return guarded


def _refuse_hired_requests(processor, served_as: str) -> None:
    """Make ``processor`` refuse hired's keys in each request (vLLM calls ``apply`` once per request)."""
    apply = processor.apply

    @functools.wraps(apply)
    def checked(inputs, *args, **kwargs):
        check_unserved_request(inputs.hf_processor_mm_kwargs, served_as)
        return apply(inputs, *args, **kwargs)

    processor.apply = checked
