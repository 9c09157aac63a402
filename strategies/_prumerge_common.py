"""What PruMerge and PruMerge+ share: the IQR outlier count, the CLS-attention scores and
the key-neighbour merge (pure tensor code; not a registered strategy).

Each selector module subclasses :class:`PruMergeBase` and supplies only its keep rule
(``_keep_mask``, and ``_auto_kept`` / ``_fixed_counts`` where it differs), so neither imports
the other's module.

The whole batch is one pass over ``T`` rows (every partition of every image of the same
partition size), padded to ``[T, N]`` with the valid mask: a fixed number of tensor ops,
no loop over images, partitions or tokens. The only host read is the per-partition kept
count of ``count="auto"`` (it sizes the outputs); ``count="budget"`` reads nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from tokenprune.strategies._scores import BatchedSelector, reduce_heads

from tokenprune.contracts import (
    Layout,
    Needs,
    Selection,
    Signals,
    finite_or_raise,
    to_device,
    validating,
)
from tokenprune.errors import ConfigError, ContractError, SignalError

__all__ = [
    "REFERENCE_OPTIONS",
    "PartitionRows",
    "PruMergeBase",
    "batch_outlier_ratio",
    "iqr_upper_fences",
    "outlier_counts",
    "pooled_outlier_ratio",
]

#: The released code's options shared by ``prumerge@reference`` and ``prumerge_plus@reference``.
REFERENCE_OPTIONS: dict[str, Any] = {
    "layer": -1,
    "wide_head": True,
    "count": "auto",
    "iqr_scope": "batch",
    "min_tokens": 0,
    "k": 32,
    "neighbours": "all",
    "merge": "sum",
    "summary": True,
}


# --------------------------------------------------------------------------- IQR outliers


def iqr_upper_fences(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Upper Tukey fence ``Q3 + 1.5 * IQR`` of each row's valid scores, float64 ``[R]``.

    Quartiles are linearly interpolated between order statistics (position ``q * (n - 1)``,
    NumPy's default ``percentile``), over the valid entries of each row only. A row with no
    valid entry gets ``+inf`` (no outlier). On the scores' device: one sort, one gather of
    the four order statistics, the interpolation in float64 (devices without float64, such
    as Apple MPS, are not supported here).
    """
    valid = valid.to(scores.device)
    ordered = scores.detach().masked_fill(~valid, float("inf")).sort(dim=1).values
    count = valid.sum(dim=1)
    last = (count - 1).clamp(min=0).double()
    positions = torch.stack([last * 0.25, last * 0.75], dim=1)  # Q1, Q3
    low = positions.floor()
    frac = positions - low
    # Sorting before the float64 cast is exact: the cast is monotone and lossless.
    ends = ordered.gather(1, torch.cat([low, positions.ceil()], dim=1).long()).double()
    below, above = ends[:, :2], ends[:, 2:]
    quartiles = below + (above - below) * frac
    q1, q3 = quartiles[:, 0], quartiles[:, 1]
    # Where a row has no valid entry the quartiles are inf - inf = nan: no outlier there.
    fences = q3 + 1.5 * (q3 - q1)
    return torch.where(count > 0, fences, float("inf"))


def outlier_counts(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Valid scores strictly above their row's upper IQR fence, int64 ``[R]`` (scores' device)."""
    valid = valid.to(scores.device)
    fences = iqr_upper_fences(scores, valid)
    return ((scores.detach().double() > fences[:, None]) & valid).sum(dim=1)


def pooled_outlier_ratio(scores: Sequence[torch.Tensor], valid: Sequence[torch.Tensor]) -> torch.Tensor:
    """Share of IQR outliers among ALL valid entries of ``scores`` pooled into one sample,
    a float64 scalar on the device (0 when nothing is valid). No host read."""
    flat = torch.cat([s.detach().reshape(-1) for s in scores]) if len(scores) > 1 else scores[0].detach().reshape(-1)
    mask = torch.cat([v.reshape(-1) for v in valid]) if len(valid) > 1 else valid[0].reshape(-1)
    mask = mask.to(flat.device)
    outliers = outlier_counts(flat[None], mask[None])[0]
    total = mask.sum()
    return torch.where(total > 0, outliers.double() / total.clamp(min=1).double(), 0.0)


def batch_outlier_ratio(rows: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Share of IQR outliers among ALL valid scores of ``rows`` flattened into one sample.

    ``rows`` holds ``(scores [P, N], valid [P, N])`` per image. This is the released
    PruMerge's ratio, which pools the whole batch (every partition of every image). Reads
    the ratio back (the selectors use :func:`pooled_outlier_ratio` on the device).
    """
    if not rows:
        return 0.0
    return float(pooled_outlier_ratio([s.float() for s, _ in rows], [v for _, v in rows]))


