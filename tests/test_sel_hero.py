"""The ``hero`` selector (HERO's function-aware selection): hand-computed top-b sets."""

from __future__ import annotations

import pytest
import torch

import tokenprune as tp

LAYERS = 24  # high layer -3 == 21; low layers 5..8
LOW = (5, 6, 7, 8)


def rows(p: int, *heads: list[float]) -> torch.Tensor:
    """``[p, H, N]``: the same per-head rows in every partition."""
    return torch.tensor(heads).expand(p, len(heads), len(heads[0])).clone()


def thumbnail_layout(side: int = 2, valid: torch.Tensor | None = None) -> tp.Layout:
    """Thumbnail + 1 x 2 tiles."""
    n = side * side
    if valid is None:
        valid = torch.ones(3, n, dtype=torch.bool)
    return tp.Layout(side, (1, 2), True, valid, overlap=torch.full((2, n), 0.5))


def function_aware_signals(p: int = 3) -> tp.Signals:
    """High block 21 favours t3 (head means t3 .4, t2 .1); low blocks favour t0 (t0 .4, t1 .05)."""
    high = rows(p, [0.0, 0.0, 0.0, 0.5], [0.0, 0.0, 0.2, 0.3])
    low = rows(p, [0.4, 0.1, 0.0, 0.0], [0.4, 0.0, 0.0, 0.0])
    return tp.Signals(cls_attention={21: high, **{layer: low for layer in LOW}}, num_layers=LAYERS)


def select(layout: tp.Layout, signals: tp.Signals, budgets: list[int], name: str = "hero", **options):
    selection = tp.build_selector(name, **options).select(layout, signals, torch.tensor(budgets))
    return [idx.tolist() for idx in selection.indices]


def test_thumbnail_uses_high_layers_and_tiles_use_low_layers():
    layout, sig = thumbnail_layout(), function_aware_signals()
    assert select(layout, sig, [1, 1, 1]) == [[3], [0], [0]]
    assert select(layout, sig, [2, 2, 0]) == [[2, 3], [0, 1], []]
    assert select(layout, sig, [3, 4, 2]) == [[0, 2, 3], [0, 1, 2, 3], [0, 1]]  # t0, t1 tie at 0 in the thumbnail


def test_low_layers_are_averaged():
    # Block 5: t1 = .4 (head mean); blocks 6-8: t2 = .2. Mean over 5-8: t1 .1 < t2 .15.
    block5 = rows(1, [0.0, 0.8, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0])
    later = rows(1, [0.0, 0.0, 0.2, 0.0], [0.0, 0.0, 0.2, 0.0])
    sig = tp.Signals(cls_attention={5: block5, 6: later, 7: later, 8: later}, num_layers=LAYERS)
    layout = tp.Layout.single(2)
    assert select(layout, sig, [1]) == [[2]]
    assert select(layout, sig, [1], low_layers=(5,)) == [[1]]
    assert select(layout, sig, [1], low_layers=(5, 6)) == [[1]]  # t1 .2 > t2 .1


def test_layouts_without_a_thumbnail_use_low_layers_everywhere():
    # No block 21 in the signals: it is never read without a thumbnail.
    low = rows(2, [0.4, 0.1, 0.0, 0.0], [0.4, 0.0, 0.0, 0.0])
    sig = tp.Signals(cls_attention={layer: low for layer in LOW}, num_layers=LAYERS)
    assert select(tp.Layout(2, (1, 2), False, torch.ones(2, 4, dtype=torch.bool)), sig, [1, 2]) == [[0], [0, 1]]
    assert select(tp.Layout.single(2), sig.partitions(slice(0, 1)), [1]) == [[0]]


def test_reference_second_softmax_per_head_can_reorder_tokens():
    # Plain head mean: t0 = (.6 + 0) / 2 = .300 < t1 = (.3 + .31) / 2 = .305.
    # Softmax per head first: head 0 -> e^.6, e^.3, 1, 1 over Z0 = 5.1720 = (.3523, .2610, .1933, .1933);
    # head 1 -> 1, e^.31, 1, 1 over Z1 = 4.3634 = (.2292, .3125, .2292, .2292);
    # means t0 = .2907 > t1 = .2867: the order flips.
    attention = rows(1, [0.6, 0.3, 0.0, 0.0], [0.0, 0.31, 0.0, 0.0])
    sig = tp.Signals(cls_attention={5: attention}, num_layers=LAYERS)
    layout = tp.Layout.single(2)
    assert select(layout, sig, [1], low_layers=(5,)) == [[1]]
    assert select(layout, sig, [1], name="hero@reference", low_layers=(5,)) == [[0]]
    assert select(layout, sig, [1], low_layers=(5,), double_softmax=True) == [[0]]
    # t2 and t3 tie after the second softmax too: lowest index.
    assert select(layout, sig, [3], name="hero@reference", low_layers=(5,)) == [[0, 1, 2]]


def test_reference_softmax_normalises_over_padding_too():
    # Token 3 is padding with attention 1.0 in head 0: Z0 = 1.8221 + 1.3499 + 1 + 2.7183 = 6.8903,
    # head 0 -> t0 .2645, t1 .1959; head 1 as above -> t0 .2292, t1 .3125; means t0 .2468 < t1 .2542.
    attention = rows(1, [0.6, 0.3, 0.0, 1.0], [0.0, 0.31, 0.0, 0.0])
    sig = tp.Signals(cls_attention={5: attention}, num_layers=LAYERS)
    valid = torch.tensor([[True, True, True, False]])
    layout = tp.Layout.single(2, valid=valid)
    assert select(layout, sig, [1], name="hero@reference", low_layers=(5,)) == [[1]]
    assert select(layout, sig, [3], name="hero@reference", low_layers=(5,)) == [[0, 1, 2]]


