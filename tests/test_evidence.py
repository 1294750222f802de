"""Document generator, evidence geometry and recall, and the evidence benchmark on a tiny real model."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

import hired
from hired.cli import main
from hired.families.llava_next import LLAVA_NEXT_PINPOINTS
from hired.families.llava_next.tiny import tiny_llava_next
from hired.geometry import AnyresGeometry
from hired_testbed import evidence
from hired_testbed.documents import generate_documents
from hired_testbed.evidence import ImageResult, Setting, box_coverage, kept_coverage


@pytest.fixture(scope="module")
def pages():
    return generate_documents(seed=7, n=10, questions_per_image=3)


def _pixels(image):
    return np.asarray(image)


# --------------------------------------------------------------------------------------------
# Documents


def test_documents_are_deterministic_by_seed_and_independent_of_n(pages):
    again = generate_documents(seed=7, n=3, questions_per_image=3)
    for first, second in zip(pages, again):
        assert first.question == second.question and first.answer == second.answer
        assert first.evidence == second.evidence
        assert np.array_equal(_pixels(first.image), _pixels(second.image))
    other = generate_documents(seed=8, n=1, questions_per_image=3)
    assert not np.array_equal(_pixels(other[0].image), _pixels(pages[0].image)) or other[0].question != pages[0].question


def test_every_anyres_grid_and_padded_pages_occur(pages):
    images = {id(s.image): s.image for s in pages}.values()
    for tile in (224, 336):
        points = [[tile * h // 336, tile * w // 336] for h, w in LLAVA_NEXT_PINPOINTS]
        grids, padded = set(), 0
        for image in images:
            geometry = AnyresGeometry.create((image.height, image.width), tile, 14, points)
            grids.add(geometry.grid)
            padded += geometry.resized != geometry.canvas
        assert grids == {(2, 2), (1, 2), (2, 1), (1, 3), (3, 1)}
        assert padded >= 3


def test_evidence_box_is_the_drawn_answer(pages):
    for sample in pages:
        (box,) = sample.evidence
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= sample.image.width and 0 <= y0 < y1 <= sample.image.height
        # The box is the layout box of the answer text at the recorded font size ...
        font = ImageFont.load_default(size=sample.meta["font_size"])
        left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), sample.answer, font=font)
        assert right - left == pytest.approx(x1 - x0, abs=1.01)
        assert bottom - top == pytest.approx(y1 - y0, abs=1.01)
        # ... and that text was drawn there: ink fills the box up to the glyphs' side bearings.
        pixels = _pixels(sample.image).astype(int)
        paper = pixels[0, 0]
        crop = pixels[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))]
        ink = np.abs(crop - paper).sum(axis=2) > 150
        ys, xs = np.nonzero(ink)
        assert len(xs), sample.question
        assert xs.min() <= 4 and xs.max() >= crop.shape[1] - 5
        assert ys.max() >= crop.shape[0] - 7


def test_documents_reject_bad_counts():
    with pytest.raises(ValueError, match="at least 1"):
        generate_documents(0, 0)
    with pytest.raises(ValueError, match="questions_per_image"):
        generate_documents(0, 1, questions_per_image=0)


# --------------------------------------------------------------------------------------------
# Geometry and recall by hand


def test_footprints_of_an_unpadded_square_image():
    geometry = AnyresGeometry.create((672, 672), 336, 14, LLAVA_NEXT_PINPOINTS)
    boxes = geometry.footprints()
    assert boxes.shape == (5, 576, 4)
    assert boxes[0, 24 + 1].tolist() == [28, 28, 56, 56]  # base: whole image squashed into 24 x 24
    assert boxes[2, 24 + 1].tolist() == [350, 14, 364, 28]  # tile (row 0, col 1) at full resolution


def test_footprints_follow_resize_and_padding():
    # 672 wide, 500 high: 2x2 canvas, resized to 672 x 500, centred with 86 px of padding on top.
    geometry = AnyresGeometry.create((500, 672), 336, 14, LLAVA_NEXT_PINPOINTS)
    assert geometry.resized == (500, 672)
    boxes = geometry.footprints()
    assert boxes[1, 0].tolist() == [0, 0, 14, 0]  # over padding only: empty
    assert boxes[1, 6 * 24].tolist() == [0, 0, 14, 12]  # canvas rows 84..98 -> image rows 0..12
    assert boxes[3, 0].tolist() == [0, 336 - 86, 14, 350 - 86]


def test_box_coverage_by_hand():
    tile = np.array([[0, 0, 5, 10], [20, 20, 30, 30]], dtype=float)
    base = np.array([[0, 0, 10, 4]], dtype=float)
    # tile covers 50 of 100; base 40; both 20: any = 50 + 40 - 20 = 70
    assert box_coverage((0, 0, 10, 10), tile, base) == pytest.approx((0.5, 0.7))
    assert box_coverage((0, 0, 10, 10), np.zeros((0, 4)), np.zeros((0, 4))) == (0.0, 0.0)
    with pytest.raises(ValueError, match="no area"):
        box_coverage((3, 3, 3, 9), tile, base)


def test_kept_coverage_by_hand():
    geometry = AnyresGeometry.create((672, 672), 336, 14, LLAVA_NEXT_PINPOINTS)
    nothing = torch.tensor([], dtype=torch.long)
    kept = [torch.tensor([0]), torch.tensor([0]), nothing, nothing, nothing]
    coverage = kept_coverage(geometry, kept, [(0, 0, 14, 14), (0, 0, 28, 14), (28, 28, 56, 56)])
    assert np.allclose(coverage, [[1.0, 1.0], [0.5, 1.0], [0.0, 0.0]])


def test_summary_by_item_and_by_area_by_hand():
    results = [
        ImageResult(np.array([[0.6, 0.9], [0.4, 0.7]]), ["a", "b"], 10, 50),
        ImageResult(np.array([[0.2, 0.3]]), ["a"], 20, 50),
    ]
    summary = evidence.summarize(results, resamples=200, seed=1)
    assert summary["evidence_recall"] == pytest.approx(1 / 3)
    assert summary["evidence_recall_any"] == pytest.approx(2 / 3)
    assert summary["evidence_area_recall"] == pytest.approx(0.4)
    assert summary["evidence_area_recall_any"] == pytest.approx(1.9 / 3)
    assert summary["evidence_recall_by_question_type"] == {"a": 0.5, "b": 0.0}
    assert summary["visual_tokens"] == 15 and summary["items"] == 3
    assert 0 <= summary["ci_low"] <= summary["evidence_recall"] <= summary["ci_high"] <= 1
    assert summary == evidence.summarize(results, resamples=200, seed=1), "intervals are reproducible by seed"
    # Two images: the resamples pool image 1 twice, image 2 twice, or one each: 0.3/1 (image 2 alone) .. 1/2
    low, high = summary["evidence_recall_ci"]
    assert low == pytest.approx(0.0) and high == pytest.approx(0.5)


def test_settings_sweep_alpha_for_hired_only_and_reject_unknown_or_llm_methods():
    settings = evidence.settings_for(["hired", "random"], [0.1, 0.2], [0.0, 0.5])
    assert Setting("hired", 0.2, 0.0) in settings and Setting("random", 0.1, None) in settings
    assert len(settings) == 6
    with pytest.raises(ValueError, match="unknown method"):
        evidence.settings_for(["nope"], [0.2], [0.5])


# --------------------------------------------------------------------------------------------
# The benchmark on a tiny real LLaVA-NeXT


@pytest.fixture(scope="module")
def tiny():
    return tiny_llava_next()


def test_measure_matches_a_direct_run_through_hired_apply(tiny, pages):
    model, processor = tiny
    samples = pages[:6]  # two pages, three questions each
    settings = [Setting("hired", 0.2, 0.5), Setting("random", 0.1, None), Setting("full", 1.0, None)]
    results = evidence.measure(model, processor, samples, settings, batch_size=2, progress=False)
    assert not hasattr(model.model, "_hired")  # restored to the stock classes
    for setting in settings:
        assert len(results[setting]) == 2
    assert all(np.allclose(r.coverage, 1.0) for r in results[Setting("full", 1.0, None)])

    image = samples[3].image
    boxes = [s.evidence[0] for s in samples[3:]]
    hired.apply(model, processor, settings[1].config())
    inputs = processor.image_processor([image], return_tensors="pt")
    with torch.inference_mode():
        model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    (record,) = hired.selections(model)
    hired.remove(model, processor)
    geometry = AnyresGeometry.create((image.height, image.width), 336, 14, LLAVA_NEXT_PINPOINTS)
    direct = kept_coverage(geometry, record.kept, boxes)
    measured = results[Setting("random", 0.1, None)][1]
    assert np.array_equal(direct, measured.coverage)
    assert measured.visual_tokens == record.visual_tokens == round(0.1 * geometry.stock_tokens)
    assert (measured.coverage[:, 0] <= measured.coverage[:, 1] + 1e-12).all()


def test_measure_rejects_an_empty_split(tiny):
    model, processor = tiny
    with pytest.raises(ValueError, match="empty"):
        evidence.measure(model, processor, [], [Setting("hired", 0.2, 0.5)], progress=False)


def test_cli_writes_records_markdown_and_plot(tmp_path, capsys):
    args = ["evidence", "--model", "tiny-random", "--split", "documents", "--images", "2", "--budget", "0.2",
            "--alpha", "0.5", "--method", "hired", "random", "--resamples", "20", "-o", str(tmp_path), "--quiet"]
    assert main(args) == 0
    document = json.loads((tmp_path / "evidence.json").read_text())
    assert document["command"].startswith("hired evidence")
    assert document["versions"]["transformers"] and document["versions"]["onnxruntime"]
    records = document["records"]
    assert {(r["method"], r["alpha"]) for r in records} == {("hired", 0.5), ("random", None)}
    for record in records:
        for key in ("method", "budget", "alpha", "visual_tokens", "evidence_recall", "evidence_recall_any",
                    "ci_low", "ci_high", "evidence_area_recall", "evidence_area_recall_any", "split"):
            assert key in record
        assert record["split"] == "documents" and record["items"] == 8
    value, low, high = next(r for r in records if r["method"] == "random")["hired_minus_this"]["evidence_recall"]
    assert low <= value <= high
    assert "| hired (alpha 0.5) | 20.0% |" in (tmp_path / "evidence.md").read_text()
    assert Image.open(tmp_path / "evidence.png").size[0] > 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "nope"], "unknown method 'nope'"),
        (["--images", "0"], "argument --images: expected a whole number >= 1, got 0"),
    ],
)
def test_cli_rejects_bad_input(tmp_path, capsys, extra, message):
    assert main(["evidence", "--model", "tiny-random", "-o", str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_a_budget_outside_zero_one(tmp_path, capsys):
    assert main(["evidence", "--budget", "1.5", "-o", str(tmp_path)]) == 2
    assert "fraction in (0, 1]" in capsys.readouterr().err
