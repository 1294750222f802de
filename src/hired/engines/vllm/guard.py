"""What the plugin does for the models it does not prune: refuse hired's settings instead of ignoring them.

vLLM serves such a model with its own classes, which never read a ``hired`` entry of the model's
configuration, and hands a request's ``mm_processor_kwargs`` to a Hugging Face processor that drops
keys it does not know: the model would be served stock while its configuration or the request asks
for pruning. :func:`install` (called by ``register``, in every vLLM process) wraps two methods of
vLLM's global registries:

- ``ModelRegistry.inspect_model_cls``, which every engine calls when it builds its model
  configuration, for every architecture: it refuses a ``hired`` entry on an architecture the plugin
  does not serve (before vLLM probes a multimodal processor, whose ``ValueError`` would mean
  "text-only"), and, for an architecture it serves, checks the vLLM internals each of the plugin's
  classes declares (:func:`check_served_classes`) before vLLM uses them (vLLM logs and hides an
  error raised while importing them);
- ``MULTIMODAL_REGISTRY.create_processor``: a processor that is not the plugin's refuses, per
  request, hired's keys.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable

from ...state import CONFIG_KEY
from . import internals
from .settings import SERVED_ARCHITECTURES, SERVED_FAMILIES, UnservableConfig, check_unserved_request, unserved_config

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


def check_served_classes() -> None:
    """Check the vLLM internals that each class the plugin serves declares (its ``vllm_internals``).

    Importing the classes already needs the vLLM classes they subclass and the names they import;
    one of those missing is reported the same way.

    Raises:
        hired.engines.vllm.internals.IncompatibleVllm: the first internal the installed vLLM lacks.
    """
    try:
        modules = [importlib.import_module(served.module) for served in SERVED_FAMILIES.values()]
    except AttributeError as error:  # a vLLM module without a class the plugin subclasses or names
        module = getattr(getattr(error, "obj", None), "__name__", "")
        if not module.startswith("vllm"):
            raise
        raise internals.incompatible(f"{module}.{error.name}", "defining the plugin's classes") from error
    except ImportError as error:  # a name the plugin imports from vLLM
        if not (error.name or "").startswith("vllm"):
            raise
        raise internals.incompatible(f"a name the plugin imports ({error})", "defining the plugin's classes") from error
    for module in modules:
        for served in module.SERVED_CLASSES:
            internals.check(served.vllm_internals)


def _guard_inspection(inspect_model_cls: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(inspect_model_cls)
    def guarded(architectures, model_config):
        names = [architectures] if isinstance(architectures, str) else list(architectures)
        if any(name in SERVED_ARCHITECTURES for name in names):
            check_served_classes()
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
