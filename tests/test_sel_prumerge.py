"""The ``prumerge`` selector and ``prumerge@reference``: hand-computed counts and merges."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from tokenprune.strategies.prumerge import (
    batch_outlier_ratio,
    iqr_upper_fences,
    outlier_counts,
)

import tokenprune as tp

LAYERS = 2  # signals are stored under block 1 = layer -1 of a 2-block tower


@dataclass(frozen=True)
class EvenSplit(tp.BudgetAllocator):
    """Test allocator (not registered): equal shares, capped at capacity."""

    def allocate(self, layout: tp.Layout, signals: tp.Signals, total: int) -> torch.Tensor:
        return tp.apportion([1.0] * layout.num_partitions, total, layout.capacity)


def signals(
    attention: torch.Tensor,
    features: torch.Tensor,
    keys: torch.Tensor,
    *,
    wide: bool = False,
) -> tp.Signals:
    """``attention`` [P, H, N] (or [P, N], one head); per-head or wide at block 1."""
    if attention.dim() == 2:
        attention = attention[:, None, :]
    field = "wide_cls_attention" if wide else "cls_attention"
    return tp.Signals(features=features, keys={1: keys}, num_layers=LAYERS, **{field: {1: attention}})


def random_signals(layout: tp.Layout, seed: int, *, dim: int = 4, wide: bool = False) -> tp.Signals:
    generator = torch.Generator().manual_seed(seed)
    p, n = layout.num_partitions, layout.tokens_per_partition
    logits = torch.randn(p, 1 if wide else 2, n + 1, generator=generator) * 2
    attention = logits.softmax(-1)[..., 1:].contiguous()
    features = torch.randn(p, n, dim, generator=generator)
    keys = torch.randn(p, n, dim, generator=generator)
    return signals(attention, features, keys, wide=wide)


def half_signals(sig: tp.Signals) -> tp.Signals:
    """``sig`` (per-head attention at block 1) with features, attention and keys in float16."""
    return tp.Signals(
        features=sig.features.half(),
        cls_attention={1: sig.cls_attention[1].half()},
        keys={1: sig.keys[1].half()},
        num_layers=LAYERS,
    )


def pipeline(selector: str = "prumerge", budget: int = 4, **options: object) -> tp.Pipeline:
    return tp.Pipeline(allocator=EvenSplit(), selector=selector, budget=budget, selector_options=options)


# --------------------------------------------------------------------------- 4-token hand case
# Tokens 0..3 (2 x 2 grid). CLS attention a, keys k, features x:
#   a = [1/2, 1/16, 1/8, 1/4]
#   k0 = (1, 0), k1 = (0, 1), k2 = (1, 0.2), k3 = (0.1, 1)
#   x0 = (1, 0), x1 = (0, 1), x2 = (2, 2), x3 = (4, 0)
# Budget 3 with the summary token: keep 2 = the top-2 by attention {0, 3}; pruned {1, 2}.
# Key cosines: cos(0,1) = 0, cos(0,2) = 0.981, cos(0,3) = 0.0995;
#              cos(3,1) = 0.995, cos(3,2) = 0.293, cos(3,0) = 0.0995.
ATTENTION = torch.tensor([[0.5, 0.0625, 0.125, 0.25]])
KEYS = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.2], [0.1, 1.0]]])
FEATURES = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [4.0, 0.0]]])
SMALL = tp.Layout.single(2)


def small_result(budget: int = 3, **options: object) -> tp.PruneResult:
    return pipeline(budget=budget, **options).apply(SMALL, signals(ATTENTION, FEATURES, KEYS))


def test_merge_mean_by_hand():
    result = small_result(k=1)
    selection = result.selection
    assert selection.indices[0].tolist() == [0, 3]
    assert selection.extra_tokens == (1,)
    # x0 absorbs its nearest pruned token 2: (a0 x0 + a2 x2) / (a0 + a2) = (0.75, 0.25) / 0.625
    # x3 absorbs token 1: (a3 x3 + a1 x1) / (a3 + a1) = (1, 0.0625) / 0.3125
    # summary of {1, 2}: (a1 x1 + a2 x2) / (a1 + a2) = (0.25, 0.3125) / 0.1875
    expected = torch.tensor([[1.2, 0.4], [3.2, 0.2], [4 / 3, 5 / 3]])
    torch.testing.assert_close(selection.features[0], expected)


def test_merge_sum_is_the_released_unnormalised_formula():
    selection = small_result(k=1, merge="sum").selection
    # x0 + a2 x2, x3 + a1 x1, summary a1 x1 + a2 x2
    expected = torch.tensor([[1.25, 0.25], [4.0, 0.0625], [0.25, 0.3125]])
    torch.testing.assert_close(selection.features[0], expected)


def test_neighbours_among_all_tokens_can_be_other_kept_tokens():
    selection = small_result(k=2, neighbours="all").selection
    # N(0) = {2, 3}: (0.5 x0 + 0.125 x2 + 0.25 x3) / 0.875 = (1.75, 0.25) / 0.875
    # N(3) = {1, 2}: (0.25 x3 + 0.0625 x1 + 0.125 x2) / 0.4375 = (1.25, 0.3125) / 0.4375
    expected = torch.tensor([[2.0, 2 / 7], [20 / 7, 5 / 7], [4 / 3, 5 / 3]])
    torch.testing.assert_close(selection.features[0], expected)


def test_k_larger_than_the_candidates_takes_them_all():
    selection = small_result(k=32).selection  # only 2 pruned candidates
    # N(0) = {1, 2}: (0.5 x0 + 0.0625 x1 + 0.125 x2) / 0.6875 = (0.75, 0.3125) / 0.6875
    expected = torch.tensor([[12 / 11, 5 / 11], [20 / 7, 5 / 7], [4 / 3, 5 / 3]])
    torch.testing.assert_close(selection.features[0], expected)
    released_k = small_result(k=32, neighbours="all", merge="sum").selection  # 3 others
    # x0 + a1 x1 + a2 x2 + a3 x3 = (1 + 0.25 + 1, 0.0625 + 0.25), x3 + a0 x0 + a1 x1 + a2 x2
    torch.testing.assert_close(released_k.features[0][:2], torch.tensor([[2.25, 0.3125], [4.75, 0.3125]]))


def test_k_zero_keeps_the_kept_features_unchanged():
    selection = small_result(k=0).selection
    torch.testing.assert_close(selection.features[0][:2], FEATURES[0][[0, 3]])


def test_budget_edges_zero_one_and_capacity():
    zero = small_result(budget=0).selection
    assert zero.indices[0].numel() == 0 and zero.features[0].shape == (0, 2) and zero.total == 0
    one = small_result(budget=1).selection
    assert one.indices[0].numel() == 0 and one.extra_tokens == (1,)
    # The summary of every token: sum a x / sum a = (1.75, 0.3125) / 0.9375
    torch.testing.assert_close(one.features[0], torch.tensor([[28 / 15, 1 / 3]]))
    two = small_result(budget=2).selection
    assert two.indices[0].tolist() == [0] and two.total == 2
    full = small_result(budget=4).selection  # nothing pruned: every token, no summary
    assert full.indices[0].tolist() == [0, 1, 2, 3] and full.extra_tokens == (0,)
    torch.testing.assert_close(full.features[0], FEATURES[0])
    more = small_result(budget=100).selection
    assert more.indices[0].tolist() == [0, 1, 2, 3] and more.total == 4


def test_without_summary_keeps_the_whole_budget_as_tokens():
    selection = small_result(budget=3, summary=False, k=1).selection
    assert selection.indices[0].tolist() == [0, 2, 3] and selection.extra_tokens == (0,)
    # x0's nearest pruned token is now 1 (the only one): (0.5 x0 + 0.0625 x1) / 0.5625
    torch.testing.assert_close(selection.features[0][0], torch.tensor([8 / 9, 1 / 9]))


def test_heads_sum_scales_the_released_merge_weights():
    two_heads = ATTENTION[:, None, :].expand(1, 2, 4) / 2  # each head holds half
    sig = signals(two_heads, FEATURES, KEYS)
    mean = pipeline(budget=3, k=1, merge="sum", heads="mean").apply(SMALL, sig).selection
    summed = pipeline(budget=3, k=1, merge="sum", heads="sum").apply(SMALL, sig).selection
    # mean over heads: a/2 -> x0 + (1/16) x2 ; sum: a -> x0 + (1/8) x2
    torch.testing.assert_close(mean.features[0][0], torch.tensor([1.125, 0.125]))
    torch.testing.assert_close(summed.features[0][0], torch.tensor([1.25, 0.25]))


def test_wide_head_reads_the_wide_signal():
    sig = signals(ATTENTION, FEATURES, KEYS, wide=True)
    selector = tp.build_selector("prumerge", wide_head=True, k=1)
    assert selector.needs == tp.Needs(wide_cls_attention={-1}, keys={-1}, features=True)
    assert tp.build_selector("prumerge").needs == tp.Needs(cls_attention={-1}, keys={-1}, features=True)
    result = tp.Pipeline(allocator=EvenSplit(), selector=selector, budget=3).apply(SMALL, sig)
    torch.testing.assert_close(result.selection.features[0][0], torch.tensor([1.2, 0.4]))


def test_equal_similarities_go_to_the_lower_index():
    keys = torch.tensor([[[0.0, 1.0], [0.0, 1.0], [0.0, 2.0], [1.0, 0.0]]])  # 1 and 2: same cosine to 0
    selection = (
        pipeline(budget=2, k=1, merge="sum").apply(SMALL, signals(ATTENTION, FEATURES, keys)).selection
    )
    assert selection.indices[0].tolist() == [0]
    # x0 absorbs token 1 (lower index), not 2: x0 + a1 x1
    torch.testing.assert_close(selection.features[0][0], torch.tensor([1.0, 0.0625]))


# --------------------------------------------------------------------------- IQR count
# 16 values (x 1/256, exact in binary) at scrambled positions: 0..13, 30, 40.
# n = 16: Q1 at position 0.25 * 15 = 3.75 -> 3 + 0.75 * (4 - 3) = 3.75
#         Q3 at position 0.75 * 15 = 11.25 -> 11 + 0.25 * (12 - 11) = 11.25
# IQR = 7.5, fence = 11.25 + 1.5 * 7.5 = 22.5: two outliers (30, 40).
PERMUTATION = [5, 12, 0, 9, 14, 3, 7, 1, 15, 10, 2, 8, 11, 4, 13, 6]  # value v sits at PERMUTATION[v]
VALUES = [float(v) for v in range(14)] + [30.0, 40.0]


def scrambled(values: list[float]) -> torch.Tensor:
    row = torch.zeros(len(values))
    for value, position in zip(values, PERMUTATION):
        row[position] = value / 256
    return row


def test_iqr_fence_is_linear_interpolated_by_hand():
    row = scrambled(VALUES)[None]
    valid = torch.ones_like(row, dtype=torch.bool)
    assert float(iqr_upper_fences(row, valid)[0]) == 22.5 / 256
    assert outlier_counts(row, valid).tolist() == [2]
    at_fence = scrambled([float(v) for v in range(13)] + [22.5, 30.0, 40.0])[None]
    assert outlier_counts(at_fence, valid).tolist() == [2]  # strictly above the fence only


def test_auto_count_keeps_the_outliers_plus_summary():
    n = 16
    layout = tp.Layout.single(4)
    torch.manual_seed(0)
    sig = signals(scrambled(VALUES)[None], torch.randn(1, n, 4), torch.randn(1, n, 4))
    pipe = pipeline(budget=n, count="auto")
    assert pipe.adaptive and pipe.selector.adaptive and not tp.build_selector("prumerge").adaptive
    result = pipe.apply(layout, sig)
    assert result.selection.indices[0].tolist() == sorted([PERMUTATION[14], PERMUTATION[15]])
    assert result.stats.kept == (3,)
    capped = pipeline(budget=2, count="auto").apply(layout, sig)  # the budget still caps it
    assert capped.selection.indices[0].tolist() == [PERMUTATION[15]] and capped.stats.kept == (2,)


def test_quartiles_ignore_padding_tokens():
    # 12 valid values 0..9, 20, 30 and 4 padding tokens scoring 100 (x 1/256).
    # Valid only, n = 12: Q1 at 2.75 -> 2.75, Q3 at 8.25 -> 8.25, fence 8.25 + 8.25 = 16.5 -> 2
    # outliers. With the padding, Q3 = 30 + 0.25 * 70 = 47.5 and nothing would be an outlier.
    row = torch.tensor([0, 1, 100, 2, 3, 100, 4, 20, 5, 100, 6, 7, 30, 8, 100, 9.0]) / 256
    valid = row != 100 / 256
    assert outlier_counts(row[None], valid[None]).tolist() == [2]
    layout = tp.Layout.single(4, valid=valid[None])
    torch.manual_seed(1)
    sig = signals(row[None], torch.randn(1, 16, 4), torch.randn(1, 16, 4))
    result = pipeline(budget=16, count="auto").apply(layout, sig)
    assert result.selection.indices[0].tolist() == [7, 12]


def test_uniform_attention_keeps_the_minimum_without_crashing():
    layout = tp.Layout.single(4)
    torch.manual_seed(2)
    sig = signals(torch.full((1, 16), 1 / 17), torch.randn(1, 16, 4), torch.randn(1, 16, 4))
    for minimum, kept in [(1, [0]), (3, [0, 1, 2]), (0, [])]:
        result = pipeline(budget=16, count="auto", min_tokens=minimum).apply(layout, sig)
        assert result.selection.indices[0].tolist() == kept  # ties: lowest indices
        assert result.selection.extra_tokens == (1,)
        assert torch.isfinite(result.selection.features[0]).all()


# --------------------------------------------------------------------------- batch-pooled IQR
# Image A: the 16 values above (fence 22.5 -> 2 outliers). Image B: uniform 5/256.
# Pooled, n = 32, sorted: 0..4, then seventeen 5s (positions 5..21), 6..13, 30, 40.
# Q1 at 0.25 * 31 = 7.75 -> 5; Q3 at 23.25 -> 7 + 0.25 * (8 - 7) = 7.25; IQR = 2.25;
# fence = 7.25 + 3.375 = 10.625 -> 11, 12, 13, 30, 40: 5 outliers, ratio 5/32,
# every image keeps int(16 * 5/32) = 2 tokens (+ the summary).


def batch_pair() -> tuple[list[tp.Layout], list[tp.Signals]]:
    torch.manual_seed(3)
    layout = tp.Layout.single(4)
    image_a = signals(scrambled(VALUES)[None], torch.randn(1, 16, 4), torch.randn(1, 16, 4), wide=True)
    image_b = signals(torch.full((1, 16), 5 / 256), torch.randn(1, 16, 4), torch.randn(1, 16, 4), wide=True)
    return [layout, layout], [image_a, image_b]


def test_batch_ratio_by_hand():
    layouts, sigs = batch_pair()
    rows = [(s.attention(-1, wide=True)[:, 0], lay.valid) for lay, s in zip(layouts, sigs)]
    assert batch_outlier_ratio(rows) == 5 / 32
    assert batch_outlier_ratio(rows[1:]) == 0.0


def test_reference_pools_the_batch_and_default_does_not():
    layouts, sigs = batch_pair()
    reference = tp.Pipeline(allocator=EvenSplit(), selector="prumerge@reference", budget=16)
    pooled = reference.apply_batch(layouts, sigs)
    assert [r.stats.kept for r in pooled] == [(3,), (3,)]
    assert pooled[1].selection.indices[0].tolist() == [0, 1]  # B's count comes from A
    alone = reference.apply(layouts[1], sigs[1])
    assert alone.stats.kept == (1,) and alone.selection.indices[0].numel() == 0  # summary only
    per_image = pipeline(budget=16, count="auto", wide_head=True, min_tokens=0).apply_batch(layouts, sigs)
    assert [r.stats.kept for r in per_image] == [(3,), (1,)]
    # select_batch directly gives the same pooled counts
    selector = tp.build_selector("prumerge@reference")
    budgets = [torch.tensor([16]), torch.tensor([16])]
    assert [s.total for s in selector.select_batch(layouts, sigs, budgets)] == [3, 3]


def test_reference_preset_options():
    selector = tp.build_selector("prumerge@reference")
    assert selector.options() == {
        "layer": -1,
        "wide_head": True,
        "heads": "mean",
        "count": "auto",
        "iqr_scope": "batch",
        "min_tokens": 0,
        "k": 32,
        "neighbours": "all",
        "merge": "sum",
        "summary": True,
    }
    assert selector.adaptive and selector.nested


# --------------------------------------------------------------------------- contracts


def grid_layout() -> tp.Layout:
    """Thumbnail + 1 x 3 tiles of 4 x 4 tokens: padding rows in tile 1, tile 2 empty."""
    valid = torch.ones(4, 16, dtype=torch.bool)
    valid[2, 12:] = False
    valid[3] = False
    overlap = torch.zeros(3, 16)
    overlap[0] = 1.0
    return tp.Layout(4, (1, 3), True, valid, overlap)


@pytest.mark.parametrize("options", [{}, {"count": "auto"}, {"summary": False, "neighbours": "all"}])
def test_exact_budgets_valid_ascending_nested(options):
    layout = grid_layout()
    sig = random_signals(layout, seed=4)
    previous = None
    for total in range(int(layout.capacity.sum()) + 2):
        result = pipeline(budget=total, **options).apply(layout, sig)  # Pipeline checks the contract
        selection = result.selection
        if options.get("count") != "auto":
            assert torch.equal(selection.counts, result.budgets)
        for p, index in enumerate(selection.indices):
            assert bool(layout.valid[p, index].all())
            assert index.tolist() == sorted(set(index.tolist()))
            if previous is not None:
                assert set(previous[p].tolist()) <= set(index.tolist())
        previous = selection.indices


def test_fp16_signals_match_float32():
    layout = grid_layout()
    sig = random_signals(layout, seed=5, dim=8)
    half = half_signals(sig)
    full = pipeline(budget=20).apply(layout, sig).selection
    low = pipeline(budget=20).apply(layout, half).selection
    for a, b, fa, fb in zip(full.indices, low.indices, full.features, low.features):
        assert torch.equal(a, b)
        assert fb.dtype == torch.float16
        torch.testing.assert_close(fb.float(), fa, atol=2e-2, rtol=2e-2)


def test_default_batch_is_per_image():
    layouts = [grid_layout(), tp.Layout.single(4)]
    sigs = [random_signals(layouts[0], seed=6), random_signals(layouts[1], seed=7)]
    pipe = pipeline(budget=9, count="auto")
    batched = pipe.apply_batch(layouts, sigs)
    for layout, sig, got in zip(layouts, sigs, batched):
        alone = pipe.apply(layout, sig)
        assert all(torch.equal(a, b) for a, b in zip(alone.selection.indices, got.selection.indices))
        assert all(torch.equal(a, b) for a, b in zip(alone.selection.features, got.selection.features))


def test_bad_options_are_config_errors():
    for options in [{"k": -1}, {"min_tokens": -2}, {"count": "sometimes"}, {"merge": "max"}]:
        with pytest.raises(tp.ConfigError):
            tp.build_selector("prumerge", **options)


def test_bad_signals_are_signal_errors():
    good = signals(ATTENTION, FEATURES, KEYS)
    nan_keys = KEYS.clone()
    nan_keys[0, 2, 1] = float("nan")
    with pytest.raises(tp.SignalError, match="NaN"):
        small_result_with(signals(ATTENTION, FEATURES, nan_keys))
    with pytest.raises(tp.SignalError, match="negative"):
        small_result_with(signals(-ATTENTION, FEATURES, KEYS))
    no_keys = tp.Signals(features=FEATURES, cls_attention=good.cls_attention, num_layers=LAYERS)
    with pytest.raises(tp.SignalError, match="keys"):
        small_result_with(no_keys)
    with pytest.raises(tp.ContractError):
        tp.build_selector("prumerge").select(SMALL, good, torch.tensor([5]))  # above capacity


def small_result_with(sig: tp.Signals) -> tp.PruneResult:
    return pipeline(budget=3).apply(SMALL, sig)


# --------------------------------------------------------------------------- a plain-loop oracle


def naive_prumerge(
    attention: torch.Tensor,
    keys: torch.Tensor,
    features: torch.Tensor,
    valid: torch.Tensor,
    budget: int,
    *,
    k: int,
    neighbours: str,
    merge: str,
) -> tuple[list[int], torch.Tensor]:
    """PruMerge for one partition written as the paper reads, one token at a time (float64)."""
    a, keys, x = attention.double(), keys.double(), features.double()
    tokens = [i for i in range(len(a)) if valid[i]]
    summarise = 0 < budget < len(tokens)
    ranked = sorted(tokens, key=lambda i: (-float(a[i]), i))
    kept = sorted(ranked[: budget - 1 if summarise else budget])
    pruned = [i for i in tokens if i not in kept]
    rows = []
    for i in kept:
        pool = pruned if neighbours == "pruned" else [j for j in tokens if j != i]
        cosine = {j: float(torch.dot(keys[i], keys[j]) / (keys[i].norm() * keys[j].norm())) for j in pool}
        nearest = sorted(pool, key=lambda j: (-cosine[j], j))[:k]
        if merge == "mean":
            members = [i, *nearest]
            rows.append(sum(a[j] * x[j] for j in members) / sum(a[j] for j in members))
        else:
            rows.append(x[i] + sum((a[j] * x[j] for j in nearest), torch.zeros_like(x[i])))
    if summarise:
        total = sum(a[j] * x[j] for j in pruned)
        rows.append(total / sum(a[j] for j in pruned) if merge == "mean" else total)
    return kept, torch.stack(rows).float() if rows else torch.zeros(0, x.shape[1])


@pytest.mark.parametrize("merge", ["mean", "sum"])
@pytest.mark.parametrize("neighbours", ["pruned", "all"])
def test_matches_a_plain_loop_oracle(merge, neighbours):
    valid = torch.ones(1, 36, dtype=torch.bool)
    valid[0, 30:] = False
    layout = tp.Layout.single(6, valid=valid)
    sig = random_signals(layout, seed=9, dim=5)
    attention = sig.attention(-1).float().mean(1)[0]
    for budget in [0, 1, 2, 7, 17, 29, 30]:
        for k in [0, 3, 40]:
            selection = (
                pipeline(budget=budget, k=k, neighbours=neighbours, merge=merge).apply(layout, sig).selection
            )
            kept, rows = naive_prumerge(
                attention,
                sig.keys[1][0],
                sig.features[0],
                valid[0],
                budget,
                k=k,
                neighbours=neighbours,
                merge=merge,
            )
            assert selection.indices[0].tolist() == kept
            torch.testing.assert_close(selection.features[0], rows, atol=1e-5, rtol=1e-5)
