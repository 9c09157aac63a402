"""DART and attention-received: the batched pass equals a plain per-partition reading of the
definition, on mixed token counts (Qwen-like grids) and padded LLaVA-NeXT layouts."""

from __future__ import annotations

import pytest
import torch

import tokenprune as tp
import tokenprune.testing as tpt


def _grid_layout(rows: int, cols: int) -> tp.Layout:
    side = max(rows, cols)
    valid = torch.zeros(side, side, dtype=torch.bool)
    valid[:rows, :cols] = True
    return tp.Layout(tokens_per_side=side, tiles=(0, 0), has_thumbnail=False, valid=valid.view(1, -1), grid=(rows, cols))


def _padded_layout(side: int, seed: int) -> tp.Layout:
    generator = torch.Generator().manual_seed(seed)
    valid = torch.rand(2, side * side, generator=generator) > 0.3
    valid[:, 0] = True
    return tp.Layout(tokens_per_side=side, tiles=(1, 2), has_thumbnail=False, valid=valid)


def _signals(layout: tp.Layout, seed: int, *, keys: bool) -> tp.Signals:
    generator = torch.Generator().manual_seed(seed)
    p, n = layout.num_partitions, layout.tokens_per_partition
    return tp.Signals(
        features=torch.randn(p, n, 6, generator=generator),
        keys={1: torch.randn(p, n, 6, generator=generator)} if keys else {},
        received_attention={1: torch.rand(p, 2, n, generator=generator)},
        num_layers=2,
    )


def _dart_reference(features: torch.Tensor, norms_of: torch.Tensor, valid: torch.Tensor, budget: int, pivots: int) -> list[int]:
    """DART for one partition, read straight off the docstring (a loop per pivot and token)."""
    candidates = [i for i in range(valid.shape[0]) if valid[i]]
    l1 = norms_of.abs().sum(dim=-1)
    ranked = sorted(candidates, key=lambda i: (-float(l1[i]), i))
    active = min(pivots, budget)
    chosen = ranked[:active]
    taken = set(chosen)
    share, extra = divmod(budget - active, max(active, 1))
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    for j, pivot in enumerate(chosen):
        quota = share + (1 if j < extra else 0)
        similarity = unit @ unit[pivot]
        pool = sorted((i for i in candidates if i not in taken), key=lambda i: (float(similarity[i]), i))
        taken.update(pool[:quota])
    return sorted(taken)


LAYOUTS = [_grid_layout(4, 6), _padded_layout(5, 1), _grid_layout(5, 3), _padded_layout(5, 2), _grid_layout(6, 6)]


@pytest.mark.parametrize("pivot_score", ["feature_norm", "key_norm"])
@pytest.mark.parametrize("budget", [0.1, 0.3, 0.6, 1.0])
def test_dart_batch_is_the_definition_per_partition(pivot_score, budget):
    options = {"pivots": 3, "pivot_score": pivot_score, "key_layer": 1}
    pipe = tp.Pipeline(allocator="equal", selector="dart", budget=budget, selector_options=options)
    signals = [_signals(layout, seed, keys=pivot_score == "key_norm") for seed, layout in enumerate(LAYOUTS)]
    results = pipe.apply_batch(LAYOUTS, signals)
    for layout, signal, result in zip(LAYOUTS, signals, results):
        assert signal.features is not None
        norms_of = signal.features if pivot_score == "feature_norm" else signal.key(1)
        for p, indices in enumerate(result.selection.indices):
            budget_p = int(result.budgets[p])
            expected = _dart_reference(signal.features[p], norms_of[p], layout.valid[p], budget_p, 3)
            assert indices.tolist() == expected
        alone = pipe.apply(layout, signal)
        assert all(torch.equal(a, b) for a, b in zip(alone.selection.indices, result.selection.indices))


@pytest.mark.parametrize("budget", [0.2, 0.7])
def test_attention_received_batch_keeps_the_most_received_valid_tokens(budget):
    pipe = tp.Pipeline(allocator="equal", selector={"name": "attention_received", "layer": 1}, budget=budget)
    signals = [_signals(layout, seed, keys=False) for seed, layout in enumerate(LAYOUTS)]
    results = pipe.apply_batch(LAYOUTS, signals)
    for layout, signal, result in zip(LAYOUTS, signals, results):
        scores = signal.received(1).sum(dim=1)
        for p, indices in enumerate(result.selection.indices):
            ranked = sorted((i for i in range(scores.shape[1]) if layout.valid[p, i]), key=lambda i: (-float(scores[p, i]), i))
            assert indices.tolist() == sorted(ranked[: int(result.budgets[p])])


@pytest.mark.parametrize("selector", ["dart", "attention_received"])
def test_dart_and_attention_received_read_nothing_back_and_batch(selector):
    # issue 12: non-adaptive, so no host read; a batch is one pass per token count (was a
    # loop over images with a nonzero per partition: 41 / 16 reads for 8 LLaVA-NeXT images)
    pipe = tp.Pipeline(allocator="equal", selector={"name": selector, "layer": 1} if selector != "dart" else "dart", budget=0.3)
    layouts = [_padded_layout(6, seed) for seed in range(8)]
    signals = [_signals(layout, seed, keys=False) for seed, layout in enumerate(layouts)]
    pipe.apply_batch(layouts, signals)
    with tp.validation(False), tpt.count_dispatch() as one:
        pipe.apply_batch(layouts[:1], signals[:1])
    with tp.validation(False), tpt.count_dispatch() as batch:
        pipe.apply_batch(layouts, signals)
    assert one.reads == 0 and batch.reads == 0, (one.read_names, batch.read_names)
    assert batch.ops <= 2 * one.ops, (one.ops, batch.ops)
