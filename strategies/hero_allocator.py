"""HERO's tile importance: CLS similarity to the thumbnail fused with prompt relevance."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tokenprune.strategies._budget import (
    Overflow,
    TilePlan,
    TileWeightAllocator,
    cat_rows,
    host_ints,
)

from tokenprune import (
    ConfigError,
    Layout,
    Needs,
    Signals,
    register_allocator,
    register_preset,
)
from tokenprune.budget import Rounding

__all__ = ["HeroAllocator"]


@register_allocator("hero")
@dataclass(frozen=True)
class HeroAllocator(TileWeightAllocator):
    """HERO: thumbnail keeps ratio R; tiles split the rest by CLS similarity and prompt relevance.

    HERO ("Token Budgeting", Eqs. 1-4): with R = total / (P * N) the image's retention
    ratio, the thumbnail's quota is R * N; the K tiles share the rest by

        sim_i   = softmax_i(cos(CLS_i, CLS_thumbnail) / tau_visual)
        clip_i  = softmax_i(relevance_i / tau_text)
        fused_i = density_weight * density_i
                  + (1 - density_weight) * (saliency_weight * sim_i + (1 - saliency_weight) * clip_i)

    where CLS is the tower's CLS hidden state at the output of block ``embedding_layer``
    (last block: raw hidden state, no post-layernorm or projection), ``relevance`` the
    raw cosine of each tile's CLIP image embedding with the prompt's text embedding
    (``Signals.relevance``, from the adapter's ``relevance_scorer``), and
    ``density_i`` tile i's share of the tiles' valid tokens. Softmaxes run over tiles.

    Options:
        tau_visual, tau_text: temperatures > 0. Default 0.05, the middle of the paper's
            grid {0.01, 0.03, 0.05, 0.07, 0.09}: the paper's chosen values were not
            recoverable, so these defaults are UNVERIFIED.
        saliency_weight: lambda in [0, 1], the weight of the visual term (1 = no prompt
            relevance needed). Default 0.5, UNVERIFIED: the paper reports an inverted-U
            peak inside [0, 1] without a recoverable value.
        density_weight: in [0, 1]; default 0 (the paper has no density term); the
            released code uses 0.2 (``hero@reference``).
        embedding_layer: block whose output CLS is compared (default -1, the last).
        rounding: ``"exact"`` (default) or ``"floor"``.
        overflow: ``"redistribute"`` (default; a tile full to capacity hands the rest to
            the others) or ``"discard"`` (needs ``rounding="floor"``; the released code:
            thumbnail ``floor(total / P)``, tiles ``N_local = floor(K * total / P)``,
            ``b_i = min(floor(fused_i * N_local), valid_i)``, the excess dropped).

    Deviations from the released code (Lxxx-0327/HERO), in the default setting: exact
    budgets (the thumbnail and tiles split ``total`` in ratio 1 : K via
    :func:`tokenprune.apportion`, capacity-aware and house-monotone) instead of floors
    with the remainder and clamped excess discarded; no density term; R is derived from
    the integer budget (``total / (P * N)``), not from the requested fraction, so the
    two agree whenever ``R * P * N`` is an integer.

    Layouts: a single partition gets the whole budget. Tiles without a thumbnail have
    no thumbnail CLS to compare with: the saliency term is uniform over tiles (the text
    and density terms still apply) and the tiles share the whole budget.
    """

    tau_visual: float = 0.05
    tau_text: float = 0.05
    saliency_weight: float = 0.5
    density_weight: float = 0.0
    embedding_layer: int = -1
    rounding: Rounding = "exact"
    overflow: Overflow = "redistribute"

    def check(self) -> None:
        for name in ("tau_visual", "tau_text"):
            value = getattr(self, name)
            if not value > 0.0:
                raise ConfigError(f"hero: {name}={value!r} must be > 0 (a softmax temperature)")
        for name in ("saliency_weight", "density_weight"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"hero: {name}={value!r} must lie in [0, 1]")
        if self.overflow == "discard" and self.rounding != "floor":
            raise ConfigError(
                "hero: overflow='discard' drops tokens, so it needs rounding='floor'; "
                "with rounding='exact' use overflow='redistribute'"
            )

    @property
    def uses_saliency(self) -> bool:
        return self.density_weight < 1.0 and self.saliency_weight > 0.0

    @property
    def uses_relevance(self) -> bool:
        return self.density_weight < 1.0 and self.saliency_weight < 1.0

    @property
    def needs(self) -> Needs:
        return Needs(
            cls_embedding={self.embedding_layer} if self.uses_saliency else frozenset(),
            relevance=self.uses_relevance,
        )

    # ------------------------------------------------------------------ weights
    def tile_weights(self, layout: Layout, signals: Signals) -> torch.Tensor:
        """``fused_i`` of every tile, float64 ``[K]`` on the signals' device, summing to 1."""
        used = [signals.embedding(self.embedding_layer)] if self.uses_saliency and layout.has_thumbnail else []
        used += [signals.relevance] if self.uses_relevance and signals.relevance is not None else []
        device = used[0].device if used else torch.device("cpu")
        return torch.tensor(self._weights([layout], [signals])[0], dtype=torch.float64, device=device)

    def _weights(self, layouts: Sequence[Layout], signals: Sequence[Signals]) -> list[list[float] | None]:
        """``fused_i`` of every image with tiles (``None`` for single partitions).

        The softmaxes of the whole batch run on the device in one padded pass (images x
        tiles, padding at -inf) and are read in ONE transfer; the weighted sums are a few
        float64 products per tile, done on the host on the read values in the same order.
        """
        tiled = [b for b, layout in enumerate(layouts) if layout.tiles != (0, 0)]
        salient = [b for b in tiled if self.uses_saliency and layouts[b].has_thumbnail]
        relevant = tiled if self.uses_relevance else []
        parts = []
        if salient:
            embedding = cat_rows([signals[b].embedding(self.embedding_layer) for b in salient]).float()
            rows, firsts = _tile_rows([layouts[b] for b in salient])
            tiles, thumbnails = host_ints([rows, firsts], embedding.device)
            cosine = torch.nn.functional.cosine_similarity(
                embedding.index_select(0, tiles), embedding.index_select(0, thumbnails), dim=-1
            )
            parts.append(_softmax_per_image(cosine / self.tau_visual, [layouts[b] for b in salient]))
        if relevant:
            relevance = cat_rows([signals[b].relevance for b in relevant]).float()  # type: ignore[misc]
            (tiles,) = host_ints([_tile_rows([layouts[b] for b in relevant])[0]], relevance.device)
            parts.append(_softmax_per_image(relevance.index_select(0, tiles) / self.tau_text, [layouts[b] for b in relevant]))
        flat = cat_rows(parts).tolist() if parts else []
        read: dict[tuple[str, int], list[float]] = {}
        start = 0
        for kind, chosen in (("saliency", salient), ("text", relevant)):
            for b in chosen:
                count = layouts[b].num_partitions - layouts[b].tile_slice.start
                read[kind, b] = flat[start : start + count]
                start += count
        out: list[list[float] | None] = [None] * len(layouts)
        for b in tiled:
            out[b] = self._fuse(layouts[b], read.get(("saliency", b)), read.get(("text", b)))
        return out

    def _fuse(self, layout: Layout, saliency: list[float] | None, text: list[float] | None) -> list[float]:
        """``fused_i`` from the softmaxed terms, in float64 (the paper's Eq. 4)."""
        capacity = layout.capacity_counts[layout.tile_slice]
        count = len(capacity)
        uniform = [1.0 / count] * count
        mixed = [0.0] * count
        if self.uses_saliency:
            mixed = [m + self.saliency_weight * s for m, s in zip(mixed, saliency or uniform)]
        if self.uses_relevance:
            assert text is not None
            mixed = [m + (1.0 - self.saliency_weight) * t for m, t in zip(mixed, text)]
        filled = sum(capacity)
        density = [c / filled for c in capacity] if filled > 0 else uniform
        return [self.density_weight * d + (1.0 - self.density_weight) * m for d, m in zip(density, mixed)]

    # ------------------------------------------------------------------ plan
    def _plan(self, layout: Layout, weights: list[float] | None, total: int) -> TilePlan | list[int]:
        capacity = list(layout.capacity_counts)
        if weights is None:
            return [min(total, capacity[0])]
        tile_capacity = capacity[layout.tile_slice]
        count = len(tile_capacity)
        discard = self.overflow == "discard"
        if not layout.has_thumbnail:
            return TilePlan(weights, tile_capacity, pool=total, discard=discard)
        if discard:
            thumbnail = min(total // layout.num_partitions, capacity[0])
            local = count * total // layout.num_partitions  # N_local = int(K * N * R), R = total / (P * N)
            return TilePlan(weights, tile_capacity, thumbnail=thumbnail, pool=local, discard=True)
        return TilePlan(weights, tile_capacity, split=(1, count))


def _tile_rows(layouts: Sequence[Layout]) -> tuple[list[int], list[int]]:
    """Rows of the tiles in the batch's stacked partitions, and the first row of each one's image."""
    rows, firsts, start = [], [], 0
    for layout in layouts:
        rows += range(start + layout.tile_slice.start, start + layout.num_partitions)
        firsts += [start] * (layout.num_partitions - layout.tile_slice.start)
        start += layout.num_partitions
    return rows, firsts


def _softmax_per_image(values: torch.Tensor, layouts: Sequence[Layout]) -> torch.Tensor:
    """Softmax over each image's tiles, ``values`` flat ``[sum K]``: one padded ``[B, max K]``
    softmax (padding at -inf adds exact zeros to each sum), float64."""
    counts = [layout.num_partitions - layout.tile_slice.start for layout in layouts]
    image = [g for g, count in enumerate(counts) for _ in range(count)]
    column = [k for count in counts for k in range(count)]
    image_t, column_t = host_ints([image, column], values.device)
    padded = values.new_full((len(counts), max(counts)), float("-inf")).index_put_((image_t, column_t), values)
    return padded.softmax(dim=1)[image_t, column_t].double()


register_preset(
    "allocator",
    "hero@reference",
    {"density_weight": 0.2, "rounding": "floor", "overflow": "discard"},
    doc="""HERO's tile budgets as the released code computes them (Lxxx-0327/HERO).

    Keeps: thumbnail int(N * R) = floor(total / P) tokens, R = total / (P * N).
    Keeps: N_local = int(K * N * R) = floor(K * total / P) for the K tiles.
    Keeps: b_i = min(floor(fused_i * N_local), valid_i); the remainder and the clamped excess are discarded.
    Keeps: fused_i = 0.2 * density_i + 0.8 * (lambda * sim_i + (1 - lambda) * clip_i), density_i = share of valid tokens.
    Keeps: CLS = raw last-layer hidden state of the tower (no post-layernorm, no projection).
    Differs: tau_visual, tau_text, lambda are this package's unverified defaults (0.05, 0.05, 0.5).
    Differs: R comes from the integer budget; a fraction budget whose R * P * N is not an integer may differ by a token.
    """,
)
