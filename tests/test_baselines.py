"""The other vision-side methods: hand-built inputs with known answers, then the real adapter."""

import numpy as np
import pytest
import torch

import hired
from hired.adaptive import prepare_inputs
from hired.algorithm import top_k_indices
from hired.families.llava.tiny import tiny_llava
from hired.families.llava_next import LLAVA_NEXT_PINPOINTS
from hired.families.llava_next.tiny import tiny_llava_next
from hired.geometry import AnyresGeometry
from hired.methods import VisionEvidence, get_method, vision_methods
from hired.methods.common import candidate_positions, lattice_indices
from hired.methods.divprune import max_min_diverse
from hired.methods.prumerge import iqr_outliers, merge_neighbours
from hired.methods.random import random_rows
from hired.methods.visionzip import contextual_tokens

PROMPT = "USER: <image> what is in the image ? ASSISTANT:"
MIXED_SIZES = [(672, 672), (500, 1000), (1000, 500), (336, 1008), (800, 600)]  # (width, height)
VISION_METHODS = vision_methods()
BASELINES = [name for name in VISION_METHODS if name != "hired"]


def single_tile() -> AnyresGeometry:
    return AnyresGeometry.create((336, 336), 336, 14)


def anyres(width: int, height: int) -> AnyresGeometry:
    return AnyresGeometry.create((height, width), 336, 14, LLAVA_NEXT_PINPOINTS)


def evidence(geometry, scores=None, features=None, keys=None, seed=0) -> VisionEvidence:
    generator = torch.Generator().manual_seed(seed)
    shape = (geometry.num_partitions, geometry.tokens_per_tile)
    scores = torch.rand(shape, generator=generator).softmax(-1) if scores is None else scores
    features = torch.randn(*shape, 6, generator=generator) if features is None else features
    keys = torch.randn(*shape, 4, generator=generator) if keys is None else keys
    return VisionEvidence(geometry, features, scores.clone(), scores, keys)


def config(name, **options):
    """The validated options object of method ``name`` (what its select function receives)."""
    return get_method(name).make_options(options)


# --------------------------------------------------------------------------------------------
# PruMerge


def test_iqr_outliers_of_a_crafted_vector():
    scores = torch.tensor([5.0, 1, 2, 3, 4, 30, 6, 7, 8, 13])
    # Sorted: 1..8, 13, 30. Q1 = 3.25, Q3 = 7.75, IQR = 4.5, fence = 14.5: only 30 lies above.
    assert iqr_outliers(scores).nonzero().flatten().tolist() == [5]
    # A lower factor moves the fence to 7.75 + 4.5 * 0.5 = 10: 13 joins.
    assert iqr_outliers(scores, factor=0.5).nonzero().flatten().tolist() == [5, 9]
    q1, q3 = np.quantile(scores.numpy(), [0.25, 0.75])
    assert (q1, q3) == (3.25, 7.75)


def test_merge_neighbours_is_the_attention_weighted_cluster_mean():
    features = torch.tensor([[1.0, 0], [0, 1], [2, 2], [4, 0], [0, 8], [3, 3]])
    keys = torch.tensor([[1.0, 0], [0, 1], [1, 0.1], [0.9, 0], [0.1, 1], [-1, -1]])
    scores = torch.tensor([4.0, 2, 1, 3, 2, 5])
    merged = merge_neighbours(features, keys, scores, torch.tensor([0, 1]), torch.tensor([2, 3, 4, 5]), neighbours=1)
    # Token 0's nearest dropped key is token 3's (cosine 1); token 1's is token 4's.
    expected_0 = (4 * features[0] + 3 * features[3]) / 7
    expected_1 = (2 * features[1] + 2 * features[4]) / 4
    torch.testing.assert_close(merged, torch.stack([expected_0, expected_1]))
    merged2 = merge_neighbours(features, keys, scores, torch.tensor([0]), torch.tensor([2, 3, 4, 5]), neighbours=2)
    torch.testing.assert_close(merged2[0], (4 * features[0] + 3 * features[3] + 1 * features[2]) / 8)