# --------------------------------------------------------------------------- base selector


class PartitionRows(NamedTuple):
    """Every partition of a batch as rows ``[T, N]``: the inputs to a keep rule."""

    scores: torch.Tensor  # CLS attention, float32 [T, N]
    valid: torch.Tensor  # bool [T, N]
    rank: torch.Tensor  # int64 [T, N]: place by descending attention (ties: lower index); padding last
    capacity: torch.Tensor  # int64 [T]: valid tokens
    attention_count: torch.Tensor  # int64 [T]: attention-picked tokens (adaptive or fixed count)
    ratio: torch.Tensor  # float64 [T]: outlier share (or the fixed ratio)
    side: int  # tokens per grid side


class _Group(NamedTuple):
    """The images of one partition size, stacked as rows."""

    members: list[int]  # image positions in the batch
    partitions: list[int]  # partitions per member image
    scores: torch.Tensor  # float32 [T, N]
    valid: torch.Tensor  # bool [T, N]
    capacity: torch.Tensor  # int64 [T]
    caps: list[int]  # host capacity per row
    budget: torch.Tensor  # int64 [T]
    budgets: list[int]  # host budget per row
    keys: torch.Tensor  # [T, N, Dk]
    features: torch.Tensor  # [T, N, D]
    side: int


class _Plan(NamedTuple):
    """Per row: tokens including the summary, the summary flag, tokens to keep, and kept."""

    wanted: torch.Tensor  # int64 [T]
    summarise: torch.Tensor  # bool [T]
    kept: torch.Tensor  # int64 [T]: the keep rule's target
    count: torch.Tensor  # int64 [T]: tokens it keeps (``reached``, else ``kept``)
    reached: torch.Tensor | None  # set when the rule may fall short of ``kept``


def _cat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat(list(tensors)) if len(tensors) > 1 else tensors[0]


