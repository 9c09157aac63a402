"""Score helpers shared by the built-in strategies (pure tensor code)."""

from __future__ import annotations

from typing import Literal

import torch

from tokenprune.contracts import finite_or_raise
from tokenprune.errors import ConfigError, ContractError

__all__ = ["reduce_heads", "topk_per_partition", "mean_attention"]

HeadReduction = Literal["sum", "mean"]


def reduce_heads(attention: torch.Tensor, how: HeadReduction) -> torch.Tensor:
    """``[P, H, N] -> [P, N]`` in float32, summing or averaging heads."""
    attention = attention.float()
    if how == "sum":
        return attention.sum(dim=1)
    if how == "mean":
        return attention.mean(dim=1)
    raise ConfigError(f"head reduction must be 'sum' or 'mean', got {how!r}")


def mean_attention(signals_attention: list[torch.Tensor], how: HeadReduction) -> torch.Tensor:
    """Average of several layers' head-reduced CLS attention, ``[P, N]`` float32."""
    stacked = torch.stack([reduce_heads(a, how) for a in signals_attention])
    return stacked.mean(dim=0)


def topk_per_partition(
    scores: torch.Tensor, valid: torch.Tensor, budgets: torch.Tensor, *, what: str = "scores"
) -> tuple[torch.Tensor, ...]:
    """Indices of the ``budgets[p]`` highest valid scores of each partition, ascending.

    Ties go to the lower index (stable sort), so the result at budget ``b`` is a subset of
    the result at ``b + 1``. Padding tokens are never chosen; a budget above a partition's
    valid count is a :class:`~tokenprune.ContractError` (allocators must cap at capacity).
    """
    if scores.shape != valid.shape:
        raise ContractError(f"{what} have shape {tuple(scores.shape)}, valid mask {tuple(valid.shape)}")
    scores = scores.float()
    finite_or_raise(scores, what)  # after the cast: a float64 score below float32's range would tie with padding
    if (
        not isinstance(budgets, torch.Tensor)
        or tuple(budgets.shape) != (scores.shape[0],)
        or budgets.dtype.is_floating_point
        or budgets.dtype == torch.bool
        or bool((budgets < 0).any())
    ):
        raise ContractError(
            f"budgets must be non-negative integers of shape [{scores.shape[0]}], got {budgets!r}"
        )
    valid = valid.to(scores.device)
    budgets = budgets.to(scores.device)
    if bool((budgets > valid.sum(dim=1)).any()):
        raise ContractError(
            f"budgets {budgets.tolist()} exceed the valid tokens per partition {valid.sum(dim=1).tolist()}"
        )
    masked = scores.masked_fill(~valid, float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    keep = rank < budgets[:, None]
    return tuple(torch.nonzero(row).flatten() for row in keep)
