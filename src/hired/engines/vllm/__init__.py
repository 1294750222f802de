"""vLLM plugin: the six families hired prunes (LLaVA-NeXT, LLaVA-1.5, InternVL, LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL)
served with the visual tokens a hired method keeps.

    vllm serve Qwen/Qwen2.5-VL-7B-Instruct --hf-overrides '{"hired": {"budget": 0.2}}'

vLLM calls :func:`register` in every process it starts (the ``vllm.general_plugins`` entry point).
It replaces vLLM's own classes of the architectures listed in ``settings.SERVED_FAMILIES``
with subclasses that behave exactly as the stock ones unless the model's configuration holds a
``hired`` entry (a folder saved after ``hired.apply``, or ``hf_overrides``) or a request asks for a
budget (``mm_processor_kwargs={"budget": 0.1}``), and makes every other model refuse a ``hired``
entry or hired's request keys rather than ignore them (:mod:`hired.engines.vllm.guard`). The subclasses
live in each served family's folder (``hired/families/<family>/vllm.py``, one line of
``settings.SERVED_FAMILIES`` each) over the mixins of :mod:`hired.engines.vllm.mixins` (and, for the
native-resolution Qwen-VL towers, :mod:`hired.engines.vllm.native`), and vLLM imports them only when it
loads such a model. vLLM itself is imported only inside :func:`register`; :mod:`hired.engines.vllm.settings`
holds the rules, which need no vLLM, and :mod:`hired.engines.vllm.internals` the checks of the vLLM
internals the plugin relies on (those ``register`` uses, declared there; each served class declares its
own beside it).
"""

from __future__ import annotations

from .settings import SERVED_FAMILIES

# The classes that replace vLLM's, by architecture.
ARCHITECTURES = {architecture: f"{served.module}:Hired{architecture}" for architecture, served in SERVED_FAMILIES.items()}


def register() -> None:
    """Register the plugin with vLLM (called by vLLM through its plugin entry point, in every process).

    Raises:
        hired.engines.vllm.internals.IncompatibleVllm: the installed vLLM lacks an internal the plugin needs.
    """
    from vllm import ModelRegistry

    from . import guard, internals

    internals.check(internals.REGISTRATION)
    internals.warn_if_untested()
    for architecture, target in ARCHITECTURES.items():
        ModelRegistry.register_model(architecture, target)
    guard.install()
