"""A tiny, randomly initialised Qwen2.5-VL with its real processor, for tests and demos (see :mod:`hired.testing`)."""

from __future__ import annotations

import torch

from ...testing import set_generation_tokens, tiny_tokenizer

# The special tokens of the Qwen-VL processors, by role; the configs name their ids "<role>_id".
QWEN_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
               "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}


def tiny_qwen2_5_vl(seed: int = 0, vision_layers: int = 4, vision_width: int = 32, vision_heads: int = 2,
                    text_width: int = 64, text_layers: int = 2, attn_implementation: str = "sdpa"):
    """A random Qwen2.5-VL (window-attention ViT with full attention every other block, 2x2 merger, M-RoPE
    decoder) and its real processor.

    The real patch (14 px), merge (2x2), temporal patch (2), window (112 px) and pixel limits; full
    attention in blocks 1 and 3 of 4 as the released towers every 8th of 32; M-RoPE sections in the
    released proportions (16:24:24 of 64 rotary pairs, here 2:3:3 of 8). The processor needs an
    importable torchvision (its video processor imports it).
    """
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = tiny_tokenizer(named_tokens=QWEN_TOKENS)
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        vision_config={
            "depth": vision_layers, "hidden_size": vision_width, "intermediate_size": 2 * vision_width,
            "num_heads": vision_heads, "out_hidden_size": text_width, "patch_size": 14, "spatial_merge_size": 2,
            "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [1, 3],
        },
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": text_width, "intermediate_size": 2 * text_width,
            "num_hidden_layers": text_layers, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 32768, "pad_token_id": 3, "bos_token_id": 1, "eos_token_id": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        },
        **{f"{role}_id": ids(token) for role, token in QWEN_TOKENS.items()},
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn_implementation)
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                    video_processor=Qwen2VLVideoProcessor())
    set_generation_tokens(model, tokenizer)
    return model, processor
