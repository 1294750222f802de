"""The common tester: every registered method crossed with every registered family.

For each pair: the exact token count for several image sizes (placeholders = features = the
budget), identity with the stock model at full budget, a batch equal to its images run alone, a
``save_pretrained`` / ``from_pretrained`` round trip, and ``remove``. For each family: videos pass
through stock where its model takes them, and are refused by its processor where it does not. A new method or family is
covered here by registering it (and, for a family, naming its tiny model in its adapter's ``tiny_model``,
which ``hired.testing.TINY_MODELS`` lists).
"""

import inspect
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

import hired
from hired.cli import main
from hired.methods import Method, MethodOptions, Selection, registered_methods, unregister_method
from hired.testing import TINY_MODELS

SIZES = [(800, 600), (500, 1000), (672, 672), (1000, 300), (1920, 1080)]  # (width, height); OneVision downsamples the last
METHODS = [method.name for method in registered_methods()]
LAYERS = 3  # decoder layers: FastV prunes after layer 2


def picture(width, height, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, size=(height, width, 3), dtype=np.uint8))


IMAGES = [picture(w, h, i) for i, (w, h) in enumerate(SIZES)]


@pytest.fixture(scope="module", params=sorted(TINY_MODELS))
def family(request):
    """A tiny model of each family, shared by the tests of this module (apply re-patches it), with its stock outputs."""
    model, processor = TINY_MODELS[request.param](text_layers=LAYERS)
    assert hired.family_of(model).name == request.param, "TINY_MODELS must map each family name to its own model"
    stock = [logits(model, processor, [image]) for image in IMAGES[:2]]
    return model, processor, stock


def runs_on(model, method):
    """Whether ``method`` can run on this family (methods that need a CLS token are refused without one)."""
    has_cls = hired.family_of(model).vision_probe(hired.family_of(model).inner(model)).has_cls
    return has_cls or not hired.get_method(method).needs_cls


@pytest.fixture
def supported(family, method):
    if not runs_on(family[0], method):
        pytest.skip(f"{method} needs a CLS token; test_cls_methods_are_refused_without_a_cls_token covers it")


def settings(method, **amount):
    """``method`` at ``amount``; the stock-model method takes no budget (it would refuse one)."""
    return {"method": method} if hired.get_method(method).stage == "none" else {"method": method, **amount}


def prompt(processor):
    return f"USER: {processor.image_token} what is in the image ? ASSISTANT:"


def encode(processor, images):
    return processor(images=images, text=[prompt(processor)] * len(images), return_tensors="pt", padding=True)


def logits(model, processor, images):
    with torch.no_grad():
        return model(**encode(processor, images)).logits


def expected_tokens(processor, config, image):
    geometry = processor.hired_geometry((image.height, image.width))
    fed = config.fed_tokens(geometry.stock_tokens)
    return fed + (geometry.newline_tokens if fed >= geometry.stock_tokens else 0), geometry


@pytest.mark.parametrize("method", METHODS)
def test_placeholders_equal_features_equal_the_budget(family, method, supported):
    model, processor, _ = family
    hired.apply(model, processor, **settings(method, budget=0.2))
    config = hired.stored_config(model)
    inputs = encode(processor, IMAGES)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)  # the model refuses a count mismatch
    placeholders = (inputs["input_ids"] == processor.image_token_id).sum(dim=1).tolist()
    records = hired.selections(model)
    expected = [expected_tokens(processor, config, image)[0] for image in IMAGES]
    assert placeholders == [r.visual_tokens for r in records] == expected
    assert [r.method for r in records] == [method] * len(IMAGES)
    if hired.get_method(method).stage == "llm":  # fed in full, pruned inside the decoder to the budget
        budget = hired.HiredConfig(budget=0.2)
        assert [r.extras["llm_kept"] for r in records] == [
            budget.fed_tokens(expected_tokens(processor, budget, image)[1].stock_tokens) for image in IMAGES
        ]


@pytest.mark.parametrize("amount", [{"budget": 1.0}, {"tokens": 100_000}], ids=["budget-1", "tokens-above-stock"])
@pytest.mark.parametrize("method", METHODS)
def test_full_budget_is_the_stock_model(family, method, amount, supported):
    model, processor, stock = family
    hired.apply(model, processor, **settings(method, **amount))
    for image, reference in zip(IMAGES[:2], stock):
        assert torch.equal(logits(model, processor, [image]), reference)


