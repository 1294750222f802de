"""FastV inside the tiny decoder: stock identity at full budget, exact KV cache, a manual reference."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaNextForConditionalGeneration, MistralConfig
from transformers.masking_utils import create_causal_mask

import hired
from hired import compat
from hired.families.llava.tiny import tiny_llava
from hired.families.llava_next import LLAVA_NEXT_PINPOINTS
from hired.families.llava_next.tiny import tiny_llava_next
from hired.geometry import AnyresGeometry

PROMPT = "USER: <image> what is in the image ? ASSISTANT:"
LAYERS = 4


def picture(width, height, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, size=(height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def images():
    return [picture(800, 600, 0), picture(500, 1000, 1), picture(672, 672, 2)]


def encode(processor, images):
    return processor(images=images, text=[PROMPT] * len(images), return_tensors="pt", padding=True)


def test_kv_cache_holds_exactly_the_kept_image_positions(images):
    model, processor = tiny_llava_next(text_layers=LAYERS)
    hired.apply(model, processor, method="fastv", budget=0.2)
    inputs = encode(processor, images)
    text = (inputs["attention_mask"].bool() & (inputs["input_ids"] != processor.image_token_id)).sum(dim=1)
    kept = torch.tensor([hired.HiredConfig(budget=0.2).fed_tokens(r) for r in _stock_counts(model, images)])
    with torch.no_grad():
        output = model(**inputs, use_cache=True)
    lengths = [layer.keys.shape[-2] for layer in compat.cache_of(output).layers]
    pruned = int((text + kept).max())  # the longest row; the others are left-filled
    assert lengths == [inputs["input_ids"].shape[1]] * 2 + [pruned] * (LAYERS - 2)
    plan = hired.pruning_plan(model)
    assert plan.valid.sum(dim=1).tolist() == (text + kept).tolist()
    assert plan.image_kept.tolist() == kept.tolist()
    kept_ids = torch.gather(inputs["input_ids"], 1, plan.index).masked_fill(~plan.valid, -1)
    assert (kept_ids == processor.image_token_id).sum(dim=1).tolist() == kept.tolist()
    assert [r.extras["llm_kept"] for r in hired.selections(model)] == kept.tolist()
    assert output.logits.shape[1] == plan.length


def _stock_counts(model, images):
    return [
        AnyresGeometry.create((im.height, im.width), 336, 14, LLAVA_NEXT_PINPOINTS).stock_tokens for im in images
    ]


def test_single_image_cache_length_on_llava_1_5():
    model, processor = tiny_llava(text_layers=LAYERS)
    hired.apply(model, processor, method="fastv", tokens=50, method_options={"layer": 3})
    inputs = encode(processor, [picture(640, 480)])
    with torch.no_grad():
        output = model(**inputs, use_cache=True)
    length = inputs["input_ids"].shape[1]
    lengths = [layer.keys.shape[-2] for layer in compat.cache_of(output).layers]
    assert lengths == [length] * 3 + [length - 576 + 50]


def tiny_llava_next_mistral():
    """The tiny LLaVA-NeXT with a Mistral decoder using grouped-query attention (4 heads, 2 KV heads)."""
    model, processor = tiny_llava_next(text_layers=LAYERS)
    text = model.config.text_config
    config = model.config
    config.text_config = MistralConfig(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, sliding_window=None,
        pad_token_id=text.pad_token_id, bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
    )
    torch.manual_seed(1)
    mistral = LlavaNextForConditionalGeneration(config).eval()
    mistral.set_attn_implementation("sdpa")
    mistral.generation_config = model.generation_config
    return mistral, processor


@pytest.mark.parametrize("factory", [lambda: tiny_llava_next(text_layers=LAYERS), tiny_llava_next_mistral],
                         ids=["llama", "mistral-gqa"])
def test_prefill_and_decoding_match_a_manual_reference(factory, images):
    """Eager attention maps pick the tokens; layers K.. run by hand on the kept hidden states.

    The first decoding step is checked too: its token sees the whole prompt in layers 0..K-1
    and the kept tokens after.
    """
    model, processor = factory()
    inputs = encode(processor, images[:1])
    layer = 2
    hired.apply(model, processor, method="fastv", budget=0.2, method_options={"layer": layer})
    with torch.no_grad():
        fastv = model.generate(
            **inputs, max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    plan_index = hired.pruning_plan(model).index[0]
    hired.remove(model, processor)

    language_model = model.model.language_model
    extended = dict(inputs)
    extended["input_ids"] = fastv.sequences[:, :-1]  # the prompt and the first new token
    extended["attention_mask"] = torch.ones_like(extended["input_ids"])
    model.set_attn_implementation("eager")
    with torch.no_grad():
        stock = model(**extended, output_attentions=True, output_hidden_states=True)
    model.set_attn_implementation("sdpa")
    length = inputs["input_ids"].shape[1]
    is_image = inputs["input_ids"][0] == processor.image_token_id
    keep_count = hired.HiredConfig(budget=0.2).fed_tokens(_stock_counts(model, images[:1])[0])
    attention = stock.attentions[layer - 1][0, :, length - 1, :length].mean(dim=0)  # last prompt token
    image_positions = is_image.nonzero().flatten()
    best = image_positions[attention[image_positions].sort(descending=True, stable=True).indices[:keep_count]]
    keep = ~is_image
    keep[best] = True
    positions = keep.nonzero().flatten()
    assert torch.equal(plan_index, positions)

    def upper_layers(kept_positions):
        with torch.no_grad():
            hidden = stock.hidden_states[layer][:, kept_positions]
            position_ids = kept_positions[None]
            rotary = language_model.rotary_emb(hidden, position_ids=position_ids)
            mask = create_causal_mask(language_model.config, hidden, None, None)  # causal over the kept tokens
            for decoder_layer in language_model.layers[layer:]:
                hidden = decoder_layer(
                    hidden, attention_mask=mask, position_embeddings=rotary, position_ids=position_ids
                )
            return model.lm_head(language_model.norm(hidden[:, -1]))

    torch.testing.assert_close(fastv.logits[0], upper_layers(positions), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        fastv.logits[1], upper_layers(torch.cat([positions, torch.tensor([length])])), atol=1e-5, rtol=1e-4
    )


def test_batch_rows_match_single_runs_through_decoding(images):
    """Left padding, filler slots and the decoding mask translation change nothing per row."""
    model, processor = tiny_llava_next(text_layers=LAYERS)
    hired.apply(model, processor, method="fastv", budget=0.1)

    def steps(batch):
        with torch.no_grad():
            out = model.generate(
                **encode(processor, batch), max_new_tokens=3, do_sample=False,
                output_logits=True, return_dict_in_generate=True,
            )
        return torch.stack(out.logits, dim=1), out.sequences[:, -3:]

    batch_logits, batch_tokens = steps(images[:2])
    for row, image in enumerate(images[:2]):
        single_logits, single_tokens = steps([image])
        torch.testing.assert_close(batch_logits[row], single_logits[0], atol=1e-4, rtol=1e-4)
        assert torch.equal(batch_tokens[row], single_tokens[0])


def test_generate_with_beams(images):
    model, processor = tiny_llava_next(text_layers=LAYERS)
    hired.apply(model, processor, method="fastv", budget=0.2)
    with torch.no_grad():
        out = model.generate(**encode(processor, images[:2]), max_new_tokens=3, num_beams=2, do_sample=False)
    assert out.shape[0] == 2


# --------------------------------------------------------------------------------------------
# Bad input


def test_layer_beyond_the_decoder_is_refused():
    model, processor = tiny_llava_next(text_layers=2)
    with pytest.raises(ValueError, match="cannot prune after layer 2: the decoder has only 2 layers"):
        hired.apply(model, processor, method="fastv", budget=0.2)


@pytest.mark.parametrize("layer", [0, -1, 1.5, "2", True])
def test_bad_layer_option(layer):
    with pytest.raises(ValueError, match="option 'layer' must be an integer >= 1"):
        hired.HiredConfig(method="fastv", method_options={"layer": layer})


def test_placeholders_without_images_are_refused():
    model, processor = tiny_llava_next(text_layers=LAYERS)
    hired.apply(model, processor, method="fastv", budget=0.2)
    ids = processor.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with pytest.raises(ValueError, match="needs the images in the same call"):
        model(input_ids=ids)


def test_remove_restores_the_stock_decoder(images):
    model, processor = tiny_llava_next(text_layers=LAYERS)
    inputs = encode(processor, images[:1])
    with torch.no_grad():
        stock = model(**inputs).logits
    hired.apply(model, processor, method="fastv", budget=0.2)
    hired.remove(model, processor)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, stock)
    assert not model.model._forward_pre_hooks and not model.model.language_model.layers[2]._forward_pre_hooks
