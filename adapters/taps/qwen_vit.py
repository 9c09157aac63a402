"""CLS-free signals of the Qwen2-VL / Qwen2.5-VL vision tower, on the merged (LLM) grid.

The Qwen towers have no CLS token, run on a packed sequence of every image's patches (no
batch dimension; ``cu_seqlens`` marks where each image, or each attention window, starts),
and end in a patch merger that turns each 2 x 2 block of patches into one LLM token. The
pruning unit is that merged token, so every signal here is reported per merged token, per
image, in raster order of the merged grid:

* ``features`` ``[M, D_llm]``: the merger output, i.e. what the LLM would receive (the
  tower's ``pooler_output``).
* ``received_attention[l]`` ``[H, M]`` float32: attention each token receives in block
  ``l``, per head: the block's softmax rows (``softmax(q . k^T * scale)`` over the tokens a
  query attends to: its image in a full-attention block, its window in a windowed block)
  summed over the queries of the image, divided by the image's patch count, then summed over
  the 4 patches of each merged token. Per image and head it sums to 1. Computed from the
  rotated q/k in chunks of queries (never the whole ``[H, L, L]`` map), while the tower keeps
  its SDPA/flash kernel.
* ``keys[l]`` ``[M, 4 * H * head_dim]``: the rotated keys of block ``l`` as the attention uses
  them, the merged token's 4 patches concatenated (the merger's own order).

Qwen2.5-VL permutes patches into window order before the blocks (``window_index`` over
merged tokens) and un-permutes only after the merger; hooks see the permuted order, and map it
back with the tower's own window index. Qwen2-VL has no windows (identity order).

Hooks: a forward pre-hook on the tower (grid, window order), on each tapped block's ``attn``
(``cu_seqlens`` and rotary ``position_embeddings``), a forward hook on its fused ``qkv``
projection, and a forward hook on the tower for the merger output. transformers is only
imported when the window index is computed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tokenprune.contracts import AttentionTap, Needs
from tokenprune.errors import IncompatibleError, SignalError

from ._common import _exclusive, check_needs

__all__ = ["QwenTapRecord", "QwenVisionTap"]

_TOWER_TYPES = ("Qwen2_5_VisionTransformerPretrainedModel", "Qwen2VisionTransformerPretrainedModel")
#: Largest score block (elements) one chunk of queries may hold: ``segments x heads x chunk x keys``.
_CHUNK_ELEMENTS = 1 << 24


class QwenTapRecord:
    """What one :meth:`QwenVisionTap.capture` recorded, for the images of one tower forward.

    Attributes:
        needs: the needs, layers resolved.
        grid_thw: int64 ``[I, 3]`` patch grid of each image (the processor's ``image_grid_thw``).
        merge: the spatial merge size (2).
    """

    def __init__(self, needs: Needs, merge: int, tower_name: str) -> None:
        self.needs = needs
        self.merge = merge
        self.tower_name = tower_name
        self.grid_thw: torch.Tensor | None = None
        self._order: torch.Tensor | None = None  # merged raster index of each permuted merge unit
        self._counts: list[int] = []  # merged tokens per image (host ints, from the one grid read)
        self._divisor: torch.Tensor | None = None  # per merge unit (block order): its image's patch count
        self._longest: dict[int, tuple[torch.Tensor, int]] = {}  # id(cu_seqlens) -> (it, longest segment)
        self._features: torch.Tensor | None = None
        self._received: dict[int, torch.Tensor] = {}
        self._keys: dict[int, torch.Tensor] = {}

    @property
    def merged_counts(self) -> list[int]:
        """Merged (LLM) tokens per image."""
        self._grid()
        return list(self._counts)

    def merged_grids(self) -> list[tuple[int, int, int]]:
        """``(t, rows, cols)`` of each image's merged grid."""
        return [(t, h // self.merge, w // self.merge) for t, h, w in self._grid().tolist()]

    def _grid(self) -> torch.Tensor:
        if self.grid_thw is None:
            raise SignalError(
                f"the tap on the {self.tower_name} tower recorded nothing: run the tower's forward "
                "inside `with tap.capture(...)`"
            )
        return self.grid_thw

    def _split(self, tensor: torch.Tensor, dim: int) -> list[torch.Tensor]:
        return list(tensor.split(self.merged_counts, dim=dim))

    def features(self) -> list[torch.Tensor]:
        """Per image, the merger output ``[M, D_llm]`` in raster order."""
        if self._features is None:
            raise SignalError(f"the tap on the {self.tower_name} tower recorded no merger output")
        return self._split(self._features, 0)

    def received_attention(self, layer: int) -> list[torch.Tensor]:
        """Per image, ``[H, M]`` float32 attention received per merged token in ``layer``."""
        return self._split(self._layer(self._received, "received_attention", layer), 1)

    def keys(self, layer: int) -> list[torch.Tensor]:
        """Per image, ``[M, 4 * H * head_dim]`` rotated keys of ``layer`` per merged token."""
        return self._split(self._layer(self._keys, "keys", layer), 0)

    def _layer(self, store: dict[int, torch.Tensor], name: str, layer: int) -> torch.Tensor:
        if layer not in store:
            raise SignalError(
                f"the tap on the {self.tower_name} tower recorded no {name} for block {layer} "
                f"(recorded: {sorted(store) or 'none'})"
            )
        return store[layer]


class QwenVisionTap(AttentionTap):
    """Tap for the transformers Qwen2-VL / Qwen2.5-VL vision towers (``model.visual``).

    Serves ``features`` (the merger output), ``received_attention`` and ``keys`` of any block;
    refuses CLS signals (the towers have none) before any hook is installed.
    """

    framework = "transformers"
    supported_types = (
        (
            "transformers Qwen2VisionTransformerPretrainedModel / Qwen2_5_VisionTransformerPretrainedModel "
            "(model.visual of Qwen2-VL / Qwen2.5-VL)"
        ),
    )
    #: This tap computes ``Needs.received_attention``.
    serves_received_attention = True

    def __init__(self, tower: nn.Module) -> None:
        if self.find_core(tower) is None:
            raise IncompatibleError(
                f"{type(tower).__name__} is not a Qwen2-VL / Qwen2.5-VL vision tower; supported: "
                f"{self.supported_types[0]}"
            )
        self.tower = tower
        self.merge = int(tower.spatial_merge_size)
        modeling = sys.modules[type(tower).__module__]
        self._rotate: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = getattr(
            modeling, "apply_rotary_pos_emb_vision", None
        )
        if self._rotate is None:
            raise IncompatibleError(
                f"{modeling.__name__} has no apply_rotary_pos_emb_vision: this transformers version's "
                "Qwen vision tower is not supported by the tap"
            )

    @staticmethod
    def find_core(module: nn.Module) -> nn.Module | None:
        """``module`` itself when it is a Qwen2(.5)-VL vision tower, else ``None``."""
        if type(module).__name__ in _TOWER_TYPES and isinstance(getattr(module, "blocks", None), nn.ModuleList):
            return module
        return None

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.tower.blocks  # type: ignore[return-value]

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def has_cls_token(self) -> bool:
        return False

    @property
    def tower_name(self) -> str:
        return f"{self.framework} {type(self.tower).__name__}"

    @property
    def windowed(self) -> bool:
        """Whether the tower permutes patches into attention windows (Qwen2.5-VL)."""
        return hasattr(self.tower, "window_size") and hasattr(self.tower, "fullatt_block_indexes")

    @contextmanager
    def capture(self, needs: Needs, feature_layer: int | None = None) -> Iterator[QwenTapRecord]:
        """Record what ``needs`` asks for while the tower runs ``tower(pixel_values, grid_thw=...)``.

        ``feature_layer`` must be ``None``: the features are always the merger output.
        """
        resolved = check_needs(self, needs, f"tap.capture({needs.describe()})")
        if feature_layer is not None:
            raise IncompatibleError(
                f"the {self.tower_name} tower's features are its merger output; feature_layer must be None"
            )
        record = QwenTapRecord(resolved, self.merge, self.tower_name)
        with _exclusive(self.tower, self.tower_name):
            handles: list[RemovableHandle] = []
            try:
                handles.append(self.tower.register_forward_pre_hook(self._on_start(record), with_kwargs=True))
                handles.append(self.tower.register_forward_hook(self._on_end(record)))
                for layer in sorted(resolved.received_attention | resolved.keys):
                    handles.extend(self._hook_block(record, layer))
                yield record
            finally:
                for handle in handles:
                    handle.remove()

    # ------------------------------------------------------------------ hooks
    def _on_start(self, record: QwenTapRecord) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            if record.grid_thw is not None:
                raise SignalError(
                    f"the {self.tower_name} tower ran twice inside one capture; run all images in one forward"
                )
            # The capture's one read of the grid (none when it is on the host, as processors
            # give it; the tower itself reads it many times). Everything else is derived from it.
            host = grid.detach().to(device="cpu", dtype=torch.int64)
            record.grid_thw = host
            rows = host.tolist()
            unit = self.merge**2
            patches = [t * h * w for t, h, w in rows]
            record._counts = [count // unit for count in patches]
            device = next((p.device for p in module.parameters()), grid.device)
            order = self._merged_order(host, sum(record._counts), kwargs)
            divisor = torch.cat(  # one op per image, on the host
                [torch.full((count,), float(patch)) for patch, count in zip(patches, record._counts)]
            )[order.cpu()]
            record._order = _to_device(order, device)
            record._divisor = _to_device(divisor, device)

        return hook

    def _on_end(self, record: QwenTapRecord) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            pooled = getattr(output, "pooler_output", None)
            record._features = (pooled if pooled is not None else output).detach()

        return hook

    def _merged_order(self, grid: torch.Tensor, total: int, kwargs: dict[str, Any]) -> torch.Tensor:
        """Merged raster index of each merge unit in the order the blocks see them (host
        ``grid``; the window index is computed on the host too)."""
        if not self.windowed:
            return torch.arange(total)
        window_index = kwargs.get("window_index")
        if window_index is None:
            window_index = self._window_index(grid)
        return window_index.to(torch.int64)

    def _window_index(self, grid: torch.Tensor) -> torch.Tensor:
        tower = self.tower
        if hasattr(tower, "get_window_index"):  # transformers 4.x keeps it on the tower
            return tower.get_window_index(grid)[0]
        from transformers.vision_utils import get_vision_window_index

        return get_vision_window_index(
            grid, spatial_merge_size=self.merge, window_size=tower.window_size, patch_size=tower.patch_size
        )[0]

    def _hook_block(self, record: QwenTapRecord, layer: int) -> list[RemovableHandle]:
        attn = self.blocks[layer].attn
        heads = int(attn.num_heads)
        scale = float(getattr(attn, "scaling", attn.head_dim**-0.5))
        received = layer in record.needs.received_attention
        keys = layer in record.needs.keys
        context: dict[str, Any] = {}

        def attn_pre_hook(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            context["cu_seqlens"] = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
            context["max_seqlen"] = kwargs.get("max_seqlen")
            context["rotary"] = kwargs.get("position_embeddings", args[2] if len(args) > 2 else None)

        def qkv_hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            length = output.shape[0]
            query, key, _ = output.detach().reshape(length, 3, heads, -1).unbind(1)
            cos, sin = context.pop("rotary")
            query, key = self._rotate(query, key, cos, sin)  # type: ignore[misc]
            order = record._order
            assert order is not None
            if keys:
                units = key.reshape(length // self.merge**2, -1)
                record._keys[layer] = _to_raster(units, order)
            if received:
                cu_seqlens = context.pop("cu_seqlens")
                longest = _longest(record, cu_seqlens, context.pop("max_seqlen", None))
                per_patch = _received_attention(query, key, cu_seqlens, longest, scale)  # [H, L]
                per_unit = per_patch.view(heads, length // self.merge**2, self.merge**2).sum(dim=-1)
                assert record._divisor is not None
                per_unit = per_unit / record._divisor[None]
                record._received[layer] = _to_raster(per_unit.T, order).T.contiguous()

        return [
            attn.register_forward_pre_hook(attn_pre_hook, with_kwargs=True),
            attn.qkv.register_forward_hook(qkv_hook),
        ]


def _to_raster(units: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Rows of ``units`` (one per merge unit, in block order) put into merged raster order."""
    out = torch.empty_like(units)
    out[order.to(units.device)] = units
    return out


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without a blocking copy (a blocking host->device copy syncs)."""
    if tensor.device == device:
        return tensor
    return tensor.to(device, non_blocking=True)


def _longest(record: QwenTapRecord, cu_seqlens: torch.Tensor, max_seqlen: Any) -> int:
    """The longest segment of ``cu_seqlens``: the tower's own ``max_seqlen`` when it passes an
    int, else one read per distinct ``cu_seqlens`` tensor per capture (the tower passes the
    same one to every full-attention block, and one to every windowed block)."""
    if isinstance(max_seqlen, int):
        return max_seqlen
    cached = record._longest.get(id(cu_seqlens))
    if cached is not None and cached[0] is cu_seqlens:
        return cached[1]
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    record._longest[id(cu_seqlens)] = (cu_seqlens, longest)
    return longest


def _received_attention(
    query: torch.Tensor, key: torch.Tensor, cu_seqlens: torch.Tensor, longest: int, scale: float
) -> torch.Tensor:
    """``[H, L]`` float32: per key, the softmax attention its segment's queries give it, summed.

    Segments (``cu_seqlens``) are padded into one ``[S, T]`` batch (``T`` = ``longest``);
    queries are processed in chunks so that no more than ``_CHUNK_ELEMENTS`` scores exist at
    once. No host read: the padded scores go back to the tokens by a gather index, not a mask.
    """
    length, heads, _ = key.shape
    device = key.device
    bounds = cu_seqlens.to(device=device, dtype=torch.int64)
    lengths = bounds[1:] - bounds[:-1]
    segments = int(lengths.shape[0])
    slots = torch.arange(longest, device=device)
    inside = slots[None] < lengths[:, None]  # [S, T]
    index = (bounds[:-1, None] + slots[None]).clamp(max=length - 1)
    q = query.float()[index]  # [S, T, H, d]
    k = key.float()[index]
    key_bias = torch.zeros(segments, 1, 1, longest, device=device).masked_fill(~inside[:, None, None], float("-inf"))
    total = torch.zeros(segments, heads, longest, device=device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, segments * heads * longest))
    for start in range(0, longest, chunk):
        scores = torch.einsum("sqhd,skhd->shqk", q[:, start : start + chunk], k) * scale + key_bias
        weights = torch.softmax(scores, dim=-1) * inside[:, None, start : start + chunk, None]
        total += weights.sum(dim=2)
    # Token t of segment s sits at slot t - bounds[s] of row s: gather it from the padded rows.
    tokens = torch.arange(length, device=device)
    segment = torch.bucketize(tokens, bounds[1:], right=True)  # [L]
    position = segment * longest + tokens - bounds[segment]
    return total.permute(1, 0, 2).reshape(heads, segments * longest)[:, position]
