"""PruMerge: keep the CLS-attention outliers, merge the pruned tokens into them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenprune.strategies._prumerge_common import (
    REFERENCE_OPTIONS,
    PartitionRows,
    PruMergeBase,
    batch_outlier_ratio,
    iqr_upper_fences,
    outlier_counts,
)

from tokenprune import register_preset, register_selector

__all__ = ["PruMerge", "batch_outlier_ratio", "iqr_upper_fences", "outlier_counts"]


@register_selector("prumerge")
@dataclass(frozen=True)
class PruMerge(PruMergeBase):
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
          fence and the key similarities in float64 (so equal similarities tie exactly;
          the released float32 breaks them by rounding), rounded to float32 for ranking;
          the merge in float32; ``k`` clamped to the candidates (the
          released ``topk(k=32)`` fails with 32 or fewer tokens); the summary token counts
          against the budget and is dropped when nothing is pruned; the budget caps the
          adaptive count (the released code has no budget).

    Cost: the whole batch is one pass of tensor ops (every partition of every image as a
    row); ``count="budget"`` reads nothing back, ``count="auto"`` reads the kept counts
    once per batch. Float64 on the device is required (not on Apple MPS).
    """

    def _keep_mask(self, rows: PartitionRows, kept: torch.Tensor) -> torch.Tensor:
        """The top ``kept[t]`` tokens of each row by CLS attention."""
        return rows.rank < kept[:, None]


register_preset(
    "selector",
    "prumerge@reference",
    REFERENCE_OPTIONS,
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