@pytest.mark.parametrize("method", METHODS)
def test_a_batch_equals_its_images_alone(family, method, supported):
    model, processor, _ = family
    hired.apply(model, processor, **settings(method, budget=0.2))
    batch = logits(model, processor, IMAGES[:2])
    for row, image in enumerate(IMAGES[:2]):
        alone = logits(model, processor, [image])
        # left padding: the row's last position predicts the same next token
        torch.testing.assert_close(batch[row, -1], alone[0, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_save_and_load_round_trip(family, method, supported, tmp_path):
    model, processor, _ = family
    hired.apply(model, processor, **settings(method, budget=0.2))
    before = logits(model, processor, IMAGES[:1])
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = hired.from_pretrained(str(tmp_path))
    assert hired.stored_config(loaded) == hired.stored_config(model)
    torch.testing.assert_close(logits(loaded.eval(), loaded_processor, IMAGES[:1]), before)


def test_a_saved_checkpoint_names_its_weights_as_a_stock_save_does(family, tmp_path):
    """Other loaders (vLLM) read the stock names; the swapped inner class must not change them."""
    from safetensors import safe_open

    model, processor, _ = family

    def saved_names(folder) -> set[str]:
        model.save_pretrained(folder)
        with safe_open(str(folder / "model.safetensors"), "pt") as weights:
            return set(weights.keys())

    hired.remove(model, processor)
    stock = saved_names(tmp_path / "stock")
    hired.apply(model, processor, budget=0.2)
    assert saved_names(tmp_path / "hired") == stock


@pytest.mark.parametrize("method", METHODS)
def test_remove_restores_the_stock_model(family, method, supported):
    model, processor, stock = family
    hired.apply(model, processor, **settings(method, budget=0.2))
    hired.remove(model, processor)
    family_adapter = hired.family_of(model)
    assert type(model.model) is family_adapter.inner_class and type(processor) is family_adapter.processor_class
    assert not hasattr(model.config, "hired")
    assert torch.equal(logits(model, processor, IMAGES[:1]), stock[0])


@pytest.mark.parametrize("method", [m for m in METHODS if hired.get_method(m).needs_cls])
def test_cls_methods_are_refused_without_a_cls_token(family, method):
    model, processor, _ = family
    if runs_on(model, method):
        pytest.skip("this family's tower has a CLS token")
    with pytest.raises(ValueError, match=re.escape(f"method '{method}' scores tokens by CLS attention and has no CLS-free form")):
        hired.apply(model, processor, method=method, budget=0.2)


@pytest.mark.parametrize("method", [m for m in METHODS if hired.get_method(m).needs_cls])
def test_inspect_refuses_what_apply_refuses_without_a_cls_token(family, method, tmp_path, capsys):
    """``hired inspect`` loads no model: it checks the family's declared tower, which must be the tiny model's."""
    model, processor, _ = family
    adapter = hired.family_of(model)
    assert adapter.released_has_cls == adapter.vision_probe(adapter.inner(model)).has_cls
    IMAGES[0].save(tmp_path / "image.png")
    code = main(["inspect", str(tmp_path / "image.png"), "--family", adapter.name, "--method", method,
                 "--budget", "0.2"])
    refusal = f"method '{method}' scores tokens by CLS attention and has no CLS-free form"
    if runs_on(model, method):
        assert code == 0 and refusal not in capsys.readouterr().err
    else:
        assert code == 2 and refusal in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Videos: never pruned; stock wherever the stock model takes them


VIDEO = np.random.RandomState(0).randint(0, 256, size=(4, 64, 64, 3), dtype=np.uint8)  # 4 frames


def takes_videos(model) -> bool:
    """Whether the family's stock model takes videos as an input of their own."""
    return "pixel_values_videos" in inspect.signature(hired.family_of(model).inner_class.forward).parameters


def encode_video(processor):
    return processor(videos=[VIDEO], text=f"USER: {processor.video_token} what is in the video ? ASSISTANT:",
                     return_tensors="pt")


def video_features(model, inputs):
    """The inner model's ``get_video_features`` of ``inputs``: its main features, concatenated, and the whole output."""
    wanted = inspect.signature(hired.family_of(model).inner_class.get_video_features).parameters
    with torch.no_grad():
        output = model.model.get_video_features(**{k: v for k, v in inputs.items() if k in wanted})
    pooled = output.pooler_output
    return (torch.cat(list(pooled)) if isinstance(pooled, (list, tuple)) else pooled), output


def test_videos_pass_through_stock_where_the_model_takes_them(family):
    """A video-only prompt: the patched processor and model give the stock inputs and logits, and encoding a
    video leaves the records of the images of the last call as they are."""
    model, processor, _ = family
    if not takes_videos(model):
        pytest.skip("this family's model takes no videos; test_videos_are_refused_where_the_model_takes_none covers it")
    hired.remove(model, processor)
    stock_inputs = encode_video(processor)
    with torch.no_grad():
        stock = model(**stock_inputs).logits
    stock_features, _ = video_features(model, stock_inputs)
    hired.apply(model, processor, budget=0.2)
    inputs = encode_video(processor)
    assert inputs.keys() == stock_inputs.keys() and all(torch.equal(inputs[k], stock_inputs[k]) for k in inputs)
    with torch.no_grad():
        model(**encode(processor, IMAGES[:1]))
    records = hired.selections(model)
    features, _ = video_features(model, inputs)
    torch.testing.assert_close(features, stock_features, atol=0, rtol=0)
    assert len(records) == 1 and all(a is b for a, b in zip(hired.selections(model), records, strict=True))
    with torch.no_grad():
        pruned = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=2, do_sample=False)  # generate encodes videos itself
    torch.testing.assert_close(pruned, stock, atol=0, rtol=0)
    assert hired.selections(model) == []  # the call held no image
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 2)
    assert torch.equal(generated[:, -2], stock[:, -1].argmax(-1))


