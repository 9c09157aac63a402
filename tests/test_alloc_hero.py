"""The ``hero`` allocator and ``hero@reference`` on a hand-made 2x2 grid of 4x4-token tiles.

Tile CLS embeddings are unit vectors at cosines 1, 0, 0, -1 from the thumbnail's; the
last tile holds only 4 valid tokens. With tau_visual = 0.5, tau_text = 0.1, lambda = 0.5:

    sim  = softmax([1, 0, 0, -1] / 0.5)            = [.775803, .104994, .104994, .014209]
    clip = softmax([.2, .1, .15, .35] / 0.1)       = [.154892, .056982, .093947, .694179]
    fused = (sim + clip) / 2                       = [.465348, .080988, .099470, .354194]
"""

from __future__ import annotations

import pytest
import torch
from tokenprune.strategies.hero_allocator import HeroAllocator

import tokenprune as tp
from tokenprune import (
    ConfigError,
    Layout,
    Needs,
    SignalError,
    Signals,
)

from .conftest import FirstValid, assert_batch_equals_per_image, quadrants

SIDE, N = 4, 16
SIM = [0.775803, 0.104994, 0.104994, 0.014209]
CLIP = [0.154892, 0.056982, 0.093947, 0.694179]
FUSED = [0.465348, 0.080988, 0.099470, 0.354194]
HAND = {"tau_visual": 0.5, "tau_text": 0.1, "saliency_weight": 0.5}


def hero_layout() -> Layout:
    valid = torch.ones(5, N, dtype=torch.bool)
    valid[4, 4:] = False  # tile BR: 4 valid tokens
    return Layout(SIDE, (2, 2), True, valid, quadrants())


def hero_signals(*, relevance: bool = True, dtype: torch.dtype = torch.float32) -> Signals:
    embedding = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, -3.0], [-1.0, 0.0]], dtype=dtype)
    return Signals(
        cls_embedding={23: embedding},  # the last block of 24; the allocator asks for -1
        relevance=torch.tensor([0.0, 0.2, 0.1, 0.15, 0.35]) if relevance else None,
        num_layers=24,
    )


def test_tile_weights_follow_the_paper_formulas():
    layout, signals = hero_layout(), hero_signals()
    fused = HeroAllocator(**HAND).tile_weights(layout, signals)
    assert torch.allclose(fused, torch.tensor(FUSED, dtype=torch.float64), atol=1e-5)
    sim = HeroAllocator(**HAND | {"saliency_weight": 1.0}).tile_weights(layout, signals)
    assert torch.allclose(sim, torch.tensor(SIM, dtype=torch.float64), atol=1e-5)
    clip = HeroAllocator(**HAND | {"saliency_weight": 0.0}).tile_weights(layout, signals)
    assert torch.allclose(clip, torch.tensor(CLIP, dtype=torch.float64), atol=1e-5)
    # density only: valid tokens 16, 16, 16, 4 of 52.
    density = HeroAllocator(density_weight=1.0).tile_weights(layout, signals)
    assert torch.allclose(density, torch.tensor([16, 16, 16, 4], dtype=torch.float64) / 52)


def test_thumbnail_keeps_ratio_r_and_tiles_split_the_rest_exactly():
    layout, signals = hero_layout(), hero_signals()
    # total 30 = 20 % of 5 * 16 -> thumbnail R * N = 6, tiles 24. BR's quota 24 * .354 = 8.5
    # exceeds its 4 valid tokens; the other 20 go 14.41 : 2.51 : 3.08.
    budgets = HeroAllocator(**HAND).allocate(layout, signals, 30).tolist()
    assert budgets[0] == 6 and budgets[4] == 4 and sum(budgets) == 30
    assert all(lo <= b <= lo + 1 for b, lo in zip(budgets[1:4], [14, 2, 3]))
    floor = HeroAllocator(**HAND, rounding="floor").allocate(layout, signals, 30)
    assert floor.tolist() == [6, 14, 2, 3, 4]


def test_reference_preset_reproduces_the_released_arithmetic():
    layout, signals = hero_layout(), hero_signals()
    reference = tp.build_allocator("hero@reference", **HAND)
    # fused_ref = 0.2 * density + 0.8 * fused = [.433817, .126329, .141115, .298740]
    # total 30: thumbnail int(16 * 0.375) = 6, N_local = int(4 * 16 * 0.375) = 24,
    # b = min(floor(10.41, 3.03, 3.39, 7.17), valid) = 10, 3, 3, 4 (3 tokens of BR's dropped).
    assert reference.allocate(layout, signals, 30).tolist() == [6, 10, 3, 3, 4]
    # total 40: thumbnail 8, N_local 32: floor(13.88, 4.04, 4.52, 9.56) -> 13, 4, 4, 4.
    assert reference.allocate(layout, signals, 40).tolist() == [8, 13, 4, 4, 4]
    assert not reference.exact
    for total in range(90):
        assert int(reference.allocate(layout, signals, total).sum()) <= min(total, 68)


