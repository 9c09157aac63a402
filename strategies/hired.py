"""HiRED's token-budget distribution: thumbnail share α, tiles by thumbnail CLS attention."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from tokenprune.strategies._budget import (
    Overflow,
    TilePlan,
    TileWeightAllocator,
    band_bounds,
    band_regions,
    by_token_count,
    cat_rows,
    exact_ratio,
    floor_share,
    host_ints,
    read_groups,
    split_thumbnail_tiles,
)
from tokenprune.strategies._scores import reduce_heads

from tokenprune import (
    ConfigError,
    Layout,
    Needs,
    Signals,
    register_allocator,
    register_preset,
)
from tokenprune.budget import Rounding

__all__ = ["HiredAllocator", "Overflow", "band_regions", "split_thumbnail_tiles"]  # the last three: from _budget

@register_allocator("hired")
@dataclass(frozen=True)
class HiredAllocator(TileWeightAllocator):
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
        device = signals.attention(self.init_layer).device
        return torch.tensor(self._weights([layout], [signals])[0], dtype=torch.float64, device=device)

    def _weights(self, layouts: Sequence[Layout], signals: Sequence[Signals]) -> list[list[float] | None]:
        """Tile scores of every image with a thumbnail (``None`` for the others), read to the
        host in ONE transfer; a fixed set of ops per batch (per token count, in practice one)."""
        groups = by_token_count(layouts, [b for b, layout in enumerate(layouts) if layout.has_thumbnail])
        values = [self._group_weights([layouts[b] for b in g], [signals[b] for b in g]) for g in groups]
        return read_groups(groups, values, [layout.num_partitions - 1 for layout in layouts], len(layouts))

    def _group_weights(self, layouts: Sequence[Layout], signals: Sequence[Signals]) -> torch.Tensor:
        """Tile scores of images with thumbnails and one token count, float64 ``[sum K]``."""
        attention = cat_rows([signal.attention(self.init_layer) for signal in signals])  # [sum P, H, N]
        device = attention.device
        tokens = layouts[0].tokens_per_partition
        starts = [0]
        for layout in layouts[:-1]:
            starts.append(starts[-1] + layout.num_partitions)
        owner = [g for g, layout in enumerate(layouts) for _ in range(layout.num_partitions - 1)]
        bands = [band_bounds(layout.num_partitions - 1, tokens) for layout in layouts] if self.region == "bands" else []
        low = [x for b in bands for x in b[:-1]]
        high = [x for b in bands for x in b[1:]]
        thumbnails, owner_t, low_t, high_t = host_ints([starts, owner, low, high], device)
        scores = reduce_heads(attention.index_select(0, thumbnails), "sum")  # [B, N]
        valid = cat_rows([layout.valid_on(device) for layout in layouts]).index_select(0, thumbnails)
        if self.aggregation == "count":
            fraction = 1.0 - self.alpha if self.topk_fraction is None else self.topk_fraction
            k = int(tokens * fraction)
            masked = scores.masked_fill(~valid, float("-inf"))
            order = torch.sort(masked, dim=1, descending=True, stable=True).indices  # ties: lowest index
            content = torch.zeros_like(scores).scatter_(1, order[:, :k], 1.0)
        else:
            content = scores
        content = (content * valid).double()  # float64: region sums of float32 scores lose nothing
        if self.region == "bands":
            position = torch.arange(tokens, device=device)
            regions = ((position >= low_t[:, None]) & (position < high_t[:, None])).double()
        else:
            regions = cat_rows([layout.overlap_on(device) for layout in layouts]).double()  # type: ignore[misc]
        return (regions * content.index_select(0, owner_t)).sum(dim=1)

    # ------------------------------------------------------------------ plan
    def _plan(self, layout: Layout, weights: list[float] | None, total: int) -> TilePlan | list[int]:
        capacity = list(layout.capacity_counts)
        if layout.tiles == (0, 0):
            return [min(total, capacity[0])]
        if weights is None:  # tiles without a thumbnail: equal shares
            return TilePlan([1.0] * layout.num_partitions, capacity, pool=total)
        tile_capacity = capacity[1:]
        if self.overflow == "discard":
            thumbnail = min(floor_share(self.alpha, total), capacity[0])
            pool = min(total - thumbnail, len(tile_capacity) * layout.tokens_per_partition)
            return TilePlan(weights, tile_capacity, thumbnail=thumbnail, pool=pool, discard=True)
        num, den = exact_ratio(self.alpha)
        return TilePlan(weights, tile_capacity, split=(num, den - num))


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
