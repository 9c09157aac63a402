"""The contracts between stages (DESIGN §3): plain dataclasses of tensors and small ABCs.

Data flows ``Partitioner -> Layout``, ``tower + AttentionTap -> Signals``,
``BudgetAllocator -> budgets``, ``Selector -> Selection``. Every dataclass validates
itself on construction, so a malformed value fails where it is made, not three stages
later. Strategies only ever see ``Layout`` and ``Signals``; they never see a model.

Conventions
-----------
* ``P`` partitions per image: the thumbnail (if any) first, then tiles in row-major order.
* ``N = tokens_per_side ** 2`` patch tokens per partition, row-major, CLS excluded.
* Layer numbers are 0-based encoder blocks; negative numbers count from the end
  (``-2`` is block 22 of a 24-block tower).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, ClassVar

import torch

from .errors import ContractError, SignalError
from .options import check_option_types

__all__ = [
    "Adapter",
    "AttentionTap",
    "BudgetAllocator",
    "Layout",
    "Needs",
    "Partitioner",
    "Selection",
    "Selector",
    "Signals",
    "validating",
    "validation",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Value checks that read tensors back to the host (one sync each on an accelerator) run only
# in validation mode; shape, dtype and count checks are free and always run (DESIGN §6).
_VALIDATE = [os.environ.get("TOKENPRUNE_VALIDATE", "0").strip().lower() not in ("", "0", "false", "no")]


def validating() -> bool:
    """Whether value checks that cost a host read run (``TOKENPRUNE_VALIDATE=1``; default off)."""
    return _VALIDATE[0]


@contextmanager
def validation(enabled: bool = True) -> Iterator[None]:
    """Turn the value checks of ``Selection`` and ``Pipeline.apply`` on (or off) inside a block.

    Off by default: the hot path makes no host read for validation. The test suite and the
    invariant suite (:mod:`tokenprune.testing`) run with it on.
    """
    previous = _VALIDATE[0]
    _VALIDATE[0] = bool(enabled)
    try:
        yield
    finally:
        _VALIDATE[0] = previous


def _require(condition: bool, message: str, error: type[Exception] = ContractError) -> None:
    if not condition:
        raise error(message)


def _check_int(value: object, name: str, *, minimum: int = 0) -> int:
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
        f"{name} must be an int >= {minimum}, got {value!r}",
    )
    return value  # type: ignore[return-value]


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    if tensor.numel() and not bool(torch.isfinite(tensor).all()):  # a host read: see validating()
        bad = int((~torch.isfinite(tensor)).sum())
        raise SignalError(f"{what} holds {bad} NaN/inf value(s); signals must be finite")


# --------------------------------------------------------------------------- Layout


@dataclass(frozen=True, eq=False)
class Layout:
    """How one image was cut into partitions, and which of their tokens are real.

    Attributes:
        tokens_per_side: patches per side of every partition (24 for CLIP-L/14 at 336 px).
        tiles: ``(rows, cols)`` of the tile grid; ``(0, 0)`` when the image is one partition.
        has_thumbnail: whether partition 0 is a downscaled view of the whole image.
        valid: bool ``[P, N]``; ``False`` marks padding tokens that no strategy may keep.
        overlap: float ``[P - 1, N]`` when there is a thumbnail and tiles, else ``None``:
            ``overlap[i, j]`` is the share of thumbnail patch ``j`` that lies inside tile
            ``i``'s image region, computed in 2-D image coordinates.
        image_size: optional ``(height, width)`` of the original image, for reports.
        grid: ``(rows, cols)`` of a single partition whose tokens form a non-square grid
            (Qwen2-VL's dynamic resolution), or ``None``. Its tokens sit row by row in the
            top-left ``rows x cols`` corner of the ``tokens_per_side`` square
            (``tokens_per_side == max(rows, cols)``); the rest of the square is padding
            (``valid`` is ``False`` there) and does not count in :attr:`full_tokens`.
    """

    tokens_per_side: int
    tiles: tuple[int, int]
    has_thumbnail: bool
    valid: torch.Tensor
    overlap: torch.Tensor | None = None
    image_size: tuple[int, int] | None = None
    grid: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        side = _check_int(self.tokens_per_side, "Layout.tokens_per_side", minimum=1)
        _require(
            isinstance(self.tiles, tuple)
            and len(self.tiles) == 2
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.tiles),
            f"Layout.tiles must be a (rows, cols) tuple of ints >= 0, got {self.tiles!r}",
        )
        rows, cols = self.tiles
        _require(
            (rows == 0) == (cols == 0),
            f"Layout.tiles must be (0, 0) or both positive, got {self.tiles!r}",
        )
        _require(isinstance(self.has_thumbnail, bool), "Layout.has_thumbnail must be a bool")
        _require(
            not (self.has_thumbnail and rows == 0),
            "Layout.has_thumbnail=True needs tiles; a single-partition image has tiles=(0, 0) "
            "and has_thumbnail=False",
        )
        expected_p = int(self.has_thumbnail) + rows * cols if rows else 1
        n = side * side
        valid = self.valid
        _require(isinstance(valid, torch.Tensor), "Layout.valid must be a torch.Tensor")
        _require(
            valid.dtype == torch.bool,
            f"Layout.valid must be a bool tensor, got dtype {valid.dtype}",
        )
        _require(
            tuple(valid.shape) == (expected_p, n),
            f"Layout.valid must have shape [P, N] = [{expected_p}, {n}] for tiles={self.tiles}, "
            f"has_thumbnail={self.has_thumbnail}, tokens_per_side={side}; got {tuple(valid.shape)}",
        )
        if self.has_thumbnail:
            overlap = self.overlap
            _require(
                isinstance(overlap, torch.Tensor),
                "Layout.overlap is required when there is a thumbnail and tiles",
            )
            assert overlap is not None
            _require(
                overlap.dtype in _FLOAT_DTYPES,
                f"Layout.overlap must be a float tensor, got dtype {overlap.dtype}",
            )
            _require(
                tuple(overlap.shape) == (expected_p - 1, n),
                f"Layout.overlap must have shape [P - 1, N] = [{expected_p - 1}, {n}], "
                f"got {tuple(overlap.shape)}",
            )
            if overlap.numel():
                _check_finite(overlap, "Layout.overlap")
                low, high = float(overlap.min()), float(overlap.sum(0).max())
                _require(
                    low >= 0.0 and high <= 1.0 + 1e-4,
                    "Layout.overlap must lie in [0, 1] with at most 1 in total per thumbnail "
                    f"patch; got min {low:.4g}, largest column sum {high:.4g}",
                )
        else:
            _require(
                self.overlap is None,
                "Layout.overlap must be None without a thumbnail (it maps tiles onto the thumbnail)",
            )
        # The mask on the host, read once here (where the layout is made, not per apply):
        # valid counts, and each row as bytes, a hashable key for geometry-only strategies.
        rows = valid.tolist()
        object.__setattr__(self, "_capacity_counts", tuple(sum(row) for row in rows))
        object.__setattr__(self, "_valid_rows", tuple(bytes(row) for row in rows))
        if self.image_size is not None:
            _require(
                isinstance(self.image_size, tuple)
                and len(self.image_size) == 2
                and all(isinstance(s, int) and s > 0 for s in self.image_size),
                f"Layout.image_size must be (height, width) positive ints, got {self.image_size!r}",
            )
        if self.grid is not None:
            self._check_grid(side)

    def _check_grid(self, side: int) -> None:
        grid = self.grid
        _require(
            isinstance(grid, tuple)
            and len(grid) == 2
            and all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)
            and max(grid) == side,
            f"Layout.grid must be (rows, cols) ints >= 1 with max(rows, cols) == tokens_per_side "
            f"= {side}, got {grid!r}",
        )
        _require(self.tiles == (0, 0), "Layout.grid describes a single partition; tiles must be (0, 0)")
        assert grid is not None
        inside = torch.zeros(side, side, dtype=torch.bool)
        inside[: grid[0], : grid[1]] = True
        _require(
            not bool((self.valid.view(-1, side, side).cpu() & ~inside).any()),
            f"Layout.valid marks tokens outside the {grid[0]}x{grid[1]} grid as valid",
        )

    @classmethod
    def single(cls, tokens_per_side: int, *, valid: torch.Tensor | None = None) -> Layout:
        """A one-partition layout (LLaVA-1.5, a bare tower), all tokens valid by default."""
        if valid is None:
            valid = torch.ones(1, tokens_per_side * tokens_per_side, dtype=torch.bool)
        return cls(tokens_per_side=tokens_per_side, tiles=(0, 0), has_thumbnail=False, valid=valid)

    @property
    def num_partitions(self) -> int:
        return int(self.valid.shape[0])

    @property
    def tokens_per_partition(self) -> int:
        return self.tokens_per_side * self.tokens_per_side

    @property
    def full_tokens(self) -> int:
        """``P * N`` (``rows * cols`` with a :attr:`grid`): what a fraction budget is a
        fraction of (padding included, except the square's filler around a grid)."""
        if self.grid is not None:
            return self.grid[0] * self.grid[1]
        return self.num_partitions * self.tokens_per_partition

    @property
    def capacity(self) -> torch.Tensor:
        """Valid (keepable) tokens per partition, int64 ``[P]``."""
        return self.valid.sum(dim=1)

    @property
    def capacity_counts(self) -> tuple[int, ...]:
        """:attr:`capacity` as host ints, computed once when the layout was made (no sync)."""
        return self._capacity_counts  # type: ignore[attr-defined, no-any-return]

    @property
    def valid_rows(self) -> tuple[bytes, ...]:
        """:attr:`valid` on the host, one ``bytes`` of 0/1 per partition (``N`` long),
        copied once when the layout was made (no sync): a hashable key of a partition's
        geometry, for strategies that cache what they compute from the mask alone."""
        return self._valid_rows  # type: ignore[attr-defined, no-any-return]

    def valid_on(self, device: torch.device | str) -> torch.Tensor:
        """:attr:`valid` on ``device``, copied once per device without a sync (layouts are
        cached and reused per image size, so the hot path finds the copy already there).
        Never write into it, nor into :attr:`valid`: cached layouts are shared."""
        return self._on("valid", self.valid, device)

    def overlap_on(self, device: torch.device | str) -> torch.Tensor | None:
        """:attr:`overlap` on ``device``, like :meth:`valid_on`."""
        return None if self.overlap is None else self._on("overlap", self.overlap, device)

    def _on(self, name: str, tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        device = torch.device(device)
        if tensor.device == device or (device.index is None and tensor.device.type == device.type):
            return tensor
        copies = self.__dict__.setdefault("_device_copies", {})  # frozen dataclass: no __setattr__
        key = (name, device)
        if key not in copies:
            copies[key] = to_device(tensor, device)
        return copies[key]  # type: ignore[no-any-return]

    @property
    def tile_slice(self) -> slice:
        """Indices of the tiles among the partitions."""
        return slice(1 if self.has_thumbnail else 0, self.num_partitions)

    def partition_names(self) -> list[str]:
        """Readable names: ``thumbnail``, ``tile r0c1`` ..., or ``image``."""
        rows, cols = self.tiles
        if rows == 0:
            return ["image"]
        names = ["thumbnail"] if self.has_thumbnail else []
        names += [f"tile r{r}c{c}" for r in range(rows) for c in range(cols)]
        return names


# --------------------------------------------------------------------------- Needs


def _layer_set(value: Iterable[int] | int, name: str) -> frozenset[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    try:
        layers = frozenset(value)
    except TypeError:
        raise ContractError(f"Needs.{name} must be a set of layer ints, got {value!r}") from None
    for layer in layers:
        _require(
            isinstance(layer, int) and not isinstance(layer, bool),
            f"Needs.{name} must hold layer ints (negative counts from the end), got {layer!r}",
        )
    return layers


@dataclass(frozen=True)
class Needs:
    """What a strategy asks the attention tap for; the tap computes nothing else.

    Attributes:
        cls_attention: blocks whose CLS->patch attention row is needed, per head.
        wide_cls_attention: blocks whose CLS row is needed with the whole width treated
            as one head (PruMerge's released code does this).
        cls_embedding: blocks whose output CLS hidden state is needed.
        keys: blocks whose patch keys are needed (e.g. PruMerge's merge neighbourhoods).
        received_attention: blocks whose attention *received* per token is needed (column
            means of the block's attention map, per head; needs no CLS token).
        relevance: whether a per-partition prompt-relevance score is needed.
        features: whether the selector reads the features (merging selectors do).
        cls_token: whether the tower must have a CLS token (derived: any CLS signal).
    """

    cls_attention: frozenset[int] = frozenset()
    wide_cls_attention: frozenset[int] = frozenset()
    cls_embedding: frozenset[int] = frozenset()
    keys: frozenset[int] = frozenset()
    relevance: bool = False
    features: bool = False
    received_attention: frozenset[int] = frozenset()

    _LAYER_FIELDS: ClassVar[tuple[str, ...]] = (
        "cls_attention",
        "wide_cls_attention",
        "cls_embedding",
        "keys",
        "received_attention",
    )

    def __post_init__(self) -> None:
        for name in self._LAYER_FIELDS:
            object.__setattr__(self, name, _layer_set(getattr(self, name), name))
        for name in ("relevance", "features"):
            _require(isinstance(getattr(self, name), bool), f"Needs.{name} must be a bool")

    def __or__(self, other: Needs) -> Needs:
        if not isinstance(other, Needs):
            return NotImplemented
        return Needs(
            **{n: getattr(self, n) | getattr(other, n) for n in self._LAYER_FIELDS},
            relevance=self.relevance or other.relevance,
            features=self.features or other.features,
        )

    @classmethod
    def union(cls, *needs: Needs) -> Needs:
        result = cls()
        for item in needs:
            result = result | item
        return result

    @property
    def cls_token(self) -> bool:
        return bool(self.cls_attention or self.wide_cls_attention or self.cls_embedding)

    @property
    def layers(self) -> frozenset[int]:
        """Every block any field names (as given, possibly negative)."""
        return frozenset().union(*(getattr(self, n) for n in self._LAYER_FIELDS))

    def resolve(self, num_layers: int) -> Needs:
        """Same needs with every layer made non-negative for a tower of ``num_layers`` blocks."""
        _check_int(num_layers, "num_layers", minimum=1)
        resolved = {}
        for name in self._LAYER_FIELDS:
            layers = set()
            for layer in getattr(self, name):
                absolute = layer + num_layers if layer < 0 else layer
                _require(
                    0 <= absolute < num_layers,
                    f"layer {layer} in Needs.{name} is out of range for a tower with "
                    f"{num_layers} blocks (allowed: {-num_layers}..{num_layers - 1})",
                    SignalError,
                )
                layers.add(absolute)
            resolved[name] = frozenset(layers)
        return Needs(**resolved, relevance=self.relevance, features=self.features)

    def describe(self) -> str:
        parts = []
        for name in self._LAYER_FIELDS:
            layers = getattr(self, name)
            if layers:
                parts.append(f"{name}{sorted(layers)}")
        if self.relevance:
            parts.append("relevance")
        if self.features:
            parts.append("features")
        return ", ".join(parts) or "nothing"


# --------------------------------------------------------------------------- Signals


def _frozen_layers(mapping: Mapping[int, torch.Tensor] | None, name: str) -> Mapping[int, torch.Tensor]:
    if mapping is None:
        return MappingProxyType({})
    if not isinstance(mapping, Mapping):
        raise ContractError(
            f"Signals.{name} must be a {{layer: tensor}} mapping, got {type(mapping).__name__}"
        )
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True, eq=False)
class Signals:
    """What the tower computed for one image's ``P`` partitions.

    Attributes:
        features: ``[P, N, D]`` at the model's feature layer (CLS removed), or ``None``.
        cls_attention: ``{layer: [P, H, N]}`` float, softmax over all keys (CLS included),
            then the CLS column dropped, so a row sums to ``1 - attn(CLS->CLS)``.
        wide_cls_attention: ``{layer: [P, 1, N]}``, same with the width as one head.
        cls_embedding: ``{layer: [P, D]}`` CLS hidden state at the output of ``layer``.
        keys: ``{layer: [P, N, Dk]}`` patch keys of ``layer`` (heads concatenated).
        relevance: ``[P]`` prompt relevance per partition, or ``None``.
        received_attention: ``{layer: [P, H, N]}`` float, attention each token receives in
            ``layer``: per head, the mean over the block's queries of their softmax rows
            (a row over the tokens a query attends to sums to 1, so does each head here).
        prompt: the prompt text, when known.
        num_layers: the tower's depth, used to resolve negative layer numbers.
    """

    features: torch.Tensor | None = None
    cls_attention: Mapping[int, torch.Tensor] = field(default_factory=dict)
    wide_cls_attention: Mapping[int, torch.Tensor] = field(default_factory=dict)
    cls_embedding: Mapping[int, torch.Tensor] = field(default_factory=dict)
    keys: Mapping[int, torch.Tensor] = field(default_factory=dict)
    relevance: torch.Tensor | None = None
    prompt: str | None = None
    num_layers: int | None = None
    received_attention: Mapping[int, torch.Tensor] = field(default_factory=dict)

    _LAYER_FIELDS: ClassVar[tuple[str, ...]] = Needs._LAYER_FIELDS

    def __post_init__(self) -> None:
        if self.num_layers is not None:
            _check_int(self.num_layers, "Signals.num_layers", minimum=1)
        for name in self._LAYER_FIELDS:
            object.__setattr__(self, name, _frozen_layers(getattr(self, name), name))
        p: int | None = None
        n: int | None = None

        def agree(what: str, tensor: torch.Tensor, rank: int, token_dim: int | None) -> None:
            nonlocal p, n
            _require(isinstance(tensor, torch.Tensor), f"{what} must be a torch.Tensor")
            _require(
                tensor.dim() == rank,
                f"{what} must have {rank} dims, got shape {tuple(tensor.shape)}",
            )
            _require(tensor.dtype in _FLOAT_DTYPES, f"{what} must be floating, got {tensor.dtype}")
            if p is None:
                p = int(tensor.shape[0])
            _require(
                int(tensor.shape[0]) == p,
                f"{what} has {tensor.shape[0]} partitions, other signals have {p}",
            )
            if token_dim is not None:
                tokens = int(tensor.shape[token_dim])
                if n is None:
                    n = tokens
                _require(tokens == n, f"{what} has {tokens} tokens, other signals have {n}")

        if self.features is not None:
            agree("Signals.features", self.features, 3, 1)
        for name, rank, token_dim in (
            ("cls_attention", 3, 2),
            ("wide_cls_attention", 3, 2),
            ("cls_embedding", 2, None),
            ("keys", 3, 1),
            ("received_attention", 3, 2),
        ):
            for layer, tensor in getattr(self, name).items():
                _require(
                    isinstance(layer, int) and not isinstance(layer, bool),
                    f"Signals.{name} keys must be layer ints, got {layer!r}",
                )
                if self.num_layers is not None:
                    _require(
                        -self.num_layers <= layer < self.num_layers,
                        f"Signals.{name} has layer {layer}, out of range for "
                        f"{self.num_layers} blocks",
                    )
                what = f"Signals.{name}[{layer}]"
                agree(what, tensor, rank, token_dim)
                if name == "wide_cls_attention":
                    _require(tensor.shape[1] == 1, f"{what} must have one head, got {tensor.shape[1]}")
                if name != "keys" and validating():
                    _check_finite(tensor, what)
        if self.relevance is not None:
            agree("Signals.relevance", self.relevance, 1, None)
            if validating():
                _check_finite(self.relevance, "Signals.relevance")

    @property
    def num_partitions(self) -> int | None:
        for tensor in self._tensors():
            return int(tensor.shape[0])
        return None

    def _tensors(self) -> Iterator[torch.Tensor]:
        if self.features is not None:
            yield self.features
        for name in self._LAYER_FIELDS:
            yield from getattr(self, name).values()
        if self.relevance is not None:
            yield self.relevance

    def _lookup(self, name: str, layer: int, hint: str) -> torch.Tensor:
        mapping: Mapping[int, torch.Tensor] = getattr(self, name)
        if layer in mapping:
            return mapping[layer]
        if self.num_layers is not None:
            other = layer + self.num_layers if layer < 0 else layer - self.num_layers
            if other in mapping:
                return mapping[other]
        available = sorted(mapping) or "none"
        raise SignalError(
            f"Signals.{name} has no layer {layer} (available: {available}); "
            f"{hint} declare it in its Needs so the tap computes it"
        )

    def attention(self, layer: int, *, wide: bool = False) -> torch.Tensor:
        """CLS->patch attention of ``layer`` ``[P, H, N]`` (``[P, 1, N]`` when ``wide``)."""
        name = "wide_cls_attention" if wide else "cls_attention"
        return self._lookup(name, layer, "the strategy must")

    def embedding(self, layer: int) -> torch.Tensor:
        """CLS hidden state at the output of ``layer``, ``[P, D]``."""
        return self._lookup("cls_embedding", layer, "the strategy must")

    def key(self, layer: int) -> torch.Tensor:
        """Patch keys of ``layer``, ``[P, N, Dk]``."""
        return self._lookup("keys", layer, "the strategy must")

    def received(self, layer: int) -> torch.Tensor:
        """Attention each token receives in ``layer``, per head, ``[P, H, N]``."""
        return self._lookup("received_attention", layer, "the strategy must")

    def require(self, needs: Needs, *, who: str = "strategy") -> None:
        """Raise :class:`SignalError` naming ``who`` if anything in ``needs`` is missing."""
        for layer in needs.cls_attention:
            self._lookup("cls_attention", layer, f"{who} needs it;")
        for layer in needs.wide_cls_attention:
            self._lookup("wide_cls_attention", layer, f"{who} needs it;")
        for layer in needs.cls_embedding:
            self._lookup("cls_embedding", layer, f"{who} needs it;")
        for layer in needs.keys:
            self._lookup("keys", layer, f"{who} needs it;")
        for layer in needs.received_attention:
            self._lookup("received_attention", layer, f"{who} needs it;")
        if needs.relevance and self.relevance is None:
            raise SignalError(
                f"{who} needs prompt relevance (Signals.relevance) but none was computed; "
                "give the adapter a scorer with its relevance_scorer option"
            )
        if needs.features and self.features is None:
            raise SignalError(f"{who} needs Signals.features but none were given")

    def partitions(self, index: slice | Sequence[int] | torch.Tensor) -> Signals:
        """The same signals restricted to some partitions (used to split a batch)."""

        def take(tensor: torch.Tensor) -> torch.Tensor:
            return tensor[index]

        return Signals(
            features=None if self.features is None else take(self.features),
            cls_attention={k: take(v) for k, v in self.cls_attention.items()},
            wide_cls_attention={k: take(v) for k, v in self.wide_cls_attention.items()},
            cls_embedding={k: take(v) for k, v in self.cls_embedding.items()},
            keys={k: take(v) for k, v in self.keys.items()},
            relevance=None if self.relevance is None else take(self.relevance),
            prompt=self.prompt,
            num_layers=self.num_layers,
            received_attention={k: take(v) for k, v in self.received_attention.items()},
        )

    def check_layout(self, layout: Layout) -> None:
        """Raise if these signals do not describe ``layout``'s partitions and tokens."""
        p = self.num_partitions
        if p is not None:
            _require(
                p == layout.num_partitions,
                f"signals have {p} partitions, the layout has {layout.num_partitions}",
            )
        tokens = layout.tokens_per_partition
        for name in ("cls_attention", "wide_cls_attention", "received_attention"):
            for layer, tensor in getattr(self, name).items():
                _require(
                    tensor.shape[-1] == tokens,
                    f"Signals.{name}[{layer}] has {tensor.shape[-1]} tokens, the layout has {tokens}",
                )
        for what, tensor in [("features", self.features), *self.keys.items()]:
            if tensor is not None:
                _require(
                    tensor.shape[1] == tokens,
                    f"Signals {what} has {tensor.shape[1]} tokens, the layout has {tokens}",
                )


# --------------------------------------------------------------------------- Selection


@dataclass(frozen=True, eq=False)
class Selection:
    """The tokens one image keeps.

    Attributes:
        indices: per partition, int64 ascending unique token indices into ``N``.
        features: per partition ``[len(indices[p]) + extra_tokens[p], D]`` when the selector
            changes features (merging), else ``None`` (the adapter gathers the originals).
            Rows are the kept tokens in ``indices`` order, then the extra tokens.
        extra_tokens: per partition, how many summary tokens follow the kept ones (they
            count against the budget). ``None`` means zero everywhere.
    """

    indices: tuple[torch.Tensor, ...]
    features: tuple[torch.Tensor, ...] | None = None
    extra_tokens: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "indices", tuple(self.indices))
        for p, idx in enumerate(self.indices):
            _require(
                isinstance(idx, torch.Tensor) and idx.dim() == 1 and idx.dtype == torch.int64,
                f"Selection.indices[{p}] must be a 1-D int64 tensor, got "
                f"{getattr(idx, 'dtype', type(idx))} with shape {tuple(getattr(idx, 'shape', ()))}",
            )
        if validating():
            self.check_values()
        if self.extra_tokens is not None:
            extra = tuple(self.extra_tokens)
            object.__setattr__(self, "extra_tokens", extra)
            _require(
                len(extra) == len(self.indices)
                and all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in extra),
                "Selection.extra_tokens must hold one int >= 0 per partition",
            )
        if self.features is not None:
            feats = tuple(self.features)
            object.__setattr__(self, "features", feats)
            _require(
                len(feats) == len(self.indices),
                f"Selection.features has {len(feats)} partitions, indices have {len(self.indices)}",
            )
            for p, (f, count) in enumerate(zip(feats, self.count_values)):
                _require(
                    isinstance(f, torch.Tensor) and f.dim() == 2 and f.shape[0] == count,
                    f"Selection.features[{p}] must be [{count}, D] (kept + extra tokens), "
                    f"got {tuple(getattr(f, 'shape', ()))}",
                )
        else:
            _require(
                self.extra_tokens is None or not any(self.extra_tokens),
                "Selection.extra_tokens needs Selection.features to hold those tokens",
            )

    def check_values(self) -> None:
        """Raise unless every partition's indices are non-negative and strictly ascending.

        Reads the indices back to the host (one sync for the whole selection): called on
        construction only in validation mode (:func:`validation`)."""
        sizes = [int(idx.numel()) for idx in self.indices]
        if not any(sizes):
            return
        flat = torch.cat([idx.reshape(-1) for idx in self.indices])
        ends = torch.tensor(sizes).cumsum(0).tolist()
        first = torch.zeros(len(flat), dtype=torch.bool, device=flat.device)
        starts = [e - n for e, n in zip(ends, sizes) if n]
        first[torch.tensor(starts, device=flat.device)] = True
        rising = torch.ones_like(first)
        rising[1:] = flat[1:] > flat[:-1]
        bad = (~rising & ~first) | (flat < 0)
        if not bool(bad.any()):
            return
        position = int(torch.nonzero(bad)[0])
        p = next(q for q, end in enumerate(ends) if position < end)
        if int(flat[position]) < 0:
            raise ContractError(f"Selection.indices[{p}] has a negative index")
        raise ContractError(f"Selection.indices[{p}] must be strictly ascending (spatial order, no duplicates)")

    @property
    def num_partitions(self) -> int:
        return len(self.indices)

    @property
    def count_values(self) -> tuple[int, ...]:
        """:attr:`counts` as host ints (sizes only: no sync)."""
        extra = self.extra_tokens or (0,) * len(self.indices)
        return tuple(int(i.numel()) + e for i, e in zip(self.indices, extra))

    @property
    def counts(self) -> torch.Tensor:
        """Tokens the LLM sees per partition (kept + extra), int64 ``[P]``."""
        extra = self.extra_tokens or (0,) * len(self.indices)
        return torch.tensor([int(i.numel()) + e for i, e in zip(self.indices, extra)], dtype=torch.int64)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def mask(self, tokens_per_partition: int) -> torch.Tensor:
        """bool ``[P, N]`` of kept token positions (extra tokens have no position)."""
        mask = torch.zeros(len(self.indices), tokens_per_partition, dtype=torch.bool)
        for p, idx in enumerate(self.indices):
            mask[p, idx.cpu()] = True
        return mask

    def check_layout(self, layout: Layout) -> None:
        """Raise unless every index is in range and points at a valid token (one host read)."""
        _require(
            self.num_partitions == layout.num_partitions,
            f"selection has {self.num_partitions} partitions, the layout has {layout.num_partitions}",
        )
        sizes = [int(idx.numel()) for idx in self.indices]
        if not any(sizes):
            return
        n = layout.tokens_per_partition
        flat = torch.cat([idx.reshape(-1) for idx in self.indices])
        owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes), output_size=len(flat))
        owner = owner.to(flat.device)
        in_range = (flat >= 0) & (flat < n)
        valid = layout.valid.to(flat.device)
        kept_valid = valid[owner, flat.clamp(0, n - 1)] & in_range
        if bool(kept_valid.all()):
            return
        bad_range = int(torch.argmin(in_range.int()))
        if not bool(in_range[bad_range]):
            p, index = int(owner[bad_range]), int(flat[bad_range])
            if index < 0:
                raise ContractError(f"Selection.indices[{p}] has a negative index")
            raise ContractError(f"Selection.indices[{p}] has index {index} >= N = {n}")
        p = int(owner[int(torch.argmin(kept_valid.int()))])
        padding = int((~kept_valid[owner == p]).sum())
        raise ContractError(f"Selection.indices[{p}] keeps {padding} padding token(s)")


