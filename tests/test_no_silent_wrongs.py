"""No silent wrongs: every input is read as meant, every setting takes effect or is refused, every
failure is one clear line. One section per class of defect; each fixes its class at the root
(one image reader, one configuration check, one CLI error boundary), so the cases here are samples
of a class, not a list of patched examples.
"""

from __future__ import annotations

import copy
import io
import json
import struct
import subprocess
import sys
import warnings
import zlib
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from sample_inputs import noise_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

import hired
from hired.cli import describe, main
from hired.families.llava.tiny import tiny_llava
from hired.families.llava_next.tiny import tiny_llava_next
from hired.images import open_image
from hired.methods import registered_methods
from hired.report import markdown_table
from hired.visualize import show

PROMPT = "USER: <image> what is in the image ? ASSISTANT:"
METHODS = [method.name for method in registered_methods()]
QUICK = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def method_settings(method: str, **amount) -> dict:
    """``method`` at ``amount``, with FastV pruning inside the tiny two-layer decoder."""
    chosen = hired.get_method(method)
    if chosen.stage == "none":
        return {"method": method}
    extra = {"layer": 1} if chosen.stage == "llm" else {}
    return {"method": method, **amount, **extra}


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real ``hired`` command in a fresh interpreter, offline."""
    code = "import sys; from hired.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(cwd or Path.cwd())},
                          timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def in_process(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def save_png(image: Image.Image, path: Path, **params) -> Path:
    image.save(path, **params)
    return path


# ============================================================================================
# 1. Input read wrongly without saying so: one reader, upright RGB or a reason


def oriented(image: Image.Image, orientation: int, path: Path) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif)
    return path


def test_a_portrait_phone_photo_is_read_upright(tmp_path):
    stored = noise_image(1200, 600)  # stored sideways: landscape pixels, orientation 6 (rotate 90 on display)
    path = oriented(stored, 6, tmp_path / "phone.jpg")
    image = open_image(path)
    assert image.size == (600, 1200)
    with Image.open(path) as raw:
        assert image.tobytes() == ImageOps.exif_transpose(raw).convert("RGB").tobytes()


def test_inspect_lays_out_the_upright_image(tmp_path):
    path = oriented(noise_image(1200, 600), 6, tmp_path / "phone.jpg")
    code, out, _ = in_process("inspect", str(path), "--json")
    (row,) = json.loads(out)
    assert code == 0 and row["image_size"] == [1200, 600] and row["grid"][0] > row["grid"][1]  # portrait grid


# Modes PNG cannot hold go through TIFF, without an orientation tag: Pillow's TIFF reader rotates
# some modes itself when the tag is set, which is Pillow's business, not the reader's.
PNG_MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"]
TIFF_MODES = ["CMYK", "YCbCr", "I", "F"]
MODES = PNG_MODES + TIFF_MODES


@QUICK
@given(width=st.integers(1, 64), height=st.integers(1, 64), mode=st.sampled_from(MODES),
       orientation=st.integers(1, 8), transparent=st.booleans())
def test_every_mode_size_and_orientation_gives_upright_rgb(tmp_path_factory, width, height, mode, orientation,
                                                           transparent):
    folder = tmp_path_factory.mktemp("modes")
    image = noise_image(width, height).convert("RGBA" if mode == "LA" else "RGB")
    image = image.convert(mode) if mode not in ("I;16", "I", "F") else image.convert("L").convert(mode)
    params = {"transparency": 0} if mode == "P" and transparent else {}
    path = folder / ("image.png" if mode in PNG_MODES else "image.tiff")
    if mode in PNG_MODES:
        params["exif"] = Image.Exif()
        params["exif"][0x0112] = orientation
    image.save(path, **params)
    result = open_image(path)
    assert result.mode == "RGB"
    with Image.open(path) as raw:
        upright = ImageOps.exif_transpose(raw)
        stored_tag = raw.getexif().get(0x0112, 1)
    turned = stored_tag in (5, 6, 7, 8)
    assert result.size == upright.size == ((height, width) if turned else (width, height))


def test_transparency_goes_on_white_and_sixteen_bits_scale_to_eight(tmp_path):
    clear = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert open_image(save_png(clear, tmp_path / "clear.png")).getpixel((0, 0)) == (255, 255, 255)
    deep = Image.new("I;16", (4, 4), 65535)
    assert open_image(save_png(deep, tmp_path / "deep.png")).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("values, mode, expected", [
    ([[200.0]], "F", 200), ([[0.5]], "F", 128), ([[255]], "I;16", 1), ([[65535]], "I;16", 255),
    ([[1000]], "I;16", 4),
])
def test_wide_greyscale_keeps_its_brightness(tmp_path, values, mode, expected):
    import numpy as np

    dtype = np.float32 if mode == "F" else np.uint16
    path = tmp_path / ("image.tiff" if mode == "F" else "image.png")
    Image.fromarray(np.array(values, dtype=dtype)).save(path)
    assert open_image(path).getpixel((0, 0)) == (expected,) * 3


def test_values_without_a_fixed_scale_are_stretched_with_a_warning(tmp_path):
    import numpy as np

    path = tmp_path / "signed.tiff"
    Image.fromarray(np.array([[-5.0, 5.0]], dtype=np.float32)).save(path)
    with pytest.warns(UserWarning, match="from -5 to 5 has no fixed 8-bit scale"):
        image = open_image(path)
    assert (image.getpixel((0, 0)), image.getpixel((1, 0))) == ((0, 0, 0), (255, 255, 255))


def test_an_animated_image_reads_its_first_frame_with_a_warning(tmp_path):
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue")]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with pytest.warns(UserWarning, match="2 frames; reading the first"):
        image = open_image(path)
    assert image.getpixel((0, 0))[0] > 200


def giant_png(path: Path, width: int = 30_000, height: int = 30_000) -> Path:
    """A valid PNG header announcing 900 megapixels (Pillow refuses it before decoding anything)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0"))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("name, make, message", [
    ("bomb", lambda d: giant_png(d / "bomb.png"), "more pixels than Pillow reads safely"),
    ("folder", lambda d: d, "is a folder"),
    ("missing", lambda d: d / "missing.png", "not found"),
    ("text", lambda d: (d / "notes.png").write_text("no") and d / "notes.png", "cannot read"),
])
def test_unreadable_inputs_are_refused_with_the_reason(tmp_path, name, make, message):
    with pytest.raises(ValueError, match=message):
        open_image(make(tmp_path))


