"""A tiny, randomly initialised LLaVA-NeXT (CLIP tower, Llama decoder) with its real processor, for tests and demos.

Its answers are noise: never read them as results (see :mod:`hired.testing`).
"""

from __future__ import annotations

import torch
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
from transformers.utils import is_torchvision_available

from ...testing import IMAGE_TOKEN, set_generation_tokens, tiny_text_config, tiny_tokenizer, tiny_vision_config
from .geometry import LLAVA_NEXT_PINPOINTS

# The image processor backend that from_pretrained loads back: torchvision's where it imports, PIL's otherwise
# (so a saved tiny model reloads with the pixels it was tested with).
if is_torchvision_available():
    from transformers import LlavaNextImageProcessor
else:
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil as LlavaNextImageProcessor,
    )


def tiny_llava_next(seed: int = 0, **sizes) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """A random LLaVA-NeXT (CLIP tower, Llama decoder) and its real processor class.

    ``sizes``: ``vision_layers`` (3), ``vision_width`` (32), ``vision_heads`` (4), ``text_width`` (64),
    ``text_layers`` (2), ``attn_implementation`` ("sdpa").
    """
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS
    )
    return tiny_llava_like(LlavaNextForConditionalGeneration, LlavaNextConfig, LlavaNextProcessor, image_processor,
                           seed, {"image_grid_pinpoints": LLAVA_NEXT_PINPOINTS}, **sizes)


def tiny_llava_like(model_class, config_class, processor_class, image_processor, seed: int, extra_config: dict,
                    vision_layers: int = 3, vision_width: int = 32, vision_heads: int = 4, text_width: int = 64,
                    text_layers: int = 2, attn_implementation: str = "sdpa"):
    """A random model of a LLaVA-like ``model_class`` (CLIP tower over 336 px tiles, Llama decoder) and its
    ``processor_class`` around ``image_processor``; ``extra_config`` adds settings to ``config_class``."""
    tokenizer = tiny_tokenizer()
    config = config_class(
        vision_config=tiny_vision_config(vision_layers, vision_width, vision_heads),
        text_config=tiny_text_config(len(tokenizer), text_width, text_layers),
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