# --------------------------------------------------------------------------- interfaces


class _Configurable:
    """Options live in dataclass fields; they are type-checked, then :meth:`check`-ed."""

    #: Set by the registry decorator.
    registry_name: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        check_option_types(self)
        self.check()

    def check(self) -> None:
        """Validate option values; raise :class:`~tokenprune.ConfigError`. Default: nothing."""

    def options(self) -> dict[str, Any]:
        """The options that rebuild this instance (a dataclass's init fields)."""
        if hasattr(self, "__dataclass_fields__"):
            return {f.name: getattr(self, f.name) for f in fields(self) if f.init}  # type: ignore[arg-type]
        return {}

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{self.registry_name or type(self).__name__}({opts})"


class _Strategy(_Configurable, ABC):
    """Shared by allocators and selectors: a name, options, and the signals it needs."""

    @property
    def needs(self) -> Needs:
        """Signals this strategy reads. Default: none (geometry only)."""
        return Needs()



class BudgetAllocator(_Strategy):
    """Splits one image's token budget across its partitions."""

    @property
    def exact(self) -> bool:
        """Whether budgets sum exactly to the image's budget (``False`` under floor rounding)."""
        return getattr(self, "rounding", "exact") != "floor"

    @abstractmethod
    def allocate(self, layout: Layout, signals: Signals, total: int) -> torch.Tensor:
        """Return int64 ``[P]`` summing to ``min(total, layout.capacity.sum())``.

        Shares never exceed ``layout.capacity``. Use :func:`tokenprune.apportion` to turn
        weights into integers; it is the one place where shares are rounded.
        """

    def allocate_batch(
        self, layouts: Sequence[Layout], signals: Sequence[Signals], totals: Sequence[int]
    ) -> list[torch.Tensor]:
        """Per-image budgets for a batch. Override only when images must see each other."""
        return [self.allocate(lay, sig, tot) for lay, sig, tot in zip(layouts, signals, totals)]

    def allocate_counted(
        self, layouts: Sequence[Layout], signals: Sequence[Signals], totals: Sequence[int]
    ) -> tuple[list[torch.Tensor], list[tuple[int, ...]] | None]:
        """What :meth:`allocate_batch` returns, plus the same budgets as host ints when the
        allocator computed them on the host (then the pipeline need not read them back).

        ``Pipeline.apply_batch`` calls this. The default is the slow path: the per-image
        :meth:`allocate_batch` (a loop over :meth:`allocate`) and no host copy. Built-in
        allocators override it with one pass over the whole batch."""
        return list(self.allocate_batch(layouts, signals, totals)), None