# ============================================================================================
# 2. State that outlives its call: records describe the last call, or there are none


@pytest.fixture
def patched():
    model, processor = tiny_llava_next()
    hired.apply(model, processor, budget=0.2)
    return model, processor


def generate(model, processor, images=None, text=PROMPT, **options):
    inputs = processor(images=images, text=text, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.generate(**inputs, **{"max_new_tokens": 2, "do_sample": False, **options})


def test_a_text_only_call_leaves_no_image_records(patched):
    model, processor = patched
    generate(model, processor, noise_image(800, 600))
    assert len(hired.selections(model)) == 1
    generate(model, processor, text="USER: what is a cat ? ASSISTANT:")
    assert hired.selections(model) == []
    with torch.no_grad():  # a plain forward pass too
        model(**processor(text="USER: hi ASSISTANT:", return_tensors="pt"))
    assert hired.selections(model) == []


def test_a_failed_call_leaves_no_records_of_the_previous_one(patched):
    model, processor = patched
    generate(model, processor, noise_image(800, 600))
    inputs = processor(images=noise_image(800, 600), text=PROMPT, return_tensors="pt")
    with pytest.raises(ValueError, match="needs 5; pass the pixel_values and image_sizes"), torch.no_grad():
        model.model.get_image_features(pixel_values=inputs["pixel_values"][:, :2], image_sizes=inputs["image_sizes"])
    assert hired.selections(model) == []


def test_decoding_steps_keep_the_records_of_their_prefill(patched):
    model, processor = patched
    generate(model, processor, [noise_image(800, 600), noise_image(300, 900)],
             text=[PROMPT, PROMPT], num_beams=2)
    assert [r.image_size for r in hired.selections(model)] == [(600, 800), (900, 300)]


def test_an_llm_side_plan_is_dropped_by_a_text_only_prefill():
    model, processor = tiny_llava_next()
    hired.apply(model, processor, method="fastv", layer=1)
    generate(model, processor, noise_image(800, 600))
    assert hired.pruning_plan(model) is not None
    generate(model, processor, text="USER: hi ASSISTANT:")
    assert hired.pruning_plan(model) is None and hired.selections(model) == []


def hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("method", ["hired", "fastv"])
def test_apply_twice_and_remove_leave_no_hooks_behind(method):
    model, processor = tiny_llava_next()
    before = hook_count(model)
    hired.apply(model, processor, **method_settings(method, budget=0.2))
    once = hook_count(model)
    hired.apply(model, processor, **method_settings(method, budget=0.3))
    assert hook_count(model) == once > before
    hired.remove(model)
    assert hook_count(model) == before


# ============================================================================================
# 3. Settings dropped without a word: a setting that cannot take effect is refused


@pytest.mark.parametrize("amount", [{"budget": 0.05}, {"tokens": 100}, {"budget": 0.2}])
def test_the_stock_model_refuses_a_budget(amount):
    with pytest.raises(ValueError, match="feeds every visual token, so .* cannot take effect"):
        hired.HiredConfig.create(method="full", **amount)
    assert hired.HiredConfig.create(method="full").budget == 1.0 == hired.HiredConfig(budget=1.0, method="full").budget


@pytest.mark.parametrize("method", ["prumerge", "prumerge+"])
def test_an_adaptive_method_refuses_a_budget(method):
    with pytest.raises(ValueError, match="chooses its token count from the pixels"):
        hired.HiredConfig.create(method=method, adaptive=True, budget=0.3)
    config = hired.HiredConfig.create(method=method, adaptive=True)
    assert config.budget is None and config.fed_tokens(576) is None and config.kept_for(576) is None


def test_configurations_of_hired_0_2_still_load():
    assert hired.HiredConfig.from_dict({"budget": 0.2, "tokens": None, "method": "full"}).budget == 1.0
    adaptive = {"budget": 0.2, "tokens": None, "method": "prumerge", "method_options": {"adaptive": True}}
    assert hired.HiredConfig.from_dict(adaptive).budget is None


def test_a_stored_configuration_with_both_amounts_is_refused():
    with pytest.raises(ValueError, match="not both"):
        hired.HiredConfig.from_dict({"budget": 0.5, "tokens": 10, "method": "hired"})


def test_numpy_option_values_become_plain_numbers(tmp_path):
    import numpy as np

    config = hired.HiredConfig.create(method="random", seed=np.int64(3), budget=np.float64(0.3))
    assert type(config.method_options.seed) is int and type(config.budget) is float
    model, processor = tiny_llava_next()
    hired.apply(model, processor, distribution_layer=np.int64(1))
    model.save_pretrained(tmp_path)  # the stored configuration is JSON
    assert hired.stored_config(model).method_options.distribution_layer == 1


CONFIGS = st.one_of(
    st.builds(lambda b, a: hired.HiredConfig.create(budget=b, alpha=a), st.floats(0.01, 1.0), st.floats(0, 1)),
    st.builds(lambda t, m: hired.HiredConfig.create(tokens=t, method=m), st.integers(1, 3000),
              st.sampled_from(["visionzip", "random", "spatial", "divprune", "fastv"])),
    st.just(hired.HiredConfig.create(method="full")),
    st.just(hired.HiredConfig.create(method="prumerge", adaptive=True)),
)


@QUICK
@given(config=CONFIGS)
def test_a_stored_configuration_round_trips_and_updates_only_what_is_named(config):
    assert hired.HiredConfig.from_dict(config.to_dict()) == config
    assert config.updated() == config
    if config.fixes_count and config.method != "full":
        changed = config.updated(budget=0.5)
        assert (changed.method, changed.method_options, changed.budget, changed.tokens) == (
            config.method, config.method_options, 0.5, None)
        switched = config.updated(method="random")
        assert (switched.budget, switched.tokens) == (config.budget, config.tokens)


def test_a_new_method_starts_from_its_own_options():
    stored = hired.HiredConfig.create(budget=0.3, alpha=0.1)
    assert stored.updated(alpha=0.7).method_options.alpha == 0.7
    assert stored.updated(method="random").method_options == hired.get_method("random").make_options()
    assert stored.updated(method="full").budget == 1.0
    with pytest.raises(ValueError, match="has no options"):
        stored.updated(method="visionzip", alpha=0.5)


@pytest.fixture
def saved_folder(tmp_path):
    model, processor = tiny_llava_next()
    hired.apply(model, processor, method="visionzip", budget=0.3)
    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    image = save_png(noise_image(700, 500), tmp_path / "photo.png")
    return tmp_path / "saved", image


def test_generate_keeps_the_stored_configuration(saved_folder):
    folder, image = saved_folder
    code, out, _ = in_process("generate", str(image), "--model", str(folder), "--dtype", "float32",
                              "--max-new-tokens", "1", "--json")
    data = json.loads(out)
    assert code == 0 and data["config"]["method"] == "visionzip" and data["config"]["budget"] == 0.3


def test_options_given_replace_only_the_stored_settings_they_name(saved_folder):
    folder, image = saved_folder
    code, out, _ = in_process("generate", str(image), "--model", str(folder), "--dtype", "float32",
                              "--max-new-tokens", "1", "--budget", "0.1", "--json")
    data = json.loads(out)
    assert code == 0 and data["config"]["method"] == "visionzip" and data["config"]["budget"] == 0.1
    code, _, err = in_process("generate", str(image), "--model", str(folder), "--alpha", "0.3")
    assert code == 2 and "has no options ['alpha']" in err and "stored configuration" in err


def test_inspect_refuses_an_adaptive_count_and_reports_what_fastv_keeps(tmp_path):
    image = save_png(noise_image(800, 600), tmp_path / "photo.png")
    code, _, err = in_process("inspect", str(image), "--method", "prumerge", "--method-option", "adaptive=true")
    assert code == 2 and "chooses its token count from the pixels" in err
    code, out, _ = in_process("inspect", str(image), "--method", "fastv", "--json")
    (row,) = json.loads(out)
    assert code == 0 and row["kept_tokens"] == round(0.2 * row["stock_tokens"])
    assert row["fed_tokens"] == row["stock_tokens"] + row["newline_tokens"]
    code, out, _ = in_process("inspect", str(image), "--method", "fastv", "--budget", "0.5")
    assert "fastv keeps" in out and "after LLM layer 2" in out


def test_inspect_shows_the_base_view_share_alpha_gives(tmp_path):
    image = save_png(noise_image(800, 600), tmp_path / "photo.png")
    shares = []
    for alpha in ("0", "0.5", "1"):
        code, out, _ = in_process("inspect", str(image), "--alpha", alpha, "--json")
        shares.append(json.loads(out)[0]["base_view_tokens"])
    assert shares[0] < shares[1] < shares[2] == json.loads(out)[0]["kept_tokens"]


def test_eval_gives_alpha_only_to_hired():
    from hired_testbed.evaluate import settings_for

    settings = settings_for(["full", "base-view", "hired", "random"], [0.2], [0.3])
    assert {s.method: s.alpha for s in settings} == {"full": None, "base-view": 1.0, "hired": 0.3, "random": None}
    code, _, err = in_process("eval", "--method", "random", "--alphas", "0.3")
    assert code == 2 and "hired is not among the --method given" in err


# ============================================================================================
# 4. Crashes on legal input


@pytest.mark.parametrize("size", [(4000, 50), (50, 4000), (10_000, 10), (1, 1), (5, 3000)])
def test_show_draws_extreme_aspect_ratios(tmp_path, size):
    model, processor = tiny_llava_next()
    output = tmp_path / "picture.png"
    show(model, processor, noise_image(*size), hired.HiredConfig(budget=0.2), output)
    assert Image.open(output).size[0] > 0


@pytest.mark.parametrize("method", [m for m in METHODS if hired.get_method(m).selects_before_llm])
@pytest.mark.parametrize("size", [(4000, 50), (50, 4000)])
def test_every_vision_method_serves_extreme_aspect_ratios(method, size):
    model, processor = tiny_llava_next()
    hired.apply(model, processor, method=method, budget=0.2)
    image = noise_image(*size)
    inputs = processor(images=image, text=PROMPT, return_tensors="pt")
    generate(model, processor, image)
    (record,) = hired.selections(model)
    assert record.visual_tokens == int((inputs["input_ids"] == processor.image_token_id).sum())


def test_bench_leaves_out_a_default_method_the_model_is_too_shallow_for():
    from hired.bench.runner import BenchSpec

    spec = BenchSpec(model="tiny-random-llava-next")
    with pytest.warns(UserWarning, match="leaving fastv out of the default methods: fastv prunes before decoder layer 2"):
        spec.validate()
    assert "fastv" not in spec.methods and "hired" in spec.methods
    with pytest.raises(ValueError, match="has 2 decoder layers; so leave fastv out"):
        BenchSpec(model="tiny-random-llava-next", methods=["fastv"]).validate()


@settings(max_examples=15, deadline=None)
@given(width=st.integers(1, 6000), height=st.integers(1, 6000))
def test_inspect_lays_out_every_image_size(tmp_path_factory, width, height):
    path = save_png(Image.new("RGB", (width, height), "gray"), tmp_path_factory.mktemp("sizes") / "image.png")
    code, out, err = in_process("inspect", str(path), "--json")
    (row,) = json.loads(out)
    assert code == 0 and err == "" and 1 <= row["kept_tokens"] <= row["stock_tokens"]


@pytest.mark.parametrize("method", METHODS)
def test_torch_save_and_deepcopy_of_a_patched_model(tmp_path, method):
    model, processor = tiny_llava_next()
    if hired.get_method(method).has_fixed_budget(hired.get_method(method).make_options()):
        hired.apply(model, processor, **method_settings(method, budget=0.2))
    else:
        pytest.skip(f"{method} needs hired.adaptive.prepare_inputs")
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    clone = copy.deepcopy(model)
    image = noise_image(800, 600)
    expected = generate(model, processor, image)
    assert torch.equal(generate(loaded, processor, image), expected)
    assert torch.equal(generate(clone, processor, image), expected)
    generate(clone, processor, text="USER: hi ASSISTANT:")  # the copy's records are its own
    assert hired.selections(clone) == [] and len(hired.selections(model)) == 1


@pytest.mark.parametrize("sizes", [[(800, 600), (500, 1000)], [(336, 336), (1000, 500)], [(50, 4000), (640, 480)]])
@pytest.mark.parametrize("options", [{}, {"num_beams": 2}, {"do_sample": True}])
def test_fastv_on_left_padded_batches_of_different_sizes(sizes, options):
    model, processor = tiny_llava_next()
    processor.tokenizer.padding_side = "left"
    hired.apply(model, processor, method="fastv", layer=1, budget=0.3)
    images = [noise_image(w, h, seed) for seed, (w, h) in enumerate(sizes)]
    torch.manual_seed(0)
    output = generate(model, processor, images, text=[PROMPT, "USER: <image> and this ? ASSISTANT:"], **options)
    assert output.shape[0] == 2
    assert [r.image_size for r in hired.selections(model)] == [(h, w) for w, h in sizes]


def test_fastv_decodes_a_generated_image_token_as_text():
    """A (random) model may sample the image token's id; in decoding it is a token, not an image."""
    model, processor = tiny_llava_next()
    hired.apply(model, processor, method="fastv", layer=1)
    inputs = processor(images=noise_image(800, 600), text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        prefill = model(**inputs, use_cache=True)
        step = torch.tensor([[model.config.image_token_id]])
        mask = torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], dim=1)
        cache = {hired.compat.cache_argument_name(type(model).forward): hired.compat.cache_of(prefill)}
        model(input_ids=step, attention_mask=mask, use_cache=True, **cache)


