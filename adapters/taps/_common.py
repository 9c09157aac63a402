"""Framework-independent part of the attention taps: hook bookkeeping and the maths.

A framework tap (:mod:`.transformers_clip`, :mod:`.timm_vit`, :mod:`.open_clip_vit`) only
says where its blocks are and how to read, per block, the CLS query ``[B, H, hd]`` and the
keys ``[B, L, H, hd]`` (``L`` = prefix tokens + patch tokens) out of the tower's own
forward. Everything else lives here:

* :class:`HookTap.capture` installs per-instance hooks on the blocks the needs name, and
  removes them on exit and on exception. One capture per tower at a time.
* :class:`_LayerAttention` turns one block's CLS query and keys into the CLS->patch
  attention row: ``softmax(q_cls . k^T * scale)`` in float32 over all keys (prefix tokens
  included), then the prefix columns dropped. The wide variant (PruMerge's released code)
  treats the whole width as one head: the per-head dot products summed, scaled by
  ``width ** -0.5``.
* :class:`TapRecord` collects what the hooks produced and builds a :class:`tokenprune.Signals`.

Nothing here imports transformers, timm or open_clip.
"""

from __future__ import annotations

import functools
import threading
import weakref
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tokenprune.contracts import AttentionTap, Needs, Signals
from tokenprune.errors import ContractError, IncompatibleError, SignalError, TokenpruneError

__all__ = [
    "CaptureBusyError",
    "HookTap",
    "KeyHook",
    "QueryHook",
    "TapRecord",
    "check_needs",
    "resolve_feature_layer",
]

#: Receives the CLS query of one forward, ``[B, H, head_dim]``.
QueryHook = Callable[[torch.Tensor], None]
#: Receives the keys of one forward, ``[B, L, H, head_dim]`` (all tokens, prefix first).
KeyHook = Callable[[torch.Tensor], None]

_SIGNAL_FIELDS = ("cls_attention", "wide_cls_attention", "cls_embedding", "keys")
_CLS_FIELDS = ("cls_attention", "wide_cls_attention", "cls_embedding")


def check_needs(tap: AttentionTap, needs: Needs, strategy: str) -> Needs:
    """Raise :class:`~tokenprune.IncompatibleError` if ``tap``'s tower cannot serve ``needs``.

    Called before any forward. ``strategy`` names who asked (``"selector 'cls_final'"``) so
    the message says which strategy does not fit which tower. Returns the needs with every
    layer made non-negative for the tower's depth.
    """
    if needs.cls_token and not tap.has_cls_token:
        wanted = ", ".join(
            f"{name}{sorted(getattr(needs, name))}" for name in _CLS_FIELDS if getattr(needs, name)
        )
        raise IncompatibleError(
            f"{strategy} needs {wanted}, but the {tap.tower_name} tower has no CLS token. "
            "On a tower without CLS, use strategies that read only keys or features "
            "(Needs.keys / Needs.features), or a CLIP-style tower with a CLS token."
        )
    if needs.received_attention and not getattr(tap, "serves_received_attention", False):
        raise IncompatibleError(
            f"{strategy} needs received_attention{sorted(needs.received_attention)}, which the "
            f"{tap.tower_name} tower's tap does not compute (the Qwen2-VL / Qwen2.5-VL tap does)"
        )
    try:
        return needs.resolve(tap.num_layers)
    except SignalError as exc:
        raise IncompatibleError(
            f"{strategy} cannot run on the {tap.tower_name} tower ({tap.num_layers} blocks): {exc}"
        ) from None


def resolve_feature_layer(feature_layer: int | None, num_layers: int, tower: str) -> int | None:
    """``feature_layer`` made non-negative; :class:`~tokenprune.IncompatibleError` if out of range."""
    if feature_layer is None:
        return None
    if not isinstance(feature_layer, int) or isinstance(feature_layer, bool):
        raise ContractError(f"feature_layer must be an int block number or None, got {feature_layer!r}")
    absolute = feature_layer + num_layers if feature_layer < 0 else feature_layer
    if not 0 <= absolute < num_layers:
        raise IncompatibleError(
            f"feature_layer {feature_layer} is out of range for the {tower} tower with "
            f"{num_layers} blocks (allowed: {-num_layers}..{num_layers - 1})"
        )
    return absolute


# --------------------------------------------------------------------------- record