@dataclass(frozen=True)
class PruMergeBase(BatchedSelector):
    """CLS-attention scores, counts and the key-neighbour merge of PruMerge and PruMerge+.

    The options are documented on :class:`~tokenprune.strategies.prumerge.PruMerge`; a
    subclass decides which tokens of each partition are kept (``_keep_mask``).
    """

    layer: int = -1
    wide_head: bool = False
    heads: Literal["mean", "sum"] = "mean"
    count: Literal["budget", "auto"] = "budget"
    iqr_scope: Literal["partition", "batch"] = "partition"
    min_tokens: int = 1
    k: int = 32
    neighbours: Literal["pruned", "all"] = "pruned"
    merge: Literal["mean", "sum"] = "mean"
    summary: bool = True

    def check(self) -> None:
        name = self.registry_name or type(self).__name__
        if self.k < 0:
            raise ConfigError(
                f"{name}: k={self.k} must be >= 0 (neighbours merged into each kept token; 0 merges none)"
            )
        if self.min_tokens < 0:
            raise ConfigError(
                f"{name}: min_tokens={self.min_tokens} must be >= 0 (tokens kept when no score is an outlier)"
            )

    @property
    def adaptive(self) -> bool:  # type: ignore[override]
        """``count="auto"`` chooses its own count (at most the budget)."""
        return self.count == "auto"

    @property
    def needs(self) -> Needs:
        attention = (
            {"wide_cls_attention": {self.layer}} if self.wide_head else {"cls_attention": {self.layer}}
        )
        return Needs(**attention, keys={self.layer}, features=True)

    # ----------------------------------------------------------------- entry point
    def select_counted(
        self,
        layouts: Sequence[Layout],
        signals: Sequence[Signals],
        budgets: Sequence[torch.Tensor],
        counts: Sequence[tuple[int, ...]],
    ) -> list[Selection]:
        """Per-image selections; with ``count="auto", iqr_scope="batch"`` the images share one
        outlier ratio (every partition of every image pooled, as the released code does).

        Images are grouped by partition size (one group in practice); each group is one pass.
        ``count="auto"`` reads the kept counts of all groups back in one transfer."""
        if not len(layouts) == len(signals) == len(budgets) == len(counts):
            raise ContractError(
                f"{len(layouts)} layouts, {len(signals)} signals, {len(budgets)} budgets and {len(counts)} counts"
            )
        if not layouts:
            return []
        sizes: dict[int, list[int]] = {}
        for image, layout in enumerate(layouts):
            sizes.setdefault(layout.tokens_per_side, []).append(image)
        groups = [self._group(members, layouts, signals, budgets, counts) for members in sizes.values()]
        pooled = None
        if self.count == "auto" and self.iqr_scope == "batch":
            pooled = pooled_outlier_ratio([g.scores for g in groups], [g.valid for g in groups])
        rows = [self._rows(group, pooled) for group in groups]
        plans = [self._plan(group, part) for group, part in zip(groups, rows)]
        if self.count == "auto" or any(plan.reached is not None for plan in plans):
            # The one host read: the counts size the outputs (only a rule that chooses its
            # own count, or may fall short of it, needs them back).
            flat = torch.stack([_cat([plan.wanted for plan in plans]), _cat([plan.count for plan in plans])]).tolist()
            hosts, start = [], 0
            for group in groups:
                stop = start + len(group.caps)
                hosts.append((flat[0][start:stop], flat[1][start:stop]))
                start = stop
        else:
            hosts = [(group.budgets, None) for group in groups]
        selections: list[Selection] = [None] * len(layouts)  # type: ignore[list-item]
        for group, part, plan, (host_wanted, host_count) in zip(groups, rows, plans, hosts):
            made = self._select_group(group, part, plan, host_wanted, host_count)
            for image, selection in zip(group.members, made):
                selections[image] = selection
        return selections

    # ----------------------------------------------------------------- steps
    def _group(
        self,
        members: list[int],
        layouts: Sequence[Layout],
        signals: Sequence[Signals],
        budgets: Sequence[torch.Tensor],
        counts: Sequence[tuple[int, ...]],
    ) -> _Group:
        """Stack the images ``members`` (all of one partition size) as rows."""
        who = f"selector {self.registry_name or type(self).__name__}"
        attention, keys, features = [], [], []
        for image in members:
            layout, signal = layouts[image], signals[image]
            signal.require(self.needs, who=who)
            rows = signal.attention(self.layer, wide=self.wide_head)
            key, feature = signal.key(self.layer), signal.features
            assert feature is not None  # signal.require checked it
            shape = tuple(layout.valid.shape)
            if (rows.shape[0], rows.shape[-1]) != shape or (self.wide_head and rows.shape[1] != 1):
                raise ContractError(f"CLS attention has shape {tuple(rows.shape)}, the layout {shape}")
            if tuple(key.shape[:2]) != shape or tuple(feature.shape[:2]) != shape:
                raise ContractError(
                    f"keys {tuple(key.shape)} and features {tuple(feature.shape)} must be [P, N, ...] "
                    f"with [P, N] = {shape}"
                )
            attention.append(rows)
            keys.append(key)
            features.append(feature)
        stacked = _cat(attention)
        scores = stacked.float()[:, 0] if self.wide_head else reduce_heads(stacked, self.heads)
        if validating() and bool((scores < 0).any()):
            raise SignalError(
                f"CLS attention of layer {self.layer} has negative values; it must be softmax "
                "probabilities (>= 0), which PruMerge uses as merge weights"
            )
        device = scores.device
        valid = _cat([layouts[image].valid_on(device) for image in members])
        return _Group(
            members=members,
            partitions=[layouts[image].num_partitions for image in members],
            scores=scores,
            valid=valid,
            capacity=valid.sum(dim=1),
            caps=[c for image in members for c in layouts[image].capacity_counts],
            budget=to_device(_cat([budgets[image] for image in members]), device),
            budgets=[b for image in members for b in counts[image]],
            keys=_cat(keys),
            features=_cat(features),
            side=layouts[members[0]].tokens_per_side,
        )

    def _rows(self, group: _Group, pooled: torch.Tensor | None) -> PartitionRows:
        """Attention ranks, attention counts and outlier ratios of every row."""
        scores, valid, capacity = group.scores, group.valid, group.capacity
        order = scores.masked_fill(~valid, float("-inf")).sort(dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        if self.count != "auto":
            count, ratio = self._fixed_counts(group.capacity, group.valid.shape[1])
        elif pooled is None:
            outliers = outlier_counts(scores, valid)
            ratio = torch.where(capacity > 0, outliers.double() / capacity.clamp(min=1).double(), 0.0)
            count = outliers.clamp(min=self.min_tokens).minimum(capacity)
        else:
            ratio = pooled.expand(capacity.shape)
            # The released count: int(N * ratio) in float arithmetic, N the partition's tokens.
            count = (capacity.double() * pooled).floor().long().clamp(min=self.min_tokens).minimum(capacity)
        return PartitionRows(scores, valid, rank, capacity, count, ratio, group.side)

    def _plan(self, group: _Group, rows: PartitionRows) -> _Plan:
        """Tokens per row including the summary (the budget, or the adaptive count within
        it), the tokens to keep, and how many the keep rule reaches."""
        wanted = group.budget
        if self.count == "auto":
            auto = self._auto_kept(rows)
            with_summary = auto + (auto < rows.capacity).long() if self.summary else auto
            wanted = torch.minimum(group.budget, with_summary)
        if self.summary:
            summarise = (wanted > 0) & (wanted < rows.capacity)
        else:
            summarise = torch.zeros_like(rows.valid[:, 0])
        kept = wanted - summarise.long()
        reached = self._reached(rows, kept)
        return _Plan(wanted, summarise, kept, kept if reached is None else reached, reached)

    def _auto_kept(self, rows: PartitionRows) -> torch.Tensor:
        """Tokens kept (summary excluded) per row by the adaptive count."""
        return rows.attention_count

    def _fixed_counts(self, capacity: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention count and ratio per row when the count is not adaptive (none by default)."""
        return torch.zeros_like(capacity), torch.zeros_like(capacity, dtype=torch.float64)

    def _reached(self, rows: PartitionRows, kept: torch.Tensor) -> torch.Tensor | None:
        """Tokens the keep rule yields per row when it may yield fewer than ``kept``
        (``None``: always exactly ``kept``)."""
        return None

    def _keep_mask(self, rows: PartitionRows, kept: torch.Tensor) -> torch.Tensor:
        """bool ``[T, N]``: the ``kept[t]`` tokens of each row (nested in ``kept``)."""
        raise NotImplementedError

    def _select_group(
        self, group: _Group, rows: PartitionRows, plan: _Plan, host_wanted: list[int], host_count: list[int] | None
    ) -> list[Selection]:
        summarise = [self.summary and 0 < w < c for w, c in zip(host_wanted, group.caps)]
        if host_count is None:
            host_count = [w - s for w, s in zip(host_wanted, summarise)]
        keep = self._keep_mask(rows, plan.kept)
        indices = torch.nonzero_static(keep, size=sum(host_count))[:, 1].split(host_count)
        merged = self._merge(group, rows, keep, plan, host_count, summarise)
        out, start = [], 0
        for parts in group.partitions:
            stop = start + parts
            out.append(
                Selection(
                    indices=indices[start:stop],
                    features=merged[start:stop],
                    extra_tokens=tuple(int(s) for s in summarise[start:stop]),
                )
            )
            start = stop
        return out

    def _merge(
        self,
        group: _Group,
        rows: PartitionRows,
        keep: torch.Tensor,
        plan: _Plan,
        kept_host: list[int],
        summarise_host: list[bool],
    ) -> tuple[torch.Tensor, ...]:
        """Per row, its merged kept tokens (ascending index order) then its summary token.

        Every output row is a weighted sum of its partition's tokens: a dense weight tensor
        ``[T, K + 1, N]`` (``K`` the most kept tokens of any row; row ``K`` the summary) and
        one batched matmul produce them all; the live rows are then gathered.
        """
        valid, weights, features = rows.valid, rows.scores, group.features
        width = max(kept_host, default=0)
        slots, tokens = valid.shape
        # Kept token indices, ascending, padded with non-kept ones: [T, K].
        index = keep.to(torch.uint8).sort(dim=1, descending=True, stable=True).indices[:, :width]
        live = torch.arange(width, device=valid.device) < plan.count[:, None]
        pruned = valid & ~keep
        members = self._neighbours(group.keys, valid, pruned, index)  # bool [T, K, N]
        self_weight = weights.gather(1, index) if self.merge == "mean" else torch.ones_like(index, dtype=weights.dtype)
        matrix = torch.cat(
            [
                (members * weights[:, None, :]).scatter_(2, index[:, :, None], self_weight[:, :, None]),
                (weights * pruned)[:, None, :],
            ],
            dim=1,
        )
        if self.merge == "mean":
            structure = torch.cat([members.scatter_(2, index[:, :, None], True), pruned[:, None, :]], dim=1)
            total = matrix.sum(dim=2, keepdim=True)
            size = structure.sum(dim=2, keepdim=True).clamp(min=1)
            # A cluster whose weights are all zero falls back to equal weights.
            matrix = torch.where(
                total > 0, matrix / total.clamp(min=torch.finfo(torch.float32).tiny), structure / size
            )
        merged = torch.bmm(matrix, features.float())  # [T, K + 1, D]
        wanted_rows = torch.cat([live, plan.summarise[:, None]], dim=1).reshape(-1)
        sizes = [k + int(s) for k, s in zip(kept_host, summarise_host)]
        picked = torch.nonzero_static(wanted_rows, size=sum(sizes))[:, 0]
        return merged.reshape(-1, merged.shape[-1]).index_select(0, picked).to(features.dtype).split(sizes)

    def _neighbours(
        self, keys: torch.Tensor, valid: torch.Tensor, pruned: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        """bool ``[T, K, N]``: each kept token's ``k`` nearest candidates by key cosine.

        ``k`` is clamped to each partition's candidates; equal similarities go to the lower
        token index (a stable sort; ``topk`` leaves the order among ties unspecified).
        """
        slots, width = index.shape
        members = torch.zeros(slots, width, valid.shape[1], dtype=torch.bool, device=valid.device)
        if self.k == 0 or width == 0:
            return members
        candidates = pruned if self.neighbours == "pruned" else valid
        own = 0 if self.neighbours == "pruned" else 1  # "all" counts each kept token itself
        limit = (candidates.sum(dim=1) - own).clamp(min=0, max=self.k)
        # Float64: float32 products are exact there and the sums round far below float32, so
        # equal similarities tie exactly (lower index wins) whatever the matmul kernel or
        # batch shape; in float32 the kernel's summation order would break such ties.
        keys = keys.double()
        norms = keys.norm(dim=-1)
        # Signals does not screen keys (they are large); a NaN/inf key has a NaN/inf norm.
        finite_or_raise(norms, f"keys of layer {self.layer}")
        # A row's ranking does not depend on the kept token's own norm: divide columns only.
        kept_keys = keys.gather(1, index[:, :, None].expand(-1, -1, keys.shape[2]))
        similarity = (torch.bmm(kept_keys, keys.transpose(1, 2)) / norms.clamp(min=1e-12)[:, None, :]).float()
        similarity.masked_fill_(~candidates[:, None, :], float("-inf"))
        similarity.scatter_(2, index[:, :, None], float("-inf"))
        nearest = similarity.sort(dim=2, descending=True, stable=True).indices[:, :, : min(self.k, valid.shape[1])]
        chosen = torch.arange(nearest.shape[2], device=valid.device) < limit[:, None, None]
        return members.scatter_(2, nearest, chosen.expand_as(nearest))
