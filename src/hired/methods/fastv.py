"""FastV (arXiv 2403.06764): after decoder layer K, keep the image tokens the last prompt token attends to most.

This module is the method: its option and its score, the attention of each row's last real token in
decoder layer ``K-1``, heads averaged. The decoder hooks that prune the sequence before layer ``K``
with that score, under any batch and the KV cache, are :mod:`hired.llm_pruning`.
Each image keeps the ``K_j`` of its placeholder positions that score highest, ``K_j`` being the
budget a vision-side method would get for it (newline embeddings are candidates like the others).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .base import Method, MethodOptions, register_method


@dataclass(frozen=True)
class FastVOptions(MethodOptions):
    """``layer``: pruning starts before this decoder layer; the attention of layer ``layer - 1`` decides."""

    layer: int = 2

    def __post_init__(self) -> None:
        self._check_int("layer", 1)


def last_token_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor],
    apply_rotary: Callable,
    head_dim: int,
    scaling: float,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Attention of each row's last real token over all positions, heads averaged: ``(B, L)``.

    Args:
        query: ``(B, L, H * d)`` query projection output.
        key: ``(B, L, Hkv * d)`` key projection output.
        rotary: ``(cos, sin)`` of the layer, ``(B or 1, L, d)``.
        apply_rotary: the decoder's ``apply_rotary_pos_emb(q, k, cos, sin)``.
        head_dim: ``d``.
        scaling: the softmax scale (``d ** -0.5`` for Llama).
        attention_mask: ``(B, L)`` 2D padding mask or ``None``.
    """
    batch, length, _ = key.shape
    cos, sin = (t.expand(batch, -1, -1) for t in rotary)
    if attention_mask is None:
        valid = torch.ones(batch, length, dtype=torch.bool, device=key.device)
    else:
        valid = attention_mask[:, -length:].bool().to(key.device)
    positions = torch.arange(length, device=key.device)
    last = torch.where(valid, positions, -1).amax(dim=1)  # (B,)
    rows = torch.arange(batch, device=key.device)
    q = query[rows, last].view(batch, -1, 1, head_dim)  # (B, H, 1, d)
    k = key.view(batch, length, -1, head_dim).transpose(1, 2)  # (B, Hkv, L, d)
    q, _ = apply_rotary(q, q, cos[rows, last][:, None], sin[rows, last][:, None])
    k, _ = apply_rotary(k, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q.float() @ k.float().transpose(-1, -2)).squeeze(2) * scaling  # (B, H, L)
    allowed = valid & (positions[None] <= last[:, None])
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)


FASTV = register_method(
    Method(
        "fastv",
        "FastV (arXiv 2403.06764): after decoder layer K, keep the image tokens the last prompt token attends to most",
        options=FastVOptions,
        stage="llm",
        score=last_token_attention,
        paper="FastV, arXiv 2403.06764",
        signal="attention of the last prompt token in decoder layer `layer - 1`, heads averaged",
        partition_policy="per image: K of its placeholders (base view, tiles and newline tokens alike)",
    )
)
