"""lmms-eval plugin: every method of hired, on every family it supports, as lmms-eval's ``hired`` model.

    lmms-eval --model hired --model_args pretrained=llava-hf/llava-v1.6-vicuna-7b-hf,method=hired,budget=0.2 \\
        --tasks textvqa_val --batch_size 1 --log_samples --output_path results --verbosity DEBUG

lmms-eval finds it through the ``lmms_eval.models`` entry point, which names :func:`manifest`.
lmms-eval reads the entry points of every installed package whenever it lists or loads a model, so
this module imports nothing: the model class lives in :mod:`hired.engines.lmms_eval.model`.
"""

from __future__ import annotations

MODEL_ID = "hired"
MODEL_CLASS = "hired.engines.lmms_eval.model.HiredLmms"


def manifest():
    """The ``ModelManifest`` that registers :class:`~hired.engines.lmms_eval.model.HiredLmms` as ``hired``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS)