class TapRecord:
    """What one :meth:`HookTap.capture` recorded, batch-first, on the tower's device.

    Every forward run inside the ``with`` block is recorded; several forwards (crops run in
    chunks) are concatenated along the batch. Attention rows are float32; keys, CLS
    embeddings and features keep the tower's dtype. Layers are non-negative block numbers.

    Attributes:
        needs: the needs with layers resolved for this tower.
        feature_layer: the block whose output gives ``features`` (resolved), or ``None``.
        num_layers: the tower's depth.
        tower_name: the tower's readable name.
    """

    def __init__(self, needs: Needs, feature_layer: int | None, num_layers: int, tower_name: str) -> None:
        self.needs = needs
        self.feature_layer = feature_layer
        self.num_layers = num_layers
        self.tower_name = tower_name
        self._parts: dict[str, dict[int, list[torch.Tensor]]] = {name: {} for name in _SIGNAL_FIELDS}
        self._features: list[torch.Tensor] = []

    # hooks call these --------------------------------------------------------
    def _add(self, name: str, layer: int, tensor: torch.Tensor) -> None:
        self._parts[name].setdefault(layer, []).append(tensor)

    def _add_features(self, tensor: torch.Tensor) -> None:
        self._features.append(tensor)

    # readers -------------------------------------------------------------------
    def _expected(self, name: str) -> frozenset[int]:
        return getattr(self.needs, name)

    def _joined(self, name: str) -> dict[int, torch.Tensor]:
        out = {}
        for layer in sorted(self._expected(name)):
            chunks = self._parts[name].get(layer)
            if not chunks:
                raise SignalError(
                    f"the tap on the {self.tower_name} tower recorded no {name} for block {layer}: "
                    "run the tower's forward inside `with tap.capture(...)` (and let it reach that block)"
                )
            out[layer] = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        return out

    @property
    def cls_attention(self) -> dict[int, torch.Tensor]:
        """``{layer: [B, H, N]}`` float32 CLS->patch attention per head."""
        return self._joined("cls_attention")

    @property
    def wide_cls_attention(self) -> dict[int, torch.Tensor]:
        """``{layer: [B, 1, N]}`` float32, the whole width as one head (scale ``width ** -0.5``)."""
        return self._joined("wide_cls_attention")

    @property
    def cls_embedding(self) -> dict[int, torch.Tensor]:
        """``{layer: [B, D]}`` CLS hidden state at the output of the block."""
        return self._joined("cls_embedding")

    @property
    def keys(self) -> dict[int, torch.Tensor]:
        """``{layer: [B, N, H * head_dim]}`` patch keys (prefix tokens dropped)."""
        return self._joined("keys")

    @property
    def features(self) -> torch.Tensor | None:
        """``[B, N, D]`` patch tokens at the output of ``feature_layer``, or ``None`` if not asked."""
        if self.feature_layer is None:
            return None
        if not self._features:
            raise SignalError(
                f"the tap on the {self.tower_name} tower recorded no features of block "
                f"{self.feature_layer}: run the tower's forward inside `with tap.capture(...)`"
            )
        return self._features[0] if len(self._features) == 1 else torch.cat(self._features)

    @property
    def batch_size(self) -> int:
        """Images (crops) recorded; every recorded signal covers the same ones."""
        sizes = {int(t.shape[0]) for t in self._all()}
        if len(sizes) > 1:
            raise SignalError(
                f"the tap on the {self.tower_name} tower recorded signals for different batch sizes "
                f"{sorted(sizes)}: a forward stopped before reaching every tapped block"
            )
        return sizes.pop() if sizes else 0

    def _all(self) -> Iterator[torch.Tensor]:
        for name in _SIGNAL_FIELDS:
            yield from self._joined(name).values()
        features = self.features
        if features is not None:
            yield features

    def signals(self, *, relevance: torch.Tensor | None = None, prompt: str | None = None) -> Signals:
        """All recorded crops as one :class:`tokenprune.Signals` (``P`` = batch size).

        Split it per image with ``Signals.partitions(slice)``.
        """
        self.batch_size  # noqa: B018 -- raises on inconsistent records
        return Signals(
            features=self.features,
            cls_attention=self.cls_attention,
            wide_cls_attention=self.wide_cls_attention,
            cls_embedding=self.cls_embedding,
            keys=self.keys,
            relevance=relevance,
            prompt=prompt,
            num_layers=self.num_layers,
        )

    def __repr__(self) -> str:
        recorded = {name: sorted(self._parts[name]) for name in _SIGNAL_FIELDS if self._parts[name]}
        return (
            f"TapRecord(tower={self.tower_name!r}, needs={self.needs.describe()!r}, "
            f"feature_layer={self.feature_layer}, recorded={recorded}, forwards_with_features={len(self._features)})"
        )


