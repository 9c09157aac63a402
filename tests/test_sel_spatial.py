"""The ``spatial`` selector: 2-D lattice sampling, average pooling, and the released 1-D stride."""

from __future__ import annotations

import hashlib

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


# --------------------------------------------------------------------------- frozen selections
# Expected values below were produced by the per-partition tensor implementation that the
# host-planned one replaced (issue 12); they pin its behaviour, padding and holes included.


def _llava_next(size: tuple[int, int]) -> tp.Layout:
    from tokenprune.adapters.llava_next_partitioner import LlavaNextPartitioner

    pinpoints = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
    return LlavaNextPartitioner(pinpoints, 336, 14).layout(size)


def _notched() -> tp.Layout:
    """A 12 x 12 partition whose valid region is a box cut by a diagonal, with a hole."""
    grid = torch.zeros(12, 12, dtype=torch.bool)
    grid[2:11, 1:12] = True
    yy, xx = torch.meshgrid(torch.arange(12), torch.arange(12), indexing="ij")
    grid &= (yy + xx) >= 6
    grid[6, 5] = False
    return tp.Layout.single(12, valid=grid.flatten()[None])


def _frozen_layouts() -> dict[str, tp.Layout]:
    from tokenprune.adapters.qwen2_5_vl import merged_layout

    return {
        "llava_next_300x900": _llava_next((300, 900)),
        "llava_next_700x500": _llava_next((700, 500)),  # padded tiles
        "notched_12": _notched(),
        "random_10": tp.Layout.single(10, valid=torch.rand(1, 100, generator=torch.Generator().manual_seed(3)) < 0.45),
        "qwen_5x9": merged_layout(5, 9),
    }


def _token_features(layout: tp.Layout) -> torch.Tensor:
    """``[P, N, 1]`` float64: token t carries t (cell sums stay exact in float32)."""
    n = layout.tokens_per_partition
    return torch.arange(n, dtype=torch.float64)[None, :, None].expand(layout.num_partitions, n, 1)


