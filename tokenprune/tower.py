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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .contracts import AttentionTap, Layout, Needs, Selection, Signals
from .errors import ContractError, TokenpruneError

if TYPE_CHECKING:
    from .pipeline import Pipeline, PruneResult

__all__ = ["PrunedImage", "kept_features", "prune_batch", "split_by_layouts"]


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
    """
    with tap.capture(pipeline.needs if needs is None else needs, feature_layer=feature_layer) as record:  # type: ignore[call-arg]
        forward()
    if split is None:
        batch = record.signals() if signals is None else signals(record)
        image_layouts = list(layouts(batch) if callable(layouts) else layouts)
        per_image = split_by_layouts(batch, image_layouts)
    else:
        if callable(layouts):
            raise ContractError("prune_batch: with split=..., pass the layouts themselves")
        image_layouts = list(layouts)
        per_image = split(record, image_layouts)
    if annotate is not None:
        per_image = [annotate(index, image) for index, image in enumerate(per_image)]
    results = pipeline.apply_batch(image_layouts, per_image)
    return [
        PrunedImage(layout, image, result, kept_features(image.features, result.selection))
        for layout, image, result in zip(image_layouts, per_image, results)
    ]
