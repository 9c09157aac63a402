"""The ``spatial`` selector: 2-D lattice sampling, average pooling, and the released 1-D stride."""

from __future__ import annotations

import pytest
import torch

import tokenprune as tp

SIDE = 24
N = SIDE * SIDE


def rect_layout(top: int, bottom: int, left: int, right: int, side: int = SIDE) -> tp.Layout:
    grid = torch.zeros(side, side, dtype=torch.bool)
    grid[top:bottom, left:right] = True
    return tp.Layout.single(side, valid=grid.flatten()[None])


def sample(layout: tp.Layout, budget: int, mode: str = "sample") -> list[int]:
    selection = tp.build_selector("spatial", mode=mode).select(layout, tp.Signals(), torch.tensor([budget]))
    return selection.indices[0].tolist()


def lattice(rows: list[int], cols: list[int], side: int = SIDE) -> list[int]:
    return sorted(r * side + c for r in rows for c in cols)


def assert_contract(layout: tp.Layout, kept: list[int], budget: int) -> None:
    assert len(kept) == budget
    assert kept == sorted(set(kept))
    assert all(bool(layout.valid[0, t]) for t in kept)


# --------------------------------------------------------------------------- sample


def test_sample_hand_computed_lattices_on_a_full_grid():
    full = tp.Layout.single(SIDE)
    assert sample(full, 1) == [12 * SIDE + 12]  # the centre cell
    assert sample(full, 4) == lattice([6, 18], [6, 18])  # 2 x 2 cell centres: floor((2i + 1) * 24 / 4)
    # 10 x 10: floor((2i + 1) * 1.2).
    assert sample(full, 100) == lattice([1, 3, 6, 8, 10, 13, 15, 18, 20, 22], [1, 3, 6, 8, 10, 13, 15, 18, 20, 22])


def test_sample_spreads_evenly_over_quadrants():
    kept = torch.tensor(sample(tp.Layout.single(SIDE), 100))
    top, left = kept // SIDE < 12, kept % SIDE < 12
    quadrants = [top & left, top & ~left, ~top & left, ~top & ~left]
    assert [int(q.sum()) for q in quadrants] == [25] * 4


