"""What the vision probe reads: separate or fused q/k projections, towers with and without a CLS token."""

import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, SiglipVisionConfig

import hired
from hired.families.llava_next.tiny import tiny_llava_next
from hired.signals import VisionProbe

PROMPT = "USER: <image> what is in the image ? ASSISTANT:"


class FusedLayer(nn.Module):
    """A pre-norm-free ViT layer whose attention uses one fused q/k/v projection (as Qwen-VL's towers do)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(width, 3 * width)
        self.attn.proj = nn.Linear(width, width)

    def forward(self, hidden):
        batch, tokens, width = hidden.shape
        q, k, v = self.attn.qkv(hidden).view(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        mixed = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v
        return hidden + self.attn.proj(mixed.transpose(1, 2).reshape(batch, tokens, width))


class FusedTower(nn.Module):
    """A tiny CLS-token ViT over 4 patch tokens, built from fused-projection layers."""

    def __init__(self, width: int = 8, heads: int = 2, layers: int = 3) -> None:
        super().__init__()
        self.config = type("Config", (), {"num_attention_heads": heads})()
        self.embeddings = nn.Module()
        self.embeddings.cls_token = nn.Parameter(torch.randn(1, 1, width))
        self.embeddings.patch = nn.Linear(3, width)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(FusedLayer(width, heads) for _ in range(layers))

    def forward(self, pixel_values, **kwargs):
        hidden = torch.cat([self.embeddings.cls_token.expand(len(pixel_values), -1, -1),
                            self.embeddings.patch(pixel_values)], dim=1)
        for layer in self.encoder.layers:
            hidden = layer(hidden)
        return hidden


def test_a_fused_qkv_tower_gives_the_cls_row_of_its_attention():
    torch.manual_seed(0)
    tower = FusedTower()
    pixels = torch.randn(2, 4, 3)
    probe = VisionProbe(tower)
    assert probe.has_cls and probe.num_layers == 3
    with torch.no_grad():
        run = probe.run(pixels, feature_layer=1, distribution_layer=0, selection_layer=1, aggregation="sum")
        hidden = torch.cat([tower.embeddings.cls_token.expand(2, -1, -1), tower.embeddings.patch(pixels)], dim=1)
        expected = {}
        for index, layer in enumerate(tower.encoder.layers[:2]):
            q, k, _ = layer.attn.qkv(hidden).view(2, 5, 3, 2, -1).permute(2, 0, 3, 1, 4)
            expected[index] = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)[:, :, 0, 1:].sum(1)
            hidden = layer(hidden)
    torch.testing.assert_close(run.distribution_scores, expected[0])
    torch.testing.assert_close(run.selection_scores, expected[1])
    torch.testing.assert_close(run.hidden, hidden)  # the output of layer 1: layer 2 never ran
    assert run.features.shape == (2, 4, 8) and run.keys.shape == (2, 4, 8)


def test_a_tower_without_projections_is_refused_by_the_probe():
    tower = FusedTower()
    for layer in tower.encoder.layers:
        layer.attn.mix = layer.attn.qkv
        del layer.attn.qkv
    with pytest.raises(ValueError, match="neither separate query/key projections"):
        VisionProbe(tower)


def siglip_llava_next():
    """A LLaVA-NeXT whose tower has no CLS token (SigLIP), feeding every patch (strategy 'full')."""
    stock, processor = tiny_llava_next()
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=336, patch_size=14)
    config = LlavaNextConfig(vision_config=vision, text_config=stock.config.text_config,
                             image_token_id=stock.config.image_token_id, vision_feature_layer=-1,
                             vision_feature_select_strategy="full",
                             image_grid_pinpoints=stock.config.image_grid_pinpoints)
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config).eval()
    processor.vision_feature_select_strategy = "full"
    processor.num_additional_image_tokens = 0
    return model, processor


@pytest.mark.parametrize("method", ["divprune", "random", "spatial"])
def test_methods_without_cls_run_on_a_tower_without_one(method):
    model, processor = siglip_llava_next()
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, size=(600, 800, 3), dtype=np.uint8))
    hired.apply(model, processor, method=method, budget=0.2)
    inputs = processor(images=[image], text=[PROMPT], return_tensors="pt")
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    (record,) = hired.selections(model)
    placeholders = int((inputs["input_ids"] == processor.image_token_id).sum())
    assert placeholders == record.visual_tokens == round(0.2 * record.stock_tokens)
    assert record.extras["score"] == "distinct"  # no CLS row: the measured CLS-free default


@pytest.mark.parametrize("method", ["fastervlm", "prumerge", "prumerge+"])
def test_methods_that_need_cls_attention_are_refused_without_a_cls_token(method):
    model, processor = siglip_llava_next()
    with pytest.raises(ValueError, match=re.escape(f"method '{method}' scores tokens by CLS attention and has no "
                                                   "CLS-free form")):
        hired.apply(model, processor, method=method, budget=0.2)
