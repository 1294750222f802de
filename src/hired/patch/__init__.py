"""Adapters: one module per model family or engine, each a thin layer over :mod:`hired.algorithm`."""
