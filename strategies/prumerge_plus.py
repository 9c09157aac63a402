"""PruMerge+: PruMerge's attention outliers plus spatially uniform tokens, merged alike."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch
from tokenprune.strategies._prumerge_common import (
    REFERENCE_OPTIONS,
    PartitionRows,
    PruMergeBase,
)

from tokenprune import ConfigError, register_preset, register_selector

__all__ = [
    "PruMergePlus",
    "attention_part",
    "attention_parts",
    "bisection_order",
    "spatial_order",
    "spatial_orders",
    "stride_mask",
    "stride_points",
]

# Float slack for the split rule, so that e.g. (1 - 0.7) * 10 counts as 3, not 3.0000000000000004.
_SLACK = 1e-9


def attention_part(kept: int, spatial_share: float) -> int:
    """Attention-picked tokens among ``kept``: ``ceil((1 - spatial_share) * kept)``.

    Non-decreasing in ``kept`` by steps of at most one, so every prefix of the priority
    order stays balanced between the two sources; the first token is always by attention.
    """
    return max(0, min(kept, math.ceil((1.0 - spatial_share) * kept - _SLACK)))


def attention_parts(kept: torch.Tensor, spatial_share: float) -> torch.Tensor:
    """:func:`attention_part` of every entry of ``kept`` (int64), in float64 on its device."""
    exact = kept.double()
    return ((1.0 - spatial_share) * exact - _SLACK).ceil().clamp(min=0).minimum(exact).long()


def bisection_order(length: int) -> torch.Tensor:
    """Positions ``0..length-1`` coarse to fine: every prefix spread over the whole range.

    Recursive bisection: the middle of ``[0, length)`` first, then the middles of the two
    halves, and so on; within one level the intervals go in bit-reversed order, so a
    partly done level is spread too. For 6: ``3, 1, 5, 0, 4, 2``. One loop per level.
    """
    if length <= 0:
        return torch.zeros(0, dtype=torch.long)
    starts = torch.tensor([0])
    ends = torch.tensor([length])
    codes = torch.tensor([0])
    picked: list[torch.Tensor] = []
    level = 0
    while starts.numel():
        middles = (starts + ends) // 2
        reversed_codes = torch.zeros_like(codes)
        for bit in range(level):
            reversed_codes |= ((codes >> bit) & 1) << (level - 1 - bit)
        picked.append(middles[torch.argsort(reversed_codes, stable=True)])
        starts, ends, codes = (
            torch.cat([starts, middles + 1]),
            torch.cat([middles, ends]),
            torch.cat([codes * 2, codes * 2 + 1]),
        )
        nonempty = starts < ends
        starts, ends, codes = starts[nonempty], ends[nonempty], codes[nonempty]
        level += 1
    return torch.cat(picked)


@lru_cache(maxsize=64)
def _bisection_rank_table(side: int) -> torch.Tensor:
    """int64 ``[side + 1, side]``: row ``L`` holds each position's rank in ``bisection_order(L)``
    (zero beyond ``L``); built once per side on the host."""
    table = torch.zeros(side + 1, side, dtype=torch.long)
    for length in range(1, side + 1):
        table[length, bisection_order(length)] = torch.arange(length)
    return table


def _axis_levels(used: torch.Tensor, side: int) -> torch.Tensor:
    """float64 ``[R, side]``: ``(bisection rank + 1) / length`` of each line inside the span of
    the used lines of each row of ``used`` (bool ``[R, side]``), ``inf`` outside it."""
    positions = torch.arange(side, device=used.device)
    first = torch.where(used, positions, side).amin(dim=1, keepdim=True)
    end = torch.where(used, positions + 1, 0).amax(dim=1, keepdim=True)
    length = (end - first).clamp(min=0)
    offset = positions - first
    inside = (offset >= 0) & (positions < end)
    table = _bisection_rank_table(side).to(used.device)
    rank = table[length, offset.clamp(min=0, max=side - 1)]
    return torch.where(inside, (rank + 1).double() / length, float("inf"))


def spatial_orders(valid: torch.Tensor, side: int) -> torch.Tensor:
    """int64 ``[T, N]``: every row's token indices in a coarse-to-fine 2-D order (all rows at once).

    Rows and columns of each row's valid bounding box are ranked by :func:`bisection_order`;
    a token's priority is ``max(row_rank / rows, col_rank / cols)`` (ranks counted from 1),
    then the smaller of the two, then raster order. So the first ``r * c`` tokens at
    matching fractions form a ``r x c`` grid of spread rows and columns, and in between, a
    new row or column fills coarse to fine. Tokens outside the box come last; padding
    inside it is NOT skipped here (callers mask with ``valid``).
    """
    slots = valid.shape[0]
    grid = valid.view(slots, side, side)
    levels = _axis_levels(torch.cat([grid.any(dim=2), grid.any(dim=1)]), side)
    rows, cols = levels[:slots, :, None], levels[slots:, None, :]
    primary = torch.maximum(rows, cols).view(slots, side * side)
    secondary = torch.minimum(rows, cols).view(slots, side * side)
    by_secondary = secondary.sort(dim=1, stable=True).indices
    by_primary = primary.gather(1, by_secondary).sort(dim=1, stable=True).indices
    return by_secondary.gather(1, by_primary)


def spatial_order(valid: torch.Tensor, side: int) -> torch.Tensor:
    """Valid token indices of one partition in the coarse-to-fine 2-D order of
    :func:`spatial_orders` (padding skipped). Prefixes are nested by construction."""
    order = spatial_orders(valid[None], side)[0]
    return order[valid[order]]


def stride_mask(ratio: torch.Tensor, tokens: int) -> torch.Tensor:
    """bool ``[T, tokens]``: the raster indices of :func:`stride_points` for each ratio of ``ratio``."""
    positions = torch.arange(tokens, device=ratio.device)
    positive = ratio > 0
    # The released stride in float64: int(int(1 / ratio) / 3), at least 1; ratio 0: infinite.
    step = (1.0 / torch.where(positive, ratio, 1.0)).floor().div(3).floor().clamp(min=1)
    stride = torch.where(positive, step, float(tokens)).long()
    return (positions % stride[:, None] == 0) & (positions < tokens - 1)


def stride_points(ratio: float, tokens: int) -> torch.Tensor:
    """The released 1-D stride: raster indices ``0, s, 2s, ... < tokens - 1``.

    ``s = int(int(1 / ratio) / 3)`` as released (it never reaches the last token). Where the
    released code crashes we take the limit instead: ``ratio = 0`` (division by zero) gives
    an infinite stride, i.e. index 0 only; ``s = 0`` (``ratio > 1/3``) gives stride 1.
    """
    return torch.nonzero(stride_mask(torch.tensor([float(ratio)], dtype=torch.float64), tokens)[0]).flatten()


@register_selector("prumerge_plus")
@dataclass(frozen=True)
class PruMergePlus(PruMergeBase):
    """PruMerge plus spatially uniform tokens on a 2-D grid, all merged alike (PruMerge+).

    Shang et al., "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal
    Models" (2024), PruMerge+: the attention-picked tokens of :class:`PruMerge` are
    supplemented by spatially uniform tokens, so regions the CLS token ignores keep some
    presence; then every kept token is merged with its key neighbours and the summary token
    of the pruned ones is appended, exactly as in ``prumerge`` (same options, same merge).

    Split (``spatial="grid"``, default): of ``m`` kept tokens, ``attention_part(m) =
    ceil((1 - spatial_share) * m)`` are the top CLS-attention tokens and the remaining ones
    the first tokens of :func:`spatial_order` (a coarse-to-fine 2-D grid over the valid
    region's rows and columns) not already taken by attention. ``spatial_share=0.75`` is the
    released proportion (its stride yields about three spatial tokens per attention token).
    With ``count="budget"``, ``m`` is the budget (minus one for the summary, as in
    ``prumerge``); with ``count="auto"`` the IQR outliers ``c`` set ``m`` to the largest
    count whose attention part is ``c`` (``c / (1 - spatial_share)`` tokens), capped by the
    budget. Both sources grow monotonically with ``m``, so kept sets are nested.

    ``spatial="stride"`` (released): the ``c`` attention tokens, then the raster indices of
    :func:`stride_points` (stride ``int(int(1 / ratio) / 3)``, ``ratio`` the outlier share)
    not already kept, in raster order; a budget truncates this list from its end (a list
    shorter than the budget keeps fewer tokens: with a fixed ratio the pipeline then refuses it). The stride
    draws column stripes whenever it divides the grid side (e.g. stride 6 on a 24 x 24 grid
    keeps columns 0, 6, 12, 18 of every row). Its stride comes from the adaptive ratio
    (``count="auto"``), or from ``fixed_ratio`` with ``count="budget"``: the released
    fixed-ratio branch (``if_adaptive=False``), which keeps the top ``int(N * fixed_ratio)``
    attention tokens plus the stride points of that ratio, here within the budget.
    ``spatial_share`` is then unused.

    Options (besides those of ``prumerge``):
        spatial: ``"grid"`` (2-D, nested, budget-exact) or ``"stride"`` (released 1-D).
        spatial_share: share of the kept tokens placed spatially, in ``[0, 1)``; 0 is PruMerge.
        fixed_ratio: with ``spatial="stride"`` and ``count="budget"`` only: the released
            fixed-ratio branch's ratio, in ``(0, 1]`` (attention count and stride).

    Differences from the released code (``token_prune_merge_advanced_plus``), beyond those
    of ``prumerge`` under the default options:
        * A 2-D grid of the valid region instead of a 1-D raster stride [spatial="stride"].
        * Within the allocator's budget, split ``ceil(m / 4)`` attention : rest spatial,
          instead of the adaptive count plus however many stride points fall outside it.
        * Not restorable: spatial tokens are never padding; the kept set is in spatial order
          (the released code emits attention tokens by descending score, then stride points);
          the crashes are replaced by limits (see :func:`stride_points`); batches work (each
          image its own stride points, one pass for the whole batch).
    """

    spatial: Literal["grid", "stride"] = "grid"
    spatial_share: float = 0.75
    fixed_ratio: float | None = None

    def check(self) -> None:
        super().check()
        name = self.registry_name or type(self).__name__
        if not 0.0 <= self.spatial_share < 1.0:
            raise ConfigError(
                f"{name}: spatial_share={self.spatial_share} must lie in [0, 1) (the share of kept "
                "tokens placed on the spatial grid; 0 is plain PruMerge)"
            )
        if self.fixed_ratio is not None and not 0.0 < self.fixed_ratio <= 1.0:
            raise ConfigError(f"{name}: fixed_ratio={self.fixed_ratio} must lie in (0, 1] (or be None)")
        if self.spatial == "stride" and self.count == "budget" and self.fixed_ratio is None:
            raise ConfigError(
                f"{name}: spatial='stride' takes its stride from the outlier ratio: use count='auto' "
                "(adaptive), or count='budget' with fixed_ratio=r (the released fixed-ratio branch), "
                "or spatial='grid' with a budget"
            )
        if self.fixed_ratio is not None and (self.spatial != "stride" or self.count != "budget"):
            raise ConfigError(
                f"{name}: fixed_ratio is the released fixed-ratio branch's ratio; it needs "
                f"spatial='stride' and count='budget', got spatial={self.spatial!r}, count={self.count!r}"
            )

    def _fixed_counts(self, capacity: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``spatial="stride"`` with ``count="budget"`` (the released ``if_adaptive=False``
        branch): the top ``int(N * ratio)`` attention tokens, then the stride of that ratio;
        ``ratio`` is ``fixed_ratio`` (required there by :meth:`check`)."""
        if self.spatial != "stride" or self.count != "budget":
            return super()._fixed_counts(capacity, tokens)
        assert self.fixed_ratio is not None
        ratio = torch.full(capacity.shape, self.fixed_ratio, dtype=torch.float64, device=capacity.device)
        return capacity.clamp(max=int(tokens * self.fixed_ratio)), ratio

    def _auto_kept(self, rows: PartitionRows) -> torch.Tensor:
        if self.spatial == "stride":
            return self._stride_extra(rows).sum(dim=1) + rows.attention_count
        # The largest m (at most the capacity) whose attention part is the adaptive count.
        tokens = rows.valid.shape[1]
        candidates = torch.arange(tokens + 1, device=rows.valid.device)
        fits = (attention_parts(candidates, self.spatial_share) <= rows.attention_count[:, None]) & (
            candidates <= rows.capacity[:, None]
        )
        return fits.sum(dim=1) - 1  # attention_part is non-decreasing and m = 0 always fits

    def _stride_extra(self, rows: PartitionRows) -> torch.Tensor:
        """bool ``[T, N]``: valid stride points not among each row's top ``attention_count`` tokens."""
        points = stride_mask(rows.ratio, rows.valid.shape[1])
        return points & rows.valid & (rows.rank >= rows.attention_count[:, None])

    def _reached(self, rows: PartitionRows, kept: torch.Tensor) -> torch.Tensor | None:
        """The stride may run out of points (``count="auto"`` when the summary slot becomes a
        token, or a fixed ratio below the budget); the grid always reaches ``kept``."""
        if self.spatial != "stride":
            return None
        picked = torch.minimum(kept, rows.attention_count)
        return picked + torch.minimum(self._stride_extra(rows).sum(dim=1), kept - picked)

    def _keep_mask(self, rows: PartitionRows, kept: torch.Tensor) -> torch.Tensor:
        """The attention part of ``kept`` by CLS attention, the rest spatial (grid or stride)."""
        if self.spatial == "stride":
            picked = torch.minimum(kept, rows.attention_count)
            extra = self._stride_extra(rows)
            spatial = extra & (extra.cumsum(dim=1) <= (kept - picked)[:, None])
            return (rows.rank < picked[:, None]) | spatial
        picked = attention_parts(kept, self.spatial_share)
        by_attention = rows.rank < picked[:, None]
        order = spatial_orders(rows.valid, rows.side)
        free = (rows.valid & ~by_attention).gather(1, order)
        # The first (kept - picked) spatial tokens that attention did not already take.
        take = free & (free.cumsum(dim=1) <= (kept - picked)[:, None])
        return by_attention | torch.zeros_like(take).scatter_(1, order, take)


register_preset(
    "selector",
    "prumerge_plus@reference",
    {**REFERENCE_OPTIONS, "spatial": "stride"},
    doc="""PruMerge+ as released (42Shawn/LLaVA-PruMerge): batch IQR count plus a 1-D raster stride.

    Keeps: everything prumerge@reference keeps (wide head, batch-pooled IQR ratio, no minimum,
    unnormalised merge over the 32 nearest of all other tokens, unnormalised summary token).
    Keeps: the spatial tokens: step = int(1 / ratio), every int(step / 3)-th raster index below N - 1
    (the last token is never a stride point) that attention did not already keep; a 1-D stride, so
    column stripes whenever it divides the grid side; about 3 spatial tokens per attention token.
    Keeps: every kept token (attention and spatial) merged with its neighbours; the summary of the rest.
    Cannot keep: the order (released: attention tokens by descending score, then stride points;
    here spatial order); padding tokens (never kept); the budget still caps the count, truncating
    the stride points first, then the attention tokens.
    Fixed ratio (the released if_adaptive=False branch): add count="budget", fixed_ratio=r; the top
    int(N * r) attention tokens, then the stride points of r not already kept, within the budget.
    Cannot keep there: the released branch appends the stride points WITHOUT removing those already
    kept by attention (duplicates) and then drops tokens to its count; a Selection holds each token
    once, so duplicates are skipped and the next stride points fill their places.
    Not reproduced: ratio 0 (uniform attention) divides by zero in the released code; here the
    limit of an infinite stride: raster index 0 only. ratio > 1/3 gives stride 0 (arange error);
    here stride 1. Batch > 1 crashes there (stride indices built for one image); here per image,
    with the batch-pooled ratio.""",
)
