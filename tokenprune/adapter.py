"""The adapter contracts (DESIGN §5): what a VLM adapter and a tower adapter must provide.

``Pipeline`` talks to adapters only through these types (``isinstance``, never
``hasattr``). Both kinds hand the batch's crops to the one shared tower-pruning routine,
:func:`tokenprune.tower.prune_batch`, which runs the tower once with the attention tap,
splits the signals per image, calls the strategies on the whole batch and gathers (or takes
the merged) kept features. An adapter contributes only its model family's geometry.

**A tower adapter** (:class:`TowerAdapter`) prunes a bare vision tower: it implements
:meth:`TowerAdapter.prune` (``Pipeline.prune``).

**A VLM adapter** (:class:`VLMAdapter`) wraps a whole vision-language model. ``Pipeline``
calls :meth:`~VLMAdapter.check_model`, :meth:`~VLMAdapter.prepare` and
:meth:`~VLMAdapter.attach`; a new family fills in, in one file:

* :meth:`~VLMAdapter.partitioner` — image size → :class:`~tokenprune.Layout` (one partition
  per image for dynamic-resolution models such as Qwen2.5-VL; a Layout's ``valid`` mask
  marks a non-square token grid inside its square, e.g. a 2x2-merged patch grid).
* :meth:`~VLMAdapter.order_tokens` — the kept tokens of one image (vision space) in the order
  the LLM reads them, plus where separator rows (newlines) go.
* :meth:`~VLMAdapter.project` — vision space → LLM space (the model's projector / merger).
* :meth:`~VLMAdapter.place` — the ``generate`` kwargs from the texts and the per-image
  :class:`ImageTokens`; each carries its :class:`~tokenprune.Selection` (the kept token
  indices per partition) and the adapter's own per-image ``geometry``, so model-specific
  positions (e.g. rotary position ids of the kept tokens) are computed here.

Adapters record what happened through public ``Pipeline`` methods
(:meth:`~tokenprune.Pipeline.part_label`, :meth:`~tokenprune.Pipeline.record_images`),
never through its private attributes.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .contracts import Adapter, Layout, Partitioner, Selection

if TYPE_CHECKING:
    from .pipeline import Pipeline

__all__ = ["Adapter", "ImageTokens", "OrderedTokens", "TowerAdapter", "VLMAdapter"]


@dataclass(frozen=True)
class OrderedTokens:
    """Kept vision-space tokens of one image in LLM order, and after which of them a
    separator row (e.g. LLaVA-NeXT's ``image_newline``) follows (ascending positions)."""

    tokens: torch.Tensor
    newline_after: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))


@dataclass(frozen=True, eq=False)
class ImageTokens:
    """One image after pruning: the LLM-space embeddings, in order, and how they came about.

    ``selection.indices`` are the kept token indices per partition; ``geometry`` is whatever
    the adapter's partitioning produced for this image (grid sizes, canvas shape), for
    placement hooks that need positions.
    """

    embeddings: torch.Tensor
    layout: Layout
    selection: Selection
    stats: Any
    geometry: Any = None


class TowerAdapter(Adapter):
    """Prunes a bare vision tower's patch tokens (``Pipeline.prune``)."""

    @abstractmethod
    def prune(
        self,
        pipeline: Pipeline,
        tower: Any,
        pixel_values: torch.Tensor,
        layouts: Sequence[Layout] | None = None,
        **kwargs: Any,
    ) -> list[Any]:
        """Run ``tower`` once on ``pixel_values`` and prune every image to its budget."""


class VLMAdapter(Adapter):
    """Knows one vision-language model family (see the module docs for the hooks).

    Class attributes:
        model_classes: model class names this adapter accepts (checked by name, so no
            model library is imported to check).
        processor_classes: processor class names it accepts.
    """

    model_classes: ClassVar[tuple[str, ...]] = ()
    processor_classes: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------ what Pipeline calls
    @abstractmethod
    def check_model(self, model: Any, processor: Any = None) -> None:
        """Raise :class:`~tokenprune.IncompatibleError` when ``model``/``processor`` are not
        this family (or disagree with each other). Called before anything runs."""

    @abstractmethod
    def prepare(
        self,
        pipeline: Pipeline,
        model: Any,
        processor: Any,
        images: Any,
        text: Any,
        question: Any = None,
        **tokenizer_kwargs: Any,
    ) -> dict[str, Any]:
        """kwargs for the unmodified ``model.generate`` with pruned images
        (``Pipeline.prepare``); records per-image :class:`ImageTokens` on the pipeline."""

    @abstractmethod
    def attach(self, pipeline: Pipeline, model: Any, processor: Any) -> AbstractContextManager[None]:
        """Context manager: ``processor`` and ``model`` prune on their own while inside
        (``Pipeline.attach``); leaving restores both exactly."""

    # ------------------------------------------------------------------ family geometry
    @abstractmethod
    def partitioner(self, model: Any, processor: Any = None) -> Partitioner:
        """Image size → Layout, mirroring the family's processor."""

    @abstractmethod
    def order_tokens(self, layout: Layout, geometry: Any, selection: Selection, kept: Sequence[torch.Tensor]) -> OrderedTokens:
        """Token ordering: ``kept`` (one ``[k_p, D]`` tensor per partition, kept tokens in
        spatial order, then any merged summary tokens) in the order the LLM reads them."""

    @abstractmethod
    def project(self, model: Any, tokens: torch.Tensor) -> torch.Tensor:
        """Projector hook: ``[K, D_vision]`` ordered tokens → ``[K, D_llm]`` embeddings."""

    @abstractmethod
    def place(self, model: Any, processor: Any, texts: list[str], images: Sequence[ImageTokens], **tokenizer_kwargs: Any) -> dict[str, Any]:
        """Placement hook: tokenize ``texts`` with exactly ``images[i].embeddings.shape[0]``
        placeholders per image (images in text order) and return the ``generate`` kwargs
        that put each image's embeddings (and positions) there."""