def _select_one(layout: tp.Layout, mode: str, p: int, budget: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    budgets = torch.zeros(layout.num_partitions, dtype=torch.int64)
    budgets[p] = budget
    signals = tp.Signals(features=_token_features(layout))
    selection = tp.build_selector("spatial", mode=mode).select(layout, signals, budgets)
    return selection.indices[p], None if selection.features is None else selection.features[p]


FROZEN = [
    ("llava_next_300x900", 1, 13, "sample", [75, 81, 87, 93, 219, 225, 237, 363, 369, 375, 381, 513, 525]),
    ("llava_next_300x900", 1, 13, "stride", [0, 45, 90, 135, 180, 225, 270, 315, 360, 405, 450, 495, 540]),
    ("llava_next_300x900", 1, 13, "pool", [74, 80, 86, 92, 266, 272, 278, 284, 458, 464, 470, 476]),
    ("llava_next_300x900", 0, 20, "sample",
     [74, 79, 84, 88, 93, 218, 223, 228, 232, 237, 362, 367, 372, 376, 381, 506, 511, 516, 520, 525]),
    ("notched_12", 0, 17, "sample", [40, 42, 44, 46, 62, 64, 66, 68, 70, 86, 88, 90, 92, 94, 112, 114, 116]),
    ("notched_12", 0, 17, "stride", [45, 54, 63, 81, 90, 99, 117, 126]),
    ("notched_12", 0, 17, "pool", [39, 41, 43, 46, 50, 73, 75, 78, 79, 82, 109, 111, 113, 115, 118]),
    ("random_10", 0, 11, "sample", [0, 13, 33, 35, 37, 48, 51, 59, 80, 88, 99]),
    ("random_10", 0, 11, "stride", [0, 36, 45, 63, 72, 81, 90]),
    ("random_10", 0, 11, "pool", [1, 14, 28, 34, 41, 47, 81, 85, 87]),
    ("qwen_5x9", 0, 7, "sample", [10, 12, 14, 16, 28, 30, 34]),
    ("qwen_5x9", 0, 7, "stride", [0, 12, 24, 36]),
    ("qwen_5x9", 0, 7, "pool", [18, 19, 20, 21, 23, 24, 25]),
]


@pytest.mark.parametrize(("name", "p", "budget", "mode", "expected"), FROZEN)
def test_frozen_selections(name, p, budget, mode, expected):
    indices, _ = _select_one(_frozen_layouts()[name], mode, p, budget)
    assert indices.tolist() == expected


def test_frozen_pooled_averages():
    layouts = _frozen_layouts()
    # float32 cell means, cast back to the features' float64.
    _, pooled = _select_one(layouts["notched_12"], "pool", 0, 17)
    assert pooled[:, 0].tolist() == [42.0, 41.5, 43.5, 46.0, 50.0, 73.5, 75.5, float(torch.tensor(77.6).float()),
                                     79.5, 82.0, 109.5, 111.5, 113.5, 115.5, 118.0]
    _, pooled = _select_one(layouts["random_10"], "pool", 0, 11)
    expected = torch.tensor([36 / 5, 107 / 7, 99 / 4, 38.0, 124 / 3, 367 / 8, 559 / 7, 277 / 4, 624 / 7]).float().double()
    assert torch.equal(pooled[:, 0], expected)


#: sha256 of every partition's selection at every budget 0..capacity of the frozen layouts
#: (indices as little-endian int64, then for "pool" the float64 averages of ``_token_features``).
FROZEN_DIGESTS = {
    "sample": "71a58d2298e6ebb25774e548e478ff043e95d3a59f9624c2dd5ca0264b022813",
    "stride": "abac6af6ff35e0d81351d057cb528f29a48a3f47f173936492c4a32eb47c4fab",
    "pool": "f12167d2c3673f4dfca81cd96df60f742b4014b1c01b7357a225e61ecc6bf5b8",
}


@pytest.mark.parametrize("mode", ["sample", "stride", "pool"])
def test_every_budget_of_the_frozen_layouts_is_unchanged(mode):
    digest = hashlib.sha256()
    selector = tp.build_selector("spatial", mode=mode)
    for name, layout in _frozen_layouts().items():
        signals = tp.Signals(features=_token_features(layout))
        for p, capacity in enumerate(layout.capacity_counts):
            # One batch holds this partition at every budget (the other partitions keep 0).
            budgets = [tuple(b if q == p else 0 for q in range(layout.num_partitions)) for b in range(capacity + 1)]
            selections = selector.select_counted(
                [layout] * len(budgets), [signals] * len(budgets), [torch.tensor(b) for b in budgets], budgets
            )
            for budget, selection in enumerate(selections):
                digest.update(f"{name}/{p}/{budget}:".encode())
                digest.update(selection.indices[p].numpy().astype("<i8").tobytes())
                if selection.features is not None:
                    digest.update(selection.features[p].numpy().astype("<f8").tobytes())
    assert digest.hexdigest() == FROZEN_DIGESTS[mode]


# --------------------------------------------------------------------------- properties


def _random_layouts() -> list[tp.Layout]:
    from tokenprune.adapters.qwen2_5_vl import merged_layout

    generator = torch.Generator().manual_seed(7)
    layouts = [_llava_next(size) for size in ((480, 640), (300, 1000), (1000, 200))]
    for side, density in ((6, 0.3), (9, 0.7), (16, 0.5)):
        layouts.append(tp.Layout.single(side, valid=torch.rand(1, side * side, generator=generator) < density))
    return [*layouts, _notched(), merged_layout(7, 3), merged_layout(2, 11)]


@pytest.mark.parametrize("mode", ["sample", "stride", "pool"])
def test_properties_on_mixed_batches(mode):
    from tokenprune.strategies import spatial

    selector = tp.build_selector("spatial", mode=mode)
    layouts = _random_layouts()
    generator = torch.Generator().manual_seed(11)
    signals = [tp.Signals(features=torch.randn(lay.num_partitions, lay.tokens_per_partition, 4, generator=generator))
               for lay in layouts]
    for fraction in (0.0, 0.05, 0.3, 0.61, 1.0):
        counts = [tuple(int(c * fraction) for c in lay.capacity_counts) for lay in layouts]
        budgets = [torch.tensor(c) for c in counts]
        batch = selector.select_counted(layouts, signals, budgets, counts)
        spatial._lattice.cache_clear(), spatial._stride.cache_clear(), spatial._pool_plan.cache_clear()
        cold = selector.select_counted(layouts[::-1], signals[::-1], budgets[::-1], counts[::-1])[::-1]
        for layout, signal, values, got, again in zip(layouts, signals, counts, batch, cold):
            alone = selector.select(layout, signal, torch.tensor(values))
            for p, (indices, budget) in enumerate(zip(got.indices, values)):
                kept = indices.tolist()
                assert kept == sorted(set(kept))  # ascending, unique
                assert all(bool(layout.valid[p, t]) for t in kept)  # valid only
                assert len(kept) == budget if mode == "sample" else len(kept) <= budget
                assert torch.equal(indices, again.indices[p]) and torch.equal(indices, alone.indices[p])  # deterministic
            if mode == "pool":
                assert all(torch.equal(a, b) for a, b in zip(got.features, alone.features))


def test_pool_rejects_a_batch_of_mixed_feature_dtypes():
    layout = tp.Layout.single(4)
    signals = [tp.Signals(features=torch.zeros(1, 16, 2)), tp.Signals(features=torch.zeros(1, 16, 2, dtype=torch.float64))]
    with pytest.raises(tp.ContractError, match="one features dtype"):
        tp.build_selector("spatial", mode="pool").select_batch([layout, layout], signals, [torch.tensor([4])] * 2)
