"""Attention taps: read CLS attention, CLS embeddings, keys and features from a vision tower.

A tap hooks one tower instance while the tower runs its own forward with its own attention
kernel (SDPA, flash, eager: never ``output_attentions``), and computes only what a
:class:`tokenprune.Needs` asks for::

    from tokenprune.adapters.taps import tap_for, check_needs

    tap = tap_for(tower)                      # transformers / timm / open_clip tower
    needs = tp.Needs(cls_attention={0, 22})
    with tap.capture(needs, feature_layer=-2) as rec:
        tower(pixel_values)                   # the tower's own forward (or tap.forward(...))
    rec.cls_attention[22]                     # [B, H, N] float32
    signals = rec.signals()                   # tokenprune.Signals, P = B

Supported towers: transformers ``CLIPVisionModel`` / ``SiglipVisionModel`` (and models
holding one as ``.vision_model``), timm ``VisionTransformer``, open_clip
``VisionTransformer`` (and open_clip ``CLIP`` models, via ``.visual``).
"""

from __future__ import annotations

from torch import nn

from tokenprune.errors import IncompatibleError

from ._common import CaptureBusyError, HookTap, TapRecord, check_needs, resolve_feature_layer
from .open_clip_vit import OpenClipVitTap
from .qwen_vit import QwenVisionTap
from .timm_vit import TimmVitTap
from .transformers_clip import TransformersVisionTap

__all__ = [
    "CaptureBusyError",
    "HookTap",
    "OpenClipVitTap",
    "QwenVisionTap",
    "TapRecord",
    "TimmVitTap",
    "TransformersVisionTap",
    "check_needs",
    "resolve_feature_layer",
    "supported_towers",
    "tap_for",
]

_TAPS: tuple[type[HookTap] | type[QwenVisionTap], ...] = (TransformersVisionTap, TimmVitTap, OpenClipVitTap, QwenVisionTap)

# Where VLMs keep their vision tower, for a helpful error when a whole VLM is passed.
_TOWER_ATTRIBUTES = (
    "vision_tower",
    "model.vision_tower",
    "visual",
    "model.visual",
    "vision_model",
    "model.vision_model",
)


def supported_towers() -> list[str]:
    """Readable list of the tower types :func:`tap_for` accepts."""
    return [text for tap in _TAPS for text in tap.supported_types]


def _attribute(module: object, path: str) -> object:
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def tap_for(tower: nn.Module) -> HookTap:
    """The attention tap for ``tower``, chosen from its type.

    Raises:
        IncompatibleError: ``tower`` is not a supported vision tower; the message lists the
            supported types and, when ``tower`` is a whole VLM, where its tower lives.
    """
    if not isinstance(tower, nn.Module):
        raise IncompatibleError(f"tap_for needs a torch.nn.Module vision tower, got {type(tower).__name__}")
    for tap in _TAPS:
        if tap.find_core(tower) is not None:
            return tap(tower)
    hint = ""
    for path in _TOWER_ATTRIBUTES:
        inner = _attribute(tower, path)
        if isinstance(inner, nn.Module) and any(tap.find_core(inner) is not None for tap in _TAPS):
            hint = f" It holds a supported tower at .{path}: pass that instead."
            break
    kind = f"{type(tower).__module__}.{type(tower).__qualname__}"
    raise IncompatibleError(
        f"no attention tap for {kind}.{hint} Supported: " + "; ".join(supported_towers()) + "."
    )
