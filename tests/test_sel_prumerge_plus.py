"""The ``prumerge_plus`` selector and ``prumerge_plus@reference``: spatial tokens by hand."""

from __future__ import annotations

import pytest
import torch
from tokenprune.strategies.prumerge_plus import (
    attention_part,
    bisection_order,
    spatial_order,
    stride_points,
)

import tokenprune as tp

from .test_sel_prumerge import EvenSplit, half_signals, random_signals, signals


def pipeline(selector: str = "prumerge_plus", budget: int = 13, **options: object) -> tp.Pipeline:
    return tp.Pipeline(allocator=EvenSplit(), selector=selector, budget=budget, selector_options=options)


def attention_on(high: dict[int, float], n: int = 36) -> torch.Tensor:
    """[1, n] attention: ``high`` positions as given, the rest small and strictly decreasing."""
    row = torch.arange(n, 0, -1, dtype=torch.float32) / 4096  # distinct, lower index higher
    for position, value in high.items():
        row[position] = value
    return row[None]


def plus_signals(attention: torch.Tensor, *, wide: bool = False, seed: int = 0) -> tp.Signals:
    generator = torch.Generator().manual_seed(seed)
    n = attention.shape[-1]
    features = torch.randn(1, n, 4, generator=generator)
    return signals(attention, features, torch.randn(1, n, 4, generator=generator), wide=wide)


def rows_and_columns(indices: list[int], side: int) -> tuple[set[int], set[int]]:
    return {i // side for i in indices}, {i % side for i in indices}


# --------------------------------------------------------------------------- spatial order


def test_bisection_order_by_hand():
    # [0, 6) -> 3; halves [0, 3) -> 1 and [4, 6) -> 5; then [0, 1) -> 0, [2, 3) -> 2, [4, 5) -> 4,
    # taken in bit-reversed interval order (codes 00, 01, 10 -> 0, 2, 1): 0, 4, 2.
    assert bisection_order(6).tolist() == [3, 1, 5, 0, 4, 2]
    assert bisection_order(1).tolist() == [0]
    assert bisection_order(0).tolist() == []
    for length in range(1, 30):
        assert sorted(bisection_order(length).tolist()) == list(range(length))


def test_spatial_order_is_a_2d_grid_by_hand():
    # 6 x 6, all valid. Row/column levels (rank + 1) / 6: position 3 -> 1/6, 1 -> 2/6, 5 -> 3/6,
    # 0 -> 4/6, 4 -> 5/6, 2 -> 1. Order: max level, then min level, then raster.
    order = spatial_order(torch.ones(36, dtype=torch.bool), 6).tolist()
    # (3,3); then (1,3), (3,1) [min 1/6], (1,1); then (3,5), (5,3), (1,5), (5,1), (5,5); then (0,3)...
    assert order[:10] == [21, 9, 19, 7, 23, 33, 11, 31, 35, 3]
    assert sorted(order[:9]) == [7, 9, 11, 19, 21, 23, 31, 33, 35]  # rows {1,3,5} x cols {1,3,5}
    assert sorted(order) == list(range(36))


def test_spatial_order_covers_the_valid_rectangle_only():
    # Valid rows 1..4, columns 0..2 of a 6 x 6 partition (LLaVA-NeXT-like padding).
    valid = torch.zeros(6, 6, dtype=torch.bool)
    valid[1:5, 0:3] = True
    order = spatial_order(valid.flatten(), 6).tolist()
    # Rows: bisection(4) = 2, 1, 3, 0 -> absolute rows 3: 1/4, 2: 2/4, 4: 3/4, 1: 1.
    # Columns: bisection(3) = 1, 0, 2 -> columns 1: 1/3, 0: 2/3, 2: 1.
    # (3,1): 1/3; (2,1): 1/2; (3,0) max 2/3 min 1/4, (2,0) max 2/3 min 1/2; (4,1): 3/4 min 1/3;
    # (4,0): 3/4 min 2/3.
    assert order[:6] == [19, 13, 18, 12, 25, 24]
    assert sorted(order) == torch.nonzero(valid.flatten()).flatten().tolist()


def test_attention_part_split_rule():
    assert [attention_part(m, 0.75) for m in range(10)] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3]
    assert attention_part(10, 0.7) == 3  # (1 - 0.7) * 10 is 3.0000000000000004 in floats
    assert attention_part(7, 0.0) == 7


# --------------------------------------------------------------------------- grid selector