class Selector(_Strategy):
    """Chooses which tokens each partition keeps, given its budget."""

    #: ``True`` when the selector chooses its own count (at most the budget). A subclass
    #: may override it with a property when an option decides it.
    adaptive: ClassVar[bool] = False
    #: ``True`` when the tokens kept at budget ``b`` are a subset of those kept at ``b + 1``
    #: (score-based selectors). Geometric selectors (a lattice per budget) may set ``False``.
    nested: ClassVar[bool] = True

    @abstractmethod
    def select(self, layout: Layout, signals: Signals, budgets: torch.Tensor) -> Selection:
        """Keep exactly ``budgets[p]`` valid tokens per partition (fewer only if adaptive)."""

    def select_batch(
        self, layouts: Sequence[Layout], signals: Sequence[Signals], budgets: Sequence[torch.Tensor]
    ) -> list[Selection]:
        """Per-image selections for a batch. Override only when images must see each other."""
        return [self.select(lay, sig, bud) for lay, sig, bud in zip(layouts, signals, budgets)]

    def select_counted(
        self,
        layouts: Sequence[Layout],
        signals: Sequence[Signals],
        budgets: Sequence[torch.Tensor],
        counts: Sequence[tuple[int, ...]],
    ) -> list[Selection]:
        """:meth:`select_batch` with the budgets also given as host ints (``counts``, known
        to the pipeline), so a selector sizes its output without reading the device.

        ``Pipeline.apply_batch`` calls this. The default is the slow path: the per-image
        :meth:`select_batch` (a loop over :meth:`select`). Built-in selectors override it
        with one pass over the whole batch (all partitions of all images together)."""
        return list(self.select_batch(layouts, signals, budgets))