# ============================================================================================
# 5. Tracebacks instead of one line: one CLI error boundary


# Each case runs in process; those marked "fresh" also run as the real command in a new interpreter
# (a few, since each start costs seconds), which is what a user sees.
CLI_FAILURES = [
    (["inspect", "IMAGE", "--budget", "nan"], "argument --budget: expected a finite number", True),
    (["inspect", "IMAGE", "--budget", "0"], "expected a fraction in (0, 1]", False),
    (["inspect", "IMAGE", "--tokens", "-3"], "argument --tokens: expected a whole number >= 1", False),
    (["inspect", "IMAGE", "--alpha", "2"], "argument --alpha: expected a number in [0, 1]", False),
    (["inspect", "IMAGE", "--tile", "336", "--patch", "5"], "not a multiple of --patch 5", True),
    (["inspect", "IMAGE", "--tile", "100000", "--patch", "1"], "inspect allows at most 256", False),
    (["inspect", "IMAGE", "--method-option", "seed"], "--method-option expects KEY=VALUE", False),
    (["generate", "IMAGE", "--max-new-tokens", "0", "--model", "tiny-random"], "argument --max-new-tokens", False),
    (["show", "IMAGE", "-o", "IMAGE/out.png", "--model", "tiny-random"], "is a file, not a folder", True),
    (["show", "IMAGE", "-o", "FOLDER", "--model", "tiny-random"], "ending in .png", False),
    (["show", "IMAGE", "-o", "picture.png/"], "is a folder; give a file name ending in .png", False),
    (["show", "BOMB", "--model", "tiny-random"], "more pixels than Pillow reads safely", True),
    (["generate", "IMAGE", "--model", "FOLDER/no/such/model"], "no model folder at", True),
    (["generate", "IMAGE", "--model", "FOLDER"], "folder without config.json", False),
    (["generate", "IMAGE", "--model", "someone/uncached-model"], "nor in the local Hugging Face cache", True),
    (["bench", "--batch", "0"], "argument --batch: expected a whole number >= 1", False),
    (["bench", "--budgets", "576"], "expected a fraction in (0, 1], got 576; see hired bench --help", False),
    (["eval", "--out", "IMAGE"], "is a file; give a folder", False),
    (["eval", "--out", "/proc/hired-results"], "cannot write into /proc/hired-results", True),
]