def crafted_prumerge_evidence():
    """One tile: three outliers (12, 11, 10) on a flat map; each has one dropped twin by key."""
    geometry = single_tile()
    scores = torch.ones(1, 576)
    outliers, twins = [40, 300, 500], [41, 301, 501]
    scores[0, outliers] = torch.tensor([12.0, 11, 10])
    keys = torch.zeros(1, 576, 4)
    keys[0, :, 3] = 1
    for axis, (outlier, twin) in enumerate(zip(outliers, twins)):
        keys[0, outlier] = 0
        keys[0, twin] = 0
        keys[0, outlier, axis] = 1
        keys[0, twin, axis] = 1
    features = torch.arange(576 * 2, dtype=torch.float32).view(1, 576, 2)
    return evidence(geometry, scores, features, keys), outliers, twins


def test_prumerge_adaptive_keeps_the_outliers_and_merges_their_twins():
    ev, outliers, twins = crafted_prumerge_evidence()
    selection = get_method("prumerge").select(ev, 1, config("prumerge", adaptive=True, neighbours=1))
    assert selection.kept[0].tolist() == outliers
    assert selection.extras["adaptive_tokens"] == 3 and selection.extras["outliers"] == [3]
    f, s = ev.features[0], ev.selection_scores[0]
    expected = torch.stack([(s[o] * f[o] + s[t] * f[t]) / (s[o] + s[t]) for o, t in zip(outliers, twins)])
    torch.testing.assert_close(selection.features, expected)


def test_prumerge_fixed_budget_keeps_the_top_scores():
    ev, outliers, twins = crafted_prumerge_evidence()
    selection = get_method("prumerge").select(ev, 2, config("prumerge", neighbours=1))
    assert selection.kept[0].tolist() == outliers[:2] and selection.num_tokens == 2
    assert not selection.extras["adaptive"]


def test_prumerge_fixed_budget_follows_the_outlier_count_of_each_partition():
    geometry = anyres(672, 672)  # base + 2x2 tiles, no padding
    scores = torch.ones(5, 576)
    scores[0, :4] = 50  # 4 outliers in the base view
    scores[2, 100:112] = 50  # 12 in tile 2
    selection = get_method("prumerge").select(evidence(geometry, scores), 8, config("prumerge"))
    assert selection.partition_tokens.tolist() == [2, 0, 6, 0, 0]
    assert selection.extras["outliers"] == [4, 0, 12, 0, 0]


def test_prumerge_plus_fills_the_budget_with_a_lattice_after_its_outliers():
    ev, outliers, _ = crafted_prumerge_evidence()
    selection = get_method("prumerge+").select(ev, 39, config("prumerge+"))
    kept = set(selection.kept[0].tolist())
    assert len(kept) == 39 and set(outliers) <= kept
    assert set(lattice_indices(24, 24, 36).tolist()) <= kept
    adaptive = get_method("prumerge+").select(ev, 1, config("prumerge+", adaptive=True))
    assert set(adaptive.kept[0].tolist()) == set(outliers) | set(lattice_indices(24, 24, 144).tolist())


# --------------------------------------------------------------------------------------------
# VisionZip


def test_contextual_tokens_merge_each_group_into_its_mean():
    features = torch.tensor([[0.0, 0], [2, 2], [4, 4], [10, 0], [20, 0], [30, 0]])
    keys = torch.tensor([[1.0, 0], [1, 0.1], [1, -0.1], [0, 1], [0.1, 1], [-0.1, 1]])
    targets, merged = contextual_tokens(features, keys, torch.tensor([0, 1, 2, 3, 4, 5]), count=2)
    assert targets.tolist() == [0, 3]  # evenly spaced among the remaining tokens
    torch.testing.assert_close(merged, torch.tensor([[2.0, 2], [20, 0]]))


def test_visionzip_dominant_and_contextual_counts():
    geometry = single_tile()
    ev = evidence(geometry)
    selection = get_method("visionzip").select(ev, 64, config("visionzip"))
    assert selection.extras["dominant"] == [54] and selection.extras["contextual"] == [10]
    dominant = top_k_indices(ev.selection_scores[0], 54)
    assert set(dominant.tolist()) <= set(selection.kept[0].tolist())
    assert selection.features.shape == (64, 6)
    # Dominant tokens pass unchanged; the others are group means.
    order = geometry.stock_order(selection.kept)
    is_dominant = torch.isin(order[:, 1], dominant)
    torch.testing.assert_close(selection.features[is_dominant], ev.features[0, order[is_dominant, 1]])
    custom = get_method("visionzip").select(ev, 64, config("visionzip", dominant=3, contextual=1))
    assert custom.extras["dominant"] == [48] and custom.extras["contextual"] == [16]


