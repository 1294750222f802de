"""Names that moved or were renamed keep working from their old place, each with one DeprecationWarning that names
the new one."""

import importlib

import pytest
import torch
from PIL import Image

import hired
from hired import algorithm
from hired.families.llava_next.tiny import tiny_llava_next
from hired.methods import Selection

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
    for module in ("hired.geometry", "hired.testing", "hired.algorithm"):
        with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
            getattr(importlib.import_module(module), "nothing_here")


def test_tiny_models_lists_every_registered_family_by_its_own_builder():
    from hired.families import registered_families
    from hired.testing import TINY_MODELS

    assert sorted(TINY_MODELS) == sorted(family.name for family in registered_families())
    for family in registered_families():
        assert TINY_MODELS[family.name].__module__ == type(family).__module__.rpartition(".")[0] + ".tiny"


def test_the_old_count_function_and_method_warn_and_agree():
    with pytest.warns(DeprecationWarning, match=r"token_budget is renamed hired.algorithm.token_count"):
        old = algorithm.token_budget
    assert old(1000, fraction=0.2) == algorithm.token_count(1000, fraction=0.2) == 200
    config = hired.HiredConfig(budget=0.2)
    with pytest.warns(DeprecationWarning, match=r"HiredConfig.budget_for is renamed HiredConfig.fed_tokens"):
        assert config.budget_for(576) == config.fed_tokens(576) == 115


def test_the_old_partition_count_names_warn_and_agree():
    kept = [torch.tensor([0, 3]), torch.tensor([1])]
    with pytest.warns(DeprecationWarning, match=r"Selection\(budgets=...\) is renamed"):
        selection = Selection(budgets=torch.tensor([2, 1]), kept=kept)
    with pytest.warns(DeprecationWarning, match=r"Selection.budgets is renamed Selection.partition_tokens"):
        assert selection.budgets.tolist() == selection.partition_tokens.tolist() == [2, 1]

    model, processor = tiny_llava_next()
    hired.apply(model, processor, budget=0.2)
    inputs = processor(images=Image.new("RGB", (300, 200), "gray"), text="<image> hi", return_tensors="pt")
    model(**inputs)
    record = hired.selections(model)[0]
    with pytest.warns(DeprecationWarning, match=r"SelectionRecord.budgets is renamed SelectionRecord.partition_tokens"):
        assert torch.equal(record.budgets, record.partition_tokens)
    assert record.to_dict()["partition_tokens"] == record.partition_tokens.tolist()
