"""Attention tap for open_clip ``VisionTransformer`` towers.

open_clip blocks come in two kinds:

* ``ResidualAttentionBlock`` with ``torch.nn.MultiheadAttention``: q and k are never
  materialised outside the fused kernel, so a forward *pre*-hook on the attention module
  reads its inputs (the block's ``ln_1`` output) and projects the CLS query and the keys
  with the module's own ``in_proj`` weight/bias slices (or ``q_proj_weight``/``k_proj_weight``
  when q, k, v have separate weights). ``batch_first=False`` (sequence-first) is handled.
* ``CustomResidualAttentionBlock`` with open_clip's own ``Attention``: the tap hooks the
  outputs of ``ln_q`` / ``ln_k`` (``nn.Identity`` unless ``qk_norm``), i.e. the q and k
  the softmax sees. Scaled-cosine attention is refused (its softmax is not q.k/sqrt(d)).

Also accepted: an open_clip ``CLIP`` / ``CustomTextCLIP`` model, whose ``.visual`` is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from tokenprune.errors import IncompatibleError

from ._common import HookTap, KeyHook, QueryHook

__all__ = ["OpenClipVitTap"]


class OpenClipVitTap(HookTap):
    """Tap for ``open_clip.transformer.VisionTransformer``."""

    framework = "open_clip"
    supported_types = (
        "open_clip VisionTransformer (nn.MultiheadAttention or open_clip Attention blocks), "
        "or an open_clip CLIP model (its .visual)",
    )

    @staticmethod
    def find_core(module: nn.Module) -> nn.Module | None:
        """The open_clip VisionTransformer of ``module``, or ``None``."""
        if not type(module).__module__.startswith("open_clip."):
            return None
        from open_clip.transformer import VisionTransformer

        for candidate in (module, getattr(module, "visual", None)):
            if isinstance(candidate, VisionTransformer):
                return candidate
        return None

    def __init__(self, tower: nn.Module) -> None:
        core = self._core_or_refuse(tower, "open_clip tower")
        super().__init__(tower, core)
        for index, block in enumerate(core.transformer.resblocks):
            attn = getattr(block, "attn", None)
            if isinstance(attn, nn.MultiheadAttention):
                if attn.bias_k is not None or attn.add_zero_attn:
                    raise IncompatibleError(
                        f"block {index} of the {self.tower_name} tower uses MultiheadAttention with "
                        "add_bias_kv/add_zero_attn (extra keys); the tap does not support it"
                    )
            elif not all(hasattr(attn, n) for n in ("in_proj_weight", "ln_q", "ln_k", "num_heads", "scale")):
                raise IncompatibleError(
                    f"block {index} of the {self.tower_name} tower uses {type(attn).__name__}; supported: "
                    "nn.MultiheadAttention and open_clip's Attention"
                )

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.core.transformer.resblocks

    @property
    def has_cls_token(self) -> bool:
        return getattr(self.core, "class_embedding", None) is not None

    @property
    def _batch_first(self) -> bool:
        return bool(getattr(self.core.transformer, "batch_first", True))

    def _head_scale(self, layer: int) -> float:
        attn = self.blocks[layer].attn
        if isinstance(attn, nn.MultiheadAttention):
            return float(attn.head_dim**-0.5)
        return float(attn.scale)

    def _hook_query_key(self, layer: int, on_query: QueryHook | None, on_key: KeyHook) -> list[RemovableHandle]:
        attn = self.blocks[layer].attn
        if isinstance(attn, nn.MultiheadAttention):
            return [attn.register_forward_pre_hook(self._mha_pre_hook(attn, on_query, on_key), with_kwargs=True)]
        if attn.logit_scale is not None:
            raise IncompatibleError(
                f"block {layer} of the {self.tower_name} tower uses scaled-cosine attention; the tap "
                "computes softmax(q.k * scale) and cannot reproduce it"
            )
        handles = []
        if on_query is not None:

            def query_hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
                on_query(output[:, :, 0])  # [B, H, L, hd] -> [B, H, hd]

            handles.append(attn.ln_q.register_forward_hook(query_hook))

        def key_hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            on_key(output.transpose(1, 2))  # [B, H, L, hd] -> [B, L, H, hd]

        handles.append(attn.ln_k.register_forward_hook(key_hook))
        return handles

    @staticmethod
    def _mha_pre_hook(attn: nn.MultiheadAttention, on_query: QueryHook | None, on_key: KeyHook) -> Any:
        heads, head_dim, width = attn.num_heads, attn.head_dim, attn.embed_dim
        # The q/k weight and bias slices, taken once per capture (views of the module's own
        # parameters, outside autograd), not on every forward.
        with torch.no_grad():
            if attn._qkv_same_embed_dim:
                q_weight, k_weight = attn.in_proj_weight[:width], attn.in_proj_weight[width : 2 * width]
            else:
                q_weight, k_weight = attn.q_proj_weight, attn.k_proj_weight
            bias = attn.in_proj_bias
            q_bias = None if bias is None else bias[:width]
            k_bias = None if bias is None else bias[width : 2 * width]
        batch_first = attn.batch_first

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            query = args[0] if args else kwargs["query"]
            key = args[1] if len(args) > 1 else kwargs.get("key", query)
            if not batch_first:  # [L, B, D] -> [B, L, D]
                query, key = query.transpose(0, 1), key.transpose(0, 1)
            with torch.no_grad():
                if on_query is not None:
                    cls_query = F.linear(query[:, 0], q_weight, q_bias)
                    on_query(cls_query.view(cls_query.shape[0], heads, head_dim))
                keys = F.linear(key, k_weight, k_bias)
                on_key(keys.view(keys.shape[0], keys.shape[1], heads, head_dim))
            return None

        return hook

    def _block_tokens(self, output: Any) -> torch.Tensor:
        return output if self._batch_first else output.transpose(0, 1)

    def forward(self, pixel_values: torch.Tensor) -> Any:
        return self.core(pixel_values)