@pytest.mark.parametrize("args, fragment, fresh", [
    pytest.param(args, fragment, fresh, id=f"{'fresh' if fresh else 'in-process'}: {fragment[:40]}")
    for args, fragment, also_fresh in CLI_FAILURES for fresh in ((False, True) if also_fresh else (False,))
])
def test_cli_failures_are_one_line_and_a_non_zero_exit(tmp_path, monkeypatch, args, fragment, fresh):
    image = save_png(noise_image(64, 48), tmp_path / "photo.png")
    giant_png(tmp_path / "bomb.png")
    (tmp_path / "empty").mkdir()
    names = {"IMAGE": str(image), "BOMB": str(tmp_path / "bomb.png"), "FOLDER": str(tmp_path / "empty")}
    arguments = [names.get(a, a) for a in args]
    arguments = [a.replace("IMAGE/", f"{image}/").replace("FOLDER/", f"{tmp_path / 'empty'}/") for a in arguments]
    if fresh:
        assert_one_line_error(run_cli(*arguments, cwd=tmp_path), fragment)
        return
    monkeypatch.chdir(tmp_path)
    code, _, err = in_process(*arguments)
    assert_one_line_error(subprocess.CompletedProcess(arguments, code, "", err), fragment)


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("inspect", str(tmp_path / "missing.png"), "--debug", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr


@QUICK
@given(budget=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5)),
       tokens=st.one_of(st.none(), st.integers(-5, 5), st.text(max_size=3)))