def test_visionzip_shares_by_candidates_on_anyres():
    geometry = anyres(800, 600)  # 2x2 grid with padded rows
    selection = get_method("visionzip").select(evidence(geometry), 300, config("visionzip"))
    caps = geometry.candidates.sum(dim=1)
    assert selection.num_tokens == 300
    assert sum(selection.extras["dominant"]) + sum(selection.extras["contextual"]) == 300
    shares = selection.partition_tokens.float() / 300
    torch.testing.assert_close(shares, caps.float() / caps.sum(), atol=0.01, rtol=0)


# --------------------------------------------------------------------------------------------
# DivPrune, random, spatial


def cosine_distance(a, b):
    return 1 - torch.nn.functional.cosine_similarity(a[:, None], b[None], dim=-1)


def test_divprune_greedy_max_min_property():
    features = torch.randn(60, 5, generator=torch.Generator().manual_seed(3))
    picked = max_min_diverse(features, 12)
    distance = cosine_distance(features, features)
    assert len(set(picked.tolist())) == 12
    nearest_other = distance.masked_fill(torch.eye(60, dtype=torch.bool), float("inf")).amin(dim=1)
    assert nearest_other[picked[0]] == nearest_other.max()
    for step in range(1, 12):
        chosen = picked[:step]
        to_chosen = distance[:, chosen].amin(dim=1)
        rest = torch.ones(60, dtype=torch.bool)
        rest[chosen] = False
        assert to_chosen[picked[step]] >= to_chosen[rest].max() - 1e-6


def test_divprune_keeps_duplicates_out():
    base = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    features = torch.cat([base, base * 2, base * 3])  # three copies (same direction) of 5 tokens
    picked = max_min_diverse(features, 5)
    assert sorted(int(i) % 5 for i in picked) == [0, 1, 2, 3, 4]


def test_random_is_reproducible_by_seed():
    ev = evidence(anyres(800, 600))
    method = get_method("random")
    first = method.select(ev, 200, config("random", seed=7)).kept
    again = method.select(ev, 200, config("random", seed=7)).kept
    other = method.select(ev, 200, config("random", seed=8)).kept
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    assert torch.equal(random_rows(100, 10, 7), random_rows(100, 10, 7))


