"""``hired lmms-table``'s reading of lmms-eval's files: what it refuses (the real runs are in tests/engines/lmms)."""

import json

import pytest

from hired.cli import main
from hired.engines.lmms_eval.results import model_arguments, read_runs


def test_model_arguments_keep_json_objects_whole():
    text = 'pretrained=llava-hf/llava-v1.6-vicuna-7b-hf,method=hired,budget=0.2,method_options={"alpha":0.3,"score":"cls"}'
    assert model_arguments(text) == {"pretrained": "llava-hf/llava-v1.6-vicuna-7b-hf", "method": "hired", "budget": "0.2",
                                     "method_options": '{"alpha":0.3,"score":"cls"}'}


def test_missing_paths_empty_folders_and_other_models_are_refused(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_runs([tmp_path / "nowhere"])
    with pytest.raises(ValueError, match=r"no lmms-eval results \(\*_results.json\)"):
        read_runs([tmp_path])
    other = tmp_path / "x_results.json"
    other.write_text(json.dumps({"results": {}, "config": {"model": "llava_hf", "model_backend": "lmms_eval.models.simple.llava_hf"}}))
    with pytest.raises(ValueError, match="a run of model 'llava_hf', not of hired"):
        read_runs([other])
    other.write_text("{}")
    with pytest.raises(ValueError, match="not an lmms-eval results file"):
        read_runs([other])


def test_the_command_reports_a_bad_folder_in_one_line(tmp_path, capsys):
    assert main(["lmms-table", str(tmp_path / "nowhere"), "--out", str(tmp_path / "t")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "does not exist" in error
