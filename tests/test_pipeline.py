"""Pipeline: composition, option routing, validation, config round trip, strategy-level run."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import tokenprune as tp

from .example_strategies import ExampleAttentionMass, ExampleTopK


def two_tile_image() -> tuple[tp.Layout, tp.Signals]:
    """Thumbnail + 1x2 tiles of 2x2 tokens; the right tile's top row is padding."""
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    overlap = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]])
    layout = tp.Layout(2, (1, 2), True, valid, overlap)
    # attention mass per partition (head-summed, valid only): 0.5, 0.25, 0.25 -> 2:1:1
    # (dyadic values, so the float sums are exact and quotas land exactly on .5)
    attention = torch.tensor(
        [
            [[0.0625, 0.25, 0.125, 0.0625]],
            [[0.03125, 0.03125, 0.125, 0.0625]],
            [[0.5, 0.5, 0.0625, 0.1875]],
        ]
    )
    return layout, tp.Signals(cls_attention={1: attention}, num_layers=2)


def test_strategy_level_pipeline_runs_end_to_end():
    layout, signals = two_tile_image()
    pipe = tp.Pipeline(allocator="example_attention_mass", selector="example_topk", budget=0.5)
    result = pipe.apply(layout, signals)
    assert result.stats.budget == 6  # 50% of P*N = 12
    assert result.budgets.tolist() == [3, 2, 1]  # quotas 3, 1.5, 1.5: the tie goes to the lower index
    assert [i.tolist() for i in result.selection.indices] == [[0, 1, 2], [2, 3], [3]]
    assert result.stats.kept == (3, 2, 1) and result.stats.capacity == (4, 4, 2)
    assert result.stats.partitions == ("thumbnail", "tile r0c0", "tile r0c1")
    assert result.stats.as_dict()["kept_total"] == 6


def test_batch_equals_single_images_and_budget_is_per_image():
    layout, signals = two_tile_image()
    single = tp.Layout.single(2)
    single_signals = tp.Signals(cls_attention={1: torch.tensor([[[0.1, 0.4, 0.2, 0.3]]])}, num_layers=2)
    pipe = tp.Pipeline(allocator="example_attention_mass", selector="example_topk", budget=0.5)
    batch = pipe.apply_batch([layout, single], [signals, single_signals])
    assert batch[1].stats.budget == 2 and batch[1].selection.indices[0].tolist() == [1, 3]
    alone = pipe.apply(layout, signals)
    assert batch[0].budgets.tolist() == alone.budgets.tolist()


def test_budget_larger_than_capacity_keeps_every_valid_token():
    layout, signals = two_tile_image()
    result = tp.Pipeline(allocator="example_attention_mass", selector="example_topk", budget=100).apply(layout, signals)
    assert result.budgets.tolist() == [4, 4, 2]
    assert result.selection.indices[2].tolist() == [2, 3]


def test_options_are_routed_to_the_part_that_declares_them():
    pipe = tp.Pipeline(allocator="example_attention_mass", selector="example_topk", budget=0.2, rounding="floor")
    assert pipe.allocator.rounding == "floor"
    with pytest.raises(tp.ConfigError, match=r"taken by both the allocator and the selector.*allocator_options"):
        tp.Pipeline(allocator="example_attention_mass", selector="example_topk", budget=0.2, layer=1)
    pipe = tp.Pipeline(
        allocator="example_attention_mass",
        selector="example_topk",
        budget=0.2,
        allocator_options={"layer": 0},
        selector_options={"layer": 1},
    )
    assert (pipe.allocator.layer, pipe.selector.layer) == (0, 1)
    with pytest.raises(tp.ConfigError, match=r"option 'rounding' is given twice with different values"):
        tp.Pipeline(
            allocator="example_attention_mass", selector="example_topk", budget=0.2,
            rounding="floor", allocator_options={"rounding": "exact"},
        )  # fmt: skip
    with pytest.raises(tp.ConfigError, match=r"no part of this pipeline takes option 'roundng'. Did you mean 'rounding'"):
        tp.Pipeline(allocator="example_attention_mass", selector="example_topk", budget=0.2, roundng="floor")


def test_construction_validates_everything_before_any_tensor():
    with pytest.raises(tp.BudgetError):
        tp.Pipeline(allocator="example_attention_mass", selector="example_topk", budget=1.5)
    with pytest.raises(tp.UnknownNameError, match="Did you mean 'example_topk'"):
        tp.Pipeline(allocator="example_attention_mass", selector="example_top", budget=0.2)
    with pytest.raises(tp.ConfigError, match="option rounding='round' must be 'exact' or 'floor'"):
        tp.Pipeline(allocator="example_attention_mass", selector="example_topk", budget=0.2, rounding="round")
    with pytest.raises(tp.ConfigError, match="with a ready-made selector instance"):
        tp.Pipeline(allocator="example_attention_mass", selector=ExampleTopK(), budget=0.2, selector_options={"layer": 1})
    with pytest.raises(tp.ConfigError, match="must be a registered name"):
        tp.Pipeline(allocator=42, selector="example_topk", budget=0.2)
    with pytest.raises(tp.ConfigError, match="adapter options were given without an adapter"):
        tp.Pipeline(allocator="example_attention_mass", selector="example_topk", budget=0.2, adapter_options={"x": 1})


