"""The supported transformers range: internals checked at apply, FastV pruning checked at run time."""

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import LlavaNextModel, LlavaNextProcessor
from transformers.cache_utils import DynamicCache
from transformers.generation.utils import GenerationMixin

import hired
from hired import compat
from hired.families.llava.tiny import tiny_llava
from hired.families.llava_next.tiny import tiny_llava_next
from hired.versions import differences, package_versions, read_constraints

PROMPT = "USER: <image> what is in the image ? ASSISTANT:"
LAYERS = 4


def picture(width, height, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, size=(height, width, 3), dtype=np.uint8))


def encode(processor, images):
    return processor(images=images, text=[PROMPT] * len(images), return_tensors="pt", padding=True)


def _pruned_generate(images, **generate_options):
    model, processor = tiny_llava_next(text_layers=LAYERS)
    hired.apply(model, processor, method="fastv", budget=0.2)
    inputs = encode(processor, images)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                             **generate_options)
    return model, inputs, out


@pytest.mark.parametrize(
    "sizes,options",
    [([(800, 600)], {}), ([(800, 600), (500, 1000)], {}), ([(800, 600), (500, 1000)], {"num_beams": 2})],
    ids=["batch-1", "padded-batch-two-sizes", "beam-search"],
)
def test_fastv_prunes_the_cache_under_generate(sizes, options):
    model, inputs, out = _pruned_generate([picture(w, h, i) for i, (w, h) in enumerate(sizes)], **options)
    records = hired.selections(model)
    assert len(records) == len(sizes)
    assert all(r.extras["llm_kept"] < r.visual_tokens for r in records)
    cache = compat.cache_of(out)
    lengths = [layer.keys.shape[-2] for layer in cache.layers]
    generated = out.sequences.shape[1] - inputs["input_ids"].shape[1]
    full = inputs["input_ids"].shape[1] + generated - 1
    assert lengths[:2] == [full, full]
    assert all(length < full for length in lengths[2:]), lengths


def test_fastv_reads_the_cache_under_the_name_this_release_passes():
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    name = compat.cache_argument_name(LlamaDecoderLayer.forward)
    assert name in compat.CACHE_ARGUMENTS
    assert compat.cache_from_kwargs({name: "cache"}) == "cache"
    assert compat.cache_from_kwargs({"past_key_values": "old"}) == "old"


@pytest.mark.parametrize(
    "owner,name",
    [(LlavaNextModel, "pack_image_features"), (LlavaNextModel, "get_placeholder_mask"),
     (GenerationMixin, "_expand_multimodal_outputs"), (LlavaNextProcessor, "_get_number_of_features")],
)
def test_apply_names_a_missing_internal_the_version_and_the_range(monkeypatch, owner, name):
    model, processor = tiny_llava_next()
    monkeypatch.delattr(owner, name)
    with pytest.raises(compat.IncompatibleTransformers) as error:
        hired.apply(model, processor, budget=0.2)
    message = str(error.value)
    assert name in message and transformers.__version__ in message and ">=5.19" in message and "<5.26" in message
    assert type(model.model) is LlavaNextModel, "a refused apply must leave the model stock"


def test_fastv_refuses_a_decoder_layer_without_position_embeddings(monkeypatch):
    from transformers.models.llama import modeling_llama

    model, processor = tiny_llava_next(text_layers=LAYERS)
    stock_forward = modeling_llama.LlamaDecoderLayer.forward

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False):
        return stock_forward(self, hidden_states, attention_mask, position_ids, cache, use_cache)

    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", forward)
    with pytest.raises(compat.IncompatibleTransformers, match="position_embeddings"):
        hired.apply(model, processor, method="fastv", budget=0.2)


def test_fastv_raises_when_its_pruning_hook_never_runs():
    model, processor = tiny_llava_next(text_layers=LAYERS)
    hired.apply(model, processor, method="fastv", budget=0.2)
    layer = model.model.language_model.layers[2]
    layer._forward_pre_hooks.clear()  # as if a release called its layers without going through __call__
    with pytest.raises(RuntimeError, match="hook never ran"):
        with torch.no_grad():
            model(**encode(processor, [picture(800, 600)]), use_cache=True)


def test_fastv_raises_when_the_pruned_cache_is_not_shorter(monkeypatch):
    model, processor = tiny_llava_next(text_layers=LAYERS)
    hired.apply(model, processor, method="fastv", budget=0.2)
    stock = DynamicCache.get_seq_length
    monkeypatch.setattr(DynamicCache, "get_seq_length", lambda self, layer_idx=0: stock(self, 0))
    with pytest.raises(RuntimeError, match="did not reach the cache"):
        with torch.no_grad():
            model(**encode(processor, [picture(800, 600)]), use_cache=True)


def test_the_supported_range_matches_the_package_metadata():
    from importlib import metadata

    from packaging.requirements import Requirement

    requirements = [Requirement(r) for r in metadata.requires("hired")]
    (transformers_requirement,) = [r for r in requirements if r.name == "transformers"]
    assert transformers_requirement.specifier == compat.SUPPORTED_TRANSFORMERS
    assert transformers.__version__ in compat.SUPPORTED_TRANSFORMERS


def test_llava_1_5_is_checked_too(monkeypatch):
    from transformers import LlavaProcessor

    model, processor = tiny_llava()
    monkeypatch.delattr(LlavaProcessor, "_get_num_multimodal_tokens")
    with pytest.raises(compat.IncompatibleTransformers, match="_get_num_multimodal_tokens"):
        hired.apply(model, processor, budget=0.2)


def test_recorded_versions_cover_what_shapes_the_figures():
    versions = package_versions()
    for name in ("torch", "transformers", "huggingface_hub", "tokenizers", "numpy", "pillow", "onnxruntime"):
        assert versions[name], name


def test_differences_from_a_constraints_file(tmp_path):
    constraints = tmp_path / "c.txt"
    constraints.write_text(f"# header\nnumpy=={np.__version__}\nPillow==0.0.1\nnot-installed-pkg==1.0\n")
    pinned = read_constraints(constraints)
    assert pinned["pillow"] == "0.0.1"
    rows = {name: (tested, installed) for name, tested, installed in differences(pinned)}
    assert "numpy" not in rows
    assert rows["pillow"][0] == "0.0.1" and rows["pillow"][1]
    assert rows["not-installed-pkg"] == ("1.0", None)
