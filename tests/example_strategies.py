"""A minimal allocator/selector pair, registered by the tests themselves.

They prove that the strategy-level pipeline works end to end independently of the
built-in strategies, and they go through the generic invariant suite like any other
registered strategy. Imported by conftest.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

import tokenprune as tp
from tokenprune.errors import ConfigError


@tp.register_allocator("example_attention_mass")
@dataclass(frozen=True)
class ExampleAttentionMass(tp.BudgetAllocator):
    """Test allocator: shares proportional to each partition's CLS-attention mass."""

    layer: int = -1
    rounding: Literal["exact", "floor"] = "exact"

    @property
    def needs(self) -> tp.Needs:
        return tp.Needs(cls_attention={self.layer})

    def allocate(self, layout: tp.Layout, signals: tp.Signals, total: int) -> torch.Tensor:
        mass = (signals.attention(self.layer).float().sum(1) * layout.valid).sum(1)
        return tp.apportion(mass, total, layout.capacity, rounding=self.rounding)


@tp.register_selector("example_topk")
@dataclass(frozen=True)
class ExampleTopK(tp.Selector):
    """Test selector: top-b valid tokens by head-summed CLS attention of one layer."""

    layer: int = -1

    def check(self) -> None:
        if self.layer == 99:
            raise ConfigError("example_topk: layer 99 is reserved for testing check()")

    @property
    def needs(self) -> tp.Needs:
        return tp.Needs(cls_attention={self.layer})

    def select(self, layout: tp.Layout, signals: tp.Signals, budgets: torch.Tensor) -> tp.Selection:
        scores = signals.attention(self.layer).float().sum(1).masked_fill(~layout.valid, float("-inf"))
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        return tp.Selection(tuple(order[p, : int(b)].sort().values for p, b in enumerate(budgets.tolist())))


tp.register_preset(
    "allocator",
    "example_attention_mass@floor",
    {"rounding": "floor"},
    doc="""Test preset: floors the shares like the reference code.

    Keeps: floor rounding (remainder dropped).""",
)
