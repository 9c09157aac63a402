"""The one tower-pruning routine every adapter uses (DESIGN §5).

:func:`prune_batch` runs the vision tower once, with the attention tap, on all crops of a
batch; splits the recorded signals per image; calls the pipeline's allocator and selector
on the whole batch (``Pipeline.apply_batch``); and gathers each partition's kept features
(or takes the selector's merged ones). The adapter supplies the model-specific parts as
callables, so this module knows no model library::

    images = prune_batch(
        pipeline, tap, lambda: tower(crops), layouts,
        feature_layer=-2,                      # the block whose output the LLM gets
        annotate=add_relevance,                # optional: (image index, Signals) -> Signals
    )
    images[0].kept                             # per partition, [k_p, D] kept features

Dynamic-resolution towers whose images have different token counts pass ``split`` (the
whole batch's record → one :class:`~tokenprune.Signals` per image) instead of relying on
the default "each layout consumes its partitions' consecutive crops".
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .contracts import AttentionTap, Layout, Needs, Selection, Signals, to_device
from .errors import ContractError, TokenpruneError

if TYPE_CHECKING:
    from .pipeline import Pipeline, PruneResult

__all__ = [
    "PrunedBatch",
    "PrunedImage",
    "kept_features",
    "kept_features_batch",
    "kept_rows",
    "prune_batch",
    "run_batch",
    "split_by_layouts",
]


@dataclass(frozen=True, eq=False)
class PrunedImage:
    """One image of a batch after allocation and selection.

    Attributes:
        layout: the image's Layout.
        signals: the image's signals (what the strategies read).
        result: budgets, selection and stats from ``Pipeline.apply_batch``.
        kept: per partition, the ``[k_p, D]`` features the LLM gets: the tower's features
            at the kept indices, or the selector's merged features.
    """

    layout: Layout
    signals: Signals
    result: PruneResult
    kept: tuple[torch.Tensor, ...]

    @property
    def selection(self) -> Selection:
        return self.result.selection


def split_by_layouts(signals: Signals, layouts: Sequence[Layout]) -> list[Signals]:
    """Per image, its partitions' rows of ``signals`` (each layout consumes consecutive crops)."""
    wanted = sum(layout.num_partitions for layout in layouts)
    have = signals.num_partitions
    if have is not None and have != wanted:
        raise ContractError(
            f"the tower ran on {have} crops but the {len(layouts)} image layouts have {wanted} "
            "partitions in total; each image's partitions must be consecutive crops"
        )
    per_image, start = [], 0
    for layout in layouts:
        per_image.append(signals.partitions(slice(start, start + layout.num_partitions)))
        start += layout.num_partitions
    return per_image


def kept_features(features: torch.Tensor | None, selection: Selection) -> tuple[torch.Tensor, ...]:
    """Per partition, the rows the LLM gets (merged ones when the selector merged)."""
    if selection.features is not None:
        return tuple(selection.features)
    if features is None:
        raise TokenpruneError("no features were recorded for the kept tokens")
    return tuple(features[p, idx.to(features.device)] for p, idx in enumerate(selection.indices))


@dataclass(frozen=True, eq=False)
class PrunedBatch:
    """A whole batch after allocation and selection, before any gather (:func:`run_batch`).

    Attributes:
        layouts: one Layout per image.
        signals: one Signals per image (views of the batch's).
        results: one PruneResult per image.
        features: ``[sum P, N, D]`` the batch's features (every image's partitions,
            consecutive), or ``None`` when they were not recorded or a custom ``split`` ran.
        starts: per image, the index of its first partition in ``features``.
    """

    layouts: list[Layout]
    signals: list[Signals]
    results: list[PruneResult]
    features: torch.Tensor | None
    starts: list[int]


