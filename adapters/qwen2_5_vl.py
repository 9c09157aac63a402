"""Adapters ``qwen2_5_vl`` and ``qwen2_vl``: Qwen2.5-VL and Qwen2-VL through their own ``generate``.

What differs from the LLaVA family, and how it is handled:

* **Dynamic resolution, no tiles.** Each image is one partition: its merged (LLM-visible)
  token grid of ``rows x cols = (h / 2) x (w / 2)`` patches (``image_grid_thw`` is in patch
  units). The grid is generally not square; its :class:`~tokenprune.Layout` is the
  ``max(rows, cols)`` square with the grid in the top-left corner (``Layout.grid``), the rest
  padding that no strategy keeps and no budget counts. A fraction budget is a fraction of the
  image's ``rows * cols`` merged tokens, floored.
* **No CLS token.** CLS-attention strategies (``cls_final``, ``hired``, ``hero``, ``prumerge``,
  ``prumerge_plus``) are refused when the pipeline is built; the tap serves merger features,
  attention received and keys (:mod:`tokenprune.adapters.taps.qwen_vit`).
* **M-RoPE positions.** Every LLM token carries ``(t, h, w)`` rotary positions computed from
  the input ids and ``image_grid_thw`` by the model's own ``get_rope_index``, which always
  lays out a whole grid for an image run. The adapter computes the stock positions on the
  unpruned prompt, deletes the columns of the pruned image tokens, and hands ``generate``
  explicit ``position_ids`` (``[4, B, L]``: the 1-D text positions of the pruned sequence, for
  the attention mask, then the three M-RoPE rows). ``generate`` extends them by one per new
  token, as it does for the stock prompt, so every kept token, every text token and every
  generated token keeps its stock position.

The pruned prompt is the stock prompt with some image tokens deleted, nothing else changed.
transformers is imported lazily.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tokenprune.adapter import ImageTokens, OrderedTokens, VLMAdapter
from tokenprune.contracts import (
    BudgetAllocator,
    Layout,
    Partitioner,
    Selection,
    Selector,
    Signals,
)
from tokenprune.errors import ConfigError, IncompatibleError, TokenpruneError
from tokenprune.registry import register_adapter
from tokenprune.tower import prune_batch

from ._generate_inputs import generate_inputs
from ._llava_family import (
    LlavaFamilyAdapter,
    LlavaImageStats,
    images_and_texts,
    record_with_prefill,
    wrapped,
)

if TYPE_CHECKING:
    from tokenprune.pipeline import Pipeline

__all__ = [
    "Qwen2VLAdapter",
    "Qwen2_5_VLAdapter",
    "QwenPartitioner",
    "generate_extends_positions",
    "merged_layout",
    "prune_sequence",
    "stock_positions",
]


# ---------------------------------------------------------------------------- geometry


def merged_layout(rows: int, cols: int, image_size: tuple[int, int] | None = None) -> Layout:
    """The :class:`Layout` of a ``rows x cols`` merged-token grid (one partition, ``Layout.grid``)."""
    side = max(rows, cols)
    valid = torch.zeros(side, side, dtype=torch.bool)
    valid[:rows, :cols] = True
    return Layout(side, (0, 0), False, valid.view(1, -1), None, image_size, grid=(rows, cols))


def _square_index(rows: int, cols: int, device: torch.device | None = None) -> torch.Tensor:
    """Index in the layout's square of each merged token, in raster order ``[rows * cols]``."""
    side = max(rows, cols)
    r = torch.arange(rows, device=device)[:, None]
    c = torch.arange(cols, device=device)[None, :]
    return (r * side + c).flatten()


def _to_square(raster: torch.Tensor, rows: int, cols: int, dim: int) -> torch.Tensor:
    """``raster`` (``rows * cols`` along ``dim``) embedded in the layout's square, zeros elsewhere."""
    side = max(rows, cols)
    shape = list(raster.shape)
    shape[dim] = side * side
    out = raster.new_zeros(shape)
    out.index_copy_(dim, _square_index(rows, cols, raster.device), raster)
    return out


