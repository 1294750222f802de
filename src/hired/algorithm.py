"""HiRED as pure tensor functions: scores, token count, allocation, selection.

Nothing here knows a model class. The family adapters in :mod:`hired.families` feed these
functions the query/key projections of two ViT layers and the image's
:class:`~hired.geometry.PartitionGeometry`, and turn the kept indices back into features.

Conventions: a *partition* is one ViT input tile. Partition 0 is the base view (the whole image
squashed to one tile); partitions 1..P-1 are the tiles. Each partition has ``s*s`` patch
positions numbered row-major (the CLS token is not counted).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch

from .deprecation import warn_renamed

if TYPE_CHECKING:
    from .geometry import PartitionGeometry

HeadAggregation = Literal["sum", "mean", "max"]
# The token scores a tower can give: the CLS row, or a CLS-free one (attention received by each token,
# attention from the mean query, key norms, key distinctiveness); "auto" is CLS where the tower has a
# CLS token and CLS_FREE_SCORE otherwise (the CLS-free score closest to CLS attention on the evidence
# benchmark, docs/evidence.md).
SCORES = ("auto", "cls", "received", "mean-query", "key-norm", "distinct")
CLS_FREE_SCORE = "distinct"

def round_half_up(x: float) -> int:
    """Round to the nearest integer, halves up (Python's ``round`` rounds halves to even)."""
    return math.floor(x + 0.5)


# --------------------------------------------------------------------------------------------
# Scores


def cls_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    num_heads: int,
    aggregation: HeadAggregation = "sum",
    cls_index: int = 0,
) -> torch.Tensor:
    """CLS attention over the patch tokens from one layer's query/key projections.

    Computes ``softmax_j(q_cls . k_j / sqrt(d))`` per head for the CLS query only (O(N d), no
    N x N matrix), drops the CLS column and aggregates heads.

    Args:
        query: ``(B, 1 + N, num_heads * d)`` output of the layer's query projection (or just the
            CLS row, ``(B, 1, num_heads * d)``).
        key: ``(B, 1 + N, num_heads * d)`` output of the key projection.
        num_heads: attention heads of the layer.
        aggregation: how heads are combined: ``"sum"`` (the paper's choice), ``"mean"``, ``"max"``.
        cls_index: position of the CLS token in the sequence.

    Returns:
        ``(B, N)`` float32 scores, in the token order of ``key`` without the CLS token.
    """
    k = _split_heads(key, num_heads)
    row = cls_index if query.shape[1] > 1 else 0
    q_cls = _split_heads(query[:, row : row + 1], num_heads)[:, 0]
    logits = torch.einsum("bhd,bnhd->bhn", q_cls, k) / math.sqrt(k.shape[-1])
    attention = logits.softmax(dim=-1)
    patch = torch.cat([attention[..., :cls_index], attention[..., cls_index + 1 :]], dim=-1)
    return _aggregate(patch, aggregation)


def received_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    num_heads: int,
    aggregation: HeadAggregation = "sum",
    skip: int = 0,
) -> torch.Tensor:
    """The attention each token receives: the mean over all queries of the softmax attention.

    The signal for towers without a CLS token (SigLIP): column ``j`` of one head's attention
    ``softmax_j(q_i . k_j / sqrt(d))`` averaged over every query ``i``, heads aggregated. One head's
    ``N x N`` map exists at a time, so memory stays at one layer's attention of one head.

    Args:
        query, key: ``(B, T, num_heads * d)`` outputs of the layer's query and key projections.
        num_heads: attention heads of the layer.
        aggregation: ``"sum"``, ``"mean"`` or ``"max"`` over heads.
        skip: leading tokens (a CLS token) that are queries but whose columns are dropped.

    Returns:
        ``(B, T - skip)`` float32 scores.
    """
    q, k = _split_heads(query, num_heads), _split_heads(key, num_heads)
    scale = math.sqrt(k.shape[-1])
    per_head = torch.stack([
        (torch.einsum("bid,bjd->bij", q[:, :, h], k[:, :, h]) / scale).softmax(dim=-1).mean(dim=1)
        for h in range(num_heads)
    ], dim=1)[..., skip:]
    return _aggregate(per_head, aggregation)


