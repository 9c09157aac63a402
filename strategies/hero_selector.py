"""HERO's function-aware token selection: high layers for the thumbnail, low layers for tiles."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tokenprune.strategies._scores import BatchedSelector, topk_stacked

from tokenprune import (
    ConfigError,
    Layout,
    Needs,
    Selection,
    Signals,
    register_preset,
    register_selector,
)
from tokenprune.contracts import to_device

__all__ = ["HeroSelector"]


@register_selector("hero")
@dataclass(frozen=True)
class HeroSelector(BatchedSelector):
    """Top-b tokens by head-averaged CLS attention: high layers on the thumbnail, low on tiles (HERO).

    HERO ("HERO: Rethinking Visual Token Early Dropping in High-Resolution Large
    Vision-Language Models", §4 "Token Selection", Eq. 5-6) gives the two views different
    jobs. The global thumbnail keeps the "artifact" tokens that late blocks' CLS attention
    concentrates on (scene-level context); each local tile keeps the "object" tokens that
    low-to-middle blocks attend to (fine detail). A token's score is the CLS->patch
    attention averaged over heads, then averaged over the listed blocks; each partition
    keeps its ``budgets[p]`` best valid tokens in spatial order, ties to the lower index
    (so the selection is nested).

    Options:
        high_layers: blocks scoring the thumbnail. Default ``(-3,)``: block 21 of a
            24-block tower, the paper's best setting (appendix A), following the tower's depth.
        low_layers: blocks scoring the tiles. Default ``(5, 6, 7, 8)`` (absolute), the paper's
            best setting.
        double_softmax: apply the released code's second softmax (see below). Off by default.

    Which partitions are "the thumbnail": partition 0 when ``layout.has_thumbnail``. Every
    other partition (tiles, tiles of a layout without a thumbnail, and the single partition
    of LLaVA-1.5 / ShareGPT4V) uses ``low_layers``: with no separate global view, a
    partition's job is detail, the role HERO gives object tokens (paper §3.3). ``needs``
    still lists ``high_layers`` (it cannot know the layout in advance), but they are only
    read when a thumbnail exists.

    Differences from the released code (Lxxx-0327/HERO), all kept by ``hero@reference``
    except where stated:
        * The released code applies a second softmax to each head's CLS row (the patch
          columns of an already-softmaxed attention row, padding tokens included) before
          averaging heads and layers. ``double_softmax=True`` reproduces it. It is NOT only a
          tie/precision effect: softmax is monotone per head, but the average over heads of
          ``exp(a_h) / Z_h`` weights each head by ``1 / Z_h`` and is convex in ``a``, so the
          ranking of the averaged scores can change (a token one head attends to strongly
          gains on a token several heads attend to moderately). Since ``a <= 1`` the
          softmaxed values all lie near ``1 / N``: in the released fp16 computation many of
          them round to ties.
        * Scores are ranked in float32 and ties go to the lower index; the released code
          ranks fp16 scores with ``torch.topk``, whose order among ties is unspecified, so
          its picks among fp16-rounded ties cannot be reproduced exactly (not kept).
        * The released code reads attention from ``output_attentions=True`` (eager, every
          block's full map); the tap here reads only the CLS rows of the named blocks.
          The numbers are the same.
        * The thumbnail is ranked among its valid tokens only; the released code ranks all
          576 thumbnail tokens (LLaVA-NeXT's thumbnail has no padding, so this only matters
          for other layouts). Tiles are ranked among valid tokens in both.
        * Budgets come from the allocator (see the ``hero`` allocator for the thumbnail's
          ``int(576 R)`` quota and the floored tile shares).
    """

    high_layers: tuple[int, ...] = (-3,)
    low_layers: tuple[int, ...] = (5, 6, 7, 8)
    double_softmax: bool = False

    def check(self) -> None:
        for name in ("high_layers", "low_layers"):
            layers: tuple[int, ...] = getattr(self, name)
            if not layers:
                raise ConfigError(f"hero: option {name} must name at least one block, got ()")
            if len(set(layers)) != len(layers):
                raise ConfigError(
                    f"hero: option {name}={layers!r} lists a block twice; list each block once "
                    "(the score is the plain mean over the listed blocks)"
                )

    @property
    def needs(self) -> Needs:
        return Needs(cls_attention=set(self.high_layers) | set(self.low_layers))

    def select_counted(
        self,
        layouts: Sequence[Layout],
        signals: Sequence[Signals],
        budgets: Sequence[torch.Tensor],
        counts: Sequence[tuple[int, ...]],
    ) -> list[Selection]:
        # Every listed block of every image in one stack [blocks x partitions, H, N]; thumbnail
        # rows take the high blocks' score, every other row the low blocks'.
        thumbnails = [layout.has_thumbnail and p == 0 for layout in layouts for p in range(layout.num_partitions)]
        layers = self.low_layers + (self.high_layers if any(thumbnails) else ())
        rows = [signal.attention(layer) for layer in layers for signal in signals]
        attention = (torch.cat(rows) if len(rows) > 1 else rows[0]).float()
        if self.double_softmax:
            # The released code's softmax over each head's patch columns (padding included).
            attention = attention.softmax(dim=-1)
        per_layer = attention.mean(dim=1).view(len(layers), len(thumbnails), -1)  # heads averaged
        scores = _mean_of(per_layer, 0, len(self.low_layers))
        if any(thumbnails):
            high = _mean_of(per_layer, len(self.low_layers), len(layers))
            is_thumbnail = to_device(torch.tensor(thumbnails), scores.device)
            scores = torch.where(is_thumbnail[:, None], high, scores)
        kept = topk_stacked(scores, layouts, budgets, counts, what="HERO CLS-attention scores")
        return [Selection(indices=indices) for indices in kept]


def _mean_of(per_layer: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Mean of ``per_layer[start:stop]``, added block by block in the listed order: a
    reduction over the block dim may add in another order and move float ties."""
    total = per_layer[start]
    for layer in range(start + 1, stop):
        total = total + per_layer[layer]
    return total / (stop - start)


register_preset(
    "selector",
    "hero@reference",
    {"double_softmax": True},
    doc="""HERO's token selection as the released code computes it (Lxxx-0327/HERO), second softmax included.

    Keeps: a second softmax over each head's CLS->patch row (all N columns, padding included) before heads are averaged.
    Keeps: that softmax can reorder tokens (per-head 1/Z_h weights, convex in the attention), not only break ties.
    Keeps: thumbnail scored by block 21 of 24 (high_layers=(-3,)), tiles by blocks 5-8 (low_layers=(5, 6, 7, 8)).
    Differs: float32 scores, ties to the lower index (released: fp16 scores, torch.topk's unspecified tie order).
    Differs: the thumbnail is ranked among its valid tokens only (LLaVA-NeXT's thumbnail has none padded).""",
)
