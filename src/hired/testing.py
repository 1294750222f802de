"""Tiny, randomly initialised models of every supported family's real classes and geometry, for tests and demos.

They keep what matters to token selection (tile and patch sizes, grid pinpoints or tile rules, the
tower's CLS token or its absence, pixel shuffle, the real processor classes) and shrink the widths
and depths so that a forward pass takes milliseconds. Their answers are noise: never read them as results.

Each family builds its own in its folder (``hired/families/<family>/tiny.py``, declared by its
adapter's ``tiny_model``); :data:`TINY_MODELS` lists them by family name. This module holds what
they share: the tokenizer, the small vision and text configs, the generation tokens.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Sequence

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPVisionConfig, LlamaConfig, PreTrainedTokenizerFast

from .deprecation import moved_attribute

IMAGE_TOKEN = "<image>"
WORDS = (
    "USER ASSISTANT : what is in the image ? describe it a an cat dog red blue green one two three "
    "yes no left right top bottom text of and with on this picture color shape how many"
).split()


def tiny_tokenizer(extra_words: Sequence[str] = (), named_tokens: dict[str, str] | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with ``<image>`` as a special token; builds offline.

    ``extra_words`` extend the vocabulary (after the default words, duplicates ignored);
    ``named_tokens`` add special tokens by role (``{"video_token": "<video>"}``), as processors look them up.
    """
    named = {"image_token": IMAGE_TOKEN, **(named_tokens or {})}
    specials = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN, *named.values()]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(specials + WORDS + list(extra_words)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens=named,
    )
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_vision_config(layers: int, width: int, heads: int) -> CLIPVisionConfig:
    """A small CLIP ViT over 336 px tiles of 14 px patches, as LLaVA-1.5's and LLaVA-NeXT's."""
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


def tiny_text_config(vocab_size: int, width: int, layers: int, config_class=LlamaConfig):
    """A small decoder config of ``config_class`` (Llama's, or another with its fields, as Qwen2's)."""
    return config_class(
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


def set_generation_tokens(model, tokenizer) -> None:
    """Give ``generate`` the tokenizer's pad, end and start tokens (random models have none)."""
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id


def tiny_models() -> dict[str, Callable[..., tuple[Any, Any]]]:
    """The tiny model builder of every registered family that declares one, by family name.

    A builder takes ``seed`` and the sizes of its model as keywords and returns ``(model, processor)``.
    """
    from .families import registered_families

    builders = {}
    for family in registered_families():
        if family.tiny_model is None:
            continue
        module, _, function = family.tiny_model.partition(":")
        package = type(family).__module__.rpartition(".")[0]
        builders[family.name] = getattr(importlib.import_module(module, package), function)
    return builders


# One builder per registered family that declares one, by family name (made by tiny_models() on first use);
# the common tester (tests/test_contract.py) crosses every family with every method through it.
TINY_MODELS: dict[str, Callable[..., tuple[Any, Any]]]

# The tiny model builders that lived here, and the family module that holds each now.
_MOVED = {
    "tiny_llava_next": "hired.families.llava_next.tiny",
    "tiny_llava": "hired.families.llava.tiny",
    "tiny_internvl": "hired.families.internvl.tiny",
    "tiny_llava_onevision": "hired.families.llava_onevision.tiny",
    "tiny_qwen2_5_vl": "hired.families.qwen2_5_vl.tiny",
    "tiny_qwen3_vl": "hired.families.qwen3_vl.tiny",
    "QWEN_TOKENS": "hired.families.qwen2_5_vl.tiny",
}


def __getattr__(name: str) -> Any:
    # TINY_MODELS is made on first use: the families' builders import this module.
    if name == "TINY_MODELS":
        globals()[name] = tiny_models()
        return globals()[name]
    return moved_attribute(__name__, name, _MOVED)
