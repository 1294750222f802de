"""The command line, run in-process through its entry point."""

import json

from PIL import Image

from hired.cli import main


def test_generate_prints_answer_and_token_summary(tmp_path, capsys):
    image = tmp_path / "wide.png"
    Image.new("RGB", (1000, 500), "blue").save(image)
    assert main(["generate", str(image), "--model", "tiny-random", "--dtype", "float32", "--max-new-tokens", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "[hired] visual tokens: 346 of 1752 (19.7%)"
    assert lines[0]  # never a silently empty answer


def test_generate_json(tmp_path, capsys):
    image = tmp_path / "square.png"
    Image.new("RGB", (672, 672), "red").save(image)
    args = ["generate", str(image), "--model", "tiny-random", "--dtype", "float32", "--max-new-tokens", "1",
            "--tokens", "100", "--json"]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config"]["tokens"] == 100
    assert data["images"][0]["visual_tokens"] == 100 and data["images"][0]["grid"] == [2, 2]


def test_inspect_json(tmp_path, capsys):
    image = tmp_path / "tall.png"
    Image.new("RGB", (300, 1000)).save(image)
    assert main(["inspect", str(image), "--budget", "0.1", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["grid"] == [3, 1] and row["kept_tokens"] == row["fed_tokens"] == round(0.1 * row["stock_tokens"])


def test_inspect_names_the_image_a_family_refuses(tmp_path, capsys):
    """The Qwen-VL processors refuse aspect ratios above 200: the error names the file among several."""
    fine, wide = tmp_path / "fine.png", tmp_path / "wide.png"
    Image.new("RGB", (500, 400)).save(fine)
    Image.new("RGB", (5000, 20)).save(wide)
    assert main(["inspect", str(fine), str(wide), "--family", "qwen2.5-vl"]) == 2
    error = capsys.readouterr().err
    assert f"{wide}: a Qwen-VL processor refuses an image of 5000x20 px" in error and "crop or pad it" in error


def test_prompt_marker_count_must_match_images(tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 64)).save(image)
    args = ["generate", str(image), "--model", "tiny-random", "--prompt", "USER: <image> <image> hi ASSISTANT:"]
    assert main(args) == 2
    assert "2 <image> markers for 1 images" in capsys.readouterr().err
