"""Score helpers shared by the built-in strategies (pure tensor code)."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Literal, TypeVar

import torch

from tokenprune.budget import check_budget_tensor, check_budget_values, host_split
from tokenprune.contracts import (
    Layout,
    Selection,
    Selector,
    Signals,
    finite_or_raise,
    to_device,
)
from tokenprune.errors import ConfigError, ContractError

__all__ = ["BatchedSelector", "attention_order", "by_width", "host_budgets", "mean_attention", "reduce_heads", "topk_batch", "topk_of_heads", "topk_per_partition", "topk_stacked"]

HeadReduction = Literal["sum", "mean"]
T = TypeVar("T")


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


def attention_order(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Valid token indices of one partition by descending score, ties to the lower index."""
    masked = scores.masked_fill(~valid, float("-inf"))
    order = torch.sort(masked, descending=True, stable=True).indices
    return order[: int(valid.sum())]


def host_budgets(budgets: Sequence[torch.Tensor], layouts: Sequence[Layout], who: str) -> list[tuple[int, ...]]:
    """Per-image budgets checked against the layouts and read to the host in one transfer
    (the per-image entry points; the pipeline hands selectors host counts directly)."""
    for layout, tensor in zip(layouts, budgets):
        check_budget_tensor(tensor, layout.num_partitions, who)
    counts = host_split([b.long() for b in budgets])
    for layout, values in zip(layouts, counts):
        check_budget_values(values, layout.capacity_counts, who)
    return counts


def topk_batch(
    scores: Sequence[torch.Tensor],
    layouts: Sequence[Layout],
    budgets: Sequence[torch.Tensor],
    counts: Sequence[tuple[int, ...]],
    *,
    what: str = "scores",
) -> list[tuple[torch.Tensor, ...]]:
    """Per image, the indices of each partition's ``counts[i][p]`` highest valid scores, ascending.

    All partitions of all images in one sort, one rank and one ``nonzero_static`` sized by
    the host ``counts`` (no host read). Ties go to the lower index (stable sort), so the
    result at budget ``b`` is a subset of the result at ``b + 1``; padding is never chosen.
    ``counts`` must already be checked against capacity (:func:`host_budgets` or the pipeline).
    """
    for score, layout in zip(scores, layouts):
        if score.shape != layout.valid.shape:
            raise ContractError(f"{what} have shape {tuple(score.shape)}, valid mask {tuple(layout.valid.shape)}")
    return by_width(
        lambda group: topk_stacked(
            torch.cat([scores[i] for i in group]) if len(group) > 1 else scores[group[0]],
            [layouts[i] for i in group],
            [budgets[i] for i in group],
            [counts[i] for i in group],
            what=what,
        ),
        layouts,
    )


def topk_of_heads(
    rows: Sequence[torch.Tensor],
    layouts: Sequence[Layout],
    budgets: Sequence[torch.Tensor],
    counts: Sequence[tuple[int, ...]],
    how: HeadReduction,
    *,
    what: str,
) -> list[tuple[torch.Tensor, ...]]:
    """:func:`topk_stacked` of per-image ``[P, H, N]`` attention rows reduced over heads:
    the images of one token count stacked first (the heads reduce per row, so stacking
    first changes nothing), one pass per token count (:func:`by_width`)."""

    def run(group: list[int]) -> list[tuple[torch.Tensor, ...]]:
        stacked = torch.cat([rows[i] for i in group]) if len(group) > 1 else rows[group[0]]
        return topk_stacked(
            reduce_heads(stacked, how),
            [layouts[i] for i in group],
            [budgets[i] for i in group],
            [counts[i] for i in group],
            what=what,
        )

    return by_width(run, layouts)


def by_width(run: Callable[[list[int]], list[T]], layouts: Sequence[Layout]) -> list[T]:
    """``run`` once per group of images whose partitions have the same token count (one
    group for LLaVA; Qwen images of different grids form a few), results in image order.

    ``run`` gets the group's image indices and returns one result per index."""
    groups: dict[int, list[int]] = {}
    for index, layout in enumerate(layouts):
        groups.setdefault(int(layout.valid.shape[1]), []).append(index)
    if len(groups) == 1:
        return run(list(range(len(layouts))))
    out: list[T | None] = [None] * len(layouts)
    for group in groups.values():
        for index, result in zip(group, run(group)):
            out[index] = result
    return out  # type: ignore[return-value]