def test_nested_over_all_budgets_with_many_ties():
    torch.manual_seed(0)
    sig = tp.Signals(
        cls_attention={layer: torch.randint(0, 3, (3, 2, 16)).float() / 10 for layer in (21, *LOW)},
        num_layers=LAYERS,
    )
    layout = thumbnail_layout(side=4)
    for options in ({}, {"double_softmax": True}):
        kept = [select(layout, sig, [b, b, b], **options) for b in range(17)]
        for b in range(16):
            for p in range(3):
                assert len(kept[b][p]) == b and set(kept[b][p]) < set(kept[b + 1][p])


def test_ties_go_to_the_lowest_index():
    flat = torch.full((3, 2, 4), 0.1)
    sig = tp.Signals(cls_attention={layer: flat for layer in (21, *LOW)}, num_layers=LAYERS)
    assert select(thumbnail_layout(), sig, [2, 3, 1]) == [[0, 1], [0, 1, 2], [0]]


def test_valid_only_budget_zero_capacity_and_empty_partition():
    valid = torch.tensor([[True] * 4, [False, True, True, True], [False] * 4])
    layout = thumbnail_layout(valid=valid)
    sig = function_aware_signals()
    assert select(layout, sig, [0, 1, 0]) == [[], [1], []]  # t0 is padding in tile 1
    assert select(layout, sig, [4, 3, 0]) == [[0, 1, 2, 3], [1, 2, 3], []]
    with pytest.raises(tp.ContractError, match="exceed the valid tokens"):
        select(layout, sig, [0, 0, 1])


def test_negative_and_positive_layer_numbers_agree():
    layout, sig = thumbnail_layout(), function_aware_signals()
    expected = [[2, 3], [0, 1], [0]]
    assert select(layout, sig, [2, 2, 1], high_layers=(21,)) == expected
    assert select(layout, sig, [2, 2, 1], low_layers=(-19, -18, -17, -16)) == expected
    stored_negative = tp.Signals(
        cls_attention={layer - LAYERS: a for layer, a in function_aware_signals().cls_attention.items()},
        num_layers=LAYERS,
    )
    assert select(layout, stored_negative, [2, 2, 1]) == expected


def test_missing_layer_names_the_available_ones():
    sig = tp.Signals(cls_attention={layer: torch.full((3, 2, 4), 0.1) for layer in LOW}, num_layers=LAYERS)
    with pytest.raises(tp.SignalError, match=r"no layer -3 \(available: \[5, 6, 7, 8\]\)"):
        select(thumbnail_layout(), sig, [1, 1, 1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_signals_pick_the_same_tokens(dtype):
    torch.manual_seed(1)
    # Distinct multiples of 1/64 (exact in both half formats), a different order per block.
    attention = {layer: (torch.randperm(3 * 2 * 16).float() / 64).view(3, 2, 16) for layer in (21, *LOW)}
    full = tp.Signals(cls_attention=attention, num_layers=LAYERS)
    half = tp.Signals(cls_attention={k: v.to(dtype) for k, v in attention.items()}, num_layers=LAYERS)
    layout = thumbnail_layout(side=4)
    for budget in range(17):
        assert select(layout, half, [budget] * 3) == select(layout, full, [budget] * 3)


def test_options_are_checked_and_needs_declared():
    with pytest.raises(tp.ConfigError, match="low_layers must name at least one block"):
        tp.build_selector("hero", low_layers=())
    with pytest.raises(tp.ConfigError, match="lists a block twice"):
        tp.build_selector("hero", high_layers=(21, 21))
    with pytest.raises(tp.ConfigError, match="high_layers"):
        tp.build_selector("hero", high_layers=21)
    selector = tp.build_selector("hero", low_layers=[4, 5])
    assert selector.low_layers == (4, 5)
    assert selector.needs == tp.Needs(cls_attention={-3, 4, 5})
    assert selector.nested and not selector.adaptive
    reference = tp.build_selector("hero@reference")
    assert reference.double_softmax and reference.high_layers == (-3,) and reference.low_layers == LOW


def test_pipeline_and_batch_match_direct_selection(fill_in_order):
    layout, sig = thumbnail_layout(), function_aware_signals()
    pipe = tp.Pipeline(allocator=fill_in_order, selector="hero", budget=6)
    result = pipe.apply(layout, sig)
    assert result.budgets.tolist() == [4, 2, 0]
    assert [i.tolist() for i in result.selection.indices] == [[0, 1, 2, 3], [0, 1], []]
    batch = pipe.selector.select_batch([layout, layout], [sig, sig], [torch.tensor([1, 1, 2]), result.budgets])
    assert [i.tolist() for i in batch[0].indices] == [[3], [0], [0, 1]]
    assert [i.tolist() for i in batch[1].indices] == [i.tolist() for i in result.selection.indices]
    reference = tp.Pipeline(allocator=fill_in_order, selector="hero@reference", budget=3)
    assert [i.tolist() for i in reference.apply(layout, sig).selection.indices] == [[0, 2, 3], [], []]