def test_videos_are_refused_where_the_model_takes_none(family):
    model, processor, _ = family
    if takes_videos(model):
        pytest.skip("this family's model takes videos; "
                    "test_videos_pass_through_stock_where_the_model_takes_them covers it")
    hired.apply(model, processor, budget=0.2)
    stock_processor = hired.family_of(model).processor_class.__name__
    with pytest.raises(ValueError, match=f"prunes the tokens of images, not of videos, .* {stock_processor}'s"):
        processor(videos=[VIDEO], text="USER: what is in the video ? ASSISTANT:", return_tensors="pt")


# --------------------------------------------------------------------------------------------
# A user's own method, from this file


@dataclass(frozen=True)
class FirstTokensOptions(MethodOptions):
    """``stride``: keep every stride-th candidate of each partition, in order, until the budget is spent."""

    stride: int = 1

    def __post_init__(self) -> None:
        self._check_int("stride", 1)


def first_tokens(evidence, budget, options):
    geometry = evidence.geometry
    kept, left = [], budget
    for row in geometry.candidates:
        positions = row.nonzero().flatten()
        positions = torch.cat([positions[:: options.stride], positions[torch.arange(len(positions)) % options.stride != 0]])
        take = positions[:left].sort().values
        kept.append(take)
        left -= len(take)
    return Selection(torch.tensor([len(k) for k in kept]), kept)


USER_METHOD = Method("first-tokens-test", "the first candidates of each partition", options=FirstTokensOptions,
                     select=first_tokens)


@pytest.fixture(scope="module")
def user_method():
    hired.register_method(USER_METHOD)
    yield USER_METHOD.name
    unregister_method(USER_METHOD.name)


def test_a_user_method_runs_through_apply_on_every_family(family, user_method):
    model, processor, _ = family
    hired.apply(model, processor, method=user_method, tokens=100, stride=2)  # within partition 0 of every family
    inputs = encode(processor, IMAGES)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    config = hired.stored_config(model)
    assert config.method_options == FirstTokensOptions(stride=2)
    records = hired.selections(model)
    assert [r.visual_tokens for r in records] == [expected_tokens(processor, config, image)[0] for image in IMAGES]
    assert all(int(r.kept[0][1] - r.kept[0][0]) == 2 for r in records)


def test_register_method_refuses_a_duplicate_name(user_method):
    with pytest.raises(ValueError, match="registered already"):
        hired.register_method(Method("hired", "another hired", select=first_tokens))
    with pytest.raises(ValueError, match="registered already"):
        hired.register_method(USER_METHOD)


def test_a_method_must_match_its_stage():
    with pytest.raises(ValueError, match="must define select"):
        Method("broken", "no select")
    with pytest.raises(ValueError, match="must not define select"):
        Method("broken", "select on the stock model", stage="none", select=first_tokens)


