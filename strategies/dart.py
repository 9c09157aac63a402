"""DART: keep the tokens least duplicated by a few pivot tokens (duplication over importance)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from tokenprune.strategies._scores import BatchedSelector, by_width

from tokenprune import (
    ConfigError,
    Layout,
    Needs,
    Selection,
    Signals,
    register_selector,
)
from tokenprune.contracts import finite_or_raise, to_device

__all__ = ["Dart"]


@register_selector("dart")
@dataclass(frozen=True)
class Dart(BatchedSelector):
    """Duplication-aware token reduction (DART; Wen et al., "Stop Looking for Important Tokens in
    Multimodal Language Models: Duplication Matters More", EMNLP 2025, arXiv 2502.11494).

    Training-free and attention-free. Per partition with budget ``b``:

    1. **Pivots**: the ``min(pivots, b)`` valid tokens with the largest L1 norm of their
       features (``pivot_score="feature_norm"``) or of their keys in block ``key_layer``
       (``"key_norm"``, the paper's "max K-norm" criterion). They are kept.
    2. **Least duplicated**: the pivots take turns, in descending norm order; pivot ``j``
       keeps the ``q_j`` remaining valid tokens least cosine-similar to it (on the
       features), which then leave the pool. The ``b - pivots`` picks are shared as evenly as
       possible (``q_j`` differ by at most one, the first pivots get the extra ones), so
       exactly ``b`` tokens are kept.

    Options:
        pivots: pivot tokens per partition (default 8: the paper's 4 image + 4 text pivots;
            before the LLM there is no text, so all are image tokens).
        pivot_score: ``"feature_norm"`` (default) or ``"key_norm"``.
        key_layer: tower block whose keys rank the pivots under ``"key_norm"``.

    Deviations from the paper and its released code (ZichenWen1/DART):
        * **Where**: DART prunes inside the LLM, after layer K = 2 (keys of layer K-1 for the
          pivots, the final-normed hidden states entering layer K for the similarity).
          tokenprune prunes between the vision tower and the LLM, so it reads what exists
          there: ``Signals.features`` (on Qwen2(.5)-VL the merger output, i.e. the LLM's input
          embeddings; on LLaVA the tower's feature-layer tokens, before the projector) and,
          under ``"key_norm"``, the tower's keys. No prompt token takes part.
        * **Text pivots**: the released code adds 4 text pivots (largest key norm among the
          prompt tokens) whose dissimilar image tokens are kept too; there are no text tokens
          here, so their share goes to image pivots (``pivots=8`` keeps the paper's count).
        * **Exact budget**: the released code gives every pivot ``floor(B / 8)`` picks and
          keeps the image pivots on top (``4 + 8 * floor(B / 8)`` tokens, e.g. 132 for a
          budget of 128); here the pivots count against the budget and the remainder is
          spread, so exactly ``b`` tokens are kept.
        * **Order and ties**: the released code visits the pivots in Python-set order and
          breaks ties with ``torch.topk``; here pivots go in descending norm order and ties
          go to the lower token index, so results are deterministic. Scores are float32.
        * Padding tokens never compete (the released code has none).
        * Not ``nested``: the per-pivot quotas move with ``b``.
    """

    pivots: int = 8
    pivot_score: Literal["feature_norm", "key_norm"] = "feature_norm"
    key_layer: int = -1

    nested: ClassVar[bool] = False

    def check(self) -> None:
        if self.pivots < 1:
            raise ConfigError(f"dart: pivots must be an int >= 1, got {self.pivots}")

    @property
    def needs(self) -> Needs:
        if self.pivot_score == "key_norm":
            return Needs(features=True, keys={self.key_layer})
        return Needs(features=True)

    def select_counted(
        self,
        layouts: Sequence[Layout],
        signals: Sequence[Signals],
        budgets: Sequence[torch.Tensor],
        counts: Sequence[tuple[int, ...]],
    ) -> list[Selection]:
        """Every partition of every image in one pass (per token count), sized by the host counts."""
        for signal in signals:
            signal.require(self.needs, who="selector 'dart'")

        def run(group: list[int]) -> list[tuple[torch.Tensor, ...]]:
            def stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
                return torch.cat(tensors) if len(tensors) > 1 else tensors[0]

            features = stacked([signals[i].features for i in group]).float()  # type: ignore[misc]
            features = finite_or_raise(features, "dart features")
            if self.pivot_score == "feature_norm":
                norms_of = features
            else:
                norms_of = finite_or_raise(stacked([signals[i].key(self.key_layer) for i in group]).float(), "dart keys")
            device = features.device
            valid = stacked([layouts[i].valid_on(device) for i in group])
            wanted = to_device(stacked([budgets[i] for i in group]), device).long()
            kept = least_duplicated(features, norms_of.abs().sum(dim=-1), valid, wanted, self.pivots)  # L1 norms
            sizes = [c for i in group for c in counts[i]]
            pieces = torch.split(torch.nonzero_static(kept, size=sum(sizes))[:, 1], sizes)
            out, start = [], 0
            for i in group:
                out.append(tuple(pieces[start : start + len(counts[i])]))
                start += len(counts[i])
            return out

        return [Selection(indices=kept) for kept in by_width(run, layouts)]


def _first_by(order_key: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """bool ``[R, N]``: the ``count[r]`` entries of each row with the smallest key (ties: lower index)."""
    order = torch.sort(order_key, dim=1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return rank < count[:, None]


def least_duplicated(
    features: torch.Tensor, pivot_scores: torch.Tensor, valid: torch.Tensor, budgets: torch.Tensor, pivots: int
) -> torch.Tensor:
    """bool ``[R, N]`` kept mask of DART's selection for rows of ``features`` ``[R, N, D]``.

    Batched over rows (partitions of any number of images); one loop step per pivot.
    """
    rows, tokens = valid.shape
    device = features.device
    active = torch.minimum(budgets, torch.full_like(budgets, pivots))  # pivots per row
    descending = -pivot_scores.masked_fill(~valid, float("-inf"))
    by_norm = torch.sort(descending, dim=1, stable=True).indices
    taken = _first_by(descending, active)
    unit = torch.nn.functional.normalize(features, dim=-1)
    rest = budgets - active
    share, extra = rest // active.clamp(min=1), rest % active.clamp(min=1)
    row = torch.arange(rows, device=device)
    for j in range(min(pivots, tokens)):
        quota = torch.where(j < active, share + (j < extra).long(), torch.zeros_like(share))
        pivot = unit[row, by_norm[:, j]]  # [R, D]
        similarity = torch.einsum("rnd,rd->rn", unit, pivot)
        similarity = similarity.masked_fill(taken | ~valid, float("inf"))
        taken = taken | _first_by(similarity, quota)
    return taken
