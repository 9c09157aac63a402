"""Keep the tokens that receive the most attention in one block: a CLS-free importance score."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from tokenprune.strategies._scores import BatchedSelector, topk_of_heads

from tokenprune import Layout, Needs, Selection, Signals, register_selector

__all__ = ["AttentionReceived"]


@register_selector("attention_received")
@dataclass(frozen=True)
class AttentionReceived(BatchedSelector):
    """Top-b tokens by the attention they receive in block ``layer`` (no CLS token needed).

    A token's score is its column of the block's attention map: per head, the softmax weights
    every query of the image gives it, averaged over the queries, then summed (or averaged)
    over heads (``Signals.received_attention``). It is the CLS-free counterpart of
    ``cls_final``: in towers without a CLS token (Qwen2-VL, Qwen2.5-VL, SigLIP) there is no
    CLS row, but the column sums rank the tokens the encoder itself leans on — the
    "attention received" criterion of FastV-style pruning (Chen et al., "An Image is Worth
    1/2 Tokens After Layer 2", ECCV 2024), read here in the vision tower instead of the LLM.

    On Qwen2(.5)-VL the tap reports it per merged (LLM) token: the sum over its 2 x 2 patches.
    In a windowed block of Qwen2.5-VL a query only attends inside its window, so the default
    ``layer=-1`` is a full-attention block there (the released configs' last block is one).

    Options:
        layer: block whose attention is read; negative counts from the end.
        heads: ``"sum"`` or ``"mean"`` over heads (the same ranking, up to float rounding).

    Ties go to the lower token index, so the kept set at ``b`` is a subset of the set at
    ``b + 1``; padding tokens never compete; scores are ranked in float32.
    """

    layer: int = -1
    heads: Literal["sum", "mean"] = "sum"

    @property
    def needs(self) -> Needs:
        return Needs(received_attention={self.layer})

    def select_counted(
        self,
        layouts: Sequence[Layout],
        signals: Sequence[Signals],
        budgets: Sequence[torch.Tensor],
        counts: Sequence[tuple[int, ...]],
    ) -> list[Selection]:
        rows = [signal.received(self.layer) for signal in signals]
        what = f"attention received in layer {self.layer}"
        return [Selection(indices=kept) for kept in topk_of_heads(rows, layouts, budgets, counts, self.heads, what=what)]
