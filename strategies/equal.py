"""Every partition the same share of the budget (HiRED's "Equal" ablation baseline)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tokenprune.strategies._budget import BatchedAllocator, equal_shares, upload

from tokenprune import Layout, Signals, register_allocator
from tokenprune.budget import Rounding

__all__ = ["EqualAllocator"]


@register_allocator("equal")
@dataclass(frozen=True)
class EqualAllocator(BatchedAllocator):
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

    def allocate_counted(
        self, layouts: Sequence[Layout], signals: Sequence[Signals], totals: Sequence[int]
    ) -> tuple[list[torch.Tensor], list[tuple[int, ...]]]:
        # Capacities are host ints already: no read, one upload for the batch.
        values = [tuple(equal_shares(lay.capacity_counts, total, self.rounding)) for lay, total in zip(layouts, totals)]
        return upload(values, layouts, signals)
