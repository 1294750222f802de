"""Names that moved into a family's folder stay importable from their old modules, with a DeprecationWarning
that names the new place."""

import importlib

import pytest

MOVED = [
    ("hired.geometry", "LLAVA_NEXT_PINPOINTS", "hired.families.llava_next"),
    ("hired.geometry", "ONEVISION_PINPOINTS", "hired.families.llava_onevision"),
    ("hired.geometry", "OnevisionGeometry", "hired.families.llava_onevision"),
    ("hired.testing", "tiny_llava_next", "hired.families.llava_next.tiny"),
    ("hired.testing", "tiny_llava", "hired.families.llava.tiny"),
    ("hired.testing", "tiny_internvl", "hired.families.internvl.tiny"),
    ("hired.testing", "tiny_llava_onevision", "hired.families.llava_onevision.tiny"),
    ("hired.testing", "tiny_qwen2_5_vl", "hired.families.qwen2_5_vl.tiny"),
    ("hired.testing", "tiny_qwen3_vl", "hired.families.qwen3_vl.tiny"),
    ("hired.testing", "QWEN_TOKENS", "hired.families.qwen2_5_vl.tiny"),
]


@pytest.mark.parametrize(("old", "name", "new"), MOVED, ids=[f"{old}.{name}" for old, name, _ in MOVED])
def test_a_moved_name_is_the_new_one_with_a_warning_naming_its_place(old, name, new):
    with pytest.warns(DeprecationWarning, match=f"{old}.{name} moved to {new};"):
        value = getattr(importlib.import_module(old), name)
    assert value is getattr(importlib.import_module(new), name)


def test_an_unknown_name_is_still_an_attribute_error():
    for module in ("hired.geometry", "hired.testing"):
        with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
            getattr(importlib.import_module(module), "nothing_here")


def test_tiny_models_lists_every_registered_family_by_its_own_builder():
    from hired.families import registered_families
    from hired.testing import TINY_MODELS

    assert sorted(TINY_MODELS) == sorted(family.name for family in registered_families())
    for family in registered_families():
        assert TINY_MODELS[family.name].__module__ == type(family).__module__.rpartition(".")[0] + ".tiny"
