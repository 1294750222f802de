"""The README's main-job command, end to end on the bundled assets (real encoder, trained model)."""

import json

import pytest

from hired.cli import main

pytest.importorskip("onnx", reason="the offline extra is not installed")


def test_demo_runs_offline_and_reports_selections_and_answers(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path), "--questions", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [item["image"] for item in report["images"]] == ["astronaut.jpg", "document.png"]
    for item in report["images"]:
        assert sum(item["partition_tokens"]) == item["visual_tokens"] == round(0.2 * item["stock_tokens"])
        assert item["kept_per_partition"] == item["partition_tokens"]
        assert (tmp_path / (item["image"].split(".")[0] + "-selection.png")).stat().st_size > 10_000
    assert len(report["answers"]) == 2
    for row in report["answers"]:
        assert row["tokens_budget"] < row["tokens_full"]
        assert row["answer_full"] and row["answer_budget"]
