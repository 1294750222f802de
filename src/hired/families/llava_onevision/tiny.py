"""A tiny, randomly initialised LLaVA-OneVision with its real processor, for tests and demos (see :mod:`hired.testing`)."""

from __future__ import annotations

import torch

from ...testing import IMAGE_TOKEN, set_generation_tokens, tiny_text_config, tiny_tokenizer


def tiny_llava_onevision(seed: int = 0, vision_layers: int = 3, vision_width: int = 32, vision_heads: int = 4,
                         text_width: int = 64, text_layers: int = 2, attn_implementation: str = "sdpa"):
    """A random LLaVA-OneVision (SigLIP without CLS or head over 384 px tiles, Qwen2 decoder) and its real processor.

    The real 6x6 grid pinpoints and "anyres_max_9" downsampling. The processor needs an importable
    torchvision (its video processor imports it).
    """
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tokenizer = tiny_tokenizer(named_tokens={"video_token": "<video>"})
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=vision_width, intermediate_size=2 * vision_width, num_hidden_layers=vision_layers,
            num_attention_heads=vision_heads, image_size=384, patch_size=14, vision_use_head=False,
        ),
        text_config=tiny_text_config(len(tokenizer), text_width, text_layers, Qwen2Config),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn_implementation)
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(image_grid_pinpoints=config.image_grid_pinpoints),
        tokenizer=tokenizer, video_processor=LlavaOnevisionVideoProcessor(), num_image_tokens=729,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
    )
    set_generation_tokens(model, tokenizer)
    return model, processor
