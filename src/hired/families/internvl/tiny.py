"""A tiny, randomly initialised InternVL with its real processor, for tests and demos (see :mod:`hired.testing`)."""

from __future__ import annotations

import torch

from ...testing import set_generation_tokens, tiny_text_config, tiny_tokenizer


def tiny_internvl(seed: int = 0, vision_layers: int = 3, vision_width: int = 32, vision_heads: int = 4,
                  text_width: int = 64, text_layers: int = 2, attn_implementation: str = "sdpa", **vision):
    """A random InternVL (InternViT with CLS over 448 px tiles, pixel shuffle, Qwen2 decoder) and its real processor.

    Up to 12 tiles plus a thumbnail, 256 LLM tokens per tile, as InternVL3. ``vision`` passes more
    InternVL vision settings (``use_qk_norm``, ``use_mean_pooling``). The processor needs an
    importable torchvision (its video processor imports it).
    """
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
        InternVLVisionConfig,
        Qwen2Config,
    )

    tokenizer = tiny_tokenizer(named_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                                             "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(
            hidden_size=vision_width, intermediate_size=2 * vision_width, num_hidden_layers=vision_layers,
            num_attention_heads=vision_heads, image_size=[448, 448], patch_size=[14, 14], layer_scale_init_value=0.1,
            **vision,
        ),
        text_config=tiny_text_config(len(tokenizer), text_width, text_layers, Qwen2Config),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn_implementation)
    image_processor = GotOcr2ImageProcessor(crop_to_patches=True, min_patches=1, max_patches=12,
                                            size={"height": 448, "width": 448})
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                  video_processor=InternVLVideoProcessor(), image_seq_length=256)
    set_generation_tokens(model, tokenizer)
    return model, processor