def test_any_budget_argument_succeeds_or_fails_in_one_line(tmp_path_factory, budget, tokens):
    image = save_png(noise_image(64, 48), tmp_path_factory.mktemp("cli") / "photo.png")
    args = ["inspect", str(image), f"--budget={budget}"]
    if tokens is not None:
        args = ["inspect", str(image), f"--tokens={tokens}"]
    code, _, err = in_process(*args)
    assert code in (0, 2)
    assert code == 0 or len(err.strip().splitlines()) == 1


def test_errors_outside_the_user_classes_are_labelled_internal():
    assert describe(ValueError("budget must be a fraction")) == "budget must be a fraction"
    assert describe(PermissionError(13, "Permission denied", "/x.png")).startswith("Permission denied: /x.png")
    internal = describe(RuntimeError("shape mismatch\n  at layer 3"))
    assert internal.startswith("internal error (RuntimeError: shape mismatch at layer 3)") and "--debug" in internal


@pytest.mark.parametrize("thing", [None, "llava", torch.nn.Linear(2, 2), {"model": 1}])
def test_apply_names_the_supported_classes(thing):
    with pytest.raises(TypeError, match="hired supports InternVLForConditionalGeneration .*LlavaOnevisionForConditionalGeneration"):
        hired.apply(thing)