def test_saliency_only_needs_no_relevance_and_ties_go_to_the_lower_index():
    layout, signals = hero_layout(), hero_signals(relevance=False)
    allocator = HeroAllocator(**HAND | {"saliency_weight": 1.0})
    assert allocator.needs == Needs(cls_embedding={-1})
    # tiles 24 by sim: 18.62 exceeds tile 1's 16 tokens; the other 8 go 3.75 : 3.75 : 0.51
    # (tiles 2 and 3 tie).
    budgets = allocator.allocate(layout, signals, 30).tolist()
    assert budgets[:2] == [6, 16] and sum(budgets) == 30
    assert all(lo <= b <= lo + 1 for b, lo in zip(budgets[2:], [3, 3, 0]))
    assert budgets[2] - budgets[3] in (0, 1)
    floor = HeroAllocator(**HAND | {"saliency_weight": 1.0, "rounding": "floor"})
    assert floor.allocate(layout, signals, 30).tolist() == [6, 16, 3, 3, 0]


def test_missing_relevance_names_hero_and_the_scorer_option():
    layout, signals = hero_layout(), hero_signals(relevance=False)
    with pytest.raises(SignalError, match="relevance_scorer") as error:
        HeroAllocator().allocate(layout, signals, 30)
    assert "hero" in str(error.value)
    with pytest.raises(SignalError, match="hero"):
        tp.Pipeline(allocator="hero", selector=FirstValid(), budget=30).apply(layout, signals)


def test_density_only_needs_nothing():
    allocator = HeroAllocator(density_weight=1.0, rounding="floor")
    assert allocator.needs == Needs()
    # tiles 24 by 16:16:16:4 -> 7.38, 7.38, 7.38, 1.85.
    assert allocator.allocate(hero_layout(), Signals(), 30).tolist() == [6, 7, 7, 7, 1]


def test_budget_zero_and_budget_above_all_valid_tokens():
    layout, signals = hero_layout(), hero_signals()
    for allocator in (HeroAllocator(), tp.build_allocator("hero@reference")):
        assert allocator.allocate(layout, signals, 0).tolist() == [0] * 5
    assert HeroAllocator().allocate(layout, signals, 68).tolist() == [16, 16, 16, 16, 4]
    assert HeroAllocator().allocate(layout, signals, 500).tolist() == [16, 16, 16, 16, 4]


def test_a_tile_without_valid_tokens_gets_nothing():
    valid = torch.ones(5, N, dtype=torch.bool)
    valid[1] = False
    layout = Layout(SIDE, (2, 2), True, valid, quadrants())
    budgets = HeroAllocator(**HAND).allocate(layout, hero_signals(), 30)
    assert budgets[1] == 0 and budgets[0] == 6 and int(budgets.sum()) == 30


def test_single_partition_gets_the_whole_budget():
    layout = Layout.single(SIDE)
    signals = Signals(cls_embedding={-1: torch.ones(1, 2)}, relevance=torch.zeros(1))
    assert HeroAllocator().allocate(layout, signals, 7).tolist() == [7]
    assert HeroAllocator().allocate(layout, signals, 70).tolist() == [16]


def test_tiles_without_a_thumbnail_use_text_relevance_only():
    layout = Layout(SIDE, (1, 2), False, torch.ones(2, N, dtype=torch.bool))
    signals = Signals(cls_embedding={-1: torch.randn(2, 2)}, relevance=torch.tensor([0.3, 0.3]))
    assert HeroAllocator().allocate(layout, signals, 9).tolist() == [5, 4]


def test_half_precision_embeddings_give_the_same_budgets():
    layout = hero_layout()
    allocator = HeroAllocator(**HAND | {"saliency_weight": 1.0})
    full = allocator.allocate(layout, hero_signals(relevance=False), 30)
    half = allocator.allocate(layout, hero_signals(relevance=False, dtype=torch.float16), 30)
    assert torch.equal(full, half)


