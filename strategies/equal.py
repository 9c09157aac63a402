"""Every partition the same share of the budget (HiRED's "Equal" ablation baseline)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune import BudgetAllocator, Layout, Signals, apportion, register_allocator
from tokenprune.budget import Rounding

__all__ = ["EqualAllocator"]


@register_allocator("equal")
@dataclass(frozen=True)
class EqualAllocator(BudgetAllocator):
    """Equal shares for every partition (thumbnail and tiles alike), capped at valid tokens.

    The baseline of HiRED's budget-distribution ablation (Arif et al., AAAI 2025,
    Table 7: "dividing it equally among partitions"). Shares differ by at most one token;
    a partition with fewer valid tokens than its share hands the rest to the others.
    Reads no signals.

    Options:
        rounding: ``"exact"`` (default; sums to the budget, the extra tokens going to the
            lowest-numbered partitions first) or ``"floor"`` (``floor`` of each equal
            quota, the remainder dropped).
    """

    rounding: Rounding = "exact"

    def allocate(self, layout: Layout, signals: Signals, total: int) -> torch.Tensor:
        weights = [1.0] * layout.num_partitions
        return apportion(weights, total, layout.capacity.cpu(), self.rounding).to(layout.valid.device)
