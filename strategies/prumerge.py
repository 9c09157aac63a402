"""PruMerge: keep the CLS-attention outliers, merge the pruned tokens into them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from tokenprune.strategies._scores import attention_order, reduce_heads

from tokenprune import (
    ConfigError,
    ContractError,
    Layout,
    Needs,
    Selection,
    Selector,
    SignalError,
    Signals,
    register_preset,
    register_selector,
)
from tokenprune.budget import check_budget_tensor, check_budget_values, host_split
from tokenprune.contracts import finite_or_raise

__all__ = ["PruMerge", "batch_outlier_ratio", "iqr_upper_fences", "outlier_counts"]


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


# --------------------------------------------------------------------------- selector


@register_selector("prumerge")
@dataclass(frozen=True)
class PruMerge(Selector):
    """Top CLS-attention tokens (or the IQR outliers) merged with their key neighbours, plus a summary token (PruMerge).

    Shang et al., "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal
    Models" (2024). Each partition ranks its valid tokens by the CLS attention of block
    ``layer``; it keeps the top ones, and every kept token absorbs its ``k`` nearest tokens
    (cosine similarity of the same block's keys), weighted by their CLS attention. One
    summary token of all pruned tokens (attention-weighted) follows the kept ones.

    How many tokens (``count``):
        * ``"budget"`` (default): exactly the allocator's budget ``b`` per partition, so it
          composes with any allocator. With the summary token, ``b - 1`` tokens are kept and
          the summary is the ``b``-th; ``b = 0`` keeps nothing, ``b = 1`` keeps only the
          summary (of every valid token), and ``b >= capacity`` keeps every valid token and
          no summary (nothing was pruned). Kept sets are nested as ``b`` grows.
        * ``"auto"`` (adaptive, the paper's method): the tokens whose score lies strictly
          above the upper IQR fence ``Q3 + 1.5 * (Q3 - Q1)`` of their own partition's valid
          scores (linear-interpolated quartiles), at least ``min_tokens`` of them, plus the
          summary; never more than the budget (the budget then decides as above).
          ``iqr_scope="batch"`` pools the whole batch instead (the released quirk): the
          outlier share ``ratio`` of all valid tokens of all partitions of all images, and
          every partition keeps ``int(capacity * ratio)`` (at least ``min_tokens``).

    Merge (``merge``), with ``a`` the CLS attention and ``N(i)`` the neighbours of ``i``:
        * ``"mean"`` (default): ``x_i <- sum_{j in {i} + N(i)} a_j x_j / sum a_j`` and the
          summary ``sum_{pruned j} a_j x_j / sum a_j``: attention-weighted means, which keep
          the features' scale (equal weights if all weights are zero).
        * ``"sum"`` (released code): ``x_i <- x_i + sum_{j in N(i)} a_j x_j`` and the summary
          ``sum_{pruned j} a_j x_j``, unnormalised; the scale of ``a`` (heads summed or
          averaged, per-head or wide) then matters.
    Neighbours are the ``k`` most similar candidates by key cosine similarity (ties: lower
    index), ``k`` clamped to the number of candidates: the pruned valid tokens
    (``neighbours="pruned"``) or every other valid token (``"all"``, released code).
    ``k = 0`` merges nothing.

    Options:
        layer: block whose CLS attention ranks and whose keys cluster (default the last).
        wide_head: read the CLS row with the whole width as one head (released code) instead
            of per head.
        heads: ``"mean"`` or ``"sum"`` over heads (per-head attention only).
        count, iqr_scope, min_tokens: see above; ``iqr_scope`` and ``min_tokens`` only matter
            for ``count="auto"``.
        k, neighbours, merge: see above.
        summary: append the summary token of the pruned tokens (counts against the budget).

    Differences from the released code (42Shawn/LLaVA-PruMerge, ``token_prune_merge_advanced``),
    under the default options (the option restoring the released behaviour in brackets):
        * Per-head CLS attention averaged over heads, not one 1024-wide head [wide_head=True].
        * Exactly the allocator's budget instead of the adaptive count [count="auto"].
        * The IQR fence of each partition's own CLS row, not of the batch flattened
          [iqr_scope="batch"].
        * At least one kept token when no score is an outlier; the released code then keeps
          only the summary token [min_tokens=0].
        * Attention-weighted means instead of unnormalised sums [merge="sum"].
        * Neighbours among the pruned tokens only, not among all other tokens: a kept token
          already stands for itself, and absorbing another kept token would blur the two
          [neighbours="all"].
        * Always (not restorable): kept tokens in spatial order (the released code emits
          them in descending attention); padding tokens never kept nor counted in the
          quartiles; ties to the lower index (``torch.topk`` leaves them unspecified); the
          fence in float64, similarities in float32; ``k`` clamped to the candidates (the
          released ``topk(k=32)`` fails with 32 or fewer tokens); the summary token counts
          against the budget and is dropped when nothing is pruned; the budget caps the
          adaptive count (the released code has no budget).
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

    def _auto_kept(
        self, scores: torch.Tensor, valid: torch.Tensor, attention_count: int, ratio: float
    ) -> int:
        """Tokens kept (summary excluded) by the adaptive count in one partition."""
        return attention_count

    def _fixed_counts(self, caps: list[int], budgets: list[int], tokens: int) -> tuple[list[int], list[float]]:
        """Attention count and ratio per partition when the count is not adaptive (unused here)."""
        return [0] * len(caps), [0.0] * len(caps)

    def _keep_mask(
        self,
        scores: torch.Tensor,
        valid: torch.Tensor,
        kept: int,
        attention_count: int,
        ratio: float,
        side: int,
    ) -> torch.Tensor:
        """bool ``[N]``: the ``kept`` tokens of one partition (nested in ``kept``)."""
        order = attention_order(scores, valid)
        keep = torch.zeros_like(valid)
        keep[order[:kept]] = True
        return keep

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
            for p, cap in enumerate(caps):
                auto = self._auto_kept(scores[p], valid[p], attention_counts[p], ratios[p])
                with_summary = auto + 1 if self.summary and auto < cap else auto
                wanted[p] = min(wanted[p], with_summary)
        indices: list[torch.Tensor] = []
        merged: list[torch.Tensor] = []
        extra: list[int] = []
        for p, (budget, cap) in enumerate(zip(wanted, caps)):
            summarise = self.summary and 0 < budget < cap
            kept = budget - 1 if summarise else budget
            keep = self._keep_mask(
                scores[p], valid[p], kept, attention_counts[p], ratios[p], layout.tokens_per_side
            )
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


# --------------------------------------------------------------------------- helpers


register_preset(
    "selector",
    "prumerge@reference",
    {
        "layer": -1,
        "wide_head": True,
        "count": "auto",
        "iqr_scope": "batch",
        "min_tokens": 0,
        "k": 32,
        "neighbours": "all",
        "merge": "sum",
        "summary": True,
    },
    doc="""PruMerge as released (42Shawn/LLaVA-PruMerge): batch-pooled IQR count, unnormalised merge.

    Keeps: the last block's CLS row with the whole width as one head (softmax(q k^T / sqrt(1024))).
    Keeps: the adaptive count from the IQR fence of the WHOLE BATCH flattened (every partition of
    every image pooled): ratio = outliers / pooled tokens, and every partition keeps int(tokens * ratio),
    so an image's count depends on its batch-mates (select_batch pools them; select pools one image).
    Keeps: no minimum: with no outlier (uniform attention) only the summary token is kept.
    Keeps: x_i + sum_j a_j x_j over the 32 nearest of ALL other tokens by key cosine, unnormalised.
    Keeps: the summary token sum_{pruned j} a_j x_j, unnormalised, appended last.
    Cannot keep: the order; the released code emits kept tokens by descending attention, a Selection is
    in spatial order (same features, permuted).
    Cannot keep: padding tokens in the quartiles or the kept set (LLaVA-1.5 has none); topk's arbitrary
    tie order (here: lower index); the budget, which still caps the count (budget 1.0 never does).
    Not reproduced: the PruMerge+ path's ZeroDivisionError at ratio 0 (here PruMerge keeps only the
    summary token, as the released PruMerge path does) and its failure at batch > 1; topk(k=32) failing
    on towers with 32 or fewer tokens (k is clamped).""",
)
