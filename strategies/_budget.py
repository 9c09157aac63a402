"""Partition budget math shared by the built-in allocators (pure functions, host ints).

The thumbnail/tile split, the released code's overflow rule and its band regions, and
equal shares, used by ``equal``, ``hired`` and ``hero`` so that no allocator imports
another's module; and the batch plumbing of their one pass (issue 12): stack the batch's
rows, upload host indices in one transfer, read the batch's weights in one transfer.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import torch

from tokenprune.budget import Rounding, apportion, apportion_many
from tokenprune.contracts import BudgetAllocator, Layout, Signals, to_device

__all__ = [
    "BatchedAllocator", "Overflow", "TilePlan", "TileWeightAllocator", "band_bounds", "band_regions", "by_token_count", "cat_rows", "equal_shares",
    "exact_ratio", "floor_share", "host_ints", "read_groups", "solve_plans", "split_thumbnail_tiles", "upload",
]  # fmt: skip

#: What happens to tokens a partition cannot hold: handed to the others ("redistribute",
#: water-filling) or dropped after clamping at capacity ("discard", the released code).
Overflow = Literal["redistribute", "discard"]


def exact_ratio(share: float) -> tuple[int, int]:
    """``share`` as the decimal it was written as: ``0.7 -> (7, 10)``, ``1/3 -> (1, 3)``.

    Both ints stay below 2**53, so they pass through apportion's float64 weights exactly;
    ``0.7`` as a binary float is slightly below 7/10 and would floor ``0.7 * 10`` to 6.
    """
    ratio = Fraction(repr(float(share))).limit_denominator(10**12)
    return ratio.numerator, ratio.denominator


def floor_share(share: float, total: int) -> int:
    """``floor(share * total)`` with ``share`` read as its decimal (see :func:`exact_ratio`)."""
    num, den = exact_ratio(share)
    return (num * total) // den


def split_thumbnail_tiles(
    weights: tuple[float, float],
    total: int,
    thumbnail_capacity: int,
    tiles_capacity: int,
    rounding: Rounding,
) -> tuple[int, int]:
    """Tokens for the thumbnail and for all tiles together, ``(thumbnail, tiles)``.

    The split is capacity-aware (what one side cannot hold goes to the other) and
    monotone in ``total``. Under ``"floor"`` only the thumbnail's quota is floored; the
    tiles take the rest (they are floored tile by tile afterwards), as in HiRED's
    Algorithm 1 (``N_sub = N_budget - N_p0``).
    """
    capacity = [thumbnail_capacity, tiles_capacity]
    target = min(total, thumbnail_capacity + tiles_capacity)
    thumbnail = int(apportion(list(weights), total, capacity, rounding)[0])
    # Under floor the tiles' side is target - floor(q_thumb) <= tiles_capacity: when the
    # tiles are full, q_thumb = target - tiles_capacity is an integer.
    return thumbnail, target - thumbnail


def band_bounds(num_tiles: int, tokens: int) -> list[int]:
    """Chunk boundaries of :func:`band_regions`: tile ``i`` owns ``[b[i], b[i + 1])``."""
    return [(i * tokens) // num_tiles for i in range(num_tiles + 1)]


def band_regions(num_tiles: int, tokens: int) -> torch.Tensor:
    """The released HiRED code's regions: tile ``i`` owns the ``i``-th contiguous chunk of
    the flattened thumbnail (horizontal bands), ``[num_tiles, tokens]`` float 0/1.

    Chunk ``i`` is ``[floor(i * N / K), floor((i + 1) * N / K))``; for LLaVA-NeXT's grids
    (K in 2..4, N = 576) every chunk has N / K tokens, as in the released code.
    """
    bounds = torch.tensor(band_bounds(num_tiles, tokens))
    position = torch.arange(tokens)
    inside = (position[None, :] >= bounds[:-1, None]) & (position[None, :] < bounds[1:, None])
    return inside.float()


def equal_shares(capacity: Sequence[int], total: int, rounding: Rounding = "exact") -> list[int]:
    """:func:`tokenprune.apportion` of equal weights, in closed form on host ints.

    Equal weights fill every partition to one water level ``L`` (capped at capacity); the
    seats of level ``L + 1`` go to the lowest-numbered partitions that can hold them, which
    is the order apportion's schedule hands them out in (every partition reaches a level at
    the same total; ties go to the lower index). ``"floor"`` drops those extra seats.
    """
    caps = [int(c) for c in capacity]
    target = min(int(total), sum(caps))
    low, high = 0, max(caps, default=0)
    while low < high:  # the highest level L with sum(min(c, L)) <= target
        middle = (low + high + 1) // 2
        if sum(min(c, middle) for c in caps) <= target:
            low = middle
        else:
            high = middle - 1
    shares = [min(c, low) for c in caps]
    left = target - sum(shares)
    if rounding == "floor":
        # floor of the exact quota: the level is fractional unless nothing is left over
        return shares
    for i, c in enumerate(caps):
        if left and c > low:
            shares[i] += 1
            left -= 1
    return shares


def upload(
    values: Sequence[tuple[int, ...]], layouts: Sequence[Layout], signals: Sequence[Signals] = ()
) -> tuple[list[torch.Tensor], list[tuple[int, ...]]]:
    """Per-image host budgets as int64 tensors on the signals' device (else the layouts'),
    one non-blocking transfer for the batch, with the host copies: what
    :meth:`BudgetAllocator.allocate_counted` returns."""
    device = signals_device(signals, layouts)
    sizes = [len(v) for v in values]
    flat = to_device(torch.tensor([x for v in values for x in v], dtype=torch.int64), device)
    return list(torch.split(flat, sizes)), list(values)


def signals_device(signals: Sequence[Signals], layouts: Sequence[Layout]) -> torch.device:
    """Where the batch's signals live (where selectors will want the budgets); the layouts'
    device when the signals hold no tensor (geometry-only strategies)."""
    for signal in signals[:1]:
        for tensor in signal._tensors():
            return tensor.device
    return layouts[0].valid.device if layouts else torch.device("cpu")


class BatchedAllocator(BudgetAllocator):
    """A built-in allocator: the whole batch in :meth:`allocate_counted`; the per-image and
    per-batch entry points are that one pass."""

    def allocate(self, layout: Layout, signals: Signals, total: int) -> torch.Tensor:
        return self.allocate_batch([layout], [signals], [total])[0]

    def allocate_batch(
        self, layouts: Sequence[Layout], signals: Sequence[Signals], totals: Sequence[int]
    ) -> list[torch.Tensor]:
        return self.allocate_counted(layouts, signals, totals)[0]

    @abstractmethod
    def allocate_counted(
        self, layouts: Sequence[Layout], signals: Sequence[Signals], totals: Sequence[int]
    ) -> tuple[list[torch.Tensor], list[tuple[int, ...]]]:
        """Budgets of every image and their host copies, in one pass over the batch."""


class TileWeightAllocator(BatchedAllocator):
    """An allocator that weighs each image's tiles (``hired``, ``hero``): the weights of the
    whole batch in one pass (:meth:`_weights`, read in one transfer), one :class:`TilePlan`
    per image (:meth:`_plan`), the integer shares on the host (:func:`solve_plans`, exact
    apportion), uploaded in one transfer."""

    rounding: Rounding

    def allocate_counted(
        self, layouts: Sequence[Layout], signals: Sequence[Signals], totals: Sequence[int]
    ) -> tuple[list[torch.Tensor], list[tuple[int, ...]]]:
        for layout, signal in zip(layouts, signals):
            if layout.tiles != (0, 0):
                signal.require(self.needs, who=f"allocator {self.registry_name!r}")
        weights = self._weights(layouts, signals)
        plans = [self._plan(layout, w, total) for layout, w, total in zip(layouts, weights, totals)]
        thumbnail_capacity = [layout.capacity_counts[0] for layout in layouts]
        values = [tuple(v) for v in solve_plans(plans, totals, thumbnail_capacity, self.rounding)]
        return upload(values, layouts, signals)

    @abstractmethod
    def _weights(self, layouts: Sequence[Layout], signals: Sequence[Signals]) -> list[list[float] | None]:
        """Per image, its tile weights on the host (``None`` where it has none to weigh)."""

    @abstractmethod
    def _plan(self, layout: Layout, weights: list[float] | None, total: int) -> TilePlan | list[int]:
        """One image's plan (a ``list[int]`` is already its budgets)."""


