"""A tiny, randomly initialised Qwen3-VL with its real processor, for tests and demos (see :mod:`hired.testing`)."""

from __future__ import annotations

import torch

from ...testing import set_generation_tokens, tiny_tokenizer
from ..qwen2_5_vl.tiny import QWEN_TOKENS


def tiny_qwen3_vl(seed: int = 0, vision_layers: int = 4, vision_width: int = 32, vision_heads: int = 2,
                  text_width: int = 64, text_layers: int = 2, attn_implementation: str = "sdpa"):
    """A random Qwen3-VL (ViT with global attention, 16 px patches merged 2x2, DeepStack planes from blocks 1
    and 2 of 4, M-RoPE decoder) and its real processor.

    The real patch (16 px), merge (2x2), temporal patch (2) and learned position grid (48x48,
    interpolated to each image); DeepStack from intermediate blocks as the released towers' 8, 16
    and 24 of 27; M-RoPE sections as Qwen2.5-VL's. The processor caps images at 1,003,520 pixels
    (the released one at 16,777,216) to keep the tests light; it needs an importable torchvision.
    """
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    head = text_width // 4  # 4 heads; vLLM's CPU attention needs head_dim >= 32 (text_width 128)
    half = head // 2  # M-RoPE's sections split the rotary half of each head as Qwen2.5-VL's (16: 2, 3, 3)
    tokenizer = tiny_tokenizer(named_tokens=QWEN_TOKENS)
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3VLConfig(
        vision_config={
            "depth": vision_layers, "hidden_size": vision_width, "intermediate_size": 2 * vision_width,
            "num_heads": vision_heads, "out_hidden_size": text_width, "patch_size": 16, "spatial_merge_size": 2,
            "temporal_patch_size": 2, "num_position_embeddings": 2304, "deepstack_visual_indexes": [1, 2],
        },
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": text_width, "intermediate_size": 2 * text_width,
            "num_hidden_layers": text_layers, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": head,
            "max_position_embeddings": 32768, "pad_token_id": 3, "bos_token_id": 1, "eos_token_id": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_interleaved": True,
                                "mrope_section": [half // 4, 3 * half // 8, 3 * half // 8]},
        },
        **{f"{role}_id": ids(token) for role, token in QWEN_TOKENS.items()},
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn_implementation)
    image_processor = Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2,
                                            size={"shortest_edge": 65536, "longest_edge": 28 * 28 * 1280},
                                            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=Qwen3VLVideoProcessor())
    set_generation_tokens(model, tokenizer)
    return model, processor