def topk_stacked(
    scores: torch.Tensor,
    layouts: Sequence[Layout],
    budgets: Sequence[torch.Tensor],
    counts: Sequence[tuple[int, ...]],
    *,
    what: str = "scores",
) -> list[tuple[torch.Tensor, ...]]:
    """:func:`topk_batch` of scores already stacked: ``[sum P, N]``, the images' partitions in order."""
    rows = sum(layout.valid.shape[0] for layout in layouts)
    if scores.dim() != 2 or scores.shape[0] != rows or any(layout.valid.shape[1] != scores.shape[1] for layout in layouts):
        shapes = [tuple(layout.valid.shape) for layout in layouts]
        raise ContractError(f"{what} have shape {tuple(scores.shape)}, valid masks {shapes}")
    flat_scores = scores.float()
    finite_or_raise(flat_scores, what)  # after the cast: a float64 score below float32's range would tie with padding
    device = flat_scores.device
    valid = torch.cat([layout.valid_on(device) for layout in layouts]) if len(layouts) > 1 else layouts[0].valid_on(device)
    wanted = torch.cat(list(budgets)) if len(budgets) > 1 else budgets[0]
    masked = flat_scores.masked_fill(~valid, float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=device).expand_as(order))
    keep = rank < to_device(wanted, device)[:, None]
    sizes = [c for image in counts for c in image]
    kept = torch.nonzero_static(keep, size=sum(sizes))[:, 1]
    pieces = torch.split(kept, sizes)
    out, start = [], 0
    for image in counts:
        out.append(tuple(pieces[start : start + len(image)]))
        start += len(image)
    return out


def topk_per_partition(
    scores: torch.Tensor, valid: torch.Tensor, budgets: torch.Tensor, *, what: str = "scores"
) -> tuple[torch.Tensor, ...]:
    """Indices of the ``budgets[p]`` highest valid scores of each partition, ascending.

    The one-image form of :func:`topk_batch` (one host read of the budgets). A budget
    above a partition's valid count is a :class:`~tokenprune.ContractError` (allocators
    must cap at capacity).
    """
    if scores.shape != valid.shape:
        raise ContractError(f"{what} have shape {tuple(scores.shape)}, valid mask {tuple(valid.shape)}")
    check_budget_tensor(budgets, scores.shape[0], what)
    values = host_split([budgets.long()])[0]
    check_budget_values(values, valid.sum(dim=1).tolist(), what)
    layout = _Rows(valid)
    return topk_batch([scores], [layout], [budgets], [values], what=what)[0]  # type: ignore[list-item]


class _Rows:
    """A stand-in with the one attribute :func:`topk_batch` reads from a layout."""

    def __init__(self, valid: torch.Tensor) -> None:
        self.valid = valid


class BatchedSelector(Selector):
    """A built-in selector: the whole batch in :meth:`select_counted` (host budgets given);
    the per-image and per-batch entry points read the budgets once, then make that pass."""

    def select(self, layout: Layout, signals: Signals, budgets: torch.Tensor) -> Selection:
        return self.select_batch([layout], [signals], [budgets])[0]

    def select_batch(
        self, layouts: Sequence[Layout], signals: Sequence[Signals], budgets: Sequence[torch.Tensor]
    ) -> list[Selection]:
        counts = host_budgets(budgets, layouts, f"selector {self.registry_name or type(self).__name__!r}")
        return self.select_counted(layouts, signals, budgets, counts)

    @abstractmethod
    def select_counted(
        self,
        layouts: Sequence[Layout],
        signals: Sequence[Signals],
        budgets: Sequence[torch.Tensor],
        counts: Sequence[tuple[int, ...]],
    ) -> list[Selection]:
        """Selections of every image, sized by the host ``counts``."""
