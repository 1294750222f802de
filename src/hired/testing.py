"""Tiny, randomly initialised models of every supported family's real classes and geometry, for tests and demos.

They keep what matters to token selection (tile and patch sizes, grid pinpoints or tile rules, the
tower's CLS token or its absence, pixel shuffle, the real processor classes) and shrink the widths
and depths so that a forward pass takes milliseconds. Their answers are noise: never read them as results.
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

from transformers.utils import is_torchvision_available

# The image processor backend that from_pretrained loads back: torchvision's where it imports, PIL's otherwise
# (so a saved tiny model reloads with the pixels it was tested with).
if is_torchvision_available():
    from transformers import LlavaImageProcessor, LlavaNextImageProcessor
else:
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


def _text_config(vocab_size: int, width: int, layers: int, config_class=LlamaConfig):
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
        text_config=_text_config(len(tokenizer), text_width, text_layers, Qwen2Config),
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
        text_config=_text_config(len(tokenizer), text_width, text_layers, Qwen2Config),
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
            "num_hidden_layers": text_layers, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "max_position_embeddings": 32768, "pad_token_id": 3, "bos_token_id": 1, "eos_token_id": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                "mrope_interleaved": True},
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


# One tiny model factory per registered family, for the common tester (tests/test_contract.py) that
# crosses every family with every method. A new family adds its factory here.
TINY_MODELS = {
    "llava-next": tiny_llava_next,
    "llava": tiny_llava,
    "internvl": tiny_internvl,
    "llava-onevision": tiny_llava_onevision,
    "qwen2.5-vl": tiny_qwen2_5_vl,
    "qwen3-vl": tiny_qwen3_vl,
}