def mean_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    num_heads: int,
    aggregation: HeadAggregation = "sum",
    skip: int = 0,
) -> torch.Tensor:
    """Attention from the mean query: the CLS row's form with the mean of the patch queries as the query.

    A CLS-free stand-in for the CLS row, O(N d): ``softmax_j(mean_i(q_i) . k_j / sqrt(d))`` per head over
    the patch keys (``skip`` leading tokens, a CLS token, are left out of the mean and of the columns).

    Returns:
        ``(B, T - skip)`` float32 scores.
    """
    q = _split_heads(query[:, skip:], num_heads).mean(dim=1)
    k = _split_heads(key[:, skip:], num_heads)
    logits = torch.einsum("bhd,bnhd->bhn", q, k) / math.sqrt(k.shape[-1])
    return _aggregate(logits.softmax(dim=-1), aggregation)


def key_norms(key: torch.Tensor, num_heads: int, aggregation: HeadAggregation = "sum", skip: int = 0) -> torch.Tensor:
    """The L2 norm of each token's key per head, heads aggregated: ``(B, T - skip)`` float32."""
    return _aggregate(_split_heads(key[:, skip:], num_heads).norm(dim=-1).transpose(1, 2), aggregation)


def key_distinctness(key: torch.Tensor, num_heads: int, aggregation: HeadAggregation = "sum",
                     skip: int = 0) -> torch.Tensor:
    """How far each token's key points from the image's mean key: ``1 - cos(k_j, mean_i k_i)`` per head.

    A CLS-free signal that needs no attention map: tokens unlike the bulk of the image (objects on a
    background, text on a page) score high. ``skip`` leading tokens (a CLS token) are left out.

    Returns:
        ``(B, T - skip)`` float32 scores in ``[0, 2]`` per head, heads aggregated.
    """
    k = _split_heads(key[:, skip:], num_heads)
    similarity = torch.nn.functional.cosine_similarity(k, k.mean(dim=1, keepdim=True), dim=-1)
    return _aggregate((1 - similarity).transpose(1, 2), aggregation)


def token_scores(
    score: str,
    query: torch.Tensor,
    key: torch.Tensor,
    num_heads: int,
    aggregation: HeadAggregation = "sum",
    skip: int = 0,
    raw_key: torch.Tensor | None = None,
) -> torch.Tensor:
    """One layer's token scores of the kind ``score`` (one of :data:`SCORES` but ``"auto"``), heads aggregated.

    Args:
        query, key: ``(B, T, num_heads * d)`` the layer's queries and keys as its attention uses them
            (after any rotary embedding).
        skip: leading tokens (a CLS token) that are not scored; ``"cls"`` reads the query of token 0.
        raw_key: the keys before a rotary embedding, for the scores that read keys alone (``"key-norm"``,
            ``"distinct"``); default ``key``.

    Returns:
        ``(B, T - skip)`` float32 scores.
    """
    raw_key = key if raw_key is None else raw_key
    if score == "cls":
        return cls_attention(query[:, :1], key, num_heads, aggregation)
    if score == "received":
        return received_attention(query, key, num_heads, aggregation, skip=skip)
    if score == "mean-query":
        return mean_query_attention(query, key, num_heads, aggregation, skip=skip)
    if score == "key-norm":
        return key_norms(raw_key, num_heads, aggregation, skip=skip)
    if score == "distinct":
        return key_distinctness(raw_key, num_heads, aggregation, skip=skip)
    raise ValueError(f"score must be one of {', '.join(s for s in SCORES if s != 'auto')}, got {score!r}")


