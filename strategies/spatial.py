"""The spatial baseline: keep (or pool to) a uniform 2-D grid of each partition's valid tokens."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar, Literal

import torch
from tokenprune.strategies._scores import BatchedSelector

from tokenprune import (
    Layout,
    Needs,
    Selection,
    Signals,
    register_preset,
    register_selector,
)

__all__ = ["Spatial"]

SpatialMode = Literal["sample", "pool", "stride"]


@register_selector("spatial")
@dataclass(frozen=True)
class Spatial(BatchedSelector):
    """Spatial baseline: an even 2-D lattice of valid tokens (or its average pooling), no scores.

    The content-blind baseline of HiRED's comparison (Arif et al., AAAI 2025, §5, Table 3,
    "Spatial"; "spatial pooling" after Marin et al. 2023). Reads no attention.

    Modes:
        ``"sample"`` (default): keeps EXACTLY ``b`` valid tokens spread evenly in 2-D over
            the partition's valid region. The valid tokens' bounding box (``h`` x ``w``
            tokens) carries an ``r`` x ``c`` lattice of cell centres, ``r * c >= b``,
            ``r <= h``, ``c <= w``, with the finest spacing ``max(h / r, w / c)`` (so it
            follows the box's aspect), then the fewest spare points: 10 x 10 at ``b = 100``,
            10 x 10 less 3 at ``b = 97``, 17 x 17 less 1 at ``b = 288``. Spare points are the
            last ones in an ordered-dither (Bayer) order of the lattice, which spreads them
            evenly, so every budget is met exactly, prime or not. When the valid region is not
            a rectangle, the lattice is made denser by ``area / valid`` so that about ``b``
            points land on valid tokens; if more land, the same dither order keeps ``b`` of
            them; if fewer, the rest are the first other valid tokens in a dither order of the
            box (also even in 2-D).
        ``"pool"``: average-pools the valid region to the largest ``r`` x ``c`` grid with
            ``r * c <= b`` whose shape follows the region's aspect (``r = floor(sqrt(b h /
            w))``, ``c = floor(b / r)``, both capped at the region's size). Cells are
            disjoint bands ``[floor(i h / r), floor((i + 1) h / r))`` (unlike
            ``adaptive_avg_pool2d``, whose cells overlap when ``r`` does not divide ``h``);
            padding tokens are not averaged and a cell with no valid token is dropped.
            ``Selection.features`` holds the averages; each cell is represented in
            ``indices`` by its valid token nearest the cell's centre (ties: lower index).
            Adaptive: it keeps ``r * c <= b`` tokens and reports the count.
        ``"stride"``: the released code's 1-D raster stride (preset ``spatial@reference``):
            ``gap = N // b``, keep ``range(0, N - 1, gap)``, widened to the smallest gap whose
            stride holds at most ``b`` tokens (``gap = max(N // b, ceil((N - 1) / b))``);
            positions on padding are dropped, not replaced. Adaptive.

    ``nested`` is ``False``: the lattice (or pooling grid) is chosen for each budget (10 x 10
    at ``b = 100``, 10 x 11 less one at ``b = 109``), so the tokens kept at ``b`` are not in
    general kept at ``b + 1``. An order whose every prefix is nested (an ordered-dither
    ranking) cannot also be a regular lattice at every budget; the baseline is meant to be
    the most even grid at the budget asked for.

    Differences from the released code (hasanar1f/HiRED's "Spatial X%" baseline), for
    ``"sample"`` / ``"pool"``:
        * The released code keeps ``range(0, 575, 576 // int(576 * X))``: a 1-D stride in
          raster order, which draws column stripes whenever the gap divides 24 (at 40 % it
          keeps 288 tokens, every other column, for a budget of 230), can keep MORE than the
          budget, never keeps token 575, and keeps padding tokens. Here the budget is met
          exactly with an even 2-D lattice of valid tokens. See ``"stride"`` mode for the
          released behaviour.
    """

    mode: SpatialMode = "sample"

    #: The lattice is chosen per budget (see above).
    nested: ClassVar[bool] = False

    @property
    def adaptive(self) -> bool:  # type: ignore[override]
        """``"pool"`` and ``"stride"`` keep at most the budget and report their count."""
        return self.mode != "sample"

    @property
    def needs(self) -> Needs:
        return Needs(features=True) if self.mode == "pool" else Needs()

    def select_counted(
        self,
        layouts: Sequence[Layout],
        signals: Sequence[Signals],
        budgets: Sequence[torch.Tensor],
        counts: Sequence[tuple[int, ...]],
    ) -> list[Selection]:
        """Per image, with the pipeline's host budgets (no host read for them)."""
        return [self._select(layout, signal, values) for layout, signal, values in zip(layouts, signals, counts)]

    def _select(self, layout: Layout, signals: Signals, values: Sequence[int]) -> Selection:
        if self.mode == "pool":
            signals.require(self.needs, who="selector 'spatial' (mode='pool')")
            assert signals.features is not None
            kept = [
                _pool(layout, p, b, signals.features[p]) for p, b in enumerate(values)
            ]
            return Selection(indices=tuple(i for i, _ in kept), features=tuple(f for _, f in kept))
        choose = _lattice if self.mode == "sample" else _stride
        return Selection(indices=tuple(choose(layout, p, b) for p, b in enumerate(values)))


# --------------------------------------------------------------------------- helpers


def _bounding_box(valid_grid: torch.Tensor) -> tuple[int, int, int, int]:
    """``(top, height, left, width)`` of the valid tokens of a non-empty ``[S, S]`` mask."""
    rows = torch.nonzero(valid_grid.any(dim=1)).flatten()
    cols = torch.nonzero(valid_grid.any(dim=0)).flatten()
    top, bottom, left, right = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    return top, bottom - top + 1, left, right - left + 1


def _bayer_rank(y: torch.Tensor, x: torch.Tensor, size: int) -> torch.Tensor:
    """Ordered-dither (Bayer) rank of cells ``(y, x)`` of a grid of side ``size``.

    Every prefix of this order is spread evenly over the plane (a 2^k lattice, then its
    centred copies), and ranks are unique, so sorting by them is deterministic.
    """
    bits = max(1, (size - 1).bit_length())
    mixed = y ^ x
    rank = torch.zeros_like(y)
    for bit in range(bits):  # the coordinates' low bits decide the rank's high bits
        shift = 2 * (bits - 1 - bit)
        rank |= ((mixed >> bit) & 1) << (shift + 1)
        rank |= ((y >> bit) & 1) << shift
    return rank


def _lattice_shape(target: int, height: int, width: int) -> tuple[int, int]:
    """``(r, c)``: ``r * c >= target`` points over a ``height`` x ``width`` box, ``r <= height``, ``c <= width``.

    ``target <= height * width``. Among ``r`` near ``sqrt(target * height / width)`` with
    ``c = ceil(target / r)`` (or ``c = width``, ``r = ceil(target / width)`` when that
    overflows), picks the finest coarser spacing ``max(height / r, width / c)``, then the
    fewest spare points, then fewer rows.
    """
    low = max(1, math.isqrt(target * height // width))
    best: tuple[tuple[Fraction, int, int], tuple[int, int]] | None = None
    for first in (low - 1, low, low + 1, low + 2):
        rows = min(max(first, 1), height)
        cols = -(-target // rows)
        if cols > width:
            cols = width
            rows = -(-target // width)
        key = (max(Fraction(height, rows), Fraction(width, cols)), rows * cols - target, rows)
        if best is None or key < best[0]:
            best = (key, (rows, cols))
    assert best is not None
    return best[1]


def _lattice(layout: Layout, p: int, budget: int) -> torch.Tensor:
    """``budget`` valid token indices of partition ``p`` on an even 2-D lattice, ascending."""
    valid = layout.valid[p]
    device = valid.device
    capacity = layout.capacity_counts[p]
    if budget == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    if budget == capacity:
        return torch.nonzero(valid).flatten()
    side = layout.tokens_per_side
    grid = valid.view(side, side)
    top, height, left, width = _bounding_box(grid)
    area = height * width
    target = min(area, -(-budget * area // capacity))  # lattice points needed to hit `budget` valid ones
    rows, cols = _lattice_shape(target, height, width)

    # Cell centres of an r x c partition of the box; r <= height, c <= width keeps them distinct.
    lattice_y = top + (torch.arange(rows, device=device) * 2 + 1) * height // (2 * rows)
    lattice_x = left + (torch.arange(cols, device=device) * 2 + 1) * width // (2 * cols)
    lattice = (lattice_y[:, None] * side + lattice_x[None, :]).flatten()

    # Priority (lower first): valid lattice points in ordered-dither order of their lattice
    # position, so the spare ones (last in that order) are spread evenly; then the other
    # valid tokens in ordered-dither order of the box, to fill what padding left short.
    big = 1 << (2 * max(1, (max(rows, cols, height, width) - 1).bit_length()))
    ii, jj = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
    yy, xx = torch.meshgrid(torch.arange(side, device=device), torch.arange(side, device=device), indexing="ij")
    priority = big + _bayer_rank((yy - top).clamp(min=0), (xx - left).clamp(min=0), max(height, width))
    priority = priority.flatten()
    priority[lattice] = _bayer_rank(ii, jj, max(rows, cols)).flatten()
    priority = priority.masked_fill(~valid, 4 * big)  # never chosen: budget <= capacity
    chosen = torch.sort(priority, stable=True).indices[:budget]
    return chosen.sort().values


def _stride(layout: Layout, p: int, budget: int) -> torch.Tensor:
    """The released 1-D stride ``range(0, N - 1, gap)``, widened to fit ``budget``, valid only."""
    valid = layout.valid[p]
    if budget == 0:
        return torch.zeros(0, dtype=torch.int64, device=valid.device)
    n = layout.tokens_per_partition
    gap = max(n // budget, -(-(n - 1) // budget), 1)
    positions = torch.arange(0, n - 1, gap, device=valid.device)
    return positions[valid[positions]]


def _pool_shape(budget: int, height: int, width: int) -> tuple[int, int]:
    """Largest ``(r, c)`` grid, ``r * c <= budget``, following ``height / width``."""
    rows = min(height, budget, max(1, math.isqrt(budget * height // width)))  # cols >= 1 below
    cols = min(width, budget // rows)
    if cols == width:
        rows = min(height, budget // width)
    return rows, cols


def _pool(layout: Layout, p: int, budget: int, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pooled features of partition ``p`` and one representative token per cell."""
    valid = layout.valid[p].to(features.device)
    device = features.device
    if budget == 0:
        return torch.zeros(0, dtype=torch.int64, device=device), features[:0]
    side = layout.tokens_per_side
    top, height, left, width = _bounding_box(valid.view(side, side))
    rows, cols = _pool_shape(budget, height, width)

    row_edges = torch.arange(rows + 1, device=device) * height // rows
    col_edges = torch.arange(cols + 1, device=device) * width // cols
    tokens = torch.nonzero(valid).flatten()
    y, x = tokens // side - top, tokens % side - left
    band_y = torch.bucketize(y, row_edges[1:-1], right=True)
    band_x = torch.bucketize(x, col_edges[1:-1], right=True)
    cell = band_y * cols + band_x

    cells = rows * cols
    sums = torch.zeros(cells, features.shape[1], dtype=torch.float32, device=device)
    sums.index_add_(0, cell, features[tokens].float())
    counts = torch.bincount(cell, minlength=cells)

    # Representative: the valid token nearest the cell centre (doubled coordinates stay integer).
    centre_y2 = row_edges[:-1] + row_edges[1:] - 1
    centre_x2 = col_edges[:-1] + col_edges[1:] - 1
    dist2 = (2 * y - centre_y2[band_y]) ** 2 + (2 * x - centre_x2[band_x]) ** 2
    key = dist2 * layout.tokens_per_partition + tokens
    best = torch.full((cells,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=device)
    best.scatter_reduce_(0, cell, key, reduce="amin")

    filled = counts > 0
    representative = best[filled] % layout.tokens_per_partition
    pooled = sums[filled] / counts[filled, None]
    order = torch.argsort(representative)
    return representative[order], pooled[order].to(features.dtype)


register_preset(
    "selector",
    "spatial@reference",
    {"mode": "stride"},
    doc="""The released "Spatial X%" baseline's 1-D raster stride (hasanar1f/HiRED).

    Keeps: gap = N // b and the tokens range(0, N - 1, gap), so token N - 1 is never kept.
    Keeps: the column stripes of that stride (every other column when the gap is 2).
    Differs: never more than b: the gap widens to max(N // b, ceil((N - 1) / b)) (b = 230: 192 tokens, not 288).
    Differs: stride positions on padding tokens are dropped, not replaced (adaptive count).
    Reproduce: give each partition the released count len(range(0, N - 1, N // int(N * X))): 115 at 20 %, 288 at 40 %.
    Reproduce: that keeps the released set exactly for every released int(N * X) >= 23 (N = 576).""",
)