def test_an_option_of_another_method_is_an_error(user_method):
    with pytest.raises(ValueError, match="has no options \\['alpha'\\]"):
        hired.HiredConfig.create(method=user_method, alpha=0.5)
    with pytest.raises(ValueError, match="option 'stride' must be an integer >= 1"):
        hired.HiredConfig.create(method=user_method, stride=0)


# ============================================================================================
# The family protocol: what every family's swapped model does whatever its own code, and what an adapter must declare


def test_a_failing_image_call_forgets_the_records_of_the_last_one(family):
    """The swapped ``get_image_features`` forgets the previous call's records before the family's own code runs,
    and keeps the family's signature, by which ``generate`` picks the arguments it encodes."""
    model, processor, _ = family
    hired.apply(model, processor, budget=0.2)
    inner = hired.family_of(model).inner(model)
    inputs = encode(processor, IMAGES[:1])
    with torch.no_grad():
        model(**inputs)
    assert len(hired.selections(model)) == 1
    parameters = inspect.signature(inner.get_image_features).parameters
    assert "pixel_values" in parameters
    arguments = {key: value for key, value in inputs.items() if key in parameters}
    pixels = arguments["pixel_values"]
    arguments["pixel_values"] = pixels[:, :-1] if pixels.dim() == 5 else pixels[:-1]  # one tile or patch short
    with pytest.raises(ValueError), torch.no_grad():
        inner.get_image_features(**arguments)
    assert hired.selections(model) == []


def incomplete_adapter(drop_hook=None, **attributes):
    """A throwaway adapter class on LLaVA-1.5's classes, without ``drop_hook``; ``attributes`` override (None deletes)."""
    from hired.families import FamilyAdapter
    from hired.families.llava import LLAVA

    stock = type(LLAVA)
    namespace = {"name": "half-done", **{a: getattr(stock, a) for a in ("outer_class", "inner_class", "hired_inner_class",
                                                                          "processor_class", "hired_processor_class")}}
    namespace.update(attributes)
    for hook in ("geometry", "released_geometry", "vision_probe", "pack_stock"):
        if hook != drop_hook:
            namespace[hook] = getattr(stock, hook)
    return type("HalfDoneAdapter", (FamilyAdapter,), {k: v for k, v in namespace.items() if v is not None})


def assert_refused(adapter_class, *lacking):
    from hired.families import register_family, registered_families

    with pytest.raises(TypeError) as error:
        register_family(adapter_class())
    message = str(error.value)
    name = getattr(adapter_class, "name", None) or adapter_class.__name__
    assert f"family {name!r}" in message or f"family {name} " in message, message
    for part in lacking:
        assert part in message, message
    assert all(family.name != "half-done" for family in registered_families())


def test_the_complete_adapter_is_made_and_registered_adapters_are_complete():
    from hired.families import registered_families
    from hired.families.adapter import missing_parts

    assert incomplete_adapter()().name == "half-done"  # the throwaway adapter is complete without a drop
    assert all(missing_parts(type(family)) == [] for family in registered_families())


@pytest.mark.parametrize("hook", ["geometry", "released_geometry", "vision_probe", "pack_stock"])
def test_register_family_refuses_an_adapter_missing_a_required_hook(hook):
    assert_refused(incomplete_adapter(drop_hook=hook), f"the hook {hook}")


@pytest.mark.parametrize("attribute", ["name", "outer_class", "inner_class", "hired_inner_class", "processor_class",
                                       "hired_processor_class"])
def test_register_family_refuses_an_adapter_missing_a_required_attribute(attribute):
    assert_refused(incomplete_adapter(**{attribute: None}), f"the class attribute {attribute}")


def test_register_family_refuses_swapped_classes_that_do_not_fit():
    from transformers import LlavaModel, LlavaProcessor

    from hired.families import HiredModel

    class LazyLlavaModel(HiredModel, LlavaModel):
        """Swapped, but encodes images as the stock model does."""

    assert_refused(incomplete_adapter(drop_hook="pack_stock", hired_inner_class=LlavaModel,
                                      hired_processor_class=LlavaProcessor),
                   "the hook pack_stock", "hired_inner_class as a subclass of inner_class and HiredModel",
                   "hired_processor_class as a subclass of processor_class and HiredProcessor")
    assert_refused(incomplete_adapter(hired_inner_class=LazyLlavaModel), "hired_inner_class.get_image_features of its own")
