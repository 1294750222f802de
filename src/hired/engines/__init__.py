"""Integrations with serving and evaluation engines (vLLM, lmms-eval).

Each engine is one module or subpackage here, imported only when its engine loads it (through the
engine's plugin entry point), and depends only on hired's public API (``hired.apply``,
``hired.HiredConfig``, ``hired.selections``, the registries, :mod:`hired.loading`) and on the
pure modules (:mod:`hired.algorithm`, :mod:`hired.geometry`, :mod:`hired.methods`). A test checks
that boundary. The engines themselves are optional extras, never dependencies of the core.
"""
