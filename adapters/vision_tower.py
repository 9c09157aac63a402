"""``vision_tower``: prune the patch tokens of a bare vision tower, no LLM involved.

For research on the pruning itself, or for pipelines that feed the kept tokens to their
own head: run a transformers CLIP/SigLIP, timm ViT or open_clip ViT tower once with the
attention tap, apply the pipeline's allocator and selector per image, and get back the kept
features::

    pipe = tp.Pipeline("vision_tower", allocator=..., selector=..., budget=0.25)
    outputs = pipe.prune(tower, pixel_values)    # = pipe.adapter.prune(pipe, tower, pixel_values)
    outputs[0].features        # [K, D] kept tokens of image 0, partitions in order
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from tokenprune.adapter import TowerAdapter
from tokenprune.contracts import Layout, Selection, Signals
from tokenprune.errors import ContractError, IncompatibleError
from tokenprune.registry import register_adapter
from tokenprune.tower import prune_batch

from .taps import check_needs, resolve_feature_layer, tap_for

if TYPE_CHECKING:
    from tokenprune.pipeline import ImageStats, Pipeline

__all__ = ["TowerPruneOutput", "VisionTower"]


@dataclass(frozen=True, eq=False)
class TowerPruneOutput:
    """What one image keeps.

    Attributes:
        features: ``[K, D]`` kept tokens, partition by partition in layout order, each
            partition's tokens in spatial order, its extra (merged summary) tokens last.
            The tower's own features at the kept positions, or the selector's merged
            features for merging selectors.
        indices: per partition, the kept token indices (ascending, into ``N``).
        stats: budget, capacity, allocation and kept counts per partition.
        budgets: int64 ``[P]`` allocated budget per partition.
        selection: the selector's full :class:`tokenprune.Selection`.
        layout: the image's :class:`tokenprune.Layout`.
    """

    features: torch.Tensor
    indices: tuple[torch.Tensor, ...]
    stats: ImageStats
    budgets: torch.Tensor
    selection: Selection
    layout: Layout


@register_adapter("vision_tower")
@dataclass(frozen=True)
class VisionTower(TowerAdapter):
    """Prune a bare vision tower's patch tokens (transformers CLIP/SigLIP, timm ViT, open_clip ViT).

    One forward of the tower with the attention tap computes exactly what the pipeline's
    strategies need, plus the patch tokens at ``feature_layer``; by default every crop in
    ``pixel_values`` is its own one-partition image. Pass ``layouts`` to group consecutive
    crops into multi-partition images (thumbnail first, then tiles).

    Options:
        feature_layer: block whose output gives the features to keep (negative counts from
            the end; LLaVA uses ``-2``, the output of block ``L - 2``).
    """

    feature_layer: int = -2

    model_classes: ClassVar[tuple[str, ...]] = ()

    def prune(
        self,
        pipeline: Pipeline,
        tower: nn.Module,
        pixel_values: torch.Tensor,
        layouts: Sequence[Layout] | None = None,
        *,
        relevance: torch.Tensor | None = None,
        prompt: str | None = None,
    ) -> list[TowerPruneOutput]:
        """Run ``tower`` once on ``pixel_values`` and prune every image to its budget.

        Args:
            pipeline: supplies the allocator, selector and budget.
            tower: a vision tower :func:`~tokenprune.adapters.taps.tap_for` accepts.
            pixel_values: ``[C, 3, H, W]`` crops, already preprocessed for the tower; cast
                to the tower's dtype and device.
            layouts: one :class:`~tokenprune.Layout` per image whose partitions consume
                consecutive crops; default one ``Layout.single`` per crop.
            relevance: ``[C]`` prompt relevance per crop, for strategies that need it (this
                adapter has no text encoder to compute it).
            prompt: the prompt text, handed to the strategies in ``Signals.prompt``.

        Returns:
            One :class:`TowerPruneOutput` per image.

        Raises:
            IncompatibleError: before the forward, if a strategy needs what the tower
                cannot give (a CLS signal on SigLIP, a layer out of range, relevance).
            ContractError: if ``pixel_values`` and ``layouts`` disagree.
        """
        tap = tap_for(tower)
        check_needs(tap, pipeline.allocator.needs, f"allocator {pipeline.part_label('allocator')}")
        check_needs(tap, pipeline.selector.needs, f"selector {pipeline.part_label('selector')}")
        feature_layer = resolve_feature_layer(self.feature_layer, tap.num_layers, tap.tower_name)
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            raise ContractError(
                "pixel_values must be a [crops, channels, height, width] tensor, got "
                f"{type(pixel_values).__name__} {tuple(getattr(pixel_values, 'shape', ()))}"
            )
        crops = int(pixel_values.shape[0])
        if layouts is not None:
            layouts = list(layouts)
            wanted = sum(layout.num_partitions for layout in layouts)
            if wanted != crops:
                raise ContractError(
                    f"the layouts have {wanted} partitions in total but pixel_values holds {crops} "
                    "crops; each layout's partitions consume consecutive crops"
                )
        if pipeline.needs.relevance and relevance is None:
            raise IncompatibleError(
                f"the pipeline's strategies need prompt relevance, which the vision_tower adapter "
                f"cannot compute (it has no text encoder); pass relevance=<[{crops}] tensor> to "
                "pipe.adapter.prune(pipe, tower, pixel_values, relevance=...)"
            )
        if relevance is not None and tuple(relevance.shape) != (crops,):
            raise ContractError(f"relevance must have shape [{crops}] (one per crop), got {tuple(relevance.shape)}")

        parameter = next(iter(tap.core.parameters()), None)
        if parameter is not None:
            pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)

        def forward() -> None:
            with torch.no_grad():
                tap.forward(pixel_values)

        def image_layouts(signals: Signals) -> list[Layout]:
            assert signals.features is not None
            tokens = int(signals.features.shape[1])
            if layouts is None:
                side = math.isqrt(tokens)
                if side * side != tokens:
                    raise ContractError(
                        f"the {tap.tower_name} tower gave {tokens} patch tokens per crop, not a square "
                        "grid; pass layouts describing its partitions"
                    )
                return [Layout.single(side) for _ in range(crops)]
            for index, layout in enumerate(layouts):
                if layout.tokens_per_partition != tokens:
                    raise ContractError(
                        f"layout {index} has {layout.tokens_per_partition} tokens per partition but the "
                        f"{tap.tower_name} tower gave {tokens} per crop"
                    )
            return list(layouts)

        pruned = prune_batch(
            pipeline,
            tap,
            forward,
            image_layouts,
            feature_layer=feature_layer,
            signals=lambda record: record.signals(relevance=relevance, prompt=prompt),
        )
        return [
            TowerPruneOutput(
                features=torch.cat(image.kept),
                indices=image.selection.indices,
                stats=image.result.stats,
                budgets=image.result.budgets,
                selection=image.selection,
                layout=image.layout,
            )
            for image in pruned
        ]
