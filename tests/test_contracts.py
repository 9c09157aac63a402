"""Layout, Needs, Signals, Selection validate themselves on construction."""

from __future__ import annotations

import pytest
import torch

import tokenprune as tp


def grid_layout(side: int = 2, rows: int = 1, cols: int = 2) -> tp.Layout:
    p = 1 + rows * cols
    n = side * side
    overlap = torch.full((rows * cols, n), 1.0 / (rows * cols))
    return tp.Layout(side, (rows, cols), True, torch.ones(p, n, dtype=torch.bool), overlap)


class TestLayout:
    def test_single_partition(self):
        layout = tp.Layout.single(3)
        assert layout.num_partitions == 1 and layout.tokens_per_partition == 9
        assert layout.capacity.tolist() == [9] and layout.full_tokens == 9
        assert layout.partition_names() == ["image"]

    def test_grid_with_thumbnail(self):
        layout = grid_layout(2, 2, 2)
        assert layout.num_partitions == 5 and layout.full_tokens == 20
        assert layout.partition_names() == ["thumbnail", "tile r0c0", "tile r0c1", "tile r1c0", "tile r1c1"]
        assert layout.tile_slice == slice(1, 5)

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"tokens_per_side": 0}, "tokens_per_side must be an int >= 1"),
            ({"tiles": (1, 0)}, r"must be \(0, 0\) or both positive"),
            ({"tiles": (1,)}, r"\(rows, cols\) tuple"),
            ({"valid": torch.ones(3, 4)}, "bool tensor"),
            ({"valid": torch.ones(2, 4, dtype=torch.bool)}, r"shape \[P, N\] = \[3, 4\]"),
            ({"overlap": None}, "overlap is required"),
            ({"overlap": torch.ones(2, 4)}, "at most 1 in total"),
            ({"overlap": torch.full((2, 4), -0.1)}, r"must lie in \[0, 1\]"),
            ({"overlap": torch.ones(2, 5) / 2}, r"shape \[P - 1, N\]"),
            ({"overlap": torch.full((2, 4), float("nan"))}, "NaN/inf"),
            ({"has_thumbnail": 1}, "must be a bool"),
            ({"image_size": (0, 3)}, "image_size"),
        ],
    )
    def test_bad_layouts(self, kwargs, match):
        base = dict(
            tokens_per_side=2,
            tiles=(1, 2),
            has_thumbnail=True,
            valid=torch.ones(3, 4, dtype=torch.bool),
            overlap=torch.full((2, 4), 0.5),
        )
        base.update(kwargs)
        with pytest.raises(tp.ContractError, match=match):
            tp.Layout(**base)

    def test_thumbnail_needs_tiles_and_overlap_needs_thumbnail(self):
        with pytest.raises(tp.ContractError, match="has_thumbnail=True needs tiles"):
            tp.Layout(2, (0, 0), True, torch.ones(1, 4, dtype=torch.bool))
        with pytest.raises(tp.ContractError, match="overlap must be None without a thumbnail"):
            tp.Layout(2, (1, 2), False, torch.ones(2, 4, dtype=torch.bool), torch.zeros(1, 4))


class TestNeeds:
    def test_union_and_resolution(self):
        a = tp.Needs(cls_attention={0, -2})
        b = tp.Needs(cls_attention=[22], keys=-1, relevance=True)
        both = a | b
        assert both.cls_attention == frozenset({0, -2, 22}) and both.relevance
        assert tp.Needs.union(a, b) == both
        assert both.resolve(24).cls_attention == frozenset({0, 22})
        assert both.resolve(24).keys == frozenset({23})
        assert both.cls_token and not tp.Needs(keys={1}).cls_token
        assert both.describe() == "cls_attention[-2, 0, 22], keys[-1], relevance"

    def test_bad_needs(self):
        with pytest.raises(tp.ContractError, match="layer ints"):
            tp.Needs(cls_attention={"a"})
        with pytest.raises(tp.ContractError, match="layer ints"):
            tp.Needs(cls_attention={True})
        with pytest.raises(tp.SignalError, match=r"out of range for a tower with 24 blocks \(allowed: -24..23\)"):
            tp.Needs(cls_attention={24}).resolve(24)
        with pytest.raises(tp.ContractError, match="must be a bool"):
            tp.Needs(relevance=1)