def kept_rows(batch: PrunedBatch, images: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Where the kept tokens of ``images`` (default: all, none of them merged) sit in
    ``batch.features``: partition and token indices ``[T]`` each, in partition order, on
    the features' device, and the count per partition (host ints).

    Built without host reads: the token indices are one ``cat`` of the selections'
    tensors; the partition of each is found on the host from the counts (sizes only, a
    ``searchsorted`` of their running sums) and copied to the device once."""
    assert batch.features is not None
    device = batch.features.device
    chosen = range(len(batch.results)) if images is None else images
    tokens: list[torch.Tensor] = []
    parts: list[int] = []
    counts: list[int] = []
    for i in chosen:
        indices = batch.results[i].selection.indices
        tokens.extend(indices)
        parts.extend(range(batch.starts[i], batch.starts[i] + len(indices)))
        counts.extend(int(idx.numel()) for idx in indices)
    total = sum(counts)
    if not tokens:
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return empty, empty, counts
    token_index = to_device(torch.cat(tokens) if len(tokens) > 1 else tokens[0], device)
    ends = torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int64)
    owner = torch.searchsorted(ends, torch.arange(total, dtype=torch.int64), right=True)
    part_index = torch.tensor(parts, dtype=torch.int64)[owner]
    return to_device(part_index, device), token_index, counts


def kept_features_batch(batch: PrunedBatch) -> list[tuple[torch.Tensor, ...]]:
    """Per image, per partition, the rows the LLM gets: what :func:`kept_features` returns,
    gathered for every unmerged image of the batch with ONE index (views of one tensor)."""
    out: list[tuple[torch.Tensor, ...] | None] = [None] * len(batch.results)
    plain = []
    for i, (image, result) in enumerate(zip(batch.signals, batch.results)):
        if result.selection.features is not None or batch.features is None:
            out[i] = kept_features(image.features, result.selection)
        else:
            plain.append(i)
    if plain:
        part_index, token_index, counts = kept_rows(batch, plain)
        rows = batch.features[part_index, token_index].split(counts)
        start = 0
        for i in plain:
            size = batch.results[i].selection.num_partitions
            out[i] = tuple(rows[start : start + size])
            start += size
    return out  # type: ignore[return-value]


def prune_batch(
    pipeline: Pipeline,
    tap: AttentionTap,
    forward: Callable[[], Any],
    layouts: Sequence[Layout] | Callable[[Signals], Sequence[Layout]],
    *,
    feature_layer: int | None,
    needs: Needs | None = None,
    signals: Callable[[Any], Signals] | None = None,
    split: Callable[[Any, Sequence[Layout]], list[Signals]] | None = None,
    annotate: Callable[[int, Signals], Signals] | None = None,
    annotate_batch: Callable[[list[Signals]], list[Signals]] | None = None,
) -> list[PrunedImage]:
    """Tower once with the tap, split per image, allocate and select the batch, gather.

    Args:
        pipeline: supplies the allocator, selector and budget.
        tap: the tower's :class:`~tokenprune.AttentionTap` (its ``capture(needs,
            feature_layer=...)`` records while ``forward`` runs).
        forward: runs the tower once on every crop of the batch (its own grad mode).
        layouts: one Layout per image, or (without ``split``) a function of the whole
            batch's signals that returns them (when they depend on the tower's output).
        feature_layer: block whose output gives the features to keep.
        needs: what to record; default ``pipeline.needs``.
        signals: the whole batch's Signals from the tap's record; default ``record.signals()``.
        split: record and layouts → one Signals per image; default :func:`split_by_layouts`
            of the batch's signals.
        annotate: ``(image index, signals) -> signals`` per image after the split (e.g. to
            add prompt relevance).
        annotate_batch: ``[signals] -> [signals]``, the whole batch at once (after
            ``annotate``); e.g. prompt relevance scored in one call for every image.

    The kept features of every unmerged image are gathered with one index
    (:func:`kept_features_batch`).
    """
    batch = run_batch(
        pipeline, tap, forward, layouts, feature_layer=feature_layer, needs=needs, signals=signals,
        split=split, annotate=annotate, annotate_batch=annotate_batch,
    )
    kept = kept_features_batch(batch)
    return [
        PrunedImage(layout, image, result, image_kept)
        for layout, image, result, image_kept in zip(batch.layouts, batch.signals, batch.results, kept)
    ]


def run_batch(
    pipeline: Pipeline,
    tap: AttentionTap,
    forward: Callable[[], Any],
    layouts: Sequence[Layout] | Callable[[Signals], Sequence[Layout]],
    *,
    feature_layer: int | None,
    needs: Needs | None = None,
    signals: Callable[[Any], Signals] | None = None,
    split: Callable[[Any, Sequence[Layout]], list[Signals]] | None = None,
    annotate: Callable[[int, Signals], Signals] | None = None,
    annotate_batch: Callable[[list[Signals]], list[Signals]] | None = None,
) -> PrunedBatch:
    """:func:`prune_batch` without the gather: the batch's selections and features, for an
    adapter that gathers the kept tokens in its own order (one index for the batch)."""
    with tap.capture(pipeline.needs if needs is None else needs, feature_layer=feature_layer) as record:  # type: ignore[call-arg]
        forward()
    whole: Signals | None = None
    if split is None:
        whole = record.signals() if signals is None else signals(record)
        image_layouts = list(layouts(whole) if callable(layouts) else layouts)
        per_image = split_by_layouts(whole, image_layouts)
    else:
        if callable(layouts):
            raise ContractError("prune_batch: with split=..., pass the layouts themselves")
        image_layouts = list(layouts)
        per_image = split(record, image_layouts)
    split_features = [image.features for image in per_image]
    if annotate is not None:
        per_image = [annotate(index, image) for index, image in enumerate(per_image)]
    if annotate_batch is not None:
        per_image = list(annotate_batch(per_image))
        if len(per_image) != len(image_layouts):
            raise ContractError(f"annotate_batch returned {len(per_image)} signals for {len(image_layouts)} images")
    results = pipeline.apply_batch(image_layouts, per_image)
    starts, start = [], 0
    for layout in image_layouts:
        starts.append(start)
        start += layout.num_partitions
    # the batch's features are one tensor only while every image still reads its slice of it
    unchanged = all(image.features is before for image, before in zip(per_image, split_features))
    features = whole.features if whole is not None and unchanged else None
    return PrunedBatch(image_layouts, per_image, results, features, starts)
