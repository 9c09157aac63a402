"""Adapter ``llava_next`` (LLaVA-NeXT / LLaVA-1.6, ``LlavaNextForConditionalGeneration``).

Partitions are the thumbnail and the tiles of the processor's "anyres" grid, with HF's
exact geometry (:mod:`.llava_next_partitioner`). Token order for the LLM follows the stock
packing: the thumbnail's kept tokens first (raster order), then the kept tile tokens in
the raster order of the whole stitched canvas — not tile by tile — then any summary tokens
of merging selectors (thumbnail's after the thumbnail, the tiles' after the canvas, in
tile order).

Newline tokens (``newline``):

* ``"none"`` (default): no newline tokens; the budget counts every image token the LLM sees.
* ``"row"``: one ``image_newline`` after each canvas row that keeps at least one token,
  counted and reported separately (``newline_tokens``), not charged to the budget. At
  budget 1.0 this is exactly the stock model's input, for every image size: like the
  stock model, a zero-width unpadded canvas (very thin images) still gets one newline per
  row of its window.
* ``"canvas"``: the released HERO code's policy: one newline per row of the whole stitched
  canvas, padding rows and fully dropped rows included (with ``geometry="reference"``,
  what ``hero@reference`` needs to reproduce that code's LLM input).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from tokenprune.adapter import OrderedTokens
from tokenprune.contracts import Layout, Selection
from tokenprune.errors import ConfigError
from tokenprune.registry import register_adapter

from ._llava_family import LlavaFamilyAdapter
from .llava_next_partitioner import AnyresGeometry, LlavaNextPartitioner, tile_canvas_index

__all__ = ["LlavaNextAdapter"]


@register_adapter("llava_next")
@dataclass(frozen=True)
class LlavaNextAdapter(LlavaFamilyAdapter):
    """LLaVA-NeXT: thumbnail + anyres tiles, stitched-canvas token order, optional row newlines.

    Options:
        newline: ``"none"`` (default) or ``"row"`` (one newline per canvas row that keeps a
            token; ``"row"`` at budget 1.0 reproduces the stock model's input exactly).
        relevance_scorer: CLIP scorer for strategies that read prompt relevance
            (``'hf:/path'``, ``'open_clip:NAME:/path'`` or a RelevanceScorer).
        geometry: ``"hf"`` (default): tiles' valid tokens are what the model's unpadding
            keeps; ``"reference"``: the released HERO code's valid region (``int()`` of the
            scaled size, no extra row/column on an odd padding); see docs/strategies.md.
        newline ``"canvas"``: the released HERO code's policy, one newline per canvas row,
            padding and fully dropped rows included.
    """

    newline: Literal["none", "row", "canvas"] = "none"
    relevance_scorer: Any = None
    geometry: Literal["hf", "reference"] = "hf"

    model_classes = ("LlavaNextForConditionalGeneration",)
    processor_classes = ("LlavaNextProcessor",)

    def check_model(self, model: Any, processor: Any = None) -> None:
        super().check_model(model, processor)
        self.partitioner(model, processor)  # raises when they disagree

    def partitioner(self, model: Any, processor: Any = None) -> LlavaNextPartitioner:
        return LlavaNextPartitioner.from_model(model, processor, unpad_rule=self.geometry)

    def _image_inputs(self, processor: Any, images: list[Any]) -> dict[str, Any]:
        try:
            inputs = processor.image_processor(images, return_tensors="pt")
        except Exception as error:  # the processor's own message says what it rejects
            raise ConfigError(f"the image processor rejected the images: {type(error).__name__}: {error}") from error
        return {"pixel_values": inputs["pixel_values"], "image_sizes": inputs["image_sizes"]}

    def _crops_and_layouts(
        self, model: Any, processor: Any, pixel_values: torch.Tensor, image_sizes: Any
    ) -> tuple[list[torch.Tensor], list[Layout], list[Any]]:
        if image_sizes is None:
            raise ConfigError("LLaVA-NeXT needs image_sizes (the processor returns them with pixel_values)")
        partitioner = self.partitioner(model)
        sizes = [tuple(int(v) for v in size) for size in torch.as_tensor(image_sizes).tolist()]
        geometries = [partitioner.geometry(size) for size in sizes]
        counts = [g.num_crops for g in geometries]
        if pixel_values.dim() == 5:
            if pixel_values.shape[0] != len(sizes):
                raise ConfigError(f"{pixel_values.shape[0]} images of pixel_values but {len(sizes)} image_sizes")
            crops = [pixel_values[i, :count] for i, count in enumerate(counts)]
        elif pixel_values.dim() == 4:
            if pixel_values.shape[0] != sum(counts):
                raise ConfigError(
                    f"pixel_values hold {pixel_values.shape[0]} crops; the image sizes need {sum(counts)}"
                )
            crops = list(pixel_values.split(counts))
        else:
            raise ConfigError(f"pixel_values must be 4-D or 5-D, got shape {tuple(pixel_values.shape)}")
        for crop, count, size in zip(crops, counts, sizes):
            if crop.shape[0] != count:
                raise ConfigError(f"image of size {size} needs {count} crops, pixel_values hold {crop.shape[0]}")
        layouts = [partitioner.layout(size) for size in sizes]
        return crops, layouts, geometries

    def order_keys(self, layout: Layout, geometry: Any) -> torch.Tensor | None:
        """The thumbnail's tokens first (raster order), then the tiles' by their raster
        position on the stitched canvas (what :meth:`order_tokens` does), as sort keys."""
        assert isinstance(geometry, AnyresGeometry)
        return _canvas_keys(*geometry.tiles, geometry.tokens_per_side)

    def order_tokens(
        self, layout: Layout, geometry: Any, selection: Selection, kept: Sequence[torch.Tensor]
    ) -> OrderedTokens:
        assert isinstance(geometry, AnyresGeometry)
        features = kept
        kept_counts = [int(i.numel()) for i in selection.indices]
        thumbnail = features[0]
        tiles_kept = [f[:k] for f, k in zip(features[1:], kept_counts[1:])]
        tiles_extra = [f[k:] for f, k in zip(features[1:], kept_counts[1:])]
        canvas_index = geometry.canvas_index()
        positions = torch.cat([canvas_index[p, idx.cpu()] for p, idx in enumerate(selection.indices[1:])])
        order = torch.argsort(positions, stable=True)
        canvas_tokens = torch.cat(tiles_kept)[order.to(thumbnail.device)] if positions.numel() else thumbnail[:0]
        tokens = torch.cat([thumbnail, canvas_tokens, *tiles_extra])
        newline_after = torch.empty(0, dtype=torch.int64)
        if self.newline == "row" and positions.numel():
            width = geometry.canvas_shape[1]
            rows = positions[order] // width
            last_of_row = torch.ones_like(rows, dtype=torch.bool)
            last_of_row[:-1] = rows[1:] != rows[:-1]
            newline_after = torch.nonzero(last_of_row).flatten() + thumbnail.shape[0]
        elif self.newline == "row":  # a zero-width unpadded canvas: the stock model still closes its rows
            newline_after = torch.full((geometry.newline_only_rows,), thumbnail.shape[0] - 1, dtype=torch.int64)
        if self.newline == "canvas":  # after the last kept token of each canvas row, empty rows included
            width, height = geometry.canvas_shape[1], geometry.canvas_shape[0]
            per_row = torch.bincount(positions // width, minlength=height) if positions.numel() else torch.zeros(height, dtype=torch.int64)
            newline_after = per_row.cumsum(0) - 1 + thumbnail.shape[0]
        return OrderedTokens(tokens, newline_after)

    def _newline_embedding(self, model: Any) -> torch.Tensor | None:
        return getattr(getattr(model, "model", model), "image_newline", None)

    def _stock_image_tokens(self, layout: Layout, geometry: Any) -> int:
        return geometry.num_image_tokens(newline=True)

    def _layout_for_size(
        self, model: Any, processor: Any, image_inputs: dict, image_idx: int, size: Any
    ) -> tuple[Layout, Any]:
        if size is None:
            raise ConfigError("the LLaVA-NeXT processor returned no image_sizes")
        size = tuple(int(v) for v in (size.tolist() if hasattr(size, "tolist") else size))
        partitioner = self.partitioner(model)
        return partitioner.layout(size), partitioner.geometry(size)


@functools.lru_cache(maxsize=64)
def _canvas_keys(rows: int, cols: int, tokens_per_side: int) -> torch.Tensor:
    """int64 ``[1 + rows * cols, N]``: thumbnail token ``t`` -> ``t``; tile token -> ``N`` +
    its raster index on the stitched canvas."""
    n = tokens_per_side * tokens_per_side
    thumbnail = torch.arange(n, dtype=torch.int64)[None]
    return torch.cat([thumbnail, n + tile_canvas_index(rows, cols, tokens_per_side)])