def cat_rows(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The batch's per-image tensors stacked along dim 0 (no op for one image)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors))


def host_ints(columns: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Host int lists as int64 tensors on ``device``: one upload (and one split) for all of them."""
    flat = to_device(torch.tensor([x for column in columns for x in column], dtype=torch.int64), device)
    return torch.split(flat, [len(column) for column in columns])


def by_token_count(layouts: Sequence[Layout], chosen: Sequence[int]) -> list[list[int]]:
    """``chosen`` image indices grouped by tokens per partition (one group per tower; rows of
    different widths cannot share a tensor). The groups' order is fixed by the first member."""
    groups: dict[int, list[int]] = {}
    for b in chosen:
        groups.setdefault(layouts[b].tokens_per_partition, []).append(b)
    return list(groups.values())


def read_groups(
    groups: Sequence[list[int]], values: Sequence[torch.Tensor], sizes: Sequence[int], images: int
) -> list[list[float] | None]:
    """Per-image host rows of ``values`` (one flat tensor per group, ``sizes[b]`` entries per
    image ``b`` in group order), read in ONE transfer; images in no group get ``None``."""
    flat = cat_rows(values).tolist() if values else []
    out: list[list[float] | None] = [None] * images
    start = 0
    for group in groups:
        for b in group:
            out[b] = flat[start : start + sizes[b]]
            start += sizes[b]
    return out


@dataclass
class TilePlan:
    """How one image's budget splits: the thumbnail's part (if any), then the tiles by weight.

    ``split``: weights of the capacity-aware thumbnail/tiles split (``split_thumbnail_tiles``),
    or ``None`` when ``thumbnail`` and ``pool`` are fixed already (the released "discard"
    arithmetic, or no thumbnail: ``thumbnail=None``). ``discard``: tiles get
    ``min(floor(share of pool), capacity)`` from an uncapped apportion, the excess dropped.
    """

    weights: list[float]
    tile_capacity: list[int]
    split: tuple[float, float] | None = None
    thumbnail: int | None = None
    pool: int = 0
    discard: bool = False


def solve_plans(
    plans: Sequence[TilePlan | list[int]], totals: Sequence[int], thumbnail_capacity: Sequence[int], rounding: Rounding
) -> list[list[int]]:
    """Integer budgets of a batch of plans (a ``list[int]`` plan is already the answer), with
    two batched :func:`~tokenprune.budget.apportion_many` calls: the splits, then the tiles."""
    splits = [
        (i, plan)
        for i, plan in enumerate(plans)
        if isinstance(plan, TilePlan) and plan.split is not None
    ]
    split_shares = apportion_many(
        [(list(plan.split), totals[i], [thumbnail_capacity[i], sum(plan.tile_capacity)]) for i, plan in splits],  # type: ignore[arg-type]
        rounding,
    )
    for (i, plan), shares in zip(splits, split_shares):
        target = min(totals[i], thumbnail_capacity[i] + sum(plan.tile_capacity))
        plan.thumbnail, plan.pool = shares[0], target - shares[0]
    tiled = [(i, plan) for i, plan in enumerate(plans) if isinstance(plan, TilePlan)]
    problems = [
        (plan.weights, plan.pool, [plan.pool] * len(plan.tile_capacity) if plan.discard else plan.tile_capacity)
        for _, plan in tiled
    ]
    tile_shares = apportion_many(problems, "floor" if any(p.discard for _, p in tiled) else rounding)
    out: list[list[int]] = [list(plan) if not isinstance(plan, TilePlan) else [] for plan in plans]
    for (i, plan), shares in zip(tiled, tile_shares):
        if plan.discard:
            shares = [min(s, c) for s, c in zip(shares, plan.tile_capacity)]
        out[i] = ([] if plan.thumbnail is None else [plan.thumbnail]) + shares
    return out