class Partitioner(ABC):
    """Maps an image size to the model family's partitions (mirrors its processor)."""

    @abstractmethod
    def layout(self, image_size: tuple[int, int]) -> Layout:
        """``Layout`` for an image of ``(height, width)`` pixels."""


class AttentionTap(ABC):
    """Reads the signals a ``Needs`` asks for out of one vision tower's own forward.

    A tap is bound to one tower instance. :meth:`capture` installs per-instance hooks and
    removes them on exit, also on exception. The tower keeps its attention kernel.
    """

    #: The framework name reported in errors ("transformers", "timm", "open_clip").
    framework: ClassVar[str] = "unknown"

    @property
    @abstractmethod
    def num_layers(self) -> int:
        """Number of transformer blocks in the tower."""

    @property
    @abstractmethod
    def has_cls_token(self) -> bool:
        """Whether the tower prepends a CLS token."""

    @property
    def tower_name(self) -> str:
        """A readable name of the tower for error messages."""
        return self.framework

    @abstractmethod
    def capture(self, needs: Needs) -> AbstractContextManager[Any]:
        """Context manager; on exit the recorded signals are available from its value."""


class Adapter(_Configurable, ABC):
    """Knows one VLM family: its partitioner, tower tap, feature layer and LLM input."""

    #: Model classes this adapter accepts (names, so no import is needed to check).
    model_classes: ClassVar[tuple[str, ...]] = ()

    def check_parts(self, allocator: BudgetAllocator, selector: Selector) -> None:
        """Raise :class:`~tokenprune.IncompatibleError` if the strategies cannot run here."""


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device`` without a host sync.

    A plain ``.to("cuda")`` of a host tensor waits for the whole stream (the tower's queued
    work) before copying; from pinned memory with ``non_blocking=True`` it is only queued.
    The pinned buffer comes from torch's caching host allocator, which keeps it alive until
    the copy has run."""
    device = torch.device(device)
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def finite_or_raise(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """Return ``tensor`` unchanged, or raise :class:`SignalError` if it holds NaN/inf.

    The check reads the tensor back to the host, so it runs only in validation mode
    (:func:`validation`); otherwise the tensor is returned unchecked."""
    if validating():
        _check_finite(tensor, what)
    return tensor


def _owner(cls: type, name: str) -> type:
    return next(klass for klass in cls.__mro__ if name in vars(klass))


def implements_counted(instance: object, counted: str, plain: Sequence[str]) -> bool:
    """Whether ``instance``'s ``counted`` method belongs to the class that also gives it
    every ``plain`` method: a subclass that overrides only ``select`` (say) of a built-in
    strategy must run through its own override, not the built-in's batched path."""
    owner = _owner(type(instance), counted)
    return all(issubclass(owner, _owner(type(instance), name)) for name in plain)
