"""The pure algorithm: scores, geometry, budget, allocation, selection."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlavaNextProcessor
from transformers.models.llava_next.modeling_llava_next import unpad_image

from hired.algorithm import (
    allocate,
    apportion,
    cls_attention,
    hired_select,
    key_distinctness,
    key_norms,
    mean_query_attention,
    received_attention,
    tile_content_scores,
    token_count,
    top_k_indices,
)
from hired.families.llava_next import LLAVA_NEXT_PINPOINTS
from hired.geometry import AnyresGeometry

SIZES = [
    (672, 672), (500, 1000), (1000, 500), (336, 1008), (1008, 336), (300, 1000), (1000, 300),
    (600, 800), (800, 600), (1, 1), (50, 4000), (4000, 50), (333, 517), (1080, 1920), (1920, 1080),
]


def geometry(height, width):
    return AnyresGeometry.create((height, width), 336, 14, LLAVA_NEXT_PINPOINTS)


# ---- scores


def test_cls_attention_matches_a_dense_softmax():
    torch.manual_seed(0)
    heads, dim, tokens = 4, 8, 10
    query, key = torch.randn(3, tokens, heads * dim), torch.randn(3, tokens, heads * dim)
    q = query.view(3, tokens, heads, dim).transpose(1, 2)
    k = key.view(3, tokens, heads, dim).transpose(1, 2)
    dense = (q @ k.transpose(-1, -2) / math.sqrt(dim)).softmax(-1)[:, :, 0, 1:]
    torch.testing.assert_close(cls_attention(query, key, heads, "sum"), dense.sum(1))
    torch.testing.assert_close(cls_attention(query, key, heads, "mean"), dense.mean(1))
    torch.testing.assert_close(cls_attention(query, key, heads, "max"), dense.amax(1))
    torch.testing.assert_close(cls_attention(query[:, :1], key, heads), dense.sum(1))


# ---- geometry against the stock model's own arithmetic


@pytest.mark.parametrize("height,width", SIZES)
def test_candidates_are_exactly_the_tokens_the_stock_unpadding_keeps(height, width):
    g = geometry(height, width)
    rows, cols = g.grid
    s = g.side
    # Label every mosaic position with (tile, index) and let the stock unpad_image crop it.
    labels = torch.arange(rows * cols * s * s, dtype=torch.float64).view(rows, cols, s, s)
    mosaic = labels.permute(0, 2, 1, 3).reshape(1, rows * s, cols * s)
    kept = unpad_image(mosaic, [height, width]).flatten().long()
    expected = torch.zeros(rows * cols * s * s, dtype=torch.bool)
    expected[kept] = True
    assert torch.equal(g.candidates[1:].flatten(), expected)
    # Mosaic raster order of the stock model is what stock_order reproduces.
    order = g.stock_order([c.nonzero().flatten() for c in g.candidates])
    tile_major = (order[g.tokens_per_tile:, 0] - 1) * s * s + order[g.tokens_per_tile:, 1]
    assert torch.equal(tile_major, kept)


@pytest.mark.parametrize("height,width", SIZES)
def test_stock_count_matches_the_stock_processor(height, width):
    g = geometry(height, width)
    processor = LlavaNextProcessor.__new__(LlavaNextProcessor)
    processor.patch_size, processor.num_additional_image_tokens = 14, 1
    processor.image_processor = type("IP", (), {"image_grid_pinpoints": LLAVA_NEXT_PINPOINTS})()
    stock = processor._get_number_of_features(height, width, 336, 336) - 1  # "default" drops the CLS
    assert g.stock_tokens + g.newline_tokens == stock


@pytest.mark.parametrize("height,width", SIZES)
def test_tiles_cover_every_base_patch_exactly_once(height, width):
    overlap = geometry(height, width).tile_overlap
    torch.testing.assert_close(overlap.sum(0), torch.ones(overlap.shape[1]))
    assert overlap.min() >= 0


# ---- spatial correctness of the content scores


def band_mapping_scores(base_scores, g):
    """The reference code's mapping (a defect): the row-major map reshaped to (rows, cols, -1)."""
    rows, cols = g.grid
    return base_scores.view(rows, cols, -1).sum(-1).flatten()