def test_grid_split_by_hand():
    # Budget 13 = 12 kept + summary: ceil(12 / 4) = 3 by attention, 9 spatial.
    sig = plus_signals(attention_on({0: 0.3, 2: 0.2, 12: 0.1}))
    selection = pipeline(budget=13).apply(tp.Layout.single(6), sig).selection
    assert selection.indices[0].tolist() == sorted([0, 2, 12, 7, 9, 11, 19, 21, 23, 31, 33, 35])
    assert selection.extra_tokens == (1,)
    # Attention already holds the centre (21): the spatial part skips it and takes the next one (3).
    sig = plus_signals(attention_on({0: 0.3, 2: 0.2, 21: 0.1}))
    selection = pipeline(budget=13).apply(tp.Layout.single(6), sig).selection
    assert selection.indices[0].tolist() == sorted([0, 2, 21, 9, 19, 7, 23, 33, 11, 31, 35, 3])


def test_grid_spatial_part_is_spread_in_rows_and_columns():
    # 24 x 24; attention peaked on the top-left corner. Budget 65 = 64 kept + summary:
    # 16 by attention (inside the 4 x 4 corner), 48 spatial.
    side = 24
    corner = {r * side + c: 0.5 - 0.01 * (r * 4 + c) for r in range(4) for c in range(4)}
    sig = plus_signals(attention_on(corner, side * side))
    selection = pipeline(budget=65).apply(tp.Layout.single(side), sig).selection
    kept = selection.indices[0].tolist()
    spatial = sorted(set(kept) - set(corner))
    assert len(kept) == 64 and len(spatial) == 48
    rows, columns = rows_and_columns(spatial, side)
    assert len(rows) >= 6 and len(columns) >= 6
    assert max(rows) - min(rows) >= 16 and max(columns) - min(columns) >= 16
    # The released code at the same attention share (16/576: stride int(36 / 3) = 12) also
    # adds 48 points, but as two column stripes.
    released = stride_points(16 / 576, side * side).tolist()
    released_rows, released_columns = rows_and_columns(released, side)
    assert len(released) == 48 and released_columns == {0, 12} and len(released_rows) == side


def test_exact_budgets_nested_and_valid_with_padding():
    valid = torch.ones(3, 36, dtype=torch.bool)
    valid[1].view(6, 6)[:, 4:] = False  # a tile with padded columns
    valid[2].view(6, 6)[::2, ::3] = False  # an arbitrary mask
    layout = tp.Layout(6, (1, 2), True, valid, torch.full((2, 36), 0.5))
    sig = random_signals(layout, seed=11)
    previous = None
    for total in range(int(layout.capacity.sum()) + 2):
        result = pipeline(budget=total).apply(layout, sig)
        assert torch.equal(result.selection.counts, result.budgets)
        for p, index in enumerate(result.selection.indices):
            assert bool(layout.valid[p, index].all())
            if previous is not None:
                assert set(previous[p].tolist()) <= set(index.tolist())
        previous = result.selection.indices


def test_auto_count_adds_three_spatial_tokens_per_outlier():
    # Two outliers among 36 distinct values (see the stride test) -> 2 / (1 - 0.75) = 8 kept + summary.
    sig = plus_signals(attention_on({14: 0.5, 27: 0.4}))
    result = pipeline(budget=36, count="auto").apply(tp.Layout.single(6), sig)
    kept = result.selection.indices[0].tolist()
    assert result.stats.kept == (9,)
    # attention 14, 27; spatial: first 6 of the 2-D order 21, 9, 19, 7, 23, 33
    assert kept == sorted([14, 27, 21, 9, 19, 7, 23, 33])
    capped = pipeline(budget=5, count="auto").apply(tp.Layout.single(6), sig)
    assert capped.stats.kept == (5,)  # at most the budget: 4 kept (1 attention, 3 spatial) + summary
    assert capped.selection.indices[0].tolist() == sorted([14, 21, 9, 19])


def test_fp16_signals():
    layout = tp.Layout.single(6)
    sig = random_signals(layout, seed=12, dim=8)
    half = half_signals(sig)
    full = pipeline(budget=10).apply(layout, sig).selection
    low = pipeline(budget=10).apply(layout, half).selection
    assert torch.equal(full.indices[0], low.indices[0])
    assert low.features[0].dtype == torch.float16
    torch.testing.assert_close(low.features[0].float(), full.features[0], atol=2e-2, rtol=2e-2)


# --------------------------------------------------------------------------- released stride


