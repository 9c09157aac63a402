"""Every partition the same share of the budget (HiRED's "Equal" ablation baseline)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tokenprune import BudgetAllocator, Layout, Signals, register_allocator
from tokenprune.budget import Rounding
from tokenprune.strategies._budget import equal_shares, upload

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
        return self.allocate_batch([layout], [signals], [total])[0]

    def allocate_batch(
        self, layouts: Sequence[Layout], signals: Sequence[Signals], totals: Sequence[int]
    ) -> list[torch.Tensor]:
        return self.allocate_counted(layouts, signals, totals)[0]

    def allocate_counted(
        self, layouts: Sequence[Layout], signals: Sequence[Signals], totals: Sequence[int]
    ) -> tuple[list[torch.Tensor], list[tuple[int, ...]]]:
        # Capacities are host ints already: no read, one upload for the batch.
        values = [tuple(equal_shares(lay.capacity_counts, total, self.rounding)) for lay, total in zip(layouts, totals)]
        device = layouts[0].valid.device if layouts else torch.device("cpu")
        return upload(values, device), values