@pytest.mark.parametrize("options", [{}, HAND, HAND | {"saliency_weight": 1.0}, {"density_weight": 0.2}])
def test_house_monotone_and_exact_over_every_total(options):
    layout, signals = hero_layout(), hero_signals()
    allocator = HeroAllocator(**options)
    capacity = layout.capacity
    previous = torch.zeros(5, dtype=torch.int64)
    for total in range(int(capacity.sum()) + 2):
        budgets = allocator.allocate(layout, signals, total)
        assert int(budgets.sum()) == min(total, int(capacity.sum()))
        assert bool((budgets <= capacity).all()) and bool((budgets >= previous).all()), (total, budgets)
        previous = budgets


def test_reference_is_monotone_too():
    layout, signals = hero_layout(), hero_signals()
    reference = tp.build_allocator("hero@reference")
    previous = torch.zeros(5, dtype=torch.int64)
    for total in range(90):
        budgets = reference.allocate(layout, signals, total)
        assert bool((budgets >= previous).all()), (total, budgets)
        previous = budgets


def test_batch_equals_per_image():
    torch.manual_seed(0)
    layout, signals = hero_layout(), hero_signals()
    other = Layout(SIDE, (1, 2), True, torch.ones(3, N, dtype=torch.bool), quadrants()[:2] + quadrants()[2:])
    other_signals = Signals(cls_embedding={-1: torch.randn(3, 2)}, relevance=torch.randn(3))
    for allocator in (HeroAllocator(), tp.build_allocator("hero@reference")):
        assert_batch_equals_per_image(allocator, [layout, other], [signals, other_signals], [30, 11])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tau_visual": 0.0}, "tau_visual"),
        ({"tau_text": -0.05}, "tau_text"),
        ({"saliency_weight": 1.5}, "saliency_weight"),
        ({"density_weight": -0.1}, "density_weight"),
        ({"overflow": "discard"}, "rounding='floor'"),
        ({"tau_text": float("nan")}, "tau_text"),
    ],
)
def test_bad_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        tp.build_allocator("hero", **options)


def test_needs_follow_the_terms_in_use():
    assert HeroAllocator().needs == Needs(cls_embedding={-1}, relevance=True)
    assert HeroAllocator(saliency_weight=0.0).needs == Needs(relevance=True)
    assert HeroAllocator(embedding_layer=-2, saliency_weight=1.0).needs == Needs(cls_embedding={-2})


def test_builds_by_name_and_runs_in_a_pipeline():
    layout, signals = hero_layout(), hero_signals()
    assert isinstance(tp.build_allocator("hero"), HeroAllocator)
    preset = tp.build_allocator("hero@reference")
    assert (preset.density_weight, preset.rounding, preset.overflow) == (0.2, "floor", "discard")
    pipe = tp.Pipeline(allocator={"name": "hero@reference", **HAND}, selector=FirstValid(), budget=0.375)
    result = pipe.apply(layout, signals)  # 37.5 % of 80 = 30 tokens
    assert result.stats.allocated == (6, 10, 3, 3, 4) and result.stats.kept == (6, 10, 3, 3, 4)
    exact = tp.Pipeline(allocator="hero", selector=FirstValid(), budget=30, allocator_options=HAND).apply(layout, signals)
    assert exact.stats.kept_total == 30 and exact.stats.allocated[0] == 6


def test_batch_of_mixed_structures_equals_per_image():
    # Softmaxes of the whole batch run padded to the widest grid: a 1x2 grid, a 2x2 grid,
    # tiles without a thumbnail (uniform saliency) and a single partition in one pass.
    torch.manual_seed(1)
    layout, signals = hero_layout(), hero_signals()
    pair = Layout(SIDE, (1, 2), True, torch.ones(3, N, dtype=torch.bool), quadrants()[:2] + quadrants()[2:])
    pair_signals = Signals(cls_embedding={-1: torch.randn(3, 2)}, relevance=torch.randn(3))
    bare = Layout(SIDE, (1, 3), False, torch.ones(3, N, dtype=torch.bool))
    bare_signals = Signals(cls_embedding={-1: torch.randn(3, 2)}, relevance=torch.randn(3))
    single = Layout.single(SIDE)
    single_signals = Signals(cls_embedding={-1: torch.randn(1, 2)}, relevance=torch.randn(1))
    layouts = [pair, layout, bare, single, layout]
    signals_ = [pair_signals, signals, bare_signals, single_signals, signals]
    for options in ({}, HAND, {"saliency_weight": 1.0}, {"saliency_weight": 0.0}, {"density_weight": 1.0}):
        assert_batch_equals_per_image(HeroAllocator(**options), layouts, signals_, [11, 30, 20, 9, 41])
    assert_batch_equals_per_image(tp.build_allocator("hero@reference"), layouts, signals_, [11, 30, 20, 9, 41])