def test_stride_points_and_crash_limits():
    # ratio 2/36: step int(18.0) = 18, stride int(18 / 3) = 6, arange(0, 35, 6).
    assert stride_points(2 / 36, 36).tolist() == [0, 6, 12, 18, 24, 30]
    assert stride_points(0.0, 36).tolist() == [0]  # released: ZeroDivisionError
    assert stride_points(0.5, 36).tolist() == list(range(35))  # released: stride 0 error
    assert stride_points(0.1, 576)[-1] < 575  # the last token is never a stride point


def test_reference_stride_by_hand():
    # Wide attention, 36 values: 1..34 (x 1/1024) and two outliers at positions 14 and 27.
    # Sorted: 1..34, 200, 300. Q1 at 8.75 -> 9.75; Q3 at 26.25 -> 27.25; fence 27.25 + 26.25 = 53.5:
    # 2 outliers, ratio 2/36 -> stride 6 -> raster points 0, 6, 12, 18, 24, 30 (column 0 of a
    # 6 x 6 grid: the 1-D stripe of the released code).
    values = torch.zeros(36)
    others = [i for i in range(36) if i not in (14, 27)]
    values[others] = torch.arange(1, 35, dtype=torch.float32)
    values[14], values[27] = 200, 300
    sig = plus_signals(values[None] / 1024, wide=True)
    reference = tp.Pipeline(allocator=EvenSplit(), selector="prumerge_plus@reference", budget=36)
    result = reference.apply(tp.Layout.single(6), sig)
    assert result.selection.indices[0].tolist() == [0, 6, 12, 14, 18, 24, 27, 30]
    assert result.stats.kept == (9,)  # + the summary token
    truncated = tp.Pipeline(allocator=EvenSplit(), selector="prumerge_plus@reference", budget=5)
    # 4 kept: the 2 attention tokens, then the first stride points in raster order.
    assert truncated.apply(tp.Layout.single(6), sig).selection.indices[0].tolist() == [0, 6, 14, 27]


def test_reference_uniform_attention_does_not_crash():
    sig = plus_signals(torch.full((1, 36), 1 / 37), wide=True)
    result = tp.Pipeline(allocator=EvenSplit(), selector="prumerge_plus@reference", budget=36).apply(
        tp.Layout.single(6), sig
    )
    assert result.selection.indices[0].tolist() == [0] and result.selection.extra_tokens == (1,)


def test_reference_preset_options():
    selector = tp.build_selector("prumerge_plus@reference")
    options = selector.options()
    assert options["spatial"] == "stride" and options["count"] == "auto" and options["iqr_scope"] == "batch"
    assert options["wide_head"] and options["merge"] == "sum" and options["neighbours"] == "all"
    assert selector.adaptive and not tp.build_selector("prumerge_plus").adaptive


def test_bad_options_are_config_errors():
    for options in [
        {"spatial_share": 1.0},
        {"spatial_share": -0.1},
        {"spatial": "stride"},
        {"spatial": "dots"},
    ]:
        with pytest.raises(tp.ConfigError):
            tp.build_selector("prumerge_plus", **options)
    tp.build_selector("prumerge_plus", spatial="stride", count="auto")  # fine


def test_reference_with_a_fixed_ratio_is_the_released_fixed_branch():
    # issue 11.12: prumerge_plus@reference with count="budget" raised; a fixed ratio now expresses
    # the released if_adaptive=False branch: top int(N * r) by attention, then the stride of r.
    with pytest.raises(tp.ConfigError, match="fixed_ratio"):
        tp.build_selector("prumerge_plus@reference", count="budget")
    selector = tp.build_selector("prumerge_plus@reference", count="budget", fixed_ratio=0.25)
    side = 6
    layout = tp.Layout.single(side)
    attention = torch.arange(36, dtype=torch.float32).flip(0)[None, None, :] / 1000  # token 0 highest
    signals = tp.Signals(
        features=torch.randn(1, 36, 4),
        wide_cls_attention={-1: attention},
        keys={-1: torch.randn(1, 36, 4)},
        num_layers=2,
    )
    selection = selector.select(layout, signals, torch.tensor([20]))
    kept = selection.indices[0].tolist()
    attention_part = list(range(int(36 * 0.25)))  # tokens 0..8, the top 9
    stride = [i for i in stride_points(0.25, 36).tolist() if i not in attention_part]  # step int(4 / 3) = 1
    assert kept == sorted(attention_part + stride[: 20 - 1 - len(attention_part)])
    assert selection.extra_tokens == (1,)