def left_half(side=24):
    scores = torch.zeros(side, side)
    scores[:, : side // 2] = 1.0
    return scores.flatten()


def top_half(side=24):
    scores = torch.zeros(side, side)
    scores[: side // 2] = 1.0
    return scores.flatten()


def budget_goes_to(scorer, height, width, base_scores, expected_tiles):
    g = geometry(height, width)
    content = scorer(base_scores, g)
    caps = g.candidates.sum(1)
    budgets = allocate(200, 0.5, content, caps)[1:]
    receiving = set(torch.nonzero(budgets).flatten().tolist())
    return receiving == set(expected_tiles)


CASES = [
    # (height, width, base-view attention, tiles that cover it)
    (672, 672, left_half(), [0, 2]),
    (672, 672, top_half(), [0, 1]),
    (500, 1000, left_half(), [0]),
    (1000, 500, top_half(), [0]),
    (300, 1000, left_half(), [0, 1]),  # 1x3 grid: the left half spans tile 0 and half of tile 1
    (600, 800, left_half(), [0, 2]),  # 2x2 grid with vertical padding
]


@pytest.mark.parametrize("height,width,scores,tiles", CASES)
def test_sub_image_budget_goes_to_the_tiles_that_cover_the_attended_region(height, width, scores, tiles):
    assert budget_goes_to(tile_content_scores, height, width, scores, tiles)


@pytest.mark.parametrize("case", [0, 2], ids=["square-left-half", "1x2-left-half"])
def test_the_reference_band_mapping_fails_the_spatial_test(case):
    height, width, scores, tiles = CASES[case]
    assert not budget_goes_to(band_mapping_scores, height, width, scores, tiles)


def test_left_half_content_scores_are_144_0_144_0():
    g = geometry(672, 672)
    torch.testing.assert_close(tile_content_scores(left_half(), g), torch.tensor([144.0, 0.0, 144.0, 0.0]))


def test_padding_contributes_nothing_and_padded_tiles_score_only_their_image_part():
    g = geometry(600, 800)  # 2x2 canvas, image 504 px tall inside 672: 84 px padding top and bottom
    scores = tile_content_scores(torch.ones(576), g)
    torch.testing.assert_close(scores.sum(), torch.tensor(576.0))
    torch.testing.assert_close(scores, torch.full((4,), 144.0))


# ---- budget and allocation


def test_token_count():
    assert token_count(1000, fraction=0.2) == 200
    assert token_count(1000, fraction=0.0005) == 1
    assert token_count(1000, tokens=50) == 50
    assert token_count(1000, tokens=5000) == 1000
    assert token_count(5, fraction=0.5) == 3  # halves round up, deterministically
    with pytest.raises(ValueError):
        token_count(10)


def test_allocation_caps_are_redistributed_and_the_total_is_exact():
    # The reference code's r=0.6, alpha=0.75 case on a 2x2 image used 1152 of 1728 tokens.
    g = geometry(672, 672)
    k = token_count(g.stock_tokens, fraction=0.6)
    budgets = allocate(k, 0.75, torch.tensor([10.0, 1.0, 1.0, 1.0]), g.candidates.sum(1))
    assert int(budgets.sum()) == k == 1728
    assert budgets.tolist()[0] == 576


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_alpha_extremes(alpha):
    g = geometry(672, 672)
    content = tile_content_scores(left_half(), g)
    budgets = allocate(461, alpha, content, g.candidates.sum(1))
    assert int(budgets.sum()) == 461
    if alpha == 0.0:
        assert budgets.tolist() == [0, 231, 0, 230, 0]  # the two left tiles, ties to the lower index
    else:
        assert budgets[0] == 461


def test_all_zero_scores_share_by_candidate_count():
    shares = apportion(100, torch.zeros(3), torch.tensor([100, 50, 50]))
    assert shares.tolist() == [50, 25, 25]


@st.composite
def allocation_case(draw):
    parts = draw(st.integers(1, 6))
    caps = torch.tensor(draw(st.lists(st.integers(0, 576), min_size=parts, max_size=parts)))
    weights = torch.tensor(draw(st.lists(st.floats(0, 10, allow_nan=False), min_size=parts, max_size=parts)))
    base_cap = draw(st.integers(1, 576))
    alpha = draw(st.floats(0, 1))
    return torch.cat([torch.tensor([base_cap]), caps]), weights, alpha


@settings(max_examples=200, deadline=None)
@given(allocation_case(), st.integers(1, 4000))
def test_allocation_properties(case, budget):
    caps, weights, alpha = case
    stock = int(caps.sum())
    budget = min(budget, stock)
    budgets = allocate(budget, alpha, weights, caps)
    assert int(budgets.sum()) == budget  # exact
    assert bool((budgets >= 0).all()) and bool((budgets <= caps).all())  # no negatives, caps
    assert torch.equal(budgets, allocate(budget, alpha, weights, caps))  # deterministic
    if budget < stock:
        more = allocate(budget + 1, alpha, weights, caps)
        assert int(more.sum()) == budget + 1  # monotone total
        assert more[0] >= budgets[0]  # the base share never shrinks as the budget grows


# ---- selection


def test_top_k_prefers_lower_index_on_ties_and_skips_non_candidates():
    scores = torch.tensor([1.0, 3.0, 3.0, 3.0, 0.5])
    candidates = torch.tensor([True, True, False, True, True])
    assert top_k_indices(scores, 2, candidates).tolist() == [1, 3]
    assert top_k_indices(torch.zeros(5), 3).tolist() == [0, 1, 2]
    with pytest.raises(ValueError):
        top_k_indices(scores, 5, candidates)


@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.5, 0.99])
def test_hired_select_keeps_exactly_k_unpadded_tokens(height, width, fraction):
    g = geometry(height, width)
    torch.manual_seed(height + width)
    scores = torch.rand(g.num_partitions, g.tokens_per_tile)
    k = token_count(g.stock_tokens, fraction=fraction)
    budgets, kept = hired_select(scores, scores, g, k)
    assert int(budgets.sum()) == k == sum(len(i) for i in kept)
    for partition, indices in enumerate(kept):
        assert bool(g.candidates[partition, indices].all())
        assert torch.equal(indices, indices.sort().values)


