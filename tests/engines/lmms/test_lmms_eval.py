"""lmms-eval with the hired model, run for real on the testbed's offline tasks.

Every figure is read from what lmms-eval returned or wrote (results JSON, per-sample logs), and
compared with ``hired eval``'s own path on the same scenes (the testbed's answer function after
``hired.apply``), never with the plugin's own code.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# lmms-eval caches the json dataset of every task folder it reads; keep them out of the user's cache.
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="hired-lmms-datasets-"))

import torch
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.tasks import TaskManager

import hired
from hired.engines.lmms_eval.model import HiredLmms, SampleFailed
from hired.engines.lmms_eval.results import read_runs
from hired.loading import load_model
from hired.testing import TINY_MODELS
from hired_testbed.evaluate import Setting, evaluate
from hired_testbed.lmms_task import CHOICES, CHOICE_TASK, GENERATE_TASK, write_tasks
from hired_testbed.vlm import answer, load_trained_model, prompt, question_split

SEED, N = 1000, 10
SETTINGS = {"full": Setting("full", 1.0, None), "hired-0.2": Setting("hired", 0.2, 0.5)}
MODEL_ARGS = {"full": "pretrained=testbed,method=full", "hired-0.2": "pretrained=testbed,method=hired,budget=0.2,alpha=0.5"}
LMMS_EVAL = Path(sys.executable).with_name("lmms-eval")
BROKEN_DOC = 3
BROKEN_TASK = "hired_scenes_broken"


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    write_tasks(folder, SEED, N)
    return folder


@pytest.fixture(scope="module")
def broken_tasks(tasks, tmp_path_factory):
    """The generation task with one document whose visual is a video path, which the model refuses."""
    folder = tmp_path_factory.mktemp("broken")
    text = (tasks / f"{GENERATE_TASK}.yaml").read_text()
    text = text.replace(f"task: {GENERATE_TASK}", f"task: {BROKEN_TASK}")
    text = text.replace("data/metadata.jsonl", str(tasks / "data/metadata.jsonl")).replace("utils.", "broken.")
    (folder / f"{BROKEN_TASK}.yaml").write_text(text)
    (folder / "broken.py").write_text(
        "from pathlib import Path\n"
        "from hired_testbed.lmms_task import hooks\n"
        f"doc_to_visual, doc_to_text, doc_to_choice, process_results = hooks(Path({str(tasks)!r}))\n"
        "_visual = doc_to_visual\n"
        f"def doc_to_visual(doc):\n    return ['clip.mp4'] if doc['id'] == {BROKEN_DOC} else _visual(doc)\n"
    )
    return folder


@pytest.fixture(scope="module")
def reference():
    """Per setting: the answers and visual tokens of hired eval's path, and hired eval's accuracy."""
    model, processor = load_trained_model()
    samples = question_split(SEED, N)
    out = {}
    for name, setting in SETTINGS.items():
        hired.apply(model, processor, setting.config(256))
        answers, kept, visual = [], [], []
        for sample in samples:
            answers.append(answer(model, processor, [sample.image], [sample.question])[0])
            records = hired.selections(model)
            kept.append(sum(r.kept_tokens for r in records))
            visual.append(sum(r.visual_tokens for r in records))
        hired.remove(model, processor)
        accuracy = evaluate(model, processor, samples, [setting])[0]["accuracy"]
        out[name] = {"answers": answers, "kept": kept, "visual": visual, "accuracy": accuracy,
                     "targets": [s.answer for s in samples]}
    return out


def _evaluate(folder, model_args, task, **kwargs):
    return simple_evaluate(model="hired", model_args=model_args, tasks=[task], batch_size=1, log_samples=True,
                           task_manager=TaskManager(include_path=str(folder), include_defaults=False), **kwargs)


def _cli(folder, model_args, task, output, *extra):
    command = [str(LMMS_EVAL), "--model", "hired", "--model_args", model_args, "--tasks", task, "--batch_size", "1",
               "--include_path", str(folder), "--output_path", str(output), "--log_samples", "--verbosity", "DEBUG", *extra]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)


def _response(logged):
    """A logged sample's answer: lmms-eval keeps a list in memory and writes a single one as it is."""
    response = logged["filtered_resps"]
    return response[0] if isinstance(response, list) else response