# ============================================================================================
# 6. Records that misreport


def test_llava_1_5_records_the_original_image_size():
    model, processor = tiny_llava()
    hired.apply(model, processor, budget=0.2)
    generate(model, processor, [noise_image(500, 300), noise_image(120, 90)], text=[PROMPT, PROMPT])
    assert [r.image_size for r in hired.selections(model)] == [(300, 500), (90, 120)]


def test_llava_1_5_inputs_without_sizes_record_none_rather_than_the_view():
    model, stock_processor = tiny_llava()
    hired.apply(model, method="fastv", layer=1)  # feeds the stock count, so the stock processor fits
    generate(model, stock_processor, noise_image(500, 300))
    (record,) = hired.selections(model)
    assert record.image_size is None and record.to_dict()["image_size"] is None


def test_generate_json_reports_what_fastv_kept(tmp_path):
    image = save_png(noise_image(800, 600), tmp_path / "photo.png")
    code, out, _ = in_process("generate", str(image), "--model", "tiny-random", "--dtype", "float32",
                              "--method", "fastv", "--method-option", "layer=1", "--max-new-tokens", "1", "--json")
    (record,) = json.loads(out)["images"]
    assert code == 0 and record["kept_tokens"] == record["llm_kept"] < record["visual_tokens"]


@QUICK
@given(columns=st.integers(0, 4), rows=st.lists(st.booleans(), max_size=4))
def test_eval_tables_have_as_many_cells_as_columns(columns, rows):
    from hired_testbed.evaluate import markdown

    types = [f"type{i}" for i in range(columns)]
    records = [
        {"method": "m", "budget": 0.2, "alpha": 0.5, "error": "a | b"} if failed else
        {"method": "m", "budget": None, "alpha": 1.0, "visual_tokens": 10.0, "accuracy": 0.5, "ci_low": 0.4,
         "ci_high": 0.6, "accuracy_by_type": {t: 0.5 for t in types}}
        for failed in rows
    ]
    lines = markdown(records).strip().splitlines()
    counts = {line.replace("\\|", "").count("|") for line in lines}
    assert len(counts) == 1


def test_markdown_tables_refuse_ragged_rows():
    assert markdown_table(["a", "b"], [["x|y", 1]]).splitlines()[2] == "| x\\|y | 1 |"
    with pytest.raises(ValueError, match="2 cells for 3 columns"):
        markdown_table(["a", "b", "c"], [[1, 2]])


@pytest.mark.parametrize("command", ["evidence", "eval"])
def test_evidence_and_eval_accept_a_budget_of_one(command):
    from hired.cli import build_parser

    option = "--budget" if command == "evidence" else "--budgets"
    args = build_parser().parse_args([command, option, "1.0", "0.2"])
    assert getattr(args, option.lstrip("-")) == [1.0, 0.2]
    from hired_testbed import evaluate, evidence

    module = evidence if command == "evidence" else evaluate
    alphas = [0.5]
    assert any(s.budget == 1.0 for s in module.settings_for(["hired"], [1.0], alphas))


# ============================================================================================
# 7. Late errors: what can be checked at apply or load time is


def test_an_unservable_feature_strategy_fails_at_apply():
    model, processor = tiny_llava_next()
    model.config.vision_feature_select_strategy = "full"  # would feed the CLS token of a CLIP tower
    with pytest.raises(ValueError, match="needs vision_feature_select_strategy='default'"):
        hired.apply(model, processor, budget=0.2)
    hired.apply(model, processor, method="fastv", layer=1)  # feeds the stock features: any strategy is served


