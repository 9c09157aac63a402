"""The ``hired`` allocator and ``hired@reference``: hand-computed budgets on 4x4-token grids.

Thumbnail scores are dyadic (0.25, 0.125, 0.0625) so every region sum and quota below is
exact in floating point and the expectations can be written by hand.
"""

from __future__ import annotations

import pytest
import torch
from tokenprune.strategies.hired import HiredAllocator, band_regions

import tokenprune as tp
from tokenprune import ConfigError, Layout, SignalError, Signals

from .conftest import FirstValid, assert_batch_equals_per_image, quadrants

SIDE, N = 4, 16  # tokens per side, tokens per partition


def halves() -> torch.Tensor:
    """1x2 tiles (left, right) over a 4x4 thumbnail: columns 0-1 left, columns 2-3 right."""
    overlap = torch.zeros(2, N)
    for token in range(N):
        overlap[token % SIDE // 2, token] = 1.0
    return overlap


def grid_layout(tiles: tuple[int, int], overlap: torch.Tensor, valid: torch.Tensor | None = None) -> Layout:
    p = 1 + tiles[0] * tiles[1]
    if valid is None:
        valid = torch.ones(p, N, dtype=torch.bool)
    return Layout(SIDE, tiles, True, valid, overlap)


def thumbnail_signals(p: int, thumbnail_heads: torch.Tensor, layer: int = 0) -> Signals:
    """Layer-``layer`` CLS attention: the thumbnail's given ``[H, N]``, zeros for the tiles."""
    attention = torch.zeros(p, thumbnail_heads.shape[0], N)
    attention[0] = thumbnail_heads
    return Signals(cls_attention={layer: attention}, num_layers=24)


def quadrant_scores() -> torch.Tensor:
    """Two heads; summed: token 0 .25, tokens 3 and 5 .125, tokens 10 and 15 .0625.

    Attention mass per quadrant: TL (0,1,4,5) .375, TR (2,3,6,7) .125, BL 0, BR (10,11,14,15) .125,
    i.e. 3 : 1 : 0 : 1.
    """
    heads = torch.zeros(2, N)
    heads[0, 0], heads[0, 5], heads[0, 3], heads[0, 15] = 0.25, 0.125, 0.125, 0.0625
    heads[1, 10] = 0.0625
    return heads


@pytest.fixture
def quad() -> tuple[Layout, Signals]:
    return grid_layout((2, 2), quadrants()), thumbnail_signals(5, quadrant_scores())


# --------------------------------------------------------------------------- the paper's formula


def test_default_splits_alpha_then_attention_mass_per_2d_region(quad):
    layout, signals = quad
    # total 20: thumbnail 10; tiles 10 in ratio 3:1:0:1 -> 6, 2, 0, 2.
    assert HiredAllocator().allocate(layout, signals, 20).tolist() == [10, 6, 2, 0, 2]
    # total 16: thumbnail 8; tiles 8 -> quotas 4.8, 1.6, 0, 1.6.
    floor = HiredAllocator(rounding="floor").allocate(layout, signals, 16)
    assert floor.tolist() == [8, 4, 1, 0, 1]
    exact = HiredAllocator().allocate(layout, signals, 16)
    assert exact.sum() == 16 and exact[0] == 8 and exact[3] == 0
    assert all(lo <= b <= lo + 1 for b, lo in zip(exact[1:].tolist(), [4, 1, 0, 1]))


def test_count_aggregation_counts_top_k_tokens_with_ties_to_the_lowest_index(quad):
    layout, signals = quad
    # k = int(16 * (1 - 0.5)) = 8: tokens 0, 3, 5, 10, 15, then the zeros 1, 2, 4 (lowest index).
    # Counts: TL {0,1,4,5} = 4, TR {2,3} = 2, BL 0, BR {10,15} = 2 -> 4:2:0:2; total 20 -> tiles 10.
    allocator = HiredAllocator(aggregation="count", rounding="floor")
    assert allocator.allocate(layout, signals, 20).tolist() == [10, 5, 2, 0, 2]
    # topk_fraction 0.25: k = 4 -> tokens 0, 3, 5, 10 -> 2:1:0:1; total 16 -> tiles 8 -> 4, 2, 0, 2.
    allocator = HiredAllocator(aggregation="count", topk_fraction=0.25)
    assert allocator.allocate(layout, signals, 16).tolist() == [8, 4, 2, 0, 2]


def test_fractional_overlap_weighs_a_straddling_patch_by_area():
    # 1x2 grid whose border crosses thumbnail column 1 at a quarter: column 0 is left,
    # column 1 is 1/4 left and 3/4 right, columns 2-3 are right.
    overlap = torch.zeros(2, N)
    for token in range(N):
        col = token % SIDE
        overlap[0, token] = {0: 1.0, 1: 0.25}.get(col, 0.0)
        overlap[1, token] = 1.0 - overlap[0, token]
    heads = torch.zeros(1, N)
    heads[0, 1] = 0.5  # column 1: 0.125 left, 0.375 right
    heads[0, 4] = 0.125  # column 0: left
    layout, signals = grid_layout((1, 2), overlap), thumbnail_signals(3, heads)
    # left 0.25, right 0.375 -> 2:3; total 20 -> thumbnail 10, tiles 4 and 6.
    assert HiredAllocator().allocate(layout, signals, 20).tolist() == [10, 4, 6]


def test_bands_differ_from_2d_regions_on_a_1x2_grid():
    # All attention in the left half (columns 0-1); rows 0-1 and 2-3 alike.
    heads = torch.zeros(1, N)
    left = [t for t in range(N) if t % SIDE < 2]
    heads[0, left] = torch.tensor([0.125, 0.0625] * 4)
    layout, signals = grid_layout((1, 2), halves()), thumbnail_signals(3, heads)
    # 2-D regions: the left tile shows all of it -> tiles 8 and 0 of total 16.
    assert HiredAllocator().allocate(layout, signals, 16).tolist() == [8, 8, 0]
    # The released code's bands: tile 0 = thumbnail rows 0-1, tile 1 = rows 2-3, each holding
    # 4 of the 8 top tokens -> an even split, though the right tile shows nothing.
    assert tp.build_allocator("hired@reference").allocate(layout, signals, 16).tolist() == [8, 4, 4]


def test_band_regions_are_contiguous_chunks_of_the_flat_thumbnail():
    bands = band_regions(2, 16)
    assert bands[0].nonzero().flatten().tolist() == list(range(8))
    assert bands[1].nonzero().flatten().tolist() == list(range(8, 16))
    uneven = band_regions(3, 16)  # chunks [0, 5), [5, 10), [10, 16)
    assert uneven.sum(1).tolist() == [5.0, 5.0, 6.0] and bool((uneven.sum(0) == 1).all())


def test_reference_preset_reproduces_the_released_arithmetic(quad):
    layout, signals = quad
    reference = tp.build_allocator("hired@reference")
    # b0 = min(int(20 * 0.5), 16) = 10; tiles share min(10, 64) = 10.
    # Top-8 tokens {0,1,2,3,4,5,10,15} in bands (rows): 4, 2, 1, 1 -> floor(5, 2.5, 1.25, 1.25).
    assert reference.allocate(layout, signals, 20).tolist() == [10, 5, 2, 1, 1]
    # Total 45: b0 = min(22, 16) = 16; tiles share 29 -> floor(14.5, 7.25, 3.625, 3.625).
    assert reference.allocate(layout, signals, 45).tolist() == [16, 14, 7, 3, 3]
    # Total 70: b0 = 16; tiles share min(54, 64) = 54 -> 27 clamped at 16 (the excess is
    # discarded, not handed on), 13, 6, 6.
    assert reference.allocate(layout, signals, 70).tolist() == [16, 16, 13, 6, 6]


def test_floor_presets_never_exceed_the_budget(quad):
    layout, signals = quad
    for name in ("hired@reference",):
        allocator = tp.build_allocator(name)
        assert not allocator.exact
        for total in range(90):
            assert int(allocator.allocate(layout, signals, total).sum()) <= min(total, 80)


# --------------------------------------------------------------------------- alpha at its ends


def test_alpha_zero_gives_the_thumbnail_only_what_the_tiles_cannot_hold(quad):
    layout, signals = quad
    allocator = HiredAllocator(alpha=0.0)
    assert allocator.allocate(layout, signals, 20).tolist() == [0, 12, 4, 0, 4]
    # 70 > 64 tile tokens: every tile is full (BL too, weight 0 or not), the thumbnail gets 6.
    assert allocator.allocate(layout, signals, 70).tolist() == [6, 16, 16, 16, 16]


def test_alpha_one_fills_the_thumbnail_then_the_tiles(quad):
    layout, signals = quad
    allocator = HiredAllocator(alpha=1.0)
    assert allocator.allocate(layout, signals, 10).tolist() == [10, 0, 0, 0, 0]
    assert allocator.allocate(layout, signals, 21).tolist() == [16, 3, 1, 0, 1]
    # The released code crashes here; with top-0 counts the tiles share equally.
    reference = tp.build_allocator("hired@reference", alpha=1.0)
    assert reference.allocate(layout, signals, 20).tolist() == [16, 1, 1, 1, 1]


def test_alpha_is_read_as_its_decimal():
    # 0.7 as a binary float is below 7/10, which would floor 0.7 * 10 to 6.
    layout = grid_layout((1, 2), halves())
    signals = thumbnail_signals(3, torch.full((1, N), 1 / 16))
    assert HiredAllocator(alpha=0.7, rounding="floor").allocate(layout, signals, 10)[0] == 7
    assert tp.build_allocator("hired@reference", alpha=0.7).allocate(layout, signals, 10)[0] == 7


# --------------------------------------------------------------------------- edge cases


def test_budget_zero_and_budget_above_all_valid_tokens(quad):
    layout, signals = quad
    for allocator in (HiredAllocator(), tp.build_allocator("hired@reference")):
        assert allocator.allocate(layout, signals, 0).tolist() == [0] * 5
    assert HiredAllocator().allocate(layout, signals, 80).tolist() == [16] * 5
    assert HiredAllocator().allocate(layout, signals, 1000).tolist() == [16] * 5


def test_a_tile_without_valid_tokens_gets_nothing_and_its_share_moves_on():
    valid = torch.ones(5, N, dtype=torch.bool)
    valid[4] = False  # tile BR is all padding
    layout = grid_layout((2, 2), quadrants(), valid)
    signals = thumbnail_signals(5, quadrant_scores())
    # Tiles 8 of total 16: BR's weight cannot be used -> TL:TR = 3:1 -> 6, 2.
    assert HiredAllocator().allocate(layout, signals, 16).tolist() == [8, 6, 2, 0, 0]
    assert HiredAllocator().allocate(layout, signals, 200).tolist() == [16, 16, 16, 16, 0]


def test_equal_weights_tie_to_the_lower_index():
    layout = grid_layout((2, 2), quadrants())
    signals = thumbnail_signals(5, torch.full((1, N), 1 / 16))  # flat: every quadrant 1/4
    # Total 14: thumbnail 7, tiles 7 -> quotas 1.75 each; shares differ by at most one,
    # the extra tokens going to the lower indices.
    budgets = HiredAllocator().allocate(layout, signals, 14)
    assert budgets.tolist() == [7, 2, 2, 2, 1]


def test_single_partition_gets_the_whole_budget():
    layout = Layout.single(SIDE)
    signals = Signals(cls_attention={0: torch.rand(1, 2, N)})
    assert HiredAllocator().allocate(layout, signals, 5).tolist() == [5]
    assert HiredAllocator().allocate(layout, signals, 99).tolist() == [16]
    assert tp.build_allocator("hired@reference").allocate(layout, signals, 5).tolist() == [5]


def test_tiles_without_a_thumbnail_share_equally():
    layout = Layout(SIDE, (1, 2), False, torch.ones(2, N, dtype=torch.bool))
    signals = Signals(cls_attention={0: torch.rand(2, 2, N)})
    assert HiredAllocator().allocate(layout, signals, 9).tolist() == [5, 4]


def test_nan_attention_is_a_signal_error():
    attention = torch.zeros(5, 2, N)
    attention[0, 0, 3] = float("nan")
    with pytest.raises(SignalError, match="NaN"):
        Signals(cls_attention={0: attention})


def test_missing_attention_layer_names_the_allocator(quad):
    layout, _ = quad
    signals = thumbnail_signals(5, quadrant_scores(), layer=5)
    with pytest.raises(SignalError, match="hired"):
        HiredAllocator().allocate(layout, signals, 10)


def test_half_precision_signals_give_the_same_budgets(quad):
    layout, signals = quad
    half = Signals(cls_attention={0: signals.attention(0).half()})
    allocator = HiredAllocator()
    for total in (16, 20, 45):
        assert torch.equal(allocator.allocate(layout, half, total), allocator.allocate(layout, signals, total))


def test_negative_init_layer_resolves_with_num_layers(quad):
    layout, signals = quad  # num_layers 24: layer -24 is block 0
    assert HiredAllocator(init_layer=-24).allocate(layout, signals, 20).tolist() == [10, 6, 2, 0, 2]


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("options", [{}, {"aggregation": "count"}, {"alpha": 0.0}, {"alpha": 1.0}, {"region": "bands"}])
def test_house_monotone_and_exact_over_every_total(options):
    torch.manual_seed(0)
    valid = torch.ones(5, N, dtype=torch.bool)
    valid[2, :6] = False
    layout = grid_layout((2, 2), quadrants(), valid)
    signals = thumbnail_signals(5, torch.rand(2, N).softmax(-1))
    allocator = HiredAllocator(**options)
    capacity = layout.capacity
    previous = torch.zeros(5, dtype=torch.int64)
    for total in range(int(capacity.sum()) + 2):
        budgets = allocator.allocate(layout, signals, total)
        assert int(budgets.sum()) == min(total, int(capacity.sum()))
        assert bool((budgets <= capacity).all()) and bool((budgets >= previous).all()), (total, budgets)
        previous = budgets


def test_reference_is_monotone_too(quad):
    layout, signals = quad
    reference = tp.build_allocator("hired@reference")
    previous = torch.zeros(5, dtype=torch.int64)
    for total in range(90):
        budgets = reference.allocate(layout, signals, total)
        assert bool((budgets >= previous).all()), (total, budgets)
        previous = budgets


def test_batch_equals_per_image(quad):
    layout, signals = quad
    other = grid_layout((1, 2), halves())
    other_signals = thumbnail_signals(3, torch.full((2, N), 1 / 32))
    for allocator in (HiredAllocator(), tp.build_allocator("hired@reference")):
        assert_batch_equals_per_image(allocator, [layout, other], [signals, other_signals], [20, 7])


# --------------------------------------------------------------------------- options and wiring


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
        ({"topk_fraction": 0.5}, "aggregation='count'"),
        ({"aggregation": "count", "topk_fraction": 2.0}, "topk_fraction"),
        ({"overflow": "discard"}, "rounding='floor'"),
        ({"region": "diagonal"}, "region"),
        ({"alpha": "0.5"}, "alpha"),
    ],
)
def test_bad_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        tp.build_allocator("hired", **options)