def _written(output):
    files = sorted(Path(output).rglob("*_results.json"))
    return files, {f.name: f for f in Path(output).rglob("*_samples_*.jsonl")}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_in_process_answers_tokens_and_accuracy_equal_hired_eval(tasks, reference, setting):
    result = _evaluate(tasks, MODEL_ARGS[setting], GENERATE_TASK)
    expected = reference[setting]
    samples = sorted(result["samples"][GENERATE_TASK], key=lambda s: s["doc_id"])
    assert [_response(s) for s in samples] == expected["answers"]
    assert [s["target"] for s in samples] == expected["targets"]
    assert [s["token_counts"][0]["kept_tokens"] for s in samples] == expected["kept"]
    assert [s["token_counts"][0]["visual_tokens"] for s in samples] == expected["visual"]
    assert result["results"][GENERATE_TASK]["exact_match,none"] == pytest.approx(expected["accuracy"])
    assert result["throughput"]["avg_kept_tokens"] == pytest.approx(sum(expected["kept"]) / N)
    assert result["throughput"]["avg_failed_samples"] == 0
    if setting != "full":  # the budget took effect
        assert max(expected["kept"]) < min(reference["full"]["kept"])


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_command_line_writes_the_same_results_and_lmms_table_reads_them(tasks, reference, setting, tmp_path):
    run = _cli(tasks, MODEL_ARGS[setting], GENERATE_TASK, tmp_path / "out")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    files, sample_logs = _written(tmp_path / "out")
    assert len(files) == 1
    document = json.loads(files[0].read_text())
    expected = reference[setting]
    assert document["results"][GENERATE_TASK]["exact_match,none"] == pytest.approx(expected["accuracy"])
    (log,) = sample_logs.values()
    logged = sorted((json.loads(line) for line in log.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert [_response(s) for s in logged] == expected["answers"]
    assert [s["token_counts"][0]["kept_tokens"] for s in logged] == expected["kept"]

    table = subprocess.run([str(Path(sys.executable).with_name("hired")), "lmms-table", str(tmp_path / "out"),
                            "--out", str(tmp_path / "table"), "--json"], capture_output=True, text=True, timeout=300)
    assert table.returncode == 0, table.stderr
    (record,) = json.loads(table.stdout)
    method, budget = SETTINGS[setting].method, (None if setting == "full" else SETTINGS[setting].budget)
    assert (record["task"], record["method"], record["budget"], record["failed"]) == (GENERATE_TASK, method, budget, 0)
    assert record["value"] == pytest.approx(expected["accuracy"])
    assert record["kept_tokens"] == pytest.approx(sum(expected["kept"]) / N)
    assert (tmp_path / "table" / "lmms-table.png").stat().st_size > 0


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_every_family_answers_with_its_own_prompt_and_records_its_tokens(tasks, family):
    """A tiny random model of each family (no chat template: the documented LLaVA-1.5 prompt), against
    the library's path: the same prompt through the family's patched processor and generate."""
    limit = 2
    result = _evaluate(tasks, f"pretrained=tiny-random-{family},budget=0.2", GENERATE_TASK, limit=limit)
    model, processor = load_model(f"tiny-random-{family}")
    hired.apply(model, processor, budget=0.2)
    for logged, sample in zip(sorted(result["samples"][GENERATE_TASK], key=lambda s: s["doc_id"]), question_split(SEED, limit)):
        text = f"USER: {processor.image_token}\n{sample.question} ASSISTANT:"
        inputs = processor(images=sample.image, text=text, return_tensors="pt")
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        expected = processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert _response(logged) == expected
        records = hired.selections(model)
        assert logged["token_counts"][0]["visual_tokens"] == sum(r.visual_tokens for r in records)
        assert logged["token_counts"][0]["input_tokens"] == inputs["input_ids"].shape[1]
        assert 0 < records[0].kept_tokens < records[0].stock_tokens


@pytest.mark.parametrize("method", ["hired", "fastv"])
def test_multiple_choice_scores_each_choice_by_the_models_log_likelihood(tasks, method):
    """FastV prunes inside the LLM, so its logits cover fewer positions than the prompt has tokens."""
    result = _evaluate(tasks, f"pretrained=testbed,method={method},budget=0.2", CHOICE_TASK)
    model, processor = load_trained_model()
    hired.apply(model, processor, method=method, budget=0.2)
    samples = question_split(SEED, N)
    hits = []
    for logged in result["samples"][CHOICE_TASK]:
        sample = samples[logged["doc_id"]]
        choices = CHOICES[sample.question_type]
        losses = []
        for choice in choices:  # the whole text at once, as the model was trained: independent of the plugin
            inputs = processor(images=sample.image, text=f"{prompt(sample.question)} {choice}", return_tensors="pt")
            with torch.inference_mode():
                logits = model(**inputs).logits[0, -2]
            losses.append(-float(torch.log_softmax(logits.float(), -1)[inputs["input_ids"][0, -1]]))
        scored = [resp[0] for resp in logged["filtered_resps"]]
        assert scored == pytest.approx(losses, abs=1e-4)
        hits.append(choices[min(range(len(losses)), key=losses.__getitem__)] == sample.answer)
        assert logged["token_counts"][0]["kept_tokens"] == sum(r.kept_tokens for r in hired.selections(model))
    assert result["results"][CHOICE_TASK]["acc,none"] == pytest.approx(sum(hits) / N)
    assert sum(hits) / N > 0.5  # the trained model answers most; a sign error would pick the least likely choice


def test_a_generation_error_stops_the_evaluation_with_the_sample_and_the_cause(broken_tasks, tmp_path):
    with pytest.raises(SampleFailed, match=rf"task {BROKEN_TASK}, doc_id {BROKEN_DOC} failed: ValueError: .*'clip.mp4'"):
        _evaluate(broken_tasks, MODEL_ARGS["full"], BROKEN_TASK)
    run = _cli(broken_tasks, MODEL_ARGS["full"], BROKEN_TASK, tmp_path / "out")
    assert run.returncode != 0
    assert f"doc_id {BROKEN_DOC} failed" in run.stdout + run.stderr
    assert _written(tmp_path / "out")[0] == []


def test_recorded_errors_are_counted_and_left_out_of_the_accuracy(broken_tasks, reference, tmp_path):
    run = _cli(broken_tasks, MODEL_ARGS["full"] + ",on_error=record", BROKEN_TASK, tmp_path / "out")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    files, sample_logs = _written(tmp_path / "out")
    document = json.loads(files[0].read_text())
    assert document["throughput"]["avg_failed_samples"] == 1
    (log,) = sample_logs.values()
    logged = {s["doc_id"]: s for s in map(json.loads, log.read_text().splitlines())}
    failed = logged[BROKEN_DOC]
    assert "clip.mp4" in failed["token_counts"][0]["error"]
    assert _response(failed).startswith("[hired: failed: ValueError")  # not an empty answer
    (record,) = read_runs([tmp_path / "out"])
    expected = reference["full"]
    hits = [a == t for i, (a, t) in enumerate(zip(expected["answers"], expected["targets"])) if i != BROKEN_DOC]
    assert (record["samples"], record["failed"]) == (N, 1)
    assert record["value"] == pytest.approx(sum(hits) / len(hits))


@pytest.mark.parametrize("arguments, message", [
    ("method=nope", "unknown method 'nope'"),
    ("budget=1.5", r"budget must be a fraction in \(0, 1\], got 1.5"),
    ('method_options={"alpha":0.3', "method_options must be a JSON object"),
    ("alpha=2", r"alpha .* must be in \[0, 1\], got 2"),
    ("zeta=1", r"has no options \['zeta'\]"),
    ("method=prumerge,adaptive=True", "adaptive mode"),
    ("on_error=ignore", "on_error must be one of raise, record"),
])
def test_bad_model_arguments_fail_before_the_model_loads(tasks, arguments, message, monkeypatch):
    import hired.engines.lmms_eval.model as plugin

    def no_loading(*args):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(plugin, "load_model", no_loading)
    with pytest.raises(ValueError, match=message):
        _evaluate(tasks, f"pretrained=testbed,{arguments}", GENERATE_TASK)


def test_bad_model_arguments_through_the_command_line_write_no_results(tasks, tmp_path):
    run = _cli(tasks, "pretrained=testbed,method=nope", GENERATE_TASK, tmp_path / "out")
    assert run.returncode != 0
    assert "unknown method 'nope'" in run.stdout + run.stderr
    assert _written(tmp_path / "out")[0] == []


def test_batches_other_than_one_are_refused():
    with pytest.raises(ValueError, match="pass --batch_size 1"):
        HiredLmms(pretrained="testbed", batch_size=4)


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the refusal of a torch built without CUDA")
def test_a_cuda_device_on_a_cpu_only_torch_is_refused_before_the_model_loads(monkeypatch):
    import hired.engines.lmms_eval.model as plugin

    def no_loading(*args):
        raise AssertionError("the model was loaded before the device was checked")

    monkeypatch.setattr(plugin, "load_model", no_loading)
    with pytest.raises(ValueError, match=r"device='cuda' is not available: this torch .* is built without CUDA .*; "
                                         r"pass device=cpu"):
        HiredLmms(pretrained="testbed", device="cuda")
