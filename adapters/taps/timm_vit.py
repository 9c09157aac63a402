"""Attention tap for timm ``VisionTransformer`` towers.

timm's ``Attention`` projects q, k and v with one fused ``qkv`` Linear, splits the heads,
then applies ``q_norm`` / ``k_norm`` (``nn.Identity`` unless ``qk_norm=True``). The tap
hooks the *outputs* of ``q_norm`` and ``k_norm``, so it sees exactly the (normalised) q and
k the tower's softmax uses, whether ``fused_attn`` is on or off.

Prefix tokens: timm puts the class token first, then ``reg_tokens`` register tokens; patch
tokens follow ``num_prefix_tokens``. The CLS row is a softmax over every key (registers
included); all prefix columns are then dropped, so a row covers the patch tokens only.
A model built with ``class_token=False`` has no CLS token (keys and features only).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tokenprune.errors import IncompatibleError

from ._common import HookTap, KeyHook, QueryHook

__all__ = ["TimmVitTap"]

_ATTENTION_PARTS = ("qkv", "q_norm", "k_norm", "num_heads", "head_dim", "scale")


class TimmVitTap(HookTap):
    """Tap for ``timm.models.vision_transformer.VisionTransformer``."""

    framework = "timm"
    supported_types = ("timm VisionTransformer (standard Attention blocks: fused qkv, optional qk_norm)",)

    @staticmethod
    def find_core(module: nn.Module) -> nn.Module | None:
        """``module`` if it is a timm VisionTransformer, else ``None``."""
        if not type(module).__module__.startswith("timm."):
            return None
        from timm.models.vision_transformer import VisionTransformer

        return module if isinstance(module, VisionTransformer) else None

    def __init__(self, tower: nn.Module) -> None:
        core = self._core_or_refuse(tower, "timm tower")
        super().__init__(tower, core)
        for index, block in enumerate(core.blocks):
            attn = getattr(block, "attn", None)
            if not all(hasattr(attn, name) for name in _ATTENTION_PARTS) or attn.q_norm is attn.k_norm:
                raise IncompatibleError(
                    f"block {index} of the {self.tower_name} tower uses {type(attn).__name__}; the tap "
                    "supports timm's standard Attention (fused qkv, separate q_norm/k_norm modules)"
                )

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.core.blocks

    @property
    def has_cls_token(self) -> bool:
        return getattr(self.core, "cls_token", None) is not None

    @property
    def prefix_tokens(self) -> int:
        return int(self.core.num_prefix_tokens)

    def _head_scale(self, layer: int) -> float:
        return float(self.core.blocks[layer].attn.scale)

    def _hook_query_key(self, layer: int, on_query: QueryHook | None, on_key: KeyHook) -> list[RemovableHandle]:
        attn = self.core.blocks[layer].attn
        handles = []
        if on_query is not None:

            def query_hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
                on_query(output[:, :, 0])  # [B, H, L, hd] -> CLS query [B, H, hd]

            handles.append(attn.q_norm.register_forward_hook(query_hook))

        def key_hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            on_key(output.transpose(1, 2))  # [B, H, L, hd] -> [B, L, H, hd]

        handles.append(attn.k_norm.register_forward_hook(key_hook))
        return handles

    def _block_tokens(self, output: Any) -> torch.Tensor:
        return output

    def forward(self, pixel_values: torch.Tensor) -> Any:
        # The tower's own features forward; the classifier head is not needed.
        return self.core.forward_features(pixel_values)