def _split_heads(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``(B, T, H * d)`` projections -> ``(B, T, H, d)`` float32."""
    batch, tokens, width = tensor.shape
    if width % num_heads:
        raise ValueError(f"key width {width} is not divisible by num_heads={num_heads}")
    return tensor.float().view(batch, tokens, num_heads, width // num_heads)


def _aggregate(per_head: torch.Tensor, aggregation: str) -> torch.Tensor:
    if aggregation == "sum":
        return per_head.sum(dim=1)
    if aggregation == "mean":
        return per_head.mean(dim=1)
    if aggregation == "max":
        return per_head.amax(dim=1)
    raise ValueError(f"unknown head aggregation {aggregation!r}; use 'sum', 'mean' or 'max'")


# --------------------------------------------------------------------------------------------
# Token count


def token_count(stock_tokens: int, fraction: float | None = None, tokens: int | None = None) -> int:
    """The number of visual tokens to keep for one image: a function of its size only.

    Exactly one of ``fraction`` (of the stock count) and ``tokens`` (absolute) is given. The
    result is capped at ``stock_tokens``; a result equal to it means "run the stock model".
    """
    if (fraction is None) == (tokens is None):
        raise ValueError("give exactly one of fraction and tokens")
    if tokens is not None:
        return min(int(tokens), stock_tokens)
    return min(max(1, round_half_up(fraction * stock_tokens)), stock_tokens)


def apportion(total: int, weights: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    """Split ``total`` into integers proportional to ``weights``, none above its cap.

    Largest remainder (Hamilton): floors of the quotas, then one more to the largest fractional
    parts, ties to the lower index. A share that would exceed its cap is fixed at the cap and the
    rest is divided again among the others. All-zero weights mean shares proportional to the caps.
    Returns ``min(total, caps.sum())`` tokens in all.
    """
    # A discrete split of a few numbers: on the host, in float64 (which some accelerators lack), no gradient.
    weights = weights.detach().to("cpu", torch.float64).clamp(min=0)
    caps = caps.to("cpu", torch.long)
    shares = torch.zeros_like(caps)
    open_ = caps > 0
    remaining = min(int(total), int(caps.sum()))
    while remaining > 0 and bool(open_.any()):
        w = torch.where(open_, weights, torch.zeros_like(weights))
        if float(w.sum()) <= 0:
            w = torch.where(open_, (caps - shares).double(), torch.zeros_like(weights))
        quota = remaining * w / w.sum()
        room = (caps - shares).double()
        full = open_ & (quota >= room)
        if bool(full.any()):
            remaining -= int((caps - shares)[full].sum())
            shares[full] = caps[full]
            open_ &= ~full
            continue
        floors = quota.floor().long()
        shares += floors
        left = remaining - int(floors.sum())
        fractions = torch.where(open_, quota - floors.double(), torch.full_like(quota, -1.0))
        order = torch.sort(fractions, descending=True, stable=True).indices
        shares[order[:left]] += 1
        remaining = 0
    return shares


def tile_content_scores(base_scores: torch.Tensor, geometry: PartitionGeometry) -> torch.Tensor:
    """Visual content score of each tile: base-view attention summed over the area it covers."""
    return geometry.tile_overlap.to(base_scores.device, torch.float32) @ base_scores.float()


def allocate(
    tokens: int,
    alpha: float,
    content_scores: torch.Tensor,
    caps: torch.Tensor,
) -> torch.Tensor:
    """The image's ``tokens`` shared among its partitions: ``(P,)`` partition tokens, the base view first.

    The base view gets ``round(alpha * tokens)`` (capped at its own cap); the tiles share the rest
    in proportion to ``content_scores`` (``(P-1,)``), each capped at its candidate count; what the
    tiles cannot take goes back to the base view. The sum is exactly ``tokens`` whenever
    ``tokens <= caps.sum()``.
    """
    caps = caps.long()
    base_cap = int(caps[0])
    base = min(round_half_up(alpha * tokens), base_cap)
    tiles = apportion(tokens - base, content_scores, caps[1:])
    base = min(base_cap, tokens - int(tiles.sum()))
    return torch.cat([torch.tensor([base], dtype=torch.long), tiles])


# --------------------------------------------------------------------------------------------
# Selection


def top_k_indices(scores: torch.Tensor, k: int, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """The ``k`` highest-scoring candidate positions, ties to the lower index, in ascending order."""
    if candidates is not None:
        if k > int(candidates.sum()):
            raise ValueError(f"asked for {k} tokens among {int(candidates.sum())} candidates")
        scores = scores.float().masked_fill(~candidates.to(scores.device), float("-inf"))
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return order[:k].sort().values


def hired_select(
    distribution_scores: torch.Tensor,
    selection_scores: torch.Tensor,
    geometry: PartitionGeometry,
    tokens: int,
    alpha: float = 0.5,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """HiRED for one image: its partition tokens and kept indices.

    Args:
        distribution_scores: ``(P, s*s)`` CLS attention of the distribution layer; only the base
            view's row (partition 0) is used.
        selection_scores: ``(P, s*s)`` CLS attention of the selection (feature) layer.
        geometry: the image's AnyRes geometry.
        tokens: tokens to keep, at most ``geometry.stock_tokens``.
        alpha: share of the tokens for the base view.

    Returns:
        ``(partition_tokens, kept)``: ``(P,)`` long and one ascending index tensor per partition.
    """
    candidates = geometry.candidates
    caps = candidates.sum(dim=1)
    if geometry.num_partitions == 1:
        partition_tokens = torch.tensor([min(tokens, int(caps[0]))])
    else:
        content = tile_content_scores(distribution_scores[0], geometry)
        partition_tokens = allocate(tokens, alpha, content, caps)
    kept = [
        top_k_indices(selection_scores[p], int(partition_tokens[p]), candidates[p])
        for p in range(geometry.num_partitions)
    ]
    return partition_tokens, kept


def __getattr__(name: str):
    if name == "token_budget":
        warn_renamed("hired.algorithm.token_budget", "hired.algorithm.token_count")
        return token_count
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
