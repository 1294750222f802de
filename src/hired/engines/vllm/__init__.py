"""vLLM plugin: LLaVA-NeXT and LLaVA-1.5 served with the visual tokens a hired method keeps.

    vllm serve llava-hf/llava-v1.6-mistral-7b-hf --hf-overrides '{"hired": {"budget": 0.2}}'

vLLM calls :func:`register` in every process it starts (the ``vllm.general_plugins`` entry point).
It replaces vLLM's own ``LlavaNextForConditionalGeneration`` and ``LlavaForConditionalGeneration``
with subclasses that behave exactly as the stock ones unless the model's configuration holds a
``hired`` entry (a folder saved after ``hired.apply``, or ``hf_overrides``) or a request asks for a
budget (``mm_processor_kwargs={"budget": 0.1}``). vLLM itself is imported only inside
:func:`register`; :mod:`hired.engines.vllm.settings` holds the rules, which need no vLLM.
"""

from __future__ import annotations

# The architectures the plugin serves, and the classes that replace vLLM's.
ARCHITECTURES = {
    "LlavaNextForConditionalGeneration": "hired.engines.vllm.models:HiredLlavaNextForConditionalGeneration",
    "LlavaForConditionalGeneration": "hired.engines.vllm.models:HiredLlavaForConditionalGeneration",
}


def register() -> None:
    """Register the plugin's model classes with vLLM (called by vLLM through its plugin entry point)."""
    from vllm import ModelRegistry

    for architecture, target in ARCHITECTURES.items():
        ModelRegistry.register_model(architecture, target)
