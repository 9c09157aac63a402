"""The ``cls_final`` selector (HiRED's token dropping): hand-computed top-b sets."""

from __future__ import annotations

import pytest
import torch

import tokenprune as tp

SIDE = 4  # 4 x 4 grid, N = 16
N = SIDE * SIDE
LAYERS = 24  # block 22 == layer -2


def two_heads() -> torch.Tensor:
    """[1, 2, 16]: head sums t10 = .35, t5 = .30, t0 = .20, t3 = .05, t15 = .02, others 0."""
    heads = torch.zeros(1, 2, N)
    heads[0, 0, 5], heads[0, 0, 10], heads[0, 0, 3] = 0.30, 0.10, 0.05
    heads[0, 1, 10], heads[0, 1, 0], heads[0, 1, 15] = 0.25, 0.20, 0.02
    return heads


def signals(attention: torch.Tensor, layer: int = 22, num_layers: int | None = LAYERS) -> tp.Signals:
    return tp.Signals(cls_attention={layer: attention}, num_layers=num_layers)


def select(budgets: list[int], layout: tp.Layout | None = None, sig: tp.Signals | None = None, **options):
    layout = layout or tp.Layout.single(SIDE)
    selection = tp.build_selector("cls_final", **options).select(
        layout, sig or signals(two_heads()), torch.tensor(budgets)
    )
    return [idx.tolist() for idx in selection.indices]


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        (0, []),
        (1, [10]),
        (2, [5, 10]),
        (3, [0, 5, 10]),
        (4, [0, 3, 5, 10]),
        (5, [0, 3, 5, 10, 15]),
        (6, [0, 1, 3, 5, 10, 15]),  # the rest tie at 0: lowest index first
        (16, list(range(16))),
    ],
)
def test_top_b_of_head_summed_attention(budget, expected):
    assert select([budget]) == [expected]


def test_heads_mean_ranks_like_sum():
    assert select([4], heads="mean") == [[0, 3, 5, 10]]


def test_ties_go_to_the_lowest_index():
    flat = torch.full((1, 2, N), 0.05)
    assert select([5], sig=signals(flat)) == [[0, 1, 2, 3, 4]]


def test_nested_over_all_budgets_with_many_ties():
    torch.manual_seed(0)
    coarse = torch.randint(0, 3, (1, 2, N)).float() / 10
    kept = [set(select([b], sig=signals(coarse))[0]) for b in range(N + 1)]
    for b in range(N):
        assert len(kept[b]) == b and kept[b] < kept[b + 1]


def test_only_valid_tokens_compete():
    valid = torch.ones(1, N, dtype=torch.bool)
    valid[0, 10] = False
    layout = tp.Layout.single(SIDE, valid=valid)
    assert select([2], layout=layout) == [[0, 5]]
    assert select([15], layout=layout) == [[t for t in range(16) if t != 10]]


def test_partitions_are_independent_and_an_empty_partition_keeps_nothing():
    valid = torch.ones(2, N, dtype=torch.bool)
    valid[1] = False
    layout = tp.Layout(SIDE, (1, 2), False, valid)
    attention = torch.cat([two_heads(), two_heads().flip(-1)])  # partition 1 mirrored
    assert select([3, 0], layout=layout, sig=signals(attention)) == [[0, 5, 10], []]
    valid[1] = True
    layout = tp.Layout(SIDE, (1, 2), False, valid)
    assert select([1, 2], layout=layout, sig=signals(attention)) == [[10], [5, 10]]  # 15-10, 15-5


def test_thumbnail_layout():
    valid = torch.ones(5, N, dtype=torch.bool)
    layout = tp.Layout(SIDE, (2, 2), True, valid, overlap=torch.full((4, N), 0.25))
    attention = two_heads().expand(5, 2, N).clone()
    assert select([1, 2, 0, 3, 16], layout=layout, sig=signals(attention)) == [
        [10], [5, 10], [], [0, 5, 10], list(range(16))
    ]


def test_budget_above_capacity_is_a_contract_error():
    valid = torch.zeros(1, N, dtype=torch.bool)
    valid[0, :3] = True
    with pytest.raises(tp.ContractError, match="exceed the valid tokens"):
        select([4], layout=tp.Layout.single(SIDE, valid=valid))


@pytest.mark.parametrize(("option", "stored"), [(-2, 22), (22, 22), (22, -2), (-2, -2)])
def test_negative_and_positive_layer_numbers_agree(option, stored):
    sig = signals(two_heads(), layer=stored)
    assert select([3], sig=sig, final_layer=option) == [[0, 5, 10]]


def test_missing_layer_names_the_available_ones(fill_in_order):
    sig = signals(two_heads(), layer=5)
    with pytest.raises(tp.SignalError, match=r"no layer -2 \(available: \[5\]\)"):
        select([3], sig=sig)
    pipe = tp.Pipeline(allocator=fill_in_order, selector="cls_final", budget=3)
    with pytest.raises(tp.SignalError, match="selector 'cls_final' needs it"):
        pipe.apply(tp.Layout.single(SIDE), sig)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_signals_pick_the_same_tokens(dtype):
    torch.manual_seed(1)
    # Well separated: distinct multiples of 1/64 are exact in both half formats.
    attention = (torch.randperm(2 * N).float() / 64).view(1, 2, N)
    for budget in range(N + 1):
        assert select([budget], sig=signals(attention.to(dtype))) == select([budget], sig=signals(attention))


def test_nan_in_scores_is_a_signal_error():
    bad = two_heads()
    bad[0, 0, 3] = float("nan")
    with pytest.raises(tp.SignalError, match="NaN"):
        select([3], sig=tp.Signals(cls_attention={22: bad}, num_layers=LAYERS))


def test_options_are_checked():
    with pytest.raises(tp.ConfigError, match="heads"):
        tp.build_selector("cls_final", heads="max")
    with pytest.raises(tp.ConfigError, match="final_layer"):
        tp.build_selector("cls_final", final_layer="22")
    selector = tp.build_selector("cls_final")
    assert selector.needs == tp.Needs(cls_attention={-2})
    assert selector.nested and not selector.adaptive


def test_pipeline_and_batch_match_direct_selection(fill_in_order):
    valid = torch.ones(3, N, dtype=torch.bool)
    valid[2, 8:] = False  # a padded tile
    layout = tp.Layout(SIDE, (1, 2), True, valid, overlap=torch.full((2, N), 0.5))
    attention = torch.cat([two_heads(), two_heads().flip(-1), two_heads()])
    sig = signals(attention)
    pipe = tp.Pipeline(allocator=fill_in_order, selector="cls_final", budget=22)
    result = pipe.apply(layout, sig)
    assert result.budgets.tolist() == [16, 6, 0]
    # Mirrored head sums: t5 .35, t10 .30, t15 .20, t12 .05, t0 .02, then ties from t1.
    assert [i.tolist() for i in result.selection.indices] == [list(range(16)), [0, 1, 5, 10, 12, 15], []]
    assert result.stats.kept == (16, 6, 0)
    batch = pipe.selector.select_batch([layout, layout], [sig, sig], [torch.tensor([3, 2, 8]), result.budgets])
    assert [i.tolist() for i in batch[0].indices] == [[0, 5, 10], [5, 10], list(range(8))]
    assert [i.tolist() for i in batch[1].indices] == [i.tolist() for i in result.selection.indices]
