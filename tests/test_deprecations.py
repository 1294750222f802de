"""Renamed public names keep working, each with one DeprecationWarning that names the new one."""

import pytest
import torch

import hired
from hired import algorithm
from hired.methods import Selection
from hired.testing import tiny_llava_next
from PIL import Image


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


def test_an_unknown_name_is_still_an_attribute_error():
    with pytest.raises(AttributeError, match="token_budgets"):
        algorithm.token_budgets  # noqa: B018
