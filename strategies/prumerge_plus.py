"""PruMerge+: PruMerge's attention outliers plus spatially uniform tokens, merged alike."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch
from tokenprune.strategies._prumerge_common import (
    REFERENCE_OPTIONS,
    PartitionScores,
    PruMergeBase,
)
from tokenprune.strategies._scores import attention_order

from tokenprune import ConfigError, register_preset, register_selector

__all__ = ["PruMergePlus", "attention_part", "bisection_order", "spatial_order", "stride_points"]

# Float slack for the split rule, so that e.g. (1 - 0.7) * 10 counts as 3, not 3.0000000000000004.
_SLACK = 1e-9


def attention_part(kept: int, spatial_share: float) -> int:
    """Attention-picked tokens among ``kept``: ``ceil((1 - spatial_share) * kept)``.

    Non-decreasing in ``kept`` by steps of at most one, so every prefix of the priority
    order stays balanced between the two sources; the first token is always by attention.
    """
    return max(0, min(kept, math.ceil((1.0 - spatial_share) * kept - _SLACK)))


@lru_cache(maxsize=256)
def _bisection_ranks(length: int) -> tuple[int, ...]:
    ranks = [0] * length
    for rank, position in enumerate(bisection_order(length).tolist()):
        ranks[position] = rank
    return tuple(ranks)


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


def spatial_order(valid: torch.Tensor, side: int) -> torch.Tensor:
    """Valid token indices of one partition in a coarse-to-fine 2-D order.

    Rows and columns of the valid region's bounding box are each ranked by
    :func:`bisection_order`; a token's priority is ``max(row_rank / rows, col_rank / cols)``
    (ranks counted from 1), then the smaller of the two, then raster order. So the first
    ``r * c`` tokens at matching fractions form a ``r x c`` grid of spread rows and columns,
    and in between, a new row or column fills coarse to fine. Prefixes are nested by
    construction. Tokens outside the valid mask are skipped.
    """
    count = int(valid.sum())
    if count == 0:
        return torch.zeros(0, dtype=torch.long, device=valid.device)
    grid = valid.view(side, side)
    rows_used = torch.nonzero(grid.any(dim=1)).flatten()
    cols_used = torch.nonzero(grid.any(dim=0)).flatten()
    top, bottom = int(rows_used[0]), int(rows_used[-1]) + 1
    left, right = int(cols_used[0]), int(cols_used[-1]) + 1
    height, width = bottom - top, right - left
    row_rank = torch.full((side,), float("inf"), dtype=torch.float64)
    col_rank = torch.full((side,), float("inf"), dtype=torch.float64)
    row_rank[top:bottom] = (torch.tensor(_bisection_ranks(height), dtype=torch.float64) + 1) / height
    col_rank[left:right] = (torch.tensor(_bisection_ranks(width), dtype=torch.float64) + 1) / width
    row_level = row_rank[:, None].expand(side, side).flatten()
    col_level = col_rank[None, :].expand(side, side).flatten()
    primary = torch.maximum(row_level, col_level)
    secondary = torch.minimum(row_level, col_level)
    order = torch.arange(side * side)
    order = order[torch.sort(secondary[order], stable=True).indices]
    order = order[torch.sort(primary[order], stable=True).indices]
    order = order.to(valid.device)
    return order[valid[order]]


def stride_points(ratio: float, tokens: int) -> torch.Tensor:
    """The released 1-D stride: raster indices ``0, s, 2s, ... < tokens - 1``.

    ``s = int(int(1 / ratio) / 3)`` as released (it never reaches the last token). Where the
    released code crashes we take the limit instead: ``ratio = 0`` (division by zero) gives
    an infinite stride, i.e. index 0 only; ``s = 0`` (``ratio > 1/3``) gives stride 1.
    """
    end = max(tokens - 1, 0)
    if ratio <= 0:
        return torch.arange(0, min(1, end))
    stride = max(1, int(int(1 / ratio) / 3))
    return torch.arange(0, end, stride)


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
    not already kept, in raster order; a budget truncates this list from its end. The stride
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
          the crashes are replaced by limits (see :func:`stride_points`); batches work per image.
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

    def _fixed_counts(self, caps: list[int], budgets: list[int], tokens: int) -> tuple[list[int], list[float]]:
        """``spatial="stride"`` with ``count="budget"`` (the released ``if_adaptive=False``
        branch): the top ``int(N * ratio)`` attention tokens, then the stride of that ratio;
        ``ratio`` is ``fixed_ratio`` (required there by :meth:`check`)."""
        if self.spatial != "stride" or self.count != "budget":
            return super()._fixed_counts(caps, budgets, tokens)
        assert self.fixed_ratio is not None
        ratios = [self.fixed_ratio] * len(caps)
        counts = [min(int(tokens * r), c) for r, c in zip(ratios, caps)]
        return counts, ratios

    def _auto_kept(self, part: PartitionScores) -> int:
        capacity = int(part.valid.sum())
        attention_count = part.attention_count
        if self.spatial == "stride":
            return int(self._stride_extra(part).numel()) + attention_count
        # The largest m whose attention part is the adaptive count.
        kept = min(capacity, math.floor(attention_count / (1.0 - self.spatial_share) + _SLACK))
        while kept < capacity and attention_part(kept + 1, self.spatial_share) <= attention_count:
            kept += 1
        while kept > 0 and attention_part(kept, self.spatial_share) > attention_count:
            kept -= 1
        return kept

    def _stride_extra(self, part: PartitionScores) -> torch.Tensor:
        """Valid stride points not among the top ``attention_count`` tokens, ascending."""
        valid = part.valid
        points = stride_points(part.ratio, int(valid.numel())).to(valid.device)
        taken = torch.zeros_like(valid)
        taken[attention_order(part.scores, valid)[: part.attention_count]] = True
        return points[valid[points] & ~taken[points]]

    def _keep_mask(self, part: PartitionScores, kept: int) -> torch.Tensor:
        """The attention part of ``kept`` by CLS attention, the rest spatial (grid or stride)."""
        by_attention = attention_order(part.scores, part.valid)
        keep = torch.zeros_like(part.valid)
        if self.spatial == "stride":
            picked = min(kept, part.attention_count)
            keep[by_attention[:picked]] = True
            keep[self._stride_extra(part)[: kept - picked]] = True
            return keep
        picked = attention_part(kept, self.spatial_share)
        keep[by_attention[:picked]] = True
        order = spatial_order(part.valid, part.side)
        free = ~keep[order]
        # The first (kept - picked) spatial tokens that attention did not already take.
        keep[order[free & (torch.cumsum(free, dim=0) <= kept - picked)]] = True
        return keep


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
