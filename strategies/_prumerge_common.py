"""What PruMerge and PruMerge+ share: the IQR outlier count, the CLS-attention scores and
the key-neighbour merge (pure tensor code; not a registered strategy).

Each selector module subclasses :class:`PruMergeBase` and supplies only its keep rule
(``_keep_mask``), so neither imports the other's module.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from tokenprune.strategies._scores import reduce_heads

from tokenprune.budget import check_budget_tensor, check_budget_values, host_split
from tokenprune.contracts import (
    Layout,
    Needs,
    Selection,
    Selector,
    Signals,
    finite_or_raise,
)
from tokenprune.errors import ConfigError, ContractError, SignalError

__all__ = ["REFERENCE_OPTIONS", "PartitionScores", "PruMergeBase", "batch_outlier_ratio", "iqr_upper_fences", "outlier_counts"]

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
    """Upper Tukey fence ``Q3 + 1.5 * IQR`` of each row's valid scores, float64 ``[P]``.

    Quartiles are linearly interpolated between order statistics (position ``q * (n - 1)``,
    NumPy's default ``percentile``), over the valid entries of each row only. A row with no
    valid entry gets ``+inf`` (no outlier). Computed on the CPU in float64 (the rows are small,
    and some accelerators have no float64).
    """
    valid = valid.cpu()
    values = scores.detach().to("cpu", torch.float64).masked_fill(~valid, float("inf"))
    ordered = values.sort(dim=1).values
    count = valid.sum(dim=1)
    last = (count - 1).clamp(min=0).double()

    def quartile(share: float) -> torch.Tensor:
        position = last * share
        low = position.floor()
        frac = position - low
        low_index = low.long()[:, None]
        high_index = position.ceil().long()[:, None]
        below = ordered.gather(1, low_index).squeeze(1)
        above = ordered.gather(1, high_index).squeeze(1)
        return below + (above - below) * frac

    q1, q3 = quartile(0.25), quartile(0.75)
    # Where a row has no valid entry the quartiles are inf - inf = nan: no outlier there.
    fences = q3 + 1.5 * (q3 - q1)
    return torch.where(count > 0, fences, torch.full_like(fences, float("inf")))


def outlier_counts(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Valid scores strictly above their row's upper IQR fence, int64 ``[P]`` on the CPU."""
    fences = iqr_upper_fences(scores, valid)
    return ((scores.detach().to("cpu", torch.float64) > fences[:, None]) & valid.cpu()).sum(dim=1)


def batch_outlier_ratio(rows: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Share of IQR outliers among ALL valid scores of ``rows`` flattened into one sample.

    ``rows`` holds ``(scores [P, N], valid [P, N])`` per image. This is the released
    PruMerge's ratio, which pools the whole batch (every partition of every image).
    """
    pooled = torch.cat([scores.detach().to("cpu", torch.float64)[valid.cpu()] for scores, valid in rows])
    if pooled.numel() == 0:
        return 0.0
    flat = pooled[None, :]
    outliers = int(outlier_counts(flat, torch.ones_like(flat, dtype=torch.bool))[0])
    return outliers / pooled.numel()


# --------------------------------------------------------------------------- base selector


class PartitionScores(NamedTuple):
    """One partition's inputs to a keep rule."""

    scores: torch.Tensor  # CLS attention, float32 [N]
    valid: torch.Tensor  # bool [N]
    attention_count: int  # attention-picked tokens (adaptive or fixed count)
    ratio: float  # outlier share (or the fixed ratio)
    side: int  # tokens per grid side


@dataclass(frozen=True)
class PruMergeBase(Selector):
    """CLS-attention scores, counts and the key-neighbour merge of PruMerge and PruMerge+.

    The options are documented on :class:`~tokenprune.strategies.prumerge.PruMerge`; a
    subclass decides which tokens of a partition are kept (``_keep_mask``).
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

    # ----------------------------------------------------------------- entry points
    def select(self, layout: Layout, signals: Signals, budgets: torch.Tensor) -> Selection:
        return self.select_batch([layout], [signals], [budgets])[0]

    def select_batch(
        self, layouts: Sequence[Layout], signals: Sequence[Signals], budgets: Sequence[torch.Tensor]
    ) -> list[Selection]:
        """Per-image selections; with ``count="auto", iqr_scope="batch"`` the images share one
        outlier ratio (every partition of every image pooled, as the released code does)."""
        if not len(layouts) == len(signals) == len(budgets):
            raise ContractError(f"{len(layouts)} layouts, {len(signals)} signals and {len(budgets)} budgets")
        scored = [self._scores(layout, signal) for layout, signal in zip(layouts, signals)]
        batch_ratio: float | None = None
        if self.count == "auto" and self.iqr_scope == "batch":
            batch_ratio = batch_outlier_ratio([(s, lay.valid) for s, lay in zip(scored, layouts)])
        return [
            self._select_image(layout, signal, score, budget, batch_ratio)
            for layout, signal, score, budget in zip(layouts, signals, scored, budgets)
        ]

    # ----------------------------------------------------------------- steps
    def _scores(self, layout: Layout, signals: Signals) -> torch.Tensor:
        """CLS attention per token, float32 ``[P, N]`` (also the merge weights)."""
        signals.require(self.needs, who=f"selector {self.registry_name or type(self).__name__}")
        if self.wide_head:
            scores = signals.attention(self.layer, wide=True).float()[:, 0]
        else:
            scores = reduce_heads(signals.attention(self.layer), self.heads)
        if tuple(scores.shape) != tuple(layout.valid.shape):
            raise ContractError(
                f"CLS attention has shape {tuple(scores.shape)}, the layout {tuple(layout.valid.shape)}"
            )
        if bool((scores < 0).any()):
            raise SignalError(
                f"CLS attention of layer {self.layer} has negative values; it must be softmax "
                "probabilities (>= 0), which PruMerge uses as merge weights"
            )
        return scores

    def _attention_counts(
        self, scores: torch.Tensor, valid: torch.Tensor, batch_ratio: float | None
    ) -> tuple[list[int], list[float]]:
        """Adaptive count of attention-picked tokens per partition and the outlier ratio."""
        capacity = valid.sum(dim=1).tolist()
        if batch_ratio is None:
            outliers = outlier_counts(scores, valid).tolist()
            ratios = [o / c if c else 0.0 for o, c in zip(outliers, capacity)]
        else:
            ratios = [batch_ratio] * len(capacity)
            # The released count: int(N * ratio) in float arithmetic, N the partition's tokens.
            outliers = [int(c * batch_ratio) for c in capacity]
        counts = [min(max(o, self.min_tokens), c) for o, c in zip(outliers, capacity)]
        return counts, ratios

    def _auto_kept(self, part: PartitionScores) -> int:
        """Tokens kept (summary excluded) by the adaptive count in one partition."""
        return part.attention_count

    def _fixed_counts(self, caps: list[int], budgets: list[int], tokens: int) -> tuple[list[int], list[float]]:
        """Attention count and ratio per partition when the count is not adaptive (none by default)."""
        return [0] * len(caps), [0.0] * len(caps)

    @abstractmethod
    def _keep_mask(self, part: PartitionScores, kept: int) -> torch.Tensor:
        """bool ``[N]``: the ``kept`` tokens of one partition (nested in ``kept``)."""

    def _select_image(
        self,
        layout: Layout,
        signals: Signals,
        scores: torch.Tensor,
        budgets: torch.Tensor,
        batch_ratio: float | None,
    ) -> Selection:
        device = scores.device
        valid = layout.valid.to(device)
        who = f"selector {self.registry_name or type(self).__name__}"
        check_budget_tensor(budgets, layout.num_partitions, who, int64=True)
        features = signals.features
        assert features is not None  # signals.require checked it
        keys = signals.key(self.layer)
        if keys.shape[:2] != valid.shape or features.shape[:2] != valid.shape:
            raise ContractError(
                f"keys {tuple(keys.shape)} and features {tuple(features.shape)} must be [P, N, ...] "
                f"with [P, N] = {tuple(valid.shape)}"
            )
        caps = list(layout.capacity_counts)
        wanted = list(host_split([budgets])[0])
        check_budget_values(wanted, caps, who)
        attention_counts, ratios = self._fixed_counts(caps, wanted, layout.tokens_per_partition)
        if self.count == "auto":
            attention_counts, ratios = self._attention_counts(scores, valid, batch_ratio)
        parts = [
            PartitionScores(scores[p], valid[p], attention_counts[p], ratios[p], layout.tokens_per_side)
            for p in range(len(caps))
        ]
        if self.count == "auto":
            for p, cap in enumerate(caps):
                auto = self._auto_kept(parts[p])
                with_summary = auto + 1 if self.summary and auto < cap else auto
                wanted[p] = min(wanted[p], with_summary)
        indices: list[torch.Tensor] = []
        merged: list[torch.Tensor] = []
        extra: list[int] = []
        for p, (budget, cap) in enumerate(zip(wanted, caps)):
            summarise = self.summary and 0 < budget < cap
            kept = budget - 1 if summarise else budget
            keep = self._keep_mask(parts[p], kept)
            index = torch.nonzero(keep).flatten()
            indices.append(index)
            merged.append(self._merge(features[p], keys[p], scores[p], valid[p], keep, index, summarise))
            extra.append(int(summarise))
        return Selection(indices=tuple(indices), features=tuple(merged), extra_tokens=tuple(extra))

    def _merge(
        self,
        features: torch.Tensor,
        keys: torch.Tensor,
        weights: torch.Tensor,
        valid: torch.Tensor,
        keep: torch.Tensor,
        index: torch.Tensor,
        summarise: bool,
    ) -> torch.Tensor:
        """Merged kept tokens (``index`` order) then the summary token, ``[kept + summary, D]``.

        Every output row is a weighted sum of the partition's tokens; the weights form a
        sparse ``[rows, N]`` matrix (``k + 1`` entries per kept token, the pruned tokens for
        the summary), so one sparse matmul produces every row.
        """
        device = features.device
        kept = int(index.numel())
        rows = kept + int(summarise)
        pruned = valid & ~keep
        row_ids: list[torch.Tensor] = []
        col_ids: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        if kept:
            rows_kept = torch.arange(kept, device=device)
            neighbour_rows, neighbour_cols = self._neighbours(keys, valid, pruned, index)
            row_ids += [neighbour_rows, rows_kept]
            col_ids += [neighbour_cols, index]
            self_weight = weights[index] if self.merge == "mean" else torch.ones(kept, device=device)
            values += [weights[neighbour_cols], self_weight]
        if summarise:
            pruned_ids = torch.nonzero(pruned).flatten()
            row_ids.append(torch.full_like(pruned_ids, kept))
            col_ids.append(pruned_ids)
            values.append(weights[pruned_ids])
        if not rows:
            return features.new_zeros(0, features.shape[-1])
        row = torch.cat(row_ids)
        value = torch.cat(values).float()
        if self.merge == "mean":
            total = torch.zeros(rows, device=device).index_add_(0, row, value)
            size = torch.zeros(rows, device=device).index_add_(0, row, torch.ones_like(value))
            # A cluster whose weights are all zero falls back to equal weights.
            value = torch.where(
                total[row] > 0, value / total[row].clamp(min=torch.finfo(torch.float32).tiny), 1.0 / size[row]
            )
        matrix = torch.sparse_coo_tensor(
            torch.stack([row, torch.cat(col_ids)]), value, (rows, valid.numel()), check_invariants=False
        )
        return torch.sparse.mm(matrix, features.float()).to(features.dtype)

    def _neighbours(
        self, keys: torch.Tensor, valid: torch.Tensor, pruned: torch.Tensor, index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept row, token) pairs: each kept token's ``k`` nearest candidates by key cosine.

        ``k`` is clamped to the candidates; equal similarities go to the lower token index.
        """
        candidates = pruned if self.neighbours == "pruned" else valid
        own = 0 if self.neighbours == "pruned" else 1  # "all" counts each kept token itself
        k = min(self.k, int(candidates.sum()) - own)
        if k <= 0:
            empty = torch.zeros(0, dtype=torch.long, device=index.device)
            return empty, empty
        # Against every token, masked after: cheaper on CPU than gathering the candidates'
        # keys, which costs a fresh [C, Dk] buffer per partition.
        keys = keys.float()
        norms = keys.norm(dim=-1)
        # Signals does not screen keys (they are large); a NaN/inf key has a NaN/inf norm.
        finite_or_raise(norms, f"keys of layer {self.layer}")
        # A row's ranking does not depend on the kept token's own norm: divide columns only.
        similarity = (keys.index_select(0, index) @ keys.T) / norms.clamp(min=1e-12)
        similarity.masked_fill_(~candidates, float("-inf"))
        similarity[torch.arange(index.numel(), device=index.device), index] = float("-inf")
        # Exactly k per row: everything above the k-th largest value, then the lowest-index
        # ties at that value (topk alone leaves the order among ties unspecified).
        largest = torch.topk(similarity, k, dim=1, sorted=False).values
        threshold = largest.min(dim=1, keepdim=True).values
        row, column = torch.nonzero(similarity >= threshold, as_tuple=True)
        if row.numel() != k * index.numel():  # more ties at the threshold than places left
            missing = k - (largest > threshold).sum(dim=1, keepdim=True)
            tied = similarity == threshold
            chosen = (similarity > threshold) | (tied & (torch.cumsum(tied, dim=1) <= missing))
            row, column = torch.nonzero(chosen, as_tuple=True)
        return row, column