@pytest.mark.parametrize("count,block", [(36, 4), (144, 2), (64, 3), (576, 1)])
def test_lattice_is_a_regular_subgrid_when_the_count_divides_the_grid(count, block):
    points = lattice_indices(24, 24, count)
    grid = torch.zeros(24 * 24)
    grid[points] = 1
    per_block = grid.view(24 // block, block, 24 // block, block).sum(dim=(1, 3))
    assert torch.equal(per_block, torch.ones_like(per_block))


@pytest.mark.parametrize("height,width,count", [(24, 24, 100), (24, 24, 7), (12, 24, 50), (24, 17, 33), (5, 24, 119)])
def test_lattice_spreads_any_count_evenly(height, width, count):
    points = lattice_indices(height, width, count)
    assert len(points) == count == len(set(points.tolist()))
    rows = points // width
    used_rows, per_row = rows.unique(return_counts=True)
    assert int(per_row.max() - per_row.min()) <= 1
    gaps = used_rows.diff()
    if len(gaps):
        assert int(gaps.max() - gaps.min()) <= 1


def test_spatial_covers_the_base_view_and_the_mosaic_evenly():
    geometry = anyres(672, 672)  # 2x2, 48x48 mosaic, no padding
    selection = get_method("spatial").select(evidence(geometry), 5 * 36, config("spatial"))
    assert selection.partition_tokens.tolist() == [36, 36, 36, 36, 36]
    base = torch.zeros(576)
    base[selection.kept[0]] = 1
    assert torch.equal(base.view(6, 4, 6, 4).sum(dim=(1, 3)), torch.ones(6, 6))
    quadrant_counts = torch.tensor([len(k) for k in selection.kept[1:]])
    assert torch.equal(quadrant_counts, torch.full((4,), 36))


# --------------------------------------------------------------------------------------------
# Every method on hand-built evidence: exact counts, candidates only


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("size", [(800, 600), (1000, 300), (333, 517)])
def test_every_method_keeps_exactly_the_budget_among_candidates(name, size):
    geometry = anyres(*size)
    ev = evidence(geometry)
    for budget in (1, 37, geometry.stock_tokens // 5, geometry.stock_tokens - 1):
        selection = get_method(name).select(ev, budget, config(name))
        assert selection.num_tokens == budget == int(selection.partition_tokens.sum())
        for partition, kept in enumerate(selection.kept):
            assert bool(geometry.candidates[partition, kept].all())
            assert torch.equal(kept, kept.unique())
        if selection.features is not None:
            assert selection.features.shape == (budget, ev.features.shape[-1])


def test_candidate_positions_are_every_stock_token():
    geometry = anyres(800, 600)
    assert len(candidate_positions(geometry)) == geometry.stock_tokens


# --------------------------------------------------------------------------------------------
# Bad input


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(ValueError, match="available methods: .*divprune.*visionzip"):
        hired.HiredConfig(method="tome")


@pytest.mark.parametrize(
    "name,options,message",
    [
        ("random", {"seed": -1}, "'seed' must be an integer >= 0"),
        ("random", {"seed": "a"}, "'seed' must be an integer"),
        ("prumerge", {"adaptive": "yes"}, "'adaptive' must be true or false"),
        ("prumerge", {"neighbours": 1.5}, "'neighbours' must be an integer"),
        ("prumerge", {"iqr_factor": -1}, "'iqr_factor' must be a number >= 0"),
        ("prumerge+", {"uniform_ratio": 2}, r"'uniform_ratio' must be a number in \[0.0, 1.0\]"),
        ("visionzip", {"dominant": 0}, "'dominant' must be an integer >= 1"),
        ("visionzip", {"seed": 1}, "has no options.*its options: contextual, dominant"),
        ("fastervlm", {"k": 1}, "its options: none"),
    ],
)
def test_bad_options_are_named(name, options, message):
    with pytest.raises(ValueError, match=message):
        config(name, **options)


@pytest.mark.parametrize("name", BASELINES)
def test_a_budget_above_the_stock_count_is_refused(name):
    geometry = anyres(800, 600)
    with pytest.raises(ValueError, match=f"cannot keep {geometry.stock_tokens + 1} tokens"):
        get_method(name).select(evidence(geometry), geometry.stock_tokens + 1, config(name))


def test_adaptive_mode_needs_the_helper_not_the_processor():
    model, processor = tiny_llava()
    with pytest.raises(ValueError, match="prepare_inputs"):
        hired.apply(model, processor, method="prumerge", method_options={"adaptive": True})


# --------------------------------------------------------------------------------------------
# Through the real adapter


@pytest.fixture(scope="module")
def mixed_images():
    from PIL import Image

    return [
        Image.fromarray(np.random.RandomState(i).randint(0, 256, size=(h, w, 3), dtype=np.uint8))
        for i, (w, h) in enumerate(MIXED_SIZES)
    ]


@pytest.mark.parametrize("factory", [tiny_llava_next, tiny_llava], ids=["llava-next", "llava-1.5"])
def test_adaptive_prumerge_end_to_end(factory, mixed_images):
    model, processor = factory()
    hired.apply(model, method="prumerge", method_options={"adaptive": True})
    inputs = prepare_inputs(model, processor, mixed_images[:3], [PROMPT] * 3)
    records = hired.selections(model)
    counts = [r.visual_tokens for r in records]
    for record in records:
        geometry = AnyresGeometry.create(record.image_size, 336, 14, LLAVA_NEXT_PINPOINTS if record.grid[0] else None)
        outliers = sum(
            int(iqr_outliers(record.selection_scores[p, geometry.candidates[p]]).sum())
            for p in range(geometry.num_partitions)
        )
        assert record.visual_tokens == record.extras["adaptive_tokens"] == max(outliers, 1)
    prompt_tokens = len(processor.tokenizer(PROMPT)["input_ids"]) - 1  # without its <image>
    assert inputs["attention_mask"].sum(dim=1).tolist() == [prompt_tokens + n for n in counts]
    assert inputs["inputs_embeds"].shape[1] == prompt_tokens + max(counts)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape == (3, 3)