def test_needs_and_exactness():
    assert HiredAllocator(init_layer=3).needs == tp.Needs(cls_attention={3})
    assert HiredAllocator().exact and not HiredAllocator(rounding="floor").exact


def test_builds_by_name_and_runs_in_a_pipeline(quad):
    layout, signals = quad
    assert isinstance(tp.build_allocator("hired"), HiredAllocator)
    assert tp.build_allocator("hired@reference").region == "bands"
    pipe = tp.Pipeline(allocator="hired", selector=FirstValid(), budget=0.25)  # 25% of 80 = 20
    result = pipe.apply(layout, signals)
    assert result.stats.allocated == (10, 6, 2, 0, 2) and result.stats.kept == (10, 6, 2, 0, 2)
    assert result.selection.indices[1].tolist() == [0, 1, 2, 3, 4, 5]
    reference = tp.Pipeline(allocator="hired@reference", selector=FirstValid(), budget=20).apply(layout, signals)
    assert reference.stats.allocated == (10, 5, 2, 1, 1)


def test_batch_of_mixed_token_counts_and_structures_equals_per_image(quad):
    # One pass per token count: a 2x2-token 1x2 grid rides along with the 4x4 ones, next to a
    # single partition and tiles without a thumbnail (equal shares, no weights read).
    layout, signals = quad
    small_overlap = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]])
    small = Layout(2, (1, 2), True, torch.ones(3, 4, dtype=torch.bool), small_overlap)
    small_signals = Signals(cls_attention={0: torch.tensor([[[0.375, 0.125, 0.25, 0.25]]]).expand(3, 1, 4)}, num_layers=24)
    single, no_thumbnail = Layout.single(SIDE), Layout(SIDE, (1, 2), False, torch.ones(2, N, dtype=torch.bool))
    layouts = [layout, small, single, no_thumbnail, layout]
    signals_ = [signals, small_signals, thumbnail_signals(1, quadrant_scores()), thumbnail_signals(2, quadrant_scores()), signals]
    for allocator in (HiredAllocator(), HiredAllocator(aggregation="count"), tp.build_allocator("hired@reference")):
        assert_batch_equals_per_image(allocator, layouts, signals_, [20, 9, 7, 11, 13])
    # 1x2 of 2x2 tokens: left column .625, right .375 -> tiles 3.125 : 1.875 of the 5 after the thumbnail's 4
    assert HiredAllocator().allocate(small, small_signals, 9).tolist() == [4, 3, 2]
