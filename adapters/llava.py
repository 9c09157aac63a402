"""Adapters ``llava`` (LLaVA-1.5) and ``sharegpt4v`` (ShareGPT4V): one partition per image.

Both run ``LlavaForConditionalGeneration``. The image is one square crop; its tokens are a
``side x side`` grid (``side = image_size // patch_size``, read from the model config:
576 tokens for CLIP ViT-L/14 at 336 px). Kept tokens go to the LLM in raster order.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tokenprune.adapter import OrderedTokens
from tokenprune.contracts import Layout, Partitioner, Selection
from tokenprune.errors import ConfigError, IncompatibleError
from tokenprune.registry import register_adapter

from ._llava_family import PARTITION_ORDER, LlavaFamilyAdapter

__all__ = ["LlavaAdapter", "ShareGPT4VAdapter", "SingleCropPartitioner"]


def _tokens_per_side(model: Any) -> int:
    vision = model.config.vision_config
    if vision.image_size % vision.patch_size:
        raise IncompatibleError(
            f"vision image_size {vision.image_size} is not a multiple of patch_size {vision.patch_size}"
        )
    return vision.image_size // vision.patch_size


def _crop_size(processor: Any) -> tuple[int, int] | None:
    image_processor = getattr(processor, "image_processor", None)
    size = getattr(image_processor, "crop_size", None)
    if size is None or not getattr(image_processor, "do_center_crop", True):
        size = getattr(image_processor, "size", None)
    if isinstance(size, dict) and "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    if hasattr(size, "height") and getattr(size, "height", None) is not None:
        return int(size.height), int(size.width)
    return None


@dataclass(frozen=True)
class SingleCropPartitioner(Partitioner):
    """One partition of ``tokens_per_side`` x ``tokens_per_side`` tokens, whatever the image size."""

    tokens_per_side: int

    def layout(self, image_size: tuple[int, int] | None) -> Layout:
        """Cached per side and image size (a Layout is immutable; its tensors are shared)."""
        size = tuple(int(v) for v in image_size) if image_size is not None else None
        return _single_layout(self.tokens_per_side, size)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=1024)
def _single_layout(tokens_per_side: int, size: tuple[int, int] | None) -> Layout:
    base = Layout.single(tokens_per_side)
    return Layout(tokens_per_side, (0, 0), False, base.valid, None, size)


@register_adapter("llava")
@dataclass(frozen=True)
class LlavaAdapter(LlavaFamilyAdapter):
    """LLaVA-1.5 (LlavaForConditionalGeneration): one partition of side x side tokens per image.

    Options:
        relevance_scorer: CLIP scorer for strategies that read prompt relevance
            (``'hf:/path'``, ``'open_clip:NAME:/path'`` or a RelevanceScorer); ``None``
            when no strategy needs it.
    """

    relevance_scorer: Any = None

    model_classes = ("LlavaForConditionalGeneration",)
    processor_classes = ("LlavaProcessor",)

    def check_model(self, model: Any, processor: Any = None) -> None:
        super().check_model(model, processor)
        if processor is None:
            return
        side = _tokens_per_side(model)
        patch = getattr(processor, "patch_size", None)
        if patch is not None and patch != model.config.vision_config.patch_size:
            raise IncompatibleError(
                f"processor patch_size={patch} but the model's vision tower uses "
                f"{model.config.vision_config.patch_size}: processor and model do not match"
            )
        crop = _crop_size(processor)
        expected = model.config.vision_config.image_size
        if crop is not None and crop != (expected, expected):
            raise IncompatibleError(
                f"the processor makes {crop[0]}x{crop[1]} crops but the vision tower expects "
                f"{expected}x{expected} ({side}x{side} tokens): processor and model do not match"
            )

    def _image_inputs(self, processor: Any, images: list[Any]) -> dict[str, Any]:
        try:
            inputs = processor.image_processor(images, return_tensors="pt")
        except Exception as error:  # the processor's own message says what it rejects
            raise ConfigError(f"the image processor rejected the images: {type(error).__name__}: {error}") from error
        sizes = []
        for image in images:
            size = getattr(image, "size", None)  # PIL: (width, height)
            sizes.append((int(size[1]), int(size[0])) if isinstance(size, tuple) and len(size) == 2 else None)
        return {"pixel_values": inputs["pixel_values"], "image_sizes": sizes}

    def _crops_and_layouts(
        self, model: Any, processor: Any, pixel_values: torch.Tensor, image_sizes: Any
    ) -> tuple[list[torch.Tensor], list[Layout], list[Any]]:
        if pixel_values.dim() != 4:
            raise ConfigError(f"LLaVA pixel_values must be [B, 3, H, W], got {tuple(pixel_values.shape)}")
        partitioner = self.partitioner(model)
        crops = list(pixel_values.split(1))
        sizes = list(image_sizes) if image_sizes is not None else [None] * len(crops)
        if len(sizes) != len(crops):
            raise ConfigError(f"pixel_values hold {len(crops)} images but {len(sizes)} image sizes were given")
        return crops, [partitioner.layout(size) for size in sizes], [None] * len(crops)

    def partitioner(self, model: Any, processor: Any = None) -> SingleCropPartitioner:
        return SingleCropPartitioner(_tokens_per_side(model))

    def order_keys(self, layout: Layout, geometry: Any) -> torch.Tensor | None:
        return PARTITION_ORDER  # one partition, kept tokens in raster order

    def order_tokens(
        self, layout: Layout, geometry: Any, selection: Selection, kept: Sequence[torch.Tensor]
    ) -> OrderedTokens:
        return OrderedTokens(kept[0])

    def _stock_image_tokens(self, layout: Layout, geometry: Any) -> int:
        return layout.tokens_per_partition

    def _layout_for_size(
        self, model: Any, processor: Any, image_inputs: dict, image_idx: int, size: Any
    ) -> tuple[Layout, Any]:
        return Layout.single(_tokens_per_side(model)), None


@register_adapter("sharegpt4v")
@dataclass(frozen=True)
class ShareGPT4VAdapter(LlavaAdapter):
    """ShareGPT4V (LLaVA-1.5 architecture): pad-to-square preprocessing, one partition per image.

    ShareGPT4V's released code pads every image to a square with the mean colour before
    resizing (``image_aspect_ratio="pad"``); a checkpoint converted with
    ``tokenprune convert sharegpt4v`` gets a processor that does this. The adapter checks
    that the processor pads (option ``require_padding``), because a centre-cropping
    processor silently drops the image's borders.
    """

    require_padding: bool = True

    def check_model(self, model: Any, processor: Any = None) -> None:
        super().check_model(model, processor)
        if processor is None or not self.require_padding:
            return
        image_processor = getattr(processor, "image_processor", None)
        if not getattr(image_processor, "do_pad", False):
            raise IncompatibleError(
                "ShareGPT4V pads images to a square before resizing, but this processor "
                f"({type(image_processor).__name__}) does not (do_pad is off): use the processor "
                "written by 'tokenprune convert sharegpt4v', or pass require_padding=False to run anyway"
            )
