"""The ``equal`` allocator: the same share for every partition, capped at valid tokens."""

from __future__ import annotations

import pytest
import torch
from tokenprune.strategies.equal import EqualAllocator

import tokenprune as tp
from tokenprune import ConfigError, Layout, Needs, Signals

from .conftest import FirstValid

SIDE, N = 4, 16


def padded_layout() -> Layout:
    """Thumbnail + 2x2 tiles of 16 tokens; the last tile has only 4 valid tokens."""
    valid = torch.ones(5, N, dtype=torch.bool)
    valid[4, 4:] = False
    overlap = torch.zeros(4, N)
    overlap[torch.arange(N) % 4, torch.arange(N)] = 1.0
    return Layout(SIDE, (2, 2), True, valid, overlap)


def test_equal_shares_capped_with_the_extras_to_the_lowest_indices():
    layout = padded_layout()
    assert EqualAllocator().allocate(layout, Signals(), 20).tolist() == [4, 4, 4, 4, 4]
    # total 23: 4.6 each -> three extras to partitions 0, 1, 2.
    assert EqualAllocator().allocate(layout, Signals(), 23).tolist() == [5, 5, 5, 4, 4]
    # total 30: 6 each, but the last tile holds 4 -> the others share 26: 6.5 each.
    assert EqualAllocator().allocate(layout, Signals(), 30).tolist() == [7, 7, 6, 6, 4]
    assert EqualAllocator(rounding="floor").allocate(layout, Signals(), 30).tolist() == [6, 6, 6, 6, 4]


def test_budget_zero_above_capacity_and_empty_partitions():
    layout = padded_layout()
    assert EqualAllocator().allocate(layout, Signals(), 0).tolist() == [0] * 5
    assert EqualAllocator().allocate(layout, Signals(), 500).tolist() == [16, 16, 16, 16, 4]
    valid = torch.ones(2, N, dtype=torch.bool)
    valid[0] = False
    no_thumbnail = Layout(SIDE, (1, 2), False, valid)
    assert EqualAllocator().allocate(no_thumbnail, Signals(), 10).tolist() == [0, 10]


def test_single_partition_gets_the_whole_budget():
    assert EqualAllocator().allocate(Layout.single(SIDE), Signals(), 9).tolist() == [9]
    assert EqualAllocator().allocate(Layout.single(SIDE), Signals(), 99).tolist() == [16]


def test_house_monotone_exact_and_floor_never_above_the_budget():
    layout = padded_layout()
    previous = torch.zeros(5, dtype=torch.int64)
    for total in range(72):
        budgets = EqualAllocator().allocate(layout, Signals(), total)
        assert int(budgets.sum()) == min(total, 68) and bool((budgets >= previous).all())
        below = budgets[budgets < layout.capacity]  # partitions not yet full differ by at most one
        assert below.numel() == 0 or int(below.max() - below.min()) <= 1
        previous = budgets
        assert int(EqualAllocator(rounding="floor").allocate(layout, Signals(), total).sum()) <= min(total, 68)


def test_batch_equals_per_image_and_needs_nothing():
    layouts = [padded_layout(), Layout.single(SIDE)]
    batch = EqualAllocator().allocate_batch(layouts, [Signals(), Signals()], [23, 5])
    assert [b.tolist() for b in batch] == [[5, 5, 5, 4, 4], [5]]
    assert EqualAllocator().needs == Needs()
    with pytest.raises(ConfigError, match="rounding"):
        tp.build_allocator("equal", rounding="nearest")


def test_builds_by_name_and_runs_in_a_pipeline():
    assert isinstance(tp.build_allocator("equal"), EqualAllocator)
    result = tp.Pipeline(allocator="equal", selector=FirstValid(), budget=30).apply(padded_layout(), Signals())
    assert result.stats.allocated == (7, 7, 6, 6, 4) and result.stats.kept_total == 30