@pytest.mark.parametrize("layer", [[-2, -1], 99, -99])
def test_an_unservable_feature_layer_fails_at_apply(layer):
    model, processor = tiny_llava_next()
    model.config.vision_feature_layer = layer
    with pytest.raises(ValueError, match="vision_feature_layer"):
        hired.apply(model, processor, budget=0.2)


def test_from_pretrained_names_a_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="no model folder at"):
        hired.from_pretrained(str(tmp_path / "no" / "such" / "model"))
    with pytest.raises(ValueError, match="folder without config.json"):
        hired.from_pretrained(str(tmp_path))


def test_warnings_in_the_cli_are_one_line(tmp_path):
    frames = [Image.new("RGB", (64, 64), colour) for colour in ("red", "blue")]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with warnings.catch_warnings():
        code, _, err = in_process("inspect", str(path))
    assert code == 0 and err.strip() == f"hired inspect: warning: {path} has 2 frames; reading the first one"


# ============================================================================================
# A second adversarial pass, one case per finding


def test_records_survive_generate_in_the_adaptive_workflow():
    from hired.adaptive import prepare_inputs

    model, processor = tiny_llava_next()
    hired.apply(model, method="prumerge", adaptive=True)
    inputs = prepare_inputs(model, processor, [noise_image(800, 600)], [PROMPT])
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert len(hired.selections(model)) == 1


def test_a_call_that_fails_before_encoding_forgets_earlier_records(patched):
    model, processor = patched
    generate(model, processor, noise_image(800, 600))
    inputs = processor(images=noise_image(800, 600), text=PROMPT, return_tensors="pt")
    with pytest.raises(ValueError), torch.no_grad():
        model(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])  # neither ids nor embeds
    assert hired.selections(model) == []


def test_a_configuration_cannot_change_under_a_patched_model():
    import dataclasses

    config = hired.HiredConfig(budget=0.2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.budget = 7
    assert config.updated(budget=0.5).budget == 0.5 and config.budget == 0.2


def test_colour_key_transparency_goes_on_white_and_nan_pixels_are_named(tmp_path):
    import numpy as np

    keyed = Image.new("RGB", (2, 1), (0, 0, 0))
    keyed.putpixel((1, 0), (9, 9, 9))
    path = save_png(keyed, tmp_path / "keyed.png", transparency=(0, 0, 0))
    assert open_image(path).getpixel((0, 0)) == (255, 255, 255)
    floats = tmp_path / "nan.tiff"
    Image.fromarray(np.array([[np.nan, 0.5]], dtype=np.float32)).save(floats)
    with pytest.warns(UserWarning, match="1 pixels of a F image are not finite"):
        assert open_image(floats).getpixel((1, 0)) == (128, 128, 128)


def test_empty_paths_and_pipes_are_named(tmp_path):
    import os

    with pytest.raises(ValueError, match="no image path given"):
        open_image("")
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(ValueError, match="not a regular file"):
        open_image(tmp_path / "pipe.png")


def test_methods_update_keeps_the_text_between_two_tables(tmp_path):
    from hired.cli.methods import BEGIN, END

    page = tmp_path / "page.md"
    page.write_text(f"top\n{BEGIN}\n{END}\nmiddle text\n{BEGIN}\nSTALE-TABLE\n{END}\nend\n")
    assert main(["methods", "--update", str(page)]) == 0
    text = page.read_text()
    assert "middle text" in text and text.count(BEGIN) == 2 and "STALE-TABLE" not in text
    other = tmp_path / "other.md"
    other.write_text("no markers")
    page.write_text(f"{BEGIN}\n{END}\n")
    code, _, err = in_process("methods", "--update", str(page), str(other))
    assert code == 2 and "has no methods table markers" in err and page.read_text() == f"{BEGIN}\n{END}\n"


@pytest.mark.parametrize("args, fragment", [
    (["bench", "--methods", "hired", "hired"], "--methods lists hired twice"),
    (["evidence", "--budget", "0.2", "0.2"], "--budget lists 0.2 twice"),
    (["evidence", "--method", "random", "--alpha", "0.3"], "hired is not among the --method given"),
    (["eval", "--method", "random", "--method", "random"], "--method lists random twice"),
    (["inspect", "IMAGE", "--method-option", "seed=1", "--method-option", "seed=2", "--method", "random"],
     "--method-option seed is given twice"),
    (["bench", "--image-size", "100000x100000"], "above the 89478485 an image may have"),
    (["generate", "IMAGE", "--model", "tiny-random", "--method", "prumerge", "--method-option", "adaptive=true"],
     "in adaptive mode chooses its token count from the pixels"),
    (["show", "IMAGE", "--model", "tiny-random", "--method", "fastv"], "no selection to draw"),
])
def test_second_pass_cli_cases(tmp_path, monkeypatch, args, fragment):
    image = save_png(noise_image(64, 48), tmp_path / "photo.png")
    monkeypatch.chdir(tmp_path)
    code, _, err = in_process(*[str(image) if a == "IMAGE" else a for a in args])
    assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err


def test_eval_refuses_answers_that_are_not_text_and_models_that_are_not_testbed(tmp_path):
    from hired_testbed.evaluate import read_split

    save_png(noise_image(32, 32), tmp_path / "a.png")
    split = tmp_path / "split.jsonl"
    split.write_text(json.dumps({"image": "a.png", "question": "how many ?", "answer": 3}) + "\n")
    with pytest.raises(ValueError, match="answer must be text"):
        read_split(str(split))
    model, processor = tiny_llava_next()
    model.save_pretrained(tmp_path / "other")
    processor.save_pretrained(tmp_path / "other")
    code, _, err = in_process("eval", "--model", str(tmp_path / "other"), "--n", "1", "--out", str(tmp_path / "out"))
    assert code == 2 and "is not a trained testbed model" in err and len(err) < 400


def test_llava_1_5_sizes_of_very_flat_images():
    model, processor = tiny_llava()
    hired.apply(model, processor, budget=0.2)
    generate(model, processor, noise_image(300, 3))
    assert hired.selections(model)[0].image_size == (3, 300)


@pytest.mark.parametrize("method", ["full", "fastv"])
def test_inspect_counts_as_the_records_do(tmp_path, method):
    image = save_png(noise_image(800, 600), tmp_path / "photo.png")
    _, out, _ = in_process("inspect", str(image), "--method", method, "--json")
    (row,) = json.loads(out)
    model, processor = tiny_llava_next()
    hired.apply(model, processor, **method_settings(method, budget=0.2))
    generate(model, processor, noise_image(800, 600))
    (record,) = hired.selections(model)
    assert row["fed_tokens"] == record.visual_tokens
    if method == "full":
        assert row["kept_tokens"] == record.kept_tokens


def test_late_settings_are_refused_at_apply():
    with pytest.raises(ValueError, match="below 2\\*\\*63"):
        hired.HiredConfig.create(method="random", seed=2**64)
    model, processor = tiny_llava_next()
    model.model.language_model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="supports the sdpa and eager attention implementations"):
        hired.apply(model, processor, method="fastv", layer=1)
    model, processor = tiny_llava_next()
    processor.image_processor.crop_size = {"height": 224, "width": 224}
    with pytest.raises(ValueError, match="cuts 224 px tiles but the vision tower takes 336 px"):
        hired.apply(model, processor)