def test_unknown_adapter_lists_close_matches_and_available_names():
    with pytest.raises(tp.UnknownNameError) as info:
        tp.Pipeline(adapter="lava_next", allocator="example_attention_mass", selector="example_topk", budget=0.2)
    message = str(info.value)
    assert "no adapter named 'lava_next'" in message and "Available adapters:" in message


def test_config_round_trip_is_exact():
    pipe = tp.Pipeline(
        allocator="example_attention_mass@floor",
        selector=ExampleTopK(layer=-2),
        budget="20%",
        allocator_options={"layer": 0},
    )
    config = pipe.to_dict()
    assert config == {
        "adapter": None,
        "allocator": {"name": "example_attention_mass@floor", "layer": 0, "rounding": "floor"},
        "selector": {"name": "example_topk", "layer": -2},
        "budget": 0.2,
    }
    again = tp.Pipeline.from_dict(config)
    assert again == pipe and again.to_dict() == config
    assert tp.Pipeline.from_dict({**config, "budget": 576}) != pipe


def test_from_dict_rejects_malformed_configs():
    with pytest.raises(tp.ConfigError, match="unknown pipeline config keys"):
        tp.Pipeline.from_dict({"allocator": "example_attention_mass", "selector": "example_topk", "budget": 1.0, "extra": 1})
    with pytest.raises(tp.ConfigError, match=r"missing \['budget'\]"):
        tp.Pipeline.from_dict({"allocator": "example_attention_mass", "selector": "example_topk"})
    with pytest.raises(tp.ConfigError, match="needs a 'name' key"):
        tp.Pipeline.from_dict({"allocator": {"layer": 1}, "selector": "example_topk", "budget": 1.0})


def test_needs_union_and_describe():
    pipe = tp.Pipeline(allocator=ExampleAttentionMass(layer=0), selector="example_topk", budget=0.25)
    assert pipe.needs == tp.Needs(cls_attention={0, -1})
    text = pipe.describe()
    assert "allocator: ExampleAttentionMass(layer=0, rounding='exact')" in text
    assert "selector:  example_topk(layer=-1)" in text
    assert "Test selector: top-b valid tokens" in text
    assert "budget:    25% of each image's tokens" in text
    assert "needs:     cls_attention[-1, 0]" in text
    assert repr(pipe) == "Pipeline(allocator='ExampleAttentionMass', selector='example_topk', budget=0.25)"


def test_missing_signals_name_the_strategy():
    layout, _ = two_tile_image()
    pipe = tp.Pipeline(allocator="example_attention_mass", selector="example_topk", budget=0.5)
    with pytest.raises(tp.SignalError, match="allocator 'example_attention_mass' needs it"):
        pipe.apply(layout, tp.Signals(cls_attention={0: torch.rand(3, 1, 4)}, num_layers=3))
    with pytest.raises(tp.ContractError, match="signals have 1 partitions, the layout has 3"):
        pipe.apply(layout, tp.Signals(cls_attention={1: torch.rand(1, 1, 4)}, num_layers=2))


def test_broken_third_party_strategies_are_caught_by_the_pipeline():
    layout, signals = two_tile_image()

    @dataclass(frozen=True)
    class Overspends(tp.BudgetAllocator):
        def allocate(self, layout, signals, total):
            return layout.capacity.clone()

    @dataclass(frozen=True)
    class KeepsPadding(tp.Selector):
        def select(self, layout, signals, budgets):
            return tp.Selection(tuple(torch.arange(int(b)) for b in budgets))

    @dataclass(frozen=True)
    class KeepsTooFew(tp.Selector):
        def select(self, layout, signals, budgets):
            return tp.Selection(tuple(torch.arange(0) for _ in budgets))

    with pytest.raises(tp.ContractError, match="summing to 10; the image's budget is 6"):
        tp.Pipeline(allocator=Overspends(), selector="example_topk", budget=0.5).apply(layout, signals)
    with pytest.raises(tp.ContractError, match=r"indices\[2\] keeps 2 padding token"):
        tp.Pipeline(allocator="example_attention_mass", selector=KeepsPadding(), budget=1.0).apply(layout, signals)
    with pytest.raises(tp.ContractError, match=r"kept \[0, 0, 0\] tokens per partition; it must keep exactly"):
        tp.Pipeline(allocator="example_attention_mass", selector=KeepsTooFew(), budget=0.5).apply(layout, signals)
    with pytest.raises(tp.UnknownNameError, match="not a registered allocator"):
        tp.Pipeline(allocator=Overspends(), selector="example_topk", budget=0.5).to_dict()


def test_floor_allocators_may_keep_fewer_but_never_more():
    layout, signals = two_tile_image()
    pipe = tp.Pipeline(allocator="example_attention_mass@floor", selector="example_topk", budget=0.5)
    result = pipe.apply(layout, signals)
    assert result.budgets.tolist() == [3, 1, 1] and result.stats.kept_total == 5