def _raster_of(indices: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Layout-square indices back to raster indices of the merged grid (order kept)."""
    side = max(rows, cols)
    return (indices // side) * cols + indices % side


@dataclass(frozen=True)
class QwenPartitioner(Partitioner):
    """Image size -> the merged-grid Layout the processor's dynamic resize gives it.

    Mirrors ``Qwen2VLImageProcessor``: both sides rounded to a multiple of ``patch * merge``
    pixels, the area kept between ``min_pixels`` and ``max_pixels`` (the processor's own
    ``smart_resize``), then one merged token per ``patch * merge`` square.
    """

    patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int

    @classmethod
    def from_processor(cls, processor: Any) -> QwenPartitioner:
        images = processor.image_processor
        size = images.size
        shortest = size["shortest_edge"] if isinstance(size, dict) else size.shortest_edge
        longest = size["longest_edge"] if isinstance(size, dict) else size.longest_edge
        return cls(int(images.patch_size), int(images.merge_size), int(shortest), int(longest))

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """``(rows, cols)`` of merged tokens for an image of ``(height, width)`` pixels."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        factor = self.patch_size * self.merge_size
        height, width = smart_resize(*image_size, factor=factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return height // factor, width // factor

    def layout(self, image_size: tuple[int, int]) -> Layout:
        return merged_layout(*self.grid(image_size), image_size)


# ---------------------------------------------------------------------------- positions


def stock_positions(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_grid_thw: torch.Tensor
) -> torch.Tensor:
    """The M-RoPE positions ``[3, B, L]`` the stock model gives the unpruned prompt.

    Calls the model's own ``get_rope_index`` (with ``mm_token_type_ids`` where this
    transformers version takes them).
    """
    base = getattr(model, "model", model)
    config = model.config
    token_types = (input_ids == config.image_token_id).to(torch.int32)
    token_types = token_types + 2 * (input_ids == config.video_token_id).to(torch.int32)
    kwargs: dict[str, Any] = {"image_grid_thw": image_grid_thw, "attention_mask": attention_mask}
    if "mm_token_type_ids" in inspect.signature(base.get_rope_index).parameters:
        kwargs["mm_token_type_ids"] = token_types
    positions, _ = base.get_rope_index(input_ids, **kwargs)
    return positions


def prune_sequence(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    keep_image: torch.Tensor,
    image_token_id: int,
    pad_token_id: int,
) -> dict[str, torch.Tensor]:
    """Delete the pruned image tokens from a left-padded batch; everything else keeps its place.

    Args:
        input_ids, attention_mask: ``[B, L]`` of the stock prompt (left padding).
        positions: ``[3, B, L]`` its stock M-RoPE positions.
        keep_image: bool, one entry per image token of the batch in row-major order.

    Returns ``input_ids``, ``attention_mask`` (left padded again) and ``position_ids``
    ``[4, B, L']``: the pruned sequence's 1-D text positions (as ``generate`` derives them
    from the mask), then the stock M-RoPE rows of the tokens that remain.
    """
    real = attention_mask.bool()
    is_image = input_ids == image_token_id
    keep = real.clone()
    keep[is_image] = keep_image.to(keep.device) & real[is_image]
    lengths = keep.sum(dim=1)
    width = int(lengths.max()) if lengths.numel() else 0
    column = (width - lengths)[:, None] + keep.long().cumsum(dim=1) - 1  # left padding
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(keep)
    ids = input_ids.new_full((input_ids.shape[0], width), pad_token_id)
    ids[rows[keep], column[keep]] = input_ids[keep]
    mask = attention_mask.new_zeros((input_ids.shape[0], width))
    mask[rows[keep], column[keep]] = 1
    mrope = positions.new_zeros((3, input_ids.shape[0], width))
    mrope[:, rows[keep], column[keep]] = positions[:, keep]
    text = (mask.long().cumsum(dim=1) - 1).masked_fill(mask == 0, 0)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": torch.cat([text[None].to(mrope.dtype), mrope]),
    }


# ---------------------------------------------------------------------------- adapter


class _NoClsTower:
    """Stands for a Qwen tower in the shared CLS check, before any model exists."""

    has_cls_token = False
    serves_received_attention = True
    num_layers = 1 << 16
    tower_name = "Qwen2-VL / Qwen2.5-VL vision"


@register_adapter("qwen2_5_vl")
@dataclass(frozen=True)
class Qwen2_5_VLAdapter(VLMAdapter):
    """Qwen2.5-VL and Qwen2-VL: one partition per image, the merged token grid; M-RoPE kept.

    No options. See the module docstring for the geometry and the positions.
    """

    model_classes = ("Qwen2_5_VLForConditionalGeneration", "Qwen2VLForConditionalGeneration")
    processor_classes = ("Qwen2_5_VLProcessor", "Qwen2VLProcessor")

    # ------------------------------------------------------------------ checks
    @staticmethod
    def generate_refusal(model_class: Any) -> str | None:
        """Why ``prepare`` / ``attach`` refuse ``model_class``'s generate, or None (``tokenprune doctor``)."""
        if generate_extends_positions(model_class):
            return None
        return "its generate does not extend explicit M-RoPE position_ids; the Qwen adapters need transformers >= 5.2"

    def check_parts(self, allocator: BudgetAllocator, selector: Selector) -> None:
        from tokenprune.adapters.taps import check_needs

        for part, who in ((allocator, "allocator"), (selector, "selector")):
            label = f"{who} {part.registry_name or type(part).__name__!r}"
            check_needs(_NoClsTower(), part.needs, label)  # type: ignore[arg-type]
            if part.needs.relevance:
                raise IncompatibleError(
                    f"{label} needs prompt relevance, which the {self.registry_name!r} adapter does not "
                    "compute (no CLIP scorer for Qwen towers); use a strategy without relevance"
                )

    def check_model(self, model: Any, processor: Any = None) -> None:
        """Raise :class:`IncompatibleError` unless ``model`` / ``processor`` are Qwen2(.5)-VL."""
        name = self.registry_name or type(self).__name__
        names = [cls.__name__ for cls in type(model).__mro__]
        if not any(cls in self.model_classes for cls in names):
            raise IncompatibleError(
                f"adapter {name!r} works with {', '.join(self.model_classes)}; got a {type(model).__name__}. "
                "Pick the adapter for that model family (tokenprune list adapters)."
            )
        if processor is None:
            return
        if not any(cls.__name__ in self.processor_classes for cls in type(processor).__mro__):
            raise IncompatibleError(
                f"adapter {name!r} needs a {' or '.join(self.processor_classes)}; got a {type(processor).__name__}"
            )
        if processor.image_token_id != model.config.image_token_id:
            raise IncompatibleError(
                f"processor image_token_id={processor.image_token_id} but the model's is "
                f"{model.config.image_token_id}: the processor and model are from different checkpoints"
            )
        merge = getattr(processor.image_processor, "merge_size", None)
        if merge != model.config.vision_config.spatial_merge_size:
            raise IncompatibleError(
                f"processor merge_size={merge} but the model merges "
                f"{model.config.vision_config.spatial_merge_size} x {model.config.vision_config.spatial_merge_size} "
                "patches: the processor and model are from different checkpoints"
            )

    # ------------------------------------------------------------------ pruning
    def _tap(self, pipeline: Pipeline, model: Any) -> Any:
        from tokenprune.adapters.taps import QwenVisionTap, check_needs

        tap = QwenVisionTap(getattr(model, "model", model).visual)
        check_needs(tap, pipeline.allocator.needs, f"allocator {pipeline.part_label('allocator')}")
        check_needs(tap, pipeline.selector.needs, f"selector {pipeline.part_label('selector')}")
        return tap

    def prune_images(
        self, pipeline: Pipeline, model: Any, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
        image_sizes: Sequence[tuple[int, int] | None],
    ) -> list[ImageTokens]:
        """Tower once (with the tap) over every image, allocate, select; kept LLM embeddings per image."""
        tap = self._tap(pipeline, model)
        tower = tap.tower
        parameter = next(tower.parameters())
        grid = image_grid_thw.to(parameter.device)
        merge = int(tower.spatial_merge_size)
        shapes = [(int(t), int(h) // merge, int(w) // merge) for t, h, w in image_grid_thw.tolist()]
        for index, (frames, _, _) in enumerate(shapes):
            if frames != 1:
                raise IncompatibleError(f"image {index} has {frames} temporal patches; images have one")
        layouts = [merged_layout(rows, cols, size) for (_, rows, cols), size in zip(shapes, image_sizes)]

        def forward() -> None:
            with torch.inference_mode():
                tower(pixel_values.to(device=parameter.device, dtype=parameter.dtype), grid_thw=grid)

        pruned = prune_batch(pipeline, tap, forward, layouts, feature_layer=None, split=_split_record(tap.num_layers))
        images = []
        for image, (_, rows, cols) in zip(pruned, shapes):
            selection, stats = image.selection, image.result.stats
            if selection.extra_tokens and any(selection.extra_tokens):
                raise IncompatibleError(
                    f"selector {pipeline.part_label('selector')} adds summary tokens, which have no stock "
                    "M-RoPE position on Qwen; use a selector without extra tokens"
                )
            ordered = self.order_tokens(image.layout, (rows, cols), selection, image.kept)
            embeddings = self.project(model, ordered.tokens)
            image_stats = LlavaImageStats(
                image_size=image.layout.image_size,
                partitions=stats.partitions,
                full_tokens=stats.full_tokens,
                stock_image_tokens=rows * cols,
                budget=stats.budget,
                allocated=stats.allocated,
                kept=stats.kept,
                newline_tokens=0,
                image_tokens=int(embeddings.shape[0]),
            )
            images.append(ImageTokens(embeddings, image.layout, selection, image_stats, (rows, cols)))
        return images

    # ------------------------------------------------------------------ family geometry
    def partitioner(self, model: Any, processor: Any = None) -> QwenPartitioner:
        if processor is None:
            raise ConfigError("the Qwen partitioner reads the processor's min/max pixels: pass the processor")
        return QwenPartitioner.from_processor(processor)

    def order_tokens(
        self, layout: Layout, geometry: Any, selection: Selection, kept: Sequence[torch.Tensor]
    ) -> OrderedTokens:
        """Kept merged tokens in raster order of the grid: the stock order of the image's tokens."""
        return OrderedTokens(kept[0])

    def project(self, model: Any, tokens: torch.Tensor) -> torch.Tensor:
        """Identity: the tower's merger already produced LLM-space tokens (its features)."""
        return tokens

    # ------------------------------------------------------------------ pictures (tokenprune run / show)
    def _image_inputs(self, processor: Any, images: list[Any]) -> dict[str, Any]:
        inputs = processor.image_processor(images, return_tensors="pt")
        return {"pixel_values": inputs["pixel_values"], "image_sizes": inputs["image_grid_thw"]}

    def _crops_and_layouts(
        self, model: Any, processor: Any, pixel_values: torch.Tensor, image_sizes: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[Layout], list[Any]]:
        """Per image, the resized image as the tower saw it, padded to its layout's square."""
        vision = model.config.vision_config
        merge, patch, channels = vision.spatial_merge_size, vision.patch_size, vision.in_channels
        crops, layouts = [], []
        for patches, (frames, height, width) in zip(pixel_values.split((image_sizes.prod(-1)).tolist()), image_sizes.tolist()):
            rows, cols = height // merge, width // merge
            blocks = patches.view(rows, cols, merge, merge, channels, -1, patch, patch)[:, :, :, :, :, 0]
            picture = blocks.permute(4, 0, 2, 5, 1, 3, 6).reshape(channels, height * patch, width * patch)
            side = max(rows, cols) * merge * patch
            crops.append(torch.nn.functional.pad(picture, (0, side - width * patch, 0, side - height * patch))[None])
            layouts.append(merged_layout(rows, cols))
        return crops, layouts, [None] * len(crops)

    # ------------------------------------------------------------------ prepare
    def prepare(
        self,
        pipeline: Pipeline,
        model: Any,
        processor: Any,
        images: Any,
        text: str | Sequence[str],
        question: str | Sequence[str] | None = None,
        **tokenizer_kwargs: Any,
    ) -> dict[str, Any]:
        """kwargs for ``model.generate``: pruned ``input_ids``, ``attention_mask``, explicit
        ``position_ids`` and the kept image embeddings as ``mm_encoder_outputs``."""
        self.check_model(model, processor)
        if any(processor.video_token in t for t in ([text] if isinstance(text, str) else text or [])):
            raise ConfigError(
                f"the texts hold the video token {processor.video_token!r}; the {self.registry_name!r} adapter "
                "prunes images only (video inputs are not supported yet)"
            )
        image_list, texts, counts = images_and_texts(images, text, processor.image_token)
        _check_generate_positions(model)
        self._tap(pipeline, model)  # strategy/tower checks before the processor or tower runs
        try:
            inputs = processor.image_processor(image_list, return_tensors="pt")
        except Exception as error:  # the processor's own message says what it rejects
            raise ConfigError(f"the image processor rejected the images: {type(error).__name__}: {error}") from error
        grid = inputs["image_grid_thw"]
        sizes = [_size_of(image) for image in image_list]
        images = self.prune_images(pipeline, model, inputs["pixel_values"], grid, sizes)
        out = self.place(model, processor, texts, images, **tokenizer_kwargs)
        lengths = out["attention_mask"].sum(dim=1).tolist()
        record_with_prefill(pipeline, images, counts, lengths)
        return out

    def place(
        self, model: Any, processor: Any, texts: list[str], images: Sequence[ImageTokens], **tokenizer_kwargs: Any
    ) -> dict[str, Any]:
        """Tokenize the stock prompt (every image at its full grid), take the model's own
        M-RoPE positions of it, delete the pruned image tokens; kwargs for ``generate``."""
        token, image_token_id = processor.image_token, model.config.image_token_id
        stock_counts = [image.stats.stock_image_tokens for image in images]
        replacements = iter(token * count for count in stock_counts)
        expanded = [
            "".join(part + (next(replacements) if i < t.count(token) else "") for i, part in enumerate(t.split(token)))
            for t in texts
        ]
        tokenizer_kwargs.setdefault("padding", True)
        tokenizer_kwargs.setdefault("padding_side", "left")
        tokenized = processor.tokenizer(expanded, return_tensors="pt", **tokenizer_kwargs)
        input_ids, attention_mask = tokenized["input_ids"], tokenized["attention_mask"]
        if int((input_ids == image_token_id).sum()) != sum(stock_counts):
            raise TokenpruneError(
                f"the tokenizer produced {int((input_ids == image_token_id).sum())} image tokens, expected "
                f"{sum(stock_counts)}: the image token {token!r} must be a single special token"
            )
        return self._pruned_inputs(model, processor, input_ids, attention_mask, images)

    def _pruned_inputs(
        self, model: Any, processor: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: Sequence[ImageTokens]
    ) -> dict[str, Any]:
        """generate kwargs from the STOCK prompt: its positions, the pruned tokens deleted."""
        merge = model.config.vision_config.spatial_merge_size
        grid = torch.tensor([[1, rows * merge, cols * merge] for rows, cols in (image.geometry for image in images)])
        positions = stock_positions(model, input_ids, attention_mask, grid)
        keep_image = torch.cat([_kept_mask(image) for image in images])
        pad_id = processor.tokenizer.pad_token_id
        out = prune_sequence(
            input_ids, attention_mask, positions, keep_image, model.config.image_token_id, pad_id if pad_id is not None else 0
        )
        device = next(model.parameters()).device
        dtype = model.get_input_embeddings().weight.dtype
        embeddings = [image.embeddings.to(device=device, dtype=dtype) for image in images]
        # mm_encoder_outputs where generate takes it (transformers >= 5.18), else inputs_embeds
        inputs = generate_inputs(model, out["input_ids"], out["attention_mask"], embeddings)
        return {**inputs, "position_ids": out["position_ids"].to(device)}

    # ------------------------------------------------------------------ attach
    @contextmanager
    def attach(self, pipeline: Pipeline, model: Any, processor: Any) -> Iterator[None]:
        """Per-instance wrappers: the processor writes ``K`` image tokens per image and the
        model's ``generate`` prunes the pixels it is given and supplies the stock positions.

        ``K`` must be known before the model runs: an exact allocator and a non-adaptive
        selector. Leaving the context restores the processor and the model exactly.
        """
        self.check_model(model, processor)
        LlavaFamilyAdapter._require_fixed(self, pipeline)  # type: ignore[arg-type]
        _check_generate_positions(model)
        if not hasattr(processor, "replace_image_token"):  # transformers < 5.10
            raise IncompatibleError(
                f"Pipeline.attach cannot set the image-token count of this transformers version's "
                f"{type(processor).__name__} (it has no replace_image_token: it expands image tokens inline); "
                "use Pipeline.prepare(model, processor, images=..., text=...) and model.generate(**inputs)"
            )
        self._tap(pipeline, model)
        adapter = self
        merge = model.config.vision_config.spatial_merge_size

        def fixed_count(grid_row: Any) -> int:
            _, height, width = (int(v) for v in grid_row)
            layout = merged_layout(height // merge, width // merge)
            return min(pipeline.image_budget(layout), int(layout.capacity.sum()))

        original_replace = processor.replace_image_token

        @functools.wraps(original_replace)
        def replace_image_token(image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
            return processor.image_token * fixed_count(image_inputs["image_grid_thw"][image_idx])

        original_generate = model.generate

        @functools.wraps(original_generate)
        def generate(*args: Any, **kwargs: Any) -> Any:
            pixel_values = kwargs.get("pixel_values")
            if pixel_values is None or kwargs.get("mm_encoder_outputs") is not None:
                return original_generate(*args, **kwargs)
            input_ids = kwargs.pop("input_ids", args[0] if args else None)
            grid = kwargs.pop("image_grid_thw")
            attention_mask = kwargs.pop("attention_mask", None)
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            for name in ("pixel_values", "mm_token_type_ids", "position_ids"):
                kwargs.pop(name, None)
            pruned = adapter.prune_images(pipeline, model, pixel_values, grid, [None] * int(grid.shape[0]))
            pipeline.record_images(pruned)
            stock_ids, stock_mask = adapter._stock_prompt(model, processor, input_ids, attention_mask, pruned)
            inputs = adapter._pruned_inputs(model, processor, stock_ids, stock_mask, pruned)
            return original_generate(*args[1:], **kwargs, **inputs)

        wrappers = {(processor, "replace_image_token"): replace_image_token, (model, "generate"): generate}
        with wrapped(wrappers, processor, model):
            yield

    def _stock_prompt(
        self, model: Any, processor: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: list[ImageTokens]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The stock prompt of one the attached processor wrote with ``K`` tokens per image:
        each image's run back to its full grid (left padded again)."""
        image_token_id = model.config.image_token_id
        kept = [image.stats.image_tokens for image in images]
        full = [image.stats.stock_image_tokens for image in images]
        if int((input_ids == image_token_id).sum()) != sum(kept):
            raise TokenpruneError(
                f"the prompt holds {int((input_ids == image_token_id).sum())} image tokens but the pruned "
                f"images keep {sum(kept)}: call the processor inside the same attach block as generate"
            )
        rows, image = [], 0
        for ids in (row[mask.bool()] for row, mask in zip(input_ids.cpu(), attention_mask.cpu())):
            pieces, start = [], 0
            starts = torch.nonzero(ids == image_token_id).flatten()
            while starts.numel() and image < len(kept):  # one step per image, not per token
                first = int(starts[0])
                pieces += [ids[start:first], ids.new_full((full[image],), image_token_id)]
                start = first + kept[image]
                starts = starts[starts >= start]
                image += 1
            rows.append(torch.cat([*pieces, ids[start:]]))
        width = max(row.numel() for row in rows)
        pad_id = processor.tokenizer.pad_token_id or 0
        stock_ids = torch.stack([torch.cat([row.new_full((width - row.numel(),), pad_id), row]) for row in rows])
        stock_mask = torch.stack([torch.arange(width) >= width - row.numel() for row in rows]).long()
        return stock_ids, stock_mask


@register_adapter("qwen2_vl")
@dataclass(frozen=True)
class Qwen2VLAdapter(Qwen2_5_VLAdapter):
    """Qwen2-VL (alias of ``qwen2_5_vl``: the same code serves both families)."""


def generate_extends_positions(model: Any) -> bool:
    """Whether ``model.generate`` (a model or its class) carries explicit ``position_ids``,
    extending them by one per new token: what the pruned Qwen prompt needs.

    Before transformers 5.2, ``generate`` neither builds nor extends ``position_ids`` (it
    slices the given ones along the batch axis) and the Qwen models recompute positions from
    a full image grid, which a pruned prompt no longer holds; 5.2 brought both, and with them
    ``_prepare_position_ids_for_generation``, which this looks for.
    """
    return hasattr(model, "_prepare_position_ids_for_generation")


def _check_generate_positions(model: Any) -> None:
    """Refuse a ``generate`` that cannot carry the stock M-RoPE positions of a pruned prompt."""
    if not generate_extends_positions(model):
        import transformers

        raise IncompatibleError(
            f"{type(model).__name__}.generate of transformers {transformers.__version__} cannot take the "
            "explicit M-RoPE position_ids of a pruned Qwen prompt (its generate does not extend them); "
            "the Qwen adapters need transformers >= 5.2"
        )


def _size_of(image: Any) -> tuple[int, int] | None:
    size = getattr(image, "size", None)  # PIL: (width, height)
    return (int(size[1]), int(size[0])) if isinstance(size, tuple) and len(size) == 2 else None


def _kept_mask(image: ImageTokens) -> torch.Tensor:
    """bool ``[rows * cols]``: which of the image's stock tokens (raster order) are kept."""
    rows, cols = image.geometry
    mask = torch.zeros(rows * cols, dtype=torch.bool)
    mask[_raster_of(image.selection.indices[0].cpu(), rows, cols)] = True
    return mask


def _split_record(num_layers: int) -> Any:
    """The Qwen tap's record -> one Signals per image, each embedded in its layout's square."""

    def split(record: Any, layouts: Sequence[Layout]) -> list[Signals]:
        features = record.features()
        received = {layer: record.received_attention(layer) for layer in record.needs.received_attention}
        keys = {layer: record.keys(layer) for layer in record.needs.keys}
        signals = []
        for index, layout in enumerate(layouts):
            rows, cols = layout.grid
            signals.append(
                Signals(
                    features=_to_square(features[index], rows, cols, 0)[None],
                    keys={layer: _to_square(k[index], rows, cols, 0)[None] for layer, k in keys.items()},
                    received_attention={layer: _to_square(r[index], rows, cols, 1)[None] for layer, r in received.items()},
                    num_layers=num_layers,
                )
            )
        return signals

    return split