def test_single_partition():
    g = AnyresGeometry.create((336, 336), 336, 14)
    assert g.num_partitions == 1 and g.stock_tokens == 576 and g.newline_tokens == 0
    scores = torch.arange(576.0)[None]
    budgets, kept = hired_select(scores, scores, g, 10)
    assert budgets.tolist() == [10] and kept[0].tolist() == list(range(566, 576))


# ---- CLS-free scores (pure functions, against plain per-head loops)


def _heads(tensor, heads):
    return tensor.view(tensor.shape[0], tensor.shape[1], heads, -1)


@pytest.mark.parametrize("skip", [0, 1])
def test_cls_free_scores_equal_their_definitions(skip):
    torch.manual_seed(0)
    batch, tokens, heads, dim = 2, 10, 3, 4
    query, key = torch.randn(batch, tokens, heads * dim), torch.randn(batch, tokens, heads * dim)
    q, k = _heads(query, heads), _heads(key, heads)
    received = torch.zeros(batch, tokens - skip)
    mean_query = torch.zeros(batch, tokens - skip)
    distinct = torch.zeros(batch, tokens - skip)
    norms = torch.zeros(batch, tokens - skip)
    for b in range(batch):
        for h in range(heads):
            attention = torch.softmax(q[b, :, h] @ k[b, :, h].T / math.sqrt(dim), dim=-1)
            received[b] += attention.mean(dim=0)[skip:]
            centre = q[b, skip:, h].mean(dim=0)
            mean_query[b] += torch.softmax(k[b, skip:, h] @ centre / math.sqrt(dim), dim=0)
            mean_key = k[b, skip:, h].mean(dim=0)
            distinct[b] += 1 - torch.nn.functional.cosine_similarity(k[b, skip:, h], mean_key[None], dim=-1)
            norms[b] += k[b, skip:, h].norm(dim=-1)
    torch.testing.assert_close(received_attention(query, key, heads, "sum", skip=skip), received)
    torch.testing.assert_close(mean_query_attention(query, key, heads, "sum", skip=skip), mean_query)
    torch.testing.assert_close(key_distinctness(key, heads, "sum", skip=skip), distinct)
    torch.testing.assert_close(key_norms(key, heads, "sum", skip=skip), norms)
