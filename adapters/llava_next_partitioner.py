"""LLaVA-NeXT ("anyres") partitions, mirroring the Hugging Face processor and model exactly.

What the HF code does with an image of ``(H, W)`` pixels (``transformers`` 5,
``models/llava_next``), and what this module reproduces:

1. *Processor.* Pick the best pinpoint ``(height, width)`` (``select_best_resolution``:
   most effective pixels, then least waste, first wins a tie); resize the image into it
   keeping the aspect ratio (the long fit side exactly, the other ``ceil``-ed, capped),
   pad it centred (the odd pixel goes to the bottom/right); cut the padded canvas into
   ``crop x crop`` tiles, row-major; prepend the thumbnail, the whole image squashed to
   ``crop x crop`` (its aspect ratio is not kept).
2. *Model* (``pack_image_features``). Stitch the tiles' token grids into one canvas of
   ``rows * side`` by ``cols * side`` tokens, then ``unpad_image`` cuts the padding off
   *in token units*, symmetrically, with its own rounding (``int(round(x, 7))`` and
   ``(current - new) // 2`` on both sides). A newline token follows each surviving canvas
   row; the thumbnail's tokens come first.

``valid`` marks exactly the tile tokens that step 2 keeps (not the tokens that happen to
overlap image pixels: the two differ by a token row at times, and the model is what the
LLM sees). ``overlap`` is computed from step 1's pixel geometry.

``transformers`` is never imported here; :meth:`LlavaNextPartitioner.from_model` only reads
attributes of the objects it is given.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tokenprune import ConfigError, ContractError, IncompatibleError, Layout, Partitioner

__all__ = [
    "AnyresGeometry",
    "LlavaNextPartitioner",
    "select_best_resolution",
    "resized_size",
    "unpad_window",
    "tile_canvas_index",
]


def _image_size(image_size: Any) -> tuple[int, int]:
    """``(height, width)`` as Python ints; accepts tuples, lists and 2-element tensors."""
    if isinstance(image_size, torch.Tensor):
        if image_size.numel() != 2 or image_size.is_floating_point():
            raise ContractError(
                f"image_size must be 2 integers (height, width), got a tensor of shape "
                f"{tuple(image_size.shape)} and dtype {image_size.dtype}"
            )
        image_size = image_size.flatten().tolist()
    try:
        height, width = image_size
    except (TypeError, ValueError):
        raise ContractError(f"image_size must be (height, width), got {image_size!r}") from None
    for value in (height, width):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ContractError(
                f"image_size must be (height, width) positive ints in pixels, got {image_size!r}"
            )
    return int(height), int(width)


def select_best_resolution(
    image_size: tuple[int, int], pinpoints: Sequence[tuple[int, int]]
) -> tuple[int, int]:
    """The ``(height, width)`` pinpoint HF picks for an image of ``(height, width)`` pixels.

    Maximises the image pixels that survive the aspect-preserving fit (never counting more
    than the original has), then minimises the wasted canvas; the first pinpoint wins a tie.
    When every candidate rounds the image to zero pixels, HF's loop keeps the first one.
    Same float operations, in the same order, as ``transformers.image_processing_utils``.
    """
    height, width = image_size
    best: tuple[int, int] | None = None
    best_effective, best_wasted = 0, math.inf
    for pin_height, pin_width in pinpoints:
        scale = min(pin_width / width, pin_height / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = pin_width * pin_height - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (pin_height, pin_width), effective, wasted
    assert best is not None  # pinpoints is never empty (checked by the partitioner)
    return best


def resized_size(image_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """``(height, width)`` of the image after the processor's aspect-preserving resize into
    ``target`` (HF's ``get_patch_output_size``: the tighter side fits exactly, the other is
    ``ceil``-ed and capped at the target)."""
    height, width = image_size
    target_height, target_width = target
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_height), target_width
    return target_height, min(math.ceil(width * scale_h), target_width)


def unpad_window(
    image_size: tuple[int, int], canvas_shape: tuple[int, int], rule: str = "hf"
) -> tuple[int, int, int, int]:
    """Token rows ``[top, bottom)`` and columns ``[left, right)`` of a ``canvas_shape`` token
    canvas that hold the image.

    ``rule="hf"``: what the model's ``unpad_image`` keeps (HF's rounding, exactly): the
    scaled side ``int(round(x, 7))``, ``padding = (canvas - scaled) // 2`` cut from *both*
    ends, so an odd difference keeps one row/column more than the scaled side.
    ``rule="reference"``: the valid region of the released HERO code, after the original
    LLaVA repository: the scaled side ``int(x)``, starting at the same ``padding`` and
    exactly ``scaled`` long.
    """
    height, width = image_size
    canvas_height, canvas_width = canvas_shape
    wide = width / height > canvas_width / canvas_height
    scaled = height * (canvas_width / width) if wide else width * (canvas_height / height)
    length = canvas_height if wide else canvas_width
    if rule == "hf":
        new = int(round(scaled, 7))
        padding = (length - new) // 2
        start, stop = padding, length - padding
    elif rule == "reference":
        new = int(scaled)
        start = (length - new) // 2
        stop = start + new
    else:
        raise ConfigError(f"unpad rule must be 'hf' or 'reference', got {rule!r}")
    return (start, stop, 0, canvas_width) if wide else (0, canvas_height, start, stop)


def tile_canvas_index(rows: int, cols: int, tokens_per_side: int) -> torch.Tensor:
    """int64 ``[rows * cols, side * side]``: raster index on the stitched token canvas
    (``rows * side`` by ``cols * side``, row-major) of token ``t`` of tile ``i``.

    Tiles are row-major (HF's crop order), tokens row-major inside their tile, so tile
    ``(r, c)``'s token ``(y, x)`` sits at canvas ``(r * side + y, c * side + x)``.
    """
    side = tokens_per_side
    tile_row = torch.arange(rows).repeat_interleave(cols)  # [T]
    tile_col = torch.arange(cols).repeat(rows)  # [T]
    token_row = torch.arange(side).repeat_interleave(side)  # [N]
    token_col = torch.arange(side).repeat(side)  # [N]
    canvas_row = tile_row[:, None] * side + token_row[None, :]
    canvas_col = tile_col[:, None] * side + token_col[None, :]
    return canvas_row * (cols * side) + canvas_col


def _axis_shares(
    length: int, resized: int, padding: int, tiles: int, crop: int, side: int
) -> torch.Tensor:
    """float64 ``[tiles, side]``: share of thumbnail patch band ``j`` (of the original
    image's ``length`` pixels, cut in ``side`` equal bands) inside tile ``t``'s band.

    Tile ``t`` covers canvas pixels ``[t * crop, (t + 1) * crop)``; the image occupies
    ``[padding, padding + resized)`` of the canvas, stretched linearly from ``[0, length)``.
    """
    canvas_edges = torch.arange(tiles + 1, dtype=torch.float64) * crop
    image_edges = ((canvas_edges - padding) * (length / resized)).clamp(0.0, float(length))
    tile_start, tile_stop = image_edges[:-1, None], image_edges[1:, None]
    band = length / side
    band_start = torch.arange(side, dtype=torch.float64)[None, :] * band
    inside = torch.minimum(tile_stop, band_start + band) - torch.maximum(tile_start, band_start)
    return inside.clamp_min(0.0) / band


@dataclass(frozen=True)
class AnyresGeometry:
    """Everything about one image's LLaVA-NeXT cut, in pixels and in tokens.

    Attributes:
        image_size: ``(height, width)`` of the original image.
        best_resolution: the chosen pinpoint ``(height, width)`` in pixels.
        tiles: ``(rows, cols)`` of the tile grid.
        tokens_per_side: tokens per side of one crop.
        resized_size: ``(height, width)`` of the image inside the padded pinpoint canvas.
        padding: ``(top, left)`` pixels of padding before the image on that canvas.
        window: ``(top, bottom, left, right)``: the token rows ``[top, bottom)`` and columns
            ``[left, right)`` of the stitched token canvas that the model keeps.
    """

    image_size: tuple[int, int]
    best_resolution: tuple[int, int]
    tiles: tuple[int, int]
    tokens_per_side: int
    resized_size: tuple[int, int]
    padding: tuple[int, int]
    window: tuple[int, int, int, int]

    @property
    def num_crops(self) -> int:
        """Crops the processor emits: the thumbnail plus every tile."""
        return 1 + self.tiles[0] * self.tiles[1]

    @property
    def canvas_shape(self) -> tuple[int, int]:
        """``(rows * side, cols * side)``: the stitched token canvas before unpadding."""
        return self.tiles[0] * self.tokens_per_side, self.tiles[1] * self.tokens_per_side

    @property
    def kept_shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of canvas tokens the model keeps (one newline per kept row)."""
        top, bottom, left, right = self.window
        return bottom - top, right - left

    @property
    def newline_only_rows(self) -> int:
        """Newlines the model emits with no canvas token beside them: when the unpadded
        window is rows tall but zero columns wide (images of aspect 1:12 and thinner on
        some grids), ``pack_image_features`` still closes each of those rows with a
        newline (and the processor counts them). 0 whenever the window holds a token."""
        kept_rows, kept_cols = self.kept_shape
        return kept_rows if kept_cols == 0 else 0

    def canvas_valid(self) -> torch.Tensor:
        """bool ``[rows * side, cols * side]``: the canvas tokens the model keeps."""
        top, bottom, left, right = self.window
        mask = torch.zeros(self.canvas_shape, dtype=torch.bool)
        mask[top:bottom, left:right] = True
        return mask

    def canvas_index(self) -> torch.Tensor:
        """int64 ``[rows * cols, N]``: canvas raster index of each tile token
        (see :func:`tile_canvas_index`)."""
        return tile_canvas_index(*self.tiles, self.tokens_per_side)

    def tile_valid(self) -> torch.Tensor:
        """bool ``[rows * cols, N]``: :meth:`canvas_valid` read back per tile and token."""
        return self.canvas_valid().flatten()[self.canvas_index()]

    def num_image_tokens(self, *, newline: bool = True) -> int:
        """Image tokens the unpruned model feeds the LLM (what the processor expands
        ``<image>`` to): the thumbnail's ``N``, the kept canvas, one newline per kept row."""
        kept_rows, kept_cols = self.kept_shape
        side = self.tokens_per_side
        return side * side + kept_rows * kept_cols + (kept_rows if newline else 0)


@dataclass(frozen=True)
class LlavaNextPartitioner(Partitioner):
    """Thumbnail + tile partitions of LLaVA-NeXT, with HF's exact geometry.

    Attributes:
        grid_pinpoints: candidate canvas sizes ``(height, width)`` in pixels, each a multiple
            of ``crop_size`` (HF's ``image_grid_pinpoints``, in HF's (height, width) order).
        crop_size: side of the square crop the tower sees (``vision_config.image_size``).
        patch_size: the tower's patch size; ``crop_size // patch_size`` tokens per side.
        unpad_rule: ``"hf"`` (default): ``valid`` is what the model keeps; ``"reference"``:
            the released HERO code's valid region (:func:`unpad_window`).
    """

    grid_pinpoints: tuple[tuple[int, int], ...]
    crop_size: int
    patch_size: int
    unpad_rule: str = "hf"

    def __post_init__(self) -> None:
        if self.unpad_rule not in ("hf", "reference"):
            raise ConfigError(
                f"LlavaNextPartitioner.unpad_rule must be 'hf' (the model's own unpadding) or "
                f"'reference' (the released HERO code's), got {self.unpad_rule!r}"
            )
        for name in ("crop_size", "patch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"LlavaNextPartitioner.{name} must be an int >= 1, got {value!r}")
        if self.crop_size % self.patch_size:
            raise ConfigError(
                f"LlavaNextPartitioner: crop_size {self.crop_size} must be a multiple of "
                f"patch_size {self.patch_size} (the tower's token grid must cover the crop)"
            )
        try:
            pinpoints = tuple((int(h), int(w)) for h, w in self.grid_pinpoints)
            exact = all(
                not isinstance(v, bool) and int(v) == v for pin in self.grid_pinpoints for v in pin
            )
        except (TypeError, ValueError):
            raise ConfigError(
                "LlavaNextPartitioner.grid_pinpoints must be (height, width) pairs of ints, "
                f"got {self.grid_pinpoints!r}"
            ) from None
        if not pinpoints or not exact:
            raise ConfigError(
                "LlavaNextPartitioner.grid_pinpoints must be a non-empty list of (height, width) "
                f"int pairs, got {self.grid_pinpoints!r}"
            )
        for height, width in pinpoints:
            if min(height, width) < self.crop_size or height % self.crop_size or width % self.crop_size:
                raise ConfigError(
                    f"LlavaNextPartitioner: grid pinpoint {(height, width)} must be positive "
                    f"multiples of crop_size {self.crop_size} in both sides (the processor cuts "
                    "the canvas into whole crops)"
                )
        object.__setattr__(self, "grid_pinpoints", pinpoints)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, config: Any, unpad_rule: str = "hf") -> LlavaNextPartitioner:
        """From a ``LlavaNextConfig`` (``image_grid_pinpoints`` and its ``vision_config``)."""
        pinpoints = getattr(config, "image_grid_pinpoints", None)
        vision = getattr(config, "vision_config", None)
        if pinpoints is None or vision is None:
            raise IncompatibleError(
                f"{type(config).__name__} is not a LLaVA-NeXT config: it needs "
                "image_grid_pinpoints and vision_config (LlavaNextConfig has both)"
            )
        return cls(
            grid_pinpoints=tuple(tuple(p) for p in pinpoints),
            crop_size=int(vision.image_size),
            patch_size=int(vision.patch_size),
            unpad_rule=unpad_rule,
        )

    @classmethod
    def from_model(cls, model: Any, processor: Any = None, unpad_rule: str = "hf") -> LlavaNextPartitioner:
        """From a LLaVA-NeXT model (its config is the truth the model packs by), checked
        against its processor (a ``LlavaNextProcessor`` or its image processor) when given.

        Raises:
            IncompatibleError: the model is not LLaVA-NeXT, or the processor would cut or
                count differently from the model (pinpoints, crop size, patch size, resize
                size, image-token count).
        """
        config = getattr(model, "config", model)
        partitioner = cls.from_config(config, unpad_rule)
        if processor is not None:
            partitioner._check_processor(processor, config)
        return partitioner

    def _check_processor(self, processor: Any, config: Any) -> None:
        images = getattr(processor, "image_processor", processor)
        where = type(images).__name__
        pinpoints = getattr(images, "image_grid_pinpoints", None)
        if pinpoints is None:
            raise IncompatibleError(
                f"{where} has no image_grid_pinpoints: a LLaVA-NeXT model needs "
                "LlavaNextImageProcessor (or LlavaNextImageProcessorPil)"
            )
        if tuple(tuple(int(v) for v in p) for p in pinpoints) != self.grid_pinpoints:
            raise IncompatibleError(
                f"processor image_grid_pinpoints {[list(p) for p in pinpoints]} differ from the "
                f"model's {[list(p) for p in self.grid_pinpoints]}: the model would unpack a "
                "different tile grid than the processor cut"
            )
        crop = _size_pair(getattr(images, "crop_size", None))
        if crop != (self.crop_size, self.crop_size):
            raise IncompatibleError(
                f"processor crop_size {crop} must be the tower's square input "
                f"({self.crop_size}, {self.crop_size}) (vision_config.image_size)"
            )
        size = _size_pair(getattr(images, "size", None))
        if size != (self.crop_size, self.crop_size):
            raise IncompatibleError(
                f"processor size {size} must equal the crop size {self.crop_size} "
                "(shortest_edge, or height and width): otherwise every crop is resized and "
                "centre-cropped again and the tiles no longer cover the image"
            )
        patch = getattr(processor, "patch_size", None)
        if patch is not None and int(patch) != self.patch_size:
            raise IncompatibleError(
                f"processor patch_size {patch} differs from the tower's patch_size "
                f"{self.patch_size}: the processor would insert the wrong number of <image> tokens"
            )
        strategy = getattr(processor, "vision_feature_select_strategy", None)
        model_strategy = getattr(config, "vision_feature_select_strategy", None)
        if strategy is not None and model_strategy is not None and strategy != model_strategy:
            raise IncompatibleError(
                f"processor vision_feature_select_strategy {strategy!r} differs from the "
                f"model's {model_strategy!r}"
            )
        extra = getattr(processor, "num_additional_image_tokens", None)
        tower = getattr(getattr(config, "vision_config", None), "model_type", None)
        if strategy is not None and extra is not None and tower == "clip_vision_model":
            # A CLIP tower emits N + 1 tokens per crop (CLS first); "default" drops the CLS.
            produced = 1 - int(model_strategy == "default")
            counted = int(extra) - int(strategy == "default")
            if counted != produced:
                side = self.tokens_per_side
                raise IncompatibleError(
                    f"the processor counts {side * side + counted} tokens per crop "
                    f"(num_additional_image_tokens={extra}, strategy {strategy!r}) but the CLIP "
                    f"tower yields {side * side + produced}: num_additional_image_tokens must be "
                    f"{produced + int(strategy == 'default')}"
                )

    # ------------------------------------------------------------------ geometry

    @property
    def tokens_per_side(self) -> int:
        return self.crop_size // self.patch_size

    def geometry(self, image_size: Any) -> AnyresGeometry:
        """The processor's and the model's cut of an image of ``(height, width)`` pixels
        (cached per partitioner and image size: a dataset repeats its sizes)."""
        return _cached_geometry(self, _image_size(image_size))

    def _geometry(self, size: tuple[int, int]) -> AnyresGeometry:
        best = select_best_resolution(size, self.grid_pinpoints)
        tiles = (best[0] // self.crop_size, best[1] // self.crop_size)
        resized = resized_size(size, best)
        padding = ((best[0] - resized[0]) // 2, (best[1] - resized[1]) // 2)
        side = self.tokens_per_side
        window = unpad_window(size, (tiles[0] * side, tiles[1] * side), self.unpad_rule)
        return AnyresGeometry(
            image_size=size,
            best_resolution=best,
            tiles=tiles,
            tokens_per_side=side,
            resized_size=resized,
            padding=padding,
            window=window,
        )

    def overlap(self, geometry: AnyresGeometry) -> torch.Tensor:
        """float32 ``[rows * cols, N]``: share of thumbnail patch ``j`` inside tile ``i``'s
        image region (columns sum to 1: the tiles' image regions partition the image)."""
        height, width = geometry.image_size
        rows, cols = geometry.tiles
        side = self.tokens_per_side
        (resized_h, resized_w), (top, left) = geometry.resized_size, geometry.padding
        share_y = _axis_shares(height, resized_h, top, rows, self.crop_size, side)
        share_x = _axis_shares(width, resized_w, left, cols, self.crop_size, side)
        # Tile (r, c) and thumbnail patch (a, b): the rectangle's share is the product of the
        # row band's and the column band's shares.
        shares = share_y[:, None, :, None] * share_x[None, :, None, :]  # [rows, cols, side, side]
        return shares.reshape(rows * cols, side * side).to(torch.float32)

    def layout(self, image_size: tuple[int, int]) -> Layout:
        """Thumbnail first, then tiles row-major; ``valid`` is what the model's unpad keeps.

        Cached per partitioner and image size (a Layout is immutable; its tensors are shared
        by every image of that size: read them, never write to them)."""
        return _cached_layout(self, _image_size(image_size))

    def _layout(self, size: tuple[int, int]) -> Layout:
        geometry = self.geometry(size)
        side = self.tokens_per_side
        thumbnail = torch.ones(1, side * side, dtype=torch.bool)
        return Layout(
            tokens_per_side=side,
            tiles=geometry.tiles,
            has_thumbnail=True,
            valid=torch.cat([thumbnail, geometry.tile_valid()]),
            overlap=self.overlap(geometry),
            image_size=geometry.image_size,
        )

    def num_image_tokens(self, image_size: Any, *, newline: bool = True) -> int:
        """Image tokens of the unpruned model for this image (the processor's count)."""
        return self.geometry(image_size).num_image_tokens(newline=newline)


#: Image sizes whose geometry and Layout are kept per partitioner (least recently used dropped).
LAYOUT_CACHE_SIZE = 1024


@functools.lru_cache(maxsize=LAYOUT_CACHE_SIZE)
def _cached_geometry(partitioner: LlavaNextPartitioner, size: tuple[int, int]) -> AnyresGeometry:
    return partitioner._geometry(size)


@functools.lru_cache(maxsize=LAYOUT_CACHE_SIZE)
def _cached_layout(partitioner: LlavaNextPartitioner, size: tuple[int, int]) -> Layout:
    return partitioner._layout(size)


def _size_pair(size: Any) -> tuple[int, int] | None:
    """``(height, width)`` of an HF size (dict or ``SizeDict``); ``shortest_edge`` counts as
    a square, since every crop the processor resizes is already square."""
    if size is None:
        return None

    def read(key: str) -> Any:
        return size.get(key) if isinstance(size, dict) else getattr(size, key, None)

    height, width, edge = read("height"), read("width"), read("shortest_edge")
    if height is not None and width is not None:
        return int(height), int(width)
    if edge is not None:
        return int(edge), int(edge)
    return None