class TestSignals:
    def test_lookup_resolves_negative_layers(self):
        attention = torch.rand(3, 2, 4)
        signals = tp.Signals(cls_attention={22: attention}, num_layers=24)
        assert signals.attention(-2) is attention and signals.attention(22) is attention
        with pytest.raises(tp.SignalError, match=r"has no layer 5 \(available: \[22\]\)"):
            signals.attention(5)
        assert signals.num_partitions == 3

    def test_shape_disagreements(self):
        with pytest.raises(tp.ContractError, match="has 2 partitions, other signals have 3"):
            tp.Signals(features=torch.rand(3, 4, 8), cls_attention={0: torch.rand(2, 2, 4)})
        with pytest.raises(tp.ContractError, match="has 5 tokens, other signals have 4"):
            tp.Signals(features=torch.rand(3, 4, 8), keys={0: torch.rand(3, 5, 8)})
        with pytest.raises(tp.ContractError, match="one head"):
            tp.Signals(wide_cls_attention={0: torch.rand(3, 2, 4)})
        with pytest.raises(tp.ContractError, match="must be floating"):
            tp.Signals(relevance=torch.ones(3, dtype=torch.int64))
        with pytest.raises(tp.ContractError, match="out of range for 24 blocks"):
            tp.Signals(cls_attention={30: torch.rand(1, 1, 4)}, num_layers=24)

    @pytest.mark.parametrize("bad", [float("nan"), float("inf")])
    def test_non_finite_signals_are_rejected(self, bad):
        attention = torch.rand(1, 2, 4)
        attention[0, 1, 2] = bad
        with pytest.raises(tp.SignalError, match="NaN/inf"):
            tp.Signals(cls_attention={0: attention})
        with pytest.raises(tp.SignalError, match="NaN/inf"):
            tp.Signals(relevance=torch.tensor([0.1, bad]))

    def test_require_names_the_strategy(self):
        signals = tp.Signals(cls_attention={0: torch.rand(1, 1, 4)}, num_layers=2)
        with pytest.raises(tp.SignalError, match="selector 'x' needs it"):
            signals.require(tp.Needs(keys={1}), who="selector 'x'")
        with pytest.raises(tp.SignalError, match="relevance_scorer"):
            signals.require(tp.Needs(relevance=True), who="allocator 'hero'")
        signals.require(tp.Needs(cls_attention={-2}), who="ok")

    def test_partitions_and_layout_check(self):
        signals = tp.Signals(features=torch.rand(3, 4, 8), cls_attention={0: torch.rand(3, 2, 4)}, relevance=torch.rand(3))
        part = signals.partitions(slice(1, 3))
        assert part.num_partitions == 2 and part.relevance.shape == (2,)
        signals.check_layout(grid_layout())
        with pytest.raises(tp.ContractError, match="signals have 3 partitions, the layout has 1"):
            signals.check_layout(tp.Layout.single(2))

    def test_layer_signals_must_be_mappings(self):
        with pytest.raises(tp.ContractError, match=r"Signals.keys must be a \{layer: tensor\} mapping, got Tensor"):
            tp.Signals(keys=torch.rand(1, 4, 2))

    def test_signals_are_read_only(self):
        signals = tp.Signals(cls_attention={0: torch.rand(1, 1, 4)})
        with pytest.raises(TypeError):
            signals.cls_attention[1] = torch.rand(1, 1, 4)  # type: ignore[index]


class TestSelection:
    def test_counts_mask_and_extra_tokens(self):
        selection = tp.Selection(
            indices=(torch.tensor([0, 2]), torch.tensor([], dtype=torch.int64)),
            features=(torch.rand(3, 8), torch.rand(1, 8)),
            extra_tokens=(1, 1),
        )
        assert selection.counts.tolist() == [3, 1] and selection.total == 4
        assert selection.mask(4).tolist() == [[True, False, True, False], [False] * 4]

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"indices": (torch.tensor([2, 1]),)}, "strictly ascending"),
            ({"indices": (torch.tensor([1, 1]),)}, "strictly ascending"),
            ({"indices": (torch.tensor([-1, 1]),)}, "negative index"),
            ({"indices": (torch.tensor([0.0]),)}, "1-D int64"),
            ({"indices": (torch.tensor([0]),), "features": (torch.rand(2, 3),)}, r"must be \[1, D\]"),
            ({"indices": (torch.tensor([0]),), "extra_tokens": (1,)}, "needs Selection.features"),
            ({"indices": (torch.tensor([0]),), "extra_tokens": (1, 2)}, "one int >= 0 per partition"),
        ],
    )
    def test_bad_selections(self, kwargs, match):
        with pytest.raises(tp.ContractError, match=match):
            tp.Selection(**kwargs)

    def test_check_layout_rejects_padding_and_out_of_range(self):
        layout = tp.Layout.single(2, valid=torch.tensor([[True, False, True, True]]))
        tp.Selection((torch.tensor([0, 3]),)).check_layout(layout)
        with pytest.raises(tp.ContractError, match="keeps 1 padding token"):
            tp.Selection((torch.tensor([1]),)).check_layout(layout)
        with pytest.raises(tp.ContractError, match="index 4 >= N = 4"):
            tp.Selection((torch.tensor([4]),)).check_layout(layout)