# --------------------------------------------------------------------------- per-block maths


@functools.lru_cache(maxsize=64)
def _spread(heads: int, width: int, scale: float, per_head: bool, wide: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[H', H]`` float32: ``scale`` on the diagonal (one row per head), then a row of
    ``width ** -0.5`` if ``wide``; and the same as a ``[H', H, 1]`` view.

    Built on ``device`` (no host->device copy, which would be a sync on CUDA) and cached per
    tower geometry and device, so a capture builds nothing.
    """
    rows = []
    if per_head:
        rows.append(torch.eye(heads, dtype=torch.float32, device=device) * scale)
    if wide:
        rows.append(torch.full((1, heads), width**-0.5, dtype=torch.float32, device=device))
    spread = rows[0] if len(rows) == 1 else torch.cat(rows)
    return spread, spread.unsqueeze(-1)


class _LayerAttention:
    """Joins one block's CLS query and keys (in whichever order they arrive) into signals.

    Cheap by construction, because on a GPU the tower is close to launch-bound and every
    extra operator or host round trip in a hook stalls it: no host reads, no autograd or
    grad-mode switches, no shape checks that touch values, and the per-head rows and the
    wide row of a block come from ONE batched matmul (``bmm`` directly, not ``matmul``'s
    expand/reshape wrappers) and ONE softmax.

    * Token-major keys (transformers, MultiheadAttention): the query is spread into a
      block-diagonal ``[B, H', D]`` matrix (one row per head, holding that head's query
      times its softmax scale, plus one row of the whole query times ``width ** -0.5`` when
      the wide row is asked for), so its product with the keys ``[B, D, L]`` (a transposed
      view, no copy) is every head's logits at once.
    * Head-major keys (timm, open_clip ``Attention``): one ``bmm`` of the CLS query against
      each head's keys ``[B*H, hd, L]`` (a view), then the ``[H', H]`` spread (scales and the
      wide row) as a second ``bmm``.

    In float32 the casts are no-ops; in half precision q and k are cast to float32 once
    (logits and softmax in float32 whatever the tower's dtype).
    """

    __slots__ = ("record", "layer", "per_head", "wide", "keys", "prefix", "head_scale", "_query", "_key")

    def __init__(
        self,
        record: TapRecord,
        layer: int,
        *,
        per_head: bool,
        wide: bool,
        keys: bool,
        prefix_tokens: int,
        head_scale: float,
    ) -> None:
        self.record = record
        self.layer = layer
        self.per_head = per_head
        self.wide = wide
        self.keys = keys
        self.prefix = prefix_tokens
        self.head_scale = head_scale
        self._query: torch.Tensor | None = None
        self._key: torch.Tensor | None = None

    @property
    def needs_query(self) -> bool:
        return self.per_head or self.wide

    def on_query(self, query: torch.Tensor) -> None:
        self._query = query.detach() if query.requires_grad else query
        if self._key is not None:
            self._compute()

    def on_key(self, key: torch.Tensor) -> None:
        if key.requires_grad:
            key = key.detach()
        if self.keys:
            batch, length, heads, head_dim = key.shape
            # A view when the tower's keys are token-major (no copy); a copy when head-major.
            self.record._add("keys", self.layer, key[:, self.prefix :].reshape(batch, length - self.prefix, heads * head_dim))
        if self.per_head or self.wide:
            self._key = key
            if self._query is not None:
                self._compute()

    def _compute(self) -> None:
        query, key = self._query, self._key
        self._query = self._key = None
        assert query is not None and key is not None
        batch, length, heads, head_dim = key.shape
        if query.shape != (batch, heads, head_dim):
            raise ContractError(
                f"tap of block {self.layer}: CLS query {tuple(query.shape)} does not fit keys "
                f"{tuple(key.shape)} (expected [B, H, hd] and [B, L, H, hd])"
            )
        spread, spread3 = _spread(heads, heads * head_dim, self.head_scale, self.per_head, self.wide, key.device)
        if query.dtype != torch.float32:
            query = query.float()
        if key.dtype != torch.float32:
            key = key.float()  # keeps the strides: head-major stays head-major
        # Head-major: [B, L, H, hd] is a transposed view of a contiguous [B, H, L, hd] (timm,
        # open_clip Attention). Read from the strides (metadata, no operator dispatched).
        if not key.is_contiguous() and key.stride()[1:] == (head_dim, length * head_dim, 1) and length > 1:
            by_head = key.transpose(1, 2).view(batch * heads, length, head_dim)
            dots = torch.bmm(query.reshape(batch * heads, 1, head_dim), by_head.transpose(1, 2))  # [B*H, 1, L]
            logits = torch.bmm(spread.expand(batch, -1, -1), dots.view(batch, heads, length))  # [B, H', L]
        else:  # token-major (transformers, MultiheadAttention): one bmm over [B, D, L]
            rows = (spread3 * query.unsqueeze(1)).view(batch, -1, heads * head_dim)  # [B, H', D]
            logits = torch.bmm(rows, key.reshape(batch, length, heads * head_dim).transpose(1, 2))
        attention = torch.softmax(logits, dim=-1)  # [B, H', L]
        prefix = self.prefix
        if self.per_head and self.wide:
            self.record._add("cls_attention", self.layer, attention[:, :heads, prefix:])
            self.record._add("wide_cls_attention", self.layer, attention[:, heads:, prefix:])
        else:
            self.record._add("wide_cls_attention" if self.wide else "cls_attention", self.layer, attention[..., prefix:])


# --------------------------------------------------------------------------- the tap

class _Plan(NamedTuple):
    """The hooks one (needs, feature_layer) pair asks for, layers resolved."""

    needs: Needs
    feature_layer: int | None
    #: (layer, per-head rows, wide row, keys, softmax scale) per block with a q/k hook.
    attention: tuple[tuple[int, bool, bool, bool, float], ...]
    #: (layer, CLS embedding, features) per block with an output hook.
    blocks: tuple[tuple[int, bool, bool], ...]


class CaptureBusyError(TokenpruneError, RuntimeError):
    """A tower is captured twice at once (nested or concurrent ``tap.capture``)."""


_active_lock = threading.Lock()
_active_towers: weakref.WeakSet[nn.Module] = weakref.WeakSet()


@contextmanager
def _exclusive(core: nn.Module, tower_name: str) -> Iterator[None]:
    with _active_lock:
        if core in _active_towers:
            raise CaptureBusyError(
                f"the {tower_name} tower is already being captured: nested or concurrent "
                "`tap.capture(...)` on the same tower instance is not supported; capture once "
                "with the union of the needs (tokenprune.Needs.union)"
            )
        _active_towers.add(core)
    try:
        yield
    finally:
        with _active_lock:
            _active_towers.discard(core)


class HookTap(AttentionTap):
    """An :class:`~tokenprune.AttentionTap` built from forward hooks on one tower instance.

    Subclasses describe their framework's tower; see the module docstring. Use
    :func:`tokenprune.adapters.taps.tap_for` rather than the classes directly.
    """

    #: Readable names of the tower classes this tap accepts (for error messages).
    supported_types: tuple[str, ...] = ()

    def __init__(self, tower: nn.Module, core: nn.Module) -> None:
        self.tower = tower
        self.core = core
        # (needs, feature_layer) -> what to hook: resolved once per tap, not on every capture.
        self._plans: dict[tuple[Needs, int | None], _Plan] = {}

    @classmethod
    def _core_or_refuse(cls, tower: nn.Module, kind: str) -> nn.Module:
        """``cls.find_core(tower)``, or :class:`IncompatibleError` naming ``kind`` and what is supported."""
        core = cls.find_core(tower)  # type: ignore[attr-defined]
        if core is None:
            raise IncompatibleError(
                f"{type(tower).__name__} is not a supported {kind}; supported: {cls.supported_types[0]}"
            )
        return core

    # what a framework provides --------------------------------------------------
    @property
    @abstractmethod
    def blocks(self) -> Sequence[nn.Module]:
        """The transformer blocks, in order."""

    @property
    def prefix_tokens(self) -> int:
        """Tokens before the patch tokens (CLS and register tokens); by default the CLS token alone."""
        return 1 if self.has_cls_token else 0

    @abstractmethod
    def _head_scale(self, layer: int) -> float:
        """Softmax scale of the block's attention (usually ``head_dim ** -0.5``)."""

    @abstractmethod
    def _hook_query_key(
        self, layer: int, on_query: QueryHook | None, on_key: KeyHook
    ) -> list[RemovableHandle]:
        """Install hooks feeding block ``layer``'s CLS query (if wanted) and keys."""

    @abstractmethod
    def _block_tokens(self, output: Any) -> torch.Tensor:
        """A block's output as ``[B, L, D]`` (all tokens, prefix first)."""

    @abstractmethod
    def forward(self, pixel_values: torch.Tensor) -> Any:
        """Run the tower's own forward on ``pixel_values`` (what the tower-only adapter calls)."""

    # AttentionTap ------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def tower_name(self) -> str:
        return f"{self.framework} {type(self.core).__name__}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(tower={self.tower_name!r}, num_layers={self.num_layers}, "
            f"has_cls_token={self.has_cls_token}, prefix_tokens={self.prefix_tokens})"
        )

    @contextmanager
    def capture(self, needs: Needs, feature_layer: int | None = None) -> Iterator[TapRecord]:
        """Record what ``needs`` asks for while the tower's own forward runs in the block.

        Args:
            needs: the signals to compute (layers may be negative). Nothing else is computed.
            feature_layer: also record the patch tokens at the output of this block
                (LLaVA's ``-2`` is block ``L - 2``); ``None`` records no features.

        Yields:
            A :class:`TapRecord`; read it (or ``record.signals()``) after the forward.

        Raises:
            IncompatibleError: before anything is hooked, when the tower cannot serve the
                needs (CLS signals on a tower without CLS, a layer out of range).
            CaptureBusyError: when this tower is already being captured.
        """
        plan = self._plan(needs, feature_layer)
        record = TapRecord(plan.needs, plan.feature_layer, self.num_layers, self.tower_name)
        with _exclusive(self.core, self.tower_name):
            handles: list[RemovableHandle] = []
            try:
                self._install(plan, record, handles)
                yield record
            finally:
                for handle in handles:
                    handle.remove()

    def _plan(self, needs: Needs, feature_layer: int | None) -> _Plan:
        """What ``capture(needs, feature_layer)`` hooks; checked and resolved once per tap."""
        key = (needs, feature_layer)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        resolved = check_needs(self, needs, f"tap.capture({needs.describe()})")
        feature = resolve_feature_layer(feature_layer, self.num_layers, self.tower_name)
        attention = tuple(
            (layer, layer in resolved.cls_attention, layer in resolved.wide_cls_attention, layer in resolved.keys,
             self._head_scale(layer))
            for layer in sorted(resolved.cls_attention | resolved.wide_cls_attention | resolved.keys)
        )
        block_layers = set(resolved.cls_embedding) | ({feature} if feature is not None else set())
        blocks = tuple((layer, layer in resolved.cls_embedding, layer == feature) for layer in sorted(block_layers))
        plan = _Plan(resolved, feature, attention, blocks)
        if len(self._plans) >= 64:
            self._plans.clear()
        self._plans[key] = plan
        return plan

    def _install(self, plan: _Plan, record: TapRecord, handles: list[RemovableHandle]) -> None:
        prefix = self.prefix_tokens
        for layer, per_head, wide, keys, scale in plan.attention:
            joiner = _LayerAttention(
                record, layer, per_head=per_head, wide=wide, keys=keys, prefix_tokens=prefix, head_scale=scale
            )
            handles.extend(self._hook_query_key(layer, joiner.on_query if per_head or wide else None, joiner.on_key))
        for layer, cls_embedding, features in plan.blocks:
            handles.append(self.blocks[layer].register_forward_hook(self._block_hook(record, layer, cls_embedding, features)))

    def _block_hook(
        self, record: TapRecord, layer: int, cls_embedding: bool, features: bool
    ) -> Callable[[nn.Module, Any, Any], None]:
        prefix = self.prefix_tokens

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            # Views of the block's output, as LLaVA slices its hidden states: no copy kernels.
            # Every supported block returns a fresh tensor that nothing edits in place later.
            tokens = self._block_tokens(output)
            if tokens.requires_grad:
                tokens = tokens.detach()
            if cls_embedding:
                record._add("cls_embedding", layer, tokens[:, 0])
            if features:
                record._add_features(tokens[:, prefix:])

        return hook
