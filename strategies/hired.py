"""HiRED's token-budget distribution: thumbnail share α, tiles by thumbnail CLS attention."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import torch

from tokenprune import (
    BudgetAllocator,
    ConfigError,
    Layout,
    Needs,
    Signals,
    apportion,
    register_allocator,
    register_preset,
)
from tokenprune.budget import Rounding

from ._scores import reduce_heads

__all__ = ["HiredAllocator", "Overflow", "band_regions", "split_thumbnail_tiles"]

#: What happens to tokens a partition cannot hold: handed to the others ("redistribute",
#: water-filling) or dropped after clamping at capacity ("discard", the released code).
Overflow = Literal["redistribute", "discard"]


def _exact_ratio(share: float) -> tuple[int, int]:
    """``share`` as the decimal it was written as: ``0.7 -> (7, 10)``, ``1/3 -> (1, 3)``.

    Both ints stay below 2**53, so they pass through apportion's float64 weights exactly;
    ``0.7`` as a binary float is slightly below 7/10 and would floor ``0.7 * 10`` to 6.
    """
    ratio = Fraction(repr(float(share))).limit_denominator(10**12)
    return ratio.numerator, ratio.denominator


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


def band_regions(num_tiles: int, tokens: int) -> torch.Tensor:
    """The released code's regions: tile ``i`` owns the ``i``-th contiguous chunk of the
    flattened thumbnail (horizontal bands), ``[num_tiles, tokens]`` float 0/1.

    Chunk ``i`` is ``[floor(i * N / K), floor((i + 1) * N / K))``; for LLaVA-NeXT's grids
    (K in 2..4, N = 576) every chunk has N / K tokens, as in the released code.
    """
    bounds = torch.div(torch.arange(num_tiles + 1) * tokens, num_tiles, rounding_mode="floor")
    position = torch.arange(tokens)
    inside = (position[None, :] >= bounds[:-1, None]) & (position[None, :] < bounds[1:, None])
    return inside.float()


@register_allocator("hired")
@dataclass(frozen=True)
class HiredAllocator(BudgetAllocator):
    """HiRED: thumbnail gets share alpha; tiles split the rest by the thumbnail's early CLS attention.

    HiRED (Arif et al., AAAI 2025, "Token Budget Allocation", Algorithm 1 and Eq. 1):
    the thumbnail ("full image") receives ``alpha`` of the image's budget; each tile's
    *visual content score* is the thumbnail's block-``init_layer`` CLS attention, summed
    over heads, aggregated over the thumbnail patches that show that tile's region; the
    tiles share the rest in proportion to their scores.

    Options:
        alpha: thumbnail share in [0, 1] (paper default 0.5). Both ends work with tiles
            present: what one side cannot hold goes to the other.
        init_layer: block whose CLS attention weighs the tiles (paper: 0).
        aggregation: ``"sum"`` (default) adds the attention mass inside each region, as the
            paper's Eq. 1 and both versions of Algorithm 1 write it. ``"count"`` counts
            how many of the thumbnail's top-``k`` tokens fall in each region (the arXiv
            prose, "the number of highlighted patches", and the released code).
        topk_fraction: ``k = int(N * topk_fraction)`` for ``"count"``; ``None`` (default)
            means ``1 - alpha``, the released code's coupling.
        region: ``"overlap"`` (default) maps tile regions onto the thumbnail in true 2-D
            geometry with ``Layout.overlap`` (a patch straddling a border counts in
            proportion to its area on each side); ``"bands"`` gives tile ``i`` the
            ``i``-th contiguous chunk of the flattened thumbnail, the released code's
            mapping, right only for N x 1 grids.
        rounding: ``"exact"`` (default; sums to the budget, house-monotone) or
            ``"floor"`` (the paper's floors; the remainder is dropped).
        overflow: ``"redistribute"`` (default): a partition full to capacity hands the
            rest to the others. ``"discard"`` (needs ``rounding="floor"``): the released
            code's arithmetic, ``b0 = min(floor(alpha * total), cap0)``, tiles share
            ``min(total - b0, K * N)``, each tile ``min(floor(share), cap_i)``, the clamped
            excess is dropped.

    Deviations from the released code (hasanar1f/HiRED), in the default setting: exact
    budgets instead of floors; 2-D regions instead of bands; attention mass instead of
    a top-k count; no crash at ``alpha = 1`` (tiles get only what the thumbnail cannot
    hold; with ``"count"`` and ``k = 0`` they get equal weights); shares are capped at
    each partition's *valid* tokens, never at N (the released code budgets padding,
    which its unpadding then silently drops); thumbnail padding, if any, never counts
    as content. ``alpha`` is read as the decimal it is written as (0.29 means 29/100),
    where the released code multiplies in binary floating point.

    Layouts: a single partition (``tiles == (0, 0)``) gets the whole budget. Tiles
    without a thumbnail have no global view to weigh them by: they share the budget
    equally (HiRED's "Equal" baseline, Table 7) and ``alpha`` plays no part.
    """

    alpha: float = 0.5
    init_layer: int = 0
    aggregation: Literal["sum", "count"] = "sum"
    topk_fraction: float | None = None
    region: Literal["overlap", "bands"] = "overlap"
    rounding: Rounding = "exact"
    overflow: Overflow = "redistribute"

    def check(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"hired: alpha={self.alpha!r} must lie in [0, 1] (the thumbnail's share)")
        if self.topk_fraction is not None and not 0.0 <= self.topk_fraction <= 1.0:
            raise ConfigError(
                f"hired: topk_fraction={self.topk_fraction!r} must lie in [0, 1], or be None for 1 - alpha"
            )
        if self.topk_fraction is not None and self.aggregation != "count":
            raise ConfigError(
                "hired: topk_fraction only applies with aggregation='count'; "
                f"got aggregation={self.aggregation!r}"
            )
        if self.overflow == "discard" and self.rounding != "floor":
            raise ConfigError(
                "hired: overflow='discard' drops tokens, so it needs rounding='floor'; "
                "with rounding='exact' use overflow='redistribute'"
            )

    @property
    def needs(self) -> Needs:
        return Needs(cls_attention={self.init_layer})

    # ------------------------------------------------------------------ weights
    def tile_weights(self, layout: Layout, signals: Signals) -> torch.Tensor:
        """Visual content score of each tile, float64 ``[K]`` (needs a thumbnail)."""
        scores = reduce_heads(signals.attention(self.init_layer)[:1], "sum")[0]  # thumbnail, [N]
        valid = layout.valid[0].to(scores.device)
        tokens = layout.tokens_per_partition
        if self.aggregation == "count":
            fraction = 1.0 - self.alpha if self.topk_fraction is None else self.topk_fraction
            k = int(tokens * fraction)
            masked = scores.masked_fill(~valid, float("-inf"))
            order = torch.sort(masked, descending=True, stable=True).indices  # ties: lowest index
            content = torch.zeros_like(scores)
            content[order[:k]] = 1.0
        else:
            content = scores
        content = (content * valid).double()  # float64: region sums of float32 scores lose nothing
        if self.region == "bands":
            regions = band_regions(layout.num_partitions - 1, tokens).to(scores.device)
        else:
            assert layout.overlap is not None  # Layout guarantees it with a thumbnail
            regions = layout.overlap.to(scores.device)
        return regions.double() @ content

    # ------------------------------------------------------------------ allocate
    def allocate(self, layout: Layout, signals: Signals, total: int) -> torch.Tensor:
        device = layout.valid.device
        capacity = layout.capacity.cpu()
        if layout.tiles == (0, 0):
            return torch.tensor([min(total, int(capacity[0]))], dtype=torch.int64, device=device)
        signals.require(self.needs, who=f"allocator {self.registry_name!r}")
        if not layout.has_thumbnail:
            return apportion([1.0] * layout.num_partitions, total, capacity, self.rounding).to(device)

        tile_capacity = capacity[1:]
        weights = self.tile_weights(layout, signals).double().cpu()
        if self.overflow == "discard":
            thumbnail = min(_floor_share(self.alpha, total), int(capacity[0]))
            pool = min(total - thumbnail, tile_capacity.numel() * layout.tokens_per_partition)
            uncapped = apportion(weights, pool, [pool] * tile_capacity.numel(), "floor")
            tiles = torch.minimum(uncapped, tile_capacity)
        else:
            num, den = _exact_ratio(self.alpha)
            thumbnail, pool = split_thumbnail_tiles(
                (num, den - num), total, int(capacity[0]), int(tile_capacity.sum()), self.rounding
            )
            tiles = apportion(weights, pool, tile_capacity, self.rounding)
        return torch.cat([torch.tensor([thumbnail]), tiles]).to(dtype=torch.int64, device=device)


def _floor_share(share: float, total: int) -> int:
    """``floor(share * total)`` with ``share`` read as its decimal (see :func:`_exact_ratio`)."""
    num, den = _exact_ratio(share)
    return (num * total) // den


register_preset(
    "allocator",
    "hired@reference",
    {
        "alpha": 0.5,
        "init_layer": 0,
        "aggregation": "count",
        "topk_fraction": None,
        "region": "bands",
        "rounding": "floor",
        "overflow": "discard",
    },
    doc="""HiRED's budget distribution as the released code computes it (hasanar1f/HiRED).

    Keeps: thumbnail b0 = min(floor(alpha * total), cap0) with alpha = 0.5.
    Keeps: tiles share min(total - b0, K * N), K tiles of N tokens.
    Keeps: tile weight = count of the thumbnail's block-0 top-int(N * (1 - alpha)) tokens (heads summed) in its region.
    Keeps: regions are horizontal bands: tile i gets the i-th contiguous chunk of the flattened thumbnail (wrong for 2x2, 1x2, 1x3 grids).
    Keeps: each tile min(floor(share), capacity); the remainder and the clamped excess are discarded.
    Differs: shares are capped at valid tokens (the released code caps at N and loses padding later).
    Differs: alpha = 1 does not crash: top-0 counts are all zero, so the tiles share equally.
    Differs: alpha is read as its decimal (0.29 = 29/100); float products can floor one lower there. At alpha = 0.5 they agree.
    """,
)
