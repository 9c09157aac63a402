"""HiRED's token dropping: top-b of one late layer's CLS attention per partition."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from tokenprune.strategies._scores import BatchedSelector, topk_of_heads

from tokenprune import Layout, Needs, Selection, Signals, register_selector

__all__ = ["ClsFinal"]


@register_selector("cls_final")
@dataclass(frozen=True)
class ClsFinal(BatchedSelector):
    """Top-b tokens by the CLS attention of one late block, heads summed (HiRED).

    Each partition keeps the ``budgets[p]`` valid tokens that the CLS token of block
    ``final_layer`` attends to most, in spatial (raster) order. This is HiRED's token
    dropping step (Arif et al., "HiRED: Attention-Guided Token Dropping for Efficient
    Inference of High-Resolution Vision-Language Models", AAAI 2025, §4.2 Phase 2, Eq. 2):
    the CLS row of block 22 of CLIP-L/14-336, patch columns only, summed over the 16 heads.

    Options:
        final_layer: encoder block whose CLS row ranks the tokens; negative counts from the
            end. The default ``-2`` is block 22 of a 24-block tower, the block whose output
            LLaVA feeds the LLM, and follows the tower's depth for other towers.
        heads: ``"sum"`` (HiRED) or ``"mean"`` over heads. The ranking is the same either
            way (the mean is the sum divided by a constant); only float rounding differs.

    Differences from the released code (hasanar1f/HiRED):
        * Ties go to the lower token index (stable sort), so the kept set at budget ``b`` is
          a subset of the set at ``b + 1``; the released code uses ``torch.topk``, whose order
          among equal scores is unspecified.
        * Scores are ranked in float32 whatever the signals' dtype; the released code ranks
          the model's fp16 scores, where near-equal scores become ties.
        * Padding tokens are never kept: only valid tokens compete. The released code ranks
          all 576 tokens of a tile, padding included.
        * The budget per partition comes from the allocator, exactly; the thumbnail/tile
          split and its flooring are the allocator's business (see ``hired``).
    """

    final_layer: int = -2
    heads: Literal["sum", "mean"] = "sum"

    @property
    def needs(self) -> Needs:
        return Needs(cls_attention={self.final_layer})

    def select_counted(
        self,
        layouts: Sequence[Layout],
        signals: Sequence[Signals],
        budgets: Sequence[torch.Tensor],
        counts: Sequence[tuple[int, ...]],
    ) -> list[Selection]:
        rows = [signal.attention(self.final_layer) for signal in signals]
        what = f"CLS attention of layer {self.final_layer}"
        return [Selection(indices=kept) for kept in topk_of_heads(rows, layouts, budgets, counts, self.heads, what=what)]