def test_sample_has_no_column_stripes_where_the_released_stride_does():
    kept = torch.tensor(sample(tp.Layout.single(SIDE), 288))
    assert kept.numel() == 288
    # 17 x 17 lattice less one point: 17 rows and 17 columns used, not every other column.
    assert len(set((kept % SIDE).tolist())) == 17 and len(set((kept // SIDE).tolist())) == 17
    stride = set(range(0, N - 1, 2))  # the released 40 % selection: columns 0, 2, ..., 22
    assert {t % SIDE for t in stride} == set(range(0, SIDE, 2))
    assert set(kept.tolist()) != stride


@pytest.mark.parametrize("budget", [0, 1, 2, 7, 97, 101, 289, 400, 575, 576])
def test_sample_keeps_exactly_b_valid_unique_ascending(budget):
    layout = tp.Layout.single(SIDE)
    assert_contract(layout, sample(layout, budget), budget)


def test_sample_on_a_padded_tile_uses_the_valid_rectangle():
    layout = rect_layout(6, 18, 0, SIDE)  # LLaVA-NeXT tile with 6 padding rows above and below
    # 12 x 24 box, b = 32: 4 x 8 cells of 3 x 3 tokens, centres at box offsets 1, 4, 7, 10 / 1, 4, ..., 22.
    assert sample(layout, 32) == lattice([7, 10, 13, 16], [1, 4, 7, 10, 13, 16, 19, 22])
    for budget in (0, 1, 13, 97, 143, 287, 288):
        kept = sample(layout, budget)
        assert_contract(layout, kept, budget)
    kept = torch.tensor(sample(layout, 97))
    left = int((kept % SIDE < 12).sum())
    assert abs(left - 97 / 2) <= 5  # both halves of the valid region get about half


def test_sample_on_padding_columns_and_arbitrary_masks():
    layout = rect_layout(0, SIDE, 3, 21)
    for budget in range(0, 18 * SIDE + 1, 17):
        assert_contract(layout, sample(layout, budget), budget)
    torch.manual_seed(0)
    valid = torch.rand(1, 12 * 12) < 0.4
    layout = tp.Layout.single(12, valid=valid)
    capacity = int(valid.sum())
    for budget in range(capacity + 1):
        assert_contract(layout, sample(layout, budget), budget)


def test_sample_is_not_nested_and_says_so():
    selector = tp.build_selector("spatial")
    assert selector.nested is False and selector.adaptive is False
    full = tp.Layout.single(SIDE)
    assert not set(sample(full, 100)) <= set(sample(full, 101))  # 10 x 10, then 10 x 11 less 9


def test_empty_partition_and_budget_checks():
    valid = torch.ones(3, 16, dtype=torch.bool)
    valid[2] = False
    layout = tp.Layout(4, (1, 2), True, valid, overlap=torch.full((2, 16), 0.5))
    for mode in ("sample", "pool", "stride"):
        selector = tp.build_selector("spatial", mode=mode)
        sig = tp.Signals(features=torch.zeros(3, 16, 2))
        selection = selector.select(layout, sig, torch.tensor([16, 4, 0]))
        assert selection.indices[2].numel() == 0
        with pytest.raises(tp.ContractError, match="must lie in"):
            selector.select(layout, sig, torch.tensor([1, 1, 1]))
        with pytest.raises(tp.ContractError, match="must lie in"):
            selector.select(layout, sig, torch.tensor([-1, 1, 0]))
        with pytest.raises(tp.ContractError, match="integer tensor of shape"):
            selector.select(layout, sig, torch.tensor([1, 1]))
    with pytest.raises(tp.ConfigError, match="mode"):
        tp.build_selector("spatial", mode="grid")


# --------------------------------------------------------------------------- pool


def index_features(side: int = 4) -> torch.Tensor:
    """``[1, N, 2]``: token t carries (t, t^2)."""
    t = torch.arange(side * side, dtype=torch.float32)
    return torch.stack([t, t * t], dim=-1)[None]


def pool(layout: tp.Layout, budget: int, features: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    selector = tp.build_selector("spatial", mode="pool")
    selection = selector.select(layout, tp.Signals(features=features), torch.tensor([budget]))
    assert selection.features is not None
    return selection.indices[0].tolist(), selection.features[0]


def test_pool_averages_2x2_cells_of_a_4x4_grid():
    indices, features = pool(tp.Layout.single(4), 4, index_features())
    # Cells {0,1,4,5}, {2,3,6,7}, {8,9,12,13}, {10,11,14,15}; every token of a cell is equally
    # near its centre, so the lowest index represents it.
    assert indices == [0, 2, 8, 10]
    assert features.tolist() == [[2.5, 10.5], [4.5, 24.5], [10.5, 114.5], [12.5, 160.5]]


def test_pool_follows_the_aspect_and_keeps_at_most_b():
    # b = 3 on 4 x 4: r = isqrt(3) = 1, c = 3; column bands [0,1), [1,2), [2,4).
    indices, features = pool(tp.Layout.single(4), 3, index_features())
    assert indices == [4, 5, 6]  # nearest the centres (1.5, 0), (1.5, 1), (1.5, 2.5)
    assert features[:, 0].tolist() == [6.0, 7.0, 8.5]
    # b = 5: still 2 x 2 (r = isqrt(5) = 2, c = 5 // 2 = 2), 4 tokens <= 5.
    assert pool(tp.Layout.single(4), 5, index_features())[0] == [0, 2, 8, 10]


def test_pool_ignores_padding_and_drops_empty_cells():
    features = index_features()
    features[0, [3, 7, 11, 15]] = 1000.0  # padding column: must not leak into any average
    layout = rect_layout(0, 4, 0, 3, side=4)
    # 4 x 3 box, b = 3: r = isqrt(3 * 4 // 3) = 2, c = 3 // 2 = 1 -> row bands [0, 2), [2, 4).
    indices, pooled = pool(layout, 3, features)
    assert indices == [1, 9]
    assert pooled[:, 0].tolist() == [3.0, 11.0]  # mean of {0,1,2,4,5,6} and {8,9,10,12,13,14}
    valid = torch.ones(1, 16, dtype=torch.bool)
    valid[0, [0, 1, 4, 5]] = False  # the top-left 2 x 2 cell has no valid token
    indices, pooled = pool(tp.Layout.single(4, valid=valid), 4, index_features())
    assert indices == [2, 8, 10]
    assert pooled[:, 0].tolist() == [4.5, 10.5, 12.5]


def test_pool_at_capacity_is_the_identity_and_keeps_the_dtype():
    torch.manual_seed(0)
    features = torch.randn(1, 16, 3).to(torch.bfloat16)
    indices, pooled = pool(tp.Layout.single(4), 16, features)
    assert indices == list(range(16))
    assert pooled.dtype == torch.bfloat16 and torch.equal(pooled, features[0])
    indices, pooled = pool(tp.Layout.single(4), 0, features)
    assert indices == [] and tuple(pooled.shape) == (0, 3)


def test_pool_needs_features():
    selector = tp.build_selector("spatial", mode="pool")
    assert selector.needs == tp.Needs(features=True) and selector.adaptive
    with pytest.raises(tp.SignalError, match="features"):
        selector.select(tp.Layout.single(4), tp.Signals(), torch.tensor([4]))


# --------------------------------------------------------------------------- stride (reference)


def test_reference_stride_reproduces_the_released_set_where_it_fits():
    full = tp.Layout.single(SIDE)
    assert sample(full, 115, "stride") == list(range(0, 575, 5))  # 20 %: gap 5, 115 tokens
    assert sample(full, 288, "stride") == list(range(0, 575, 2))  # the released 40 % count
    assert sample(full, 576, "stride") == list(range(575))  # token 575 is never kept
    # The released 40 % budget, 230, would give 288 tokens: the gap widens to 3 (192 tokens).
    assert sample(full, 230, "stride") == list(range(0, 575, 3))
    assert sample(full, 0, "stride") == []


def test_reference_stride_with_the_released_count_matches_every_released_budget_from_23():
    full = tp.Layout.single(SIDE)
    for released_budget in range(23, N + 1):
        gap = N // released_budget
        released = list(range(0, N - 1, gap))
        assert sample(full, len(released), "stride") == released, released_budget


def test_reference_stride_drops_padding_positions():
    layout = rect_layout(6, 18, 0, SIDE)
    kept = sample(layout, 115, "stride")
    assert kept == [t for t in range(0, 575, 5) if 6 <= t // SIDE < 18]
    selector = tp.build_selector("spatial@reference")
    assert selector.mode == "stride" and selector.adaptive and selector.needs == tp.Needs()


# --------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize(("options", "adaptive"), [({}, False), ({"mode": "pool"}, True), ({"mode": "stride"}, True)])
def test_pipeline_reports_adaptivity_and_matches_direct_and_batch(options, adaptive, fill_in_order):
    valid = torch.ones(3, 16, dtype=torch.bool)
    valid[2, 12:] = False
    layout = tp.Layout(4, (1, 2), True, valid, overlap=torch.full((2, 16), 0.5))
    sig = tp.Signals(features=torch.arange(3 * 16 * 2, dtype=torch.float32).view(3, 16, 2))
    pipe = tp.Pipeline(allocator=fill_in_order, selector="spatial", budget=36, selector_options=options)
    assert pipe.adaptive is adaptive
    result = pipe.apply(layout, sig)
    assert result.budgets.tolist() == [16, 16, 4]
    assert result.stats.adaptive is adaptive
    direct = pipe.selector.select(layout, sig, result.budgets)
    assert [i.tolist() for i in result.selection.indices] == [i.tolist() for i in direct.indices]
    batch = pipe.selector.select_batch([layout, layout], [sig, sig], [torch.tensor([4, 1, 12]), result.budgets])
    again = pipe.selector.select(layout, sig, torch.tensor([4, 1, 12]))
    assert [i.tolist() for i in batch[0].indices] == [i.tolist() for i in again.indices]
    assert [i.tolist() for i in batch[1].indices] == [i.tolist() for i in direct.indices]
    if not adaptive:
        # Full partitions keep everything; the padded tile's 3 x 4 box keeps a 2 x 2 lattice:
        # rows floor((2i + 1) * 3 / 4) = 0, 2; columns floor((2j + 1) * 4 / 4) = 1, 3.
        assert [i.tolist() for i in direct.indices] == [list(range(16)), list(range(16)), [1, 3, 9, 11]]


def test_pool_on_a_tall_narrow_region_with_a_small_budget():
    # Regression: a 6x1 valid column with budget 1 made a 6-row, 0-column grid (division by zero).
    valid = torch.zeros(6, 6, dtype=torch.bool)
    valid[:, 2] = True
    layout = tp.Layout.single(6, valid=valid.flatten()[None])
    features = torch.arange(36, dtype=torch.float32).view(1, 36, 1).repeat(1, 1, 2)
    signals = tp.Signals(features=features)
    for budget in (1, 2, 5):
        selection = tp.build_selector("spatial", mode="pool").select(layout, signals, torch.tensor([budget]))
        assert 1 <= int(selection.counts[0]) <= budget
        column = features[0, valid.flatten(), 0]
        if budget == 1:
            assert torch.allclose(selection.features[0][:, 0], column.mean()[None])
