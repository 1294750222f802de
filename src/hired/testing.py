"""Tiny, randomly initialised LLaVA models of the real classes and geometry, for tests and demos.

They keep what matters to token selection (336 px tiles, 14 px patches, the llava-hf v1.6 grid
pinpoints, a CLS-token ViT, the real processor classes) and shrink the widths and depths so that
a forward pass takes milliseconds. Their answers are noise: never read them as results.
"""

from __future__ import annotations

from typing import Sequence

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

# The PIL backends of the image processors: the default ones want torchvision.
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil as LlavaImageProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil as LlavaNextImageProcessor,
)

from .geometry import LLAVA_NEXT_PINPOINTS

IMAGE_TOKEN = "<image>"
WORDS = (
    "USER ASSISTANT : what is in the image ? describe it a an cat dog red blue green one two three "
    "yes no left right top bottom text of and with on this picture color shape how many"
).split()


def tiny_tokenizer(extra_words: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with ``<image>`` as a special token; builds offline.

    ``extra_words`` extend the vocabulary (after the default words, duplicates ignored).
    """
    specials = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(specials + WORDS + list(extra_words)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    tokenizer.padding_side = "left"
    return tokenizer


def _vision_config(layers: int, width: int, heads: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=336,
        patch_size=14,
        projection_dim=width,
        hidden_act="quick_gelu",
    )


def _text_config(vocab_size: int, width: int, layers: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        pad_token_id=3,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_llava_next(seed: int = 0, **sizes) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """A random LLaVA-NeXT (CLIP tower, Llama decoder) and its real processor class.

    ``sizes``: ``vision_layers`` (3), ``vision_width`` (32), ``vision_heads`` (4), ``text_width`` (64),
    ``text_layers`` (2), ``attn_implementation`` ("sdpa").
    """
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS
    )
    return _tiny(LlavaNextForConditionalGeneration, LlavaNextConfig, LlavaNextProcessor, image_processor, seed,
                 {"image_grid_pinpoints": LLAVA_NEXT_PINPOINTS}, **sizes)


def tiny_llava(seed: int = 0, **sizes) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A random LLaVA-1.5 (one 336 px partition) and its real processor class; ``sizes`` as above."""
    image_processor = LlavaImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    return _tiny(LlavaForConditionalGeneration, LlavaConfig, LlavaProcessor, image_processor, seed, {}, **sizes)


def _tiny(model_class, config_class, processor_class, image_processor, seed: int, extra_config: dict,
          vision_layers: int = 3, vision_width: int = 32, vision_heads: int = 4, text_width: int = 64,
          text_layers: int = 2, attn_implementation: str = "sdpa"):
    tokenizer = tiny_tokenizer()
    config = config_class(
        vision_config=_vision_config(vision_layers, vision_width, vision_heads),
        text_config=_text_config(len(tokenizer), text_width, text_layers),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        **extra_config,
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.set_attn_implementation(attn_implementation)
    processor = processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    set_generation_tokens(model, tokenizer)
    return model, processor


def set_generation_tokens(model, tokenizer) -> None:
    """Give ``generate`` the tokenizer's pad, end and start tokens (random models have none)."""
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id


# One tiny model factory per registered family, for the common tester (tests/test_contract.py) that
# crosses every family with every method. A new family adds its factory here.
TINY_MODELS = {
    "llava-next": tiny_llava_next,
    "llava": tiny_llava,
}