def test_a_saved_adaptive_model_loads_with_a_stock_processor(tmp_path):
    model, processor = tiny_llava_next()
    hired.apply(model, method="prumerge", adaptive=True)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = hired.from_pretrained(str(tmp_path))
    assert hired.stored_config(loaded).method_options.adaptive
    assert type(loaded_processor).__name__ == "LlavaNextProcessor"


def test_reapplying_with_another_processor_restores_the_first():
    model, first = tiny_llava_next()
    _, second = tiny_llava_next()
    hired.apply(model, first, budget=0.2)
    hired.apply(model, second, budget=0.3)
    assert type(first).__name__ == "LlavaNextProcessor" and not hasattr(first, "hired_config")
    hired.remove(model)
    assert type(second).__name__ == "LlavaNextProcessor"


def test_long_messages_are_cut_to_one_readable_line():
    line = describe(ValueError("x" * 5000))
    assert len(line) <= 600 and line.endswith("(5000 characters)")


def test_junk_and_conflicting_stored_configurations_are_named():
    with pytest.raises(ValueError, match="is a mapping"):
        hired.HiredConfig.from_dict("junk")
    with pytest.raises(ValueError, match=r"gives \['alpha'\] twice, with different values"):
        hired.HiredConfig.from_dict({"budget": 0.2, "alpha": 0.3, "method_options": {"alpha": 0.6}})


def test_demo_refuses_a_method_with_nothing_to_draw_before_making_its_folder(tmp_path):
    code, _, err = in_process("demo", "--method", "fastv", "-o", str(tmp_path / "demo"))
    assert code == 2 and "no selection to draw" in err and not (tmp_path / "demo").exists()


@pytest.mark.parametrize("method", METHODS)
def test_a_forward_with_gradients_on_warns_of_nothing(method):
    model, processor = tiny_llava_next()
    if not hired.get_method(method).has_fixed_budget(hired.get_method(method).make_options()):
        pytest.skip(f"{method} needs hired.adaptive.prepare_inputs")
    hired.apply(model, processor, **method_settings(method, budget=0.2))
    inputs = processor(images=noise_image(400, 300), text=PROMPT, return_tensors="pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(**inputs)
    assert [str(w.message) for w in caught] == []
