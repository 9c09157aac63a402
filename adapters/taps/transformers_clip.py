"""Attention tap for Hugging Face transformers CLIP and SigLIP vision towers.

Accepts ``CLIPVisionModel`` (the ``vision_tower`` of LLaVA / LLaVA-NeXT models, at
``model.model.vision_tower`` in transformers 5), ``SiglipVisionModel``, their older
``*VisionTransformer`` cores, and any transformers model holding one of those as
``.vision_model`` (``CLIPModel``, ``CLIPVisionModelWithProjection``, ``SiglipModel``).

Hooks: forward hooks on ``self_attn.q_proj`` (CLS row only) and ``self_attn.k_proj`` of the
tapped blocks, and on the encoder layer itself for CLS embeddings and features. The tower
keeps whatever attention implementation it was loaded with (SDPA, flash, eager).
SigLIP has no CLS token: it serves keys and features only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tokenprune.errors import IncompatibleError

from ._common import HookTap, KeyHook, QueryHook

__all__ = ["TransformersVisionTap"]

_CORE_TYPES = ("CLIPVisionModel", "CLIPVisionTransformer", "SiglipVisionModel", "SiglipVisionTransformer")


def _is_core(module: nn.Module) -> bool:
    return type(module).__name__ in _CORE_TYPES and _layers_of(module) is not None


def _layers_of(module: nn.Module) -> Sequence[nn.Module] | None:
    encoder = getattr(module, "encoder", None)
    layers = getattr(encoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(module, "embeddings"):
        return None
    return layers


class TransformersVisionTap(HookTap):
    """Tap for transformers ``CLIPVisionModel`` / ``SiglipVisionModel`` towers."""

    framework = "transformers"
    supported_types = (
        "transformers CLIPVisionModel / SiglipVisionModel (or a model holding one as .vision_model, "
        "e.g. CLIPModel, CLIPVisionModelWithProjection, SiglipModel)",
    )

    @staticmethod
    def find_core(module: nn.Module) -> nn.Module | None:
        """The CLIP/SigLIP vision core of ``module``, or ``None`` if it is not one."""
        if not type(module).__module__.startswith("transformers."):
            return None
        # CLIPModel & co. hold the tower as .vision_model; so did CLIPVisionModel before v5.
        for candidate in (module, getattr(module, "vision_model", None)):
            if isinstance(candidate, nn.Module) and _is_core(candidate):
                return candidate
        return None

    def __init__(self, tower: nn.Module) -> None:
        core = self._core_or_refuse(tower, "transformers vision tower")
        super().__init__(tower, core)
        layers = _layers_of(core)
        assert layers is not None
        self._layers = layers
        for index, layer in enumerate(layers):
            attn = getattr(layer, "self_attn", None)
            if not all(hasattr(attn, name) for name in ("q_proj", "k_proj", "num_heads", "head_dim")):
                raise IncompatibleError(
                    f"block {index} of the {self.tower_name} tower has no self_attn.q_proj/k_proj "
                    "with num_heads/head_dim; this transformers version's layout is not supported"
                )
        self._has_cls = hasattr(core.embeddings, "class_embedding")

    @property
    def tower_name(self) -> str:
        # Before v5, CLIPVisionModel / SiglipVisionModel held their ...VisionTransformer as
        # .vision_model: name the class the user passed, as on v5.
        core_name, outer = type(self.core).__name__, type(self.tower).__name__
        if self.tower is not self.core and outer == core_name.replace("VisionTransformer", "VisionModel"):
            core_name = outer
        return f"{self.framework} {core_name}"

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self._layers

    @property
    def has_cls_token(self) -> bool:
        return self._has_cls

    def _head_scale(self, layer: int) -> float:
        attn = self._layers[layer].self_attn
        return float(getattr(attn, "scale", attn.head_dim**-0.5))

    def _hook_query_key(self, layer: int, on_query: QueryHook | None, on_key: KeyHook) -> list[RemovableHandle]:
        attn = self._layers[layer].self_attn
        heads, head_dim = int(attn.num_heads), int(attn.head_dim)
        handles = []
        if on_query is not None:

            def query_hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
                on_query(output[:, 0].reshape(output.shape[0], heads, head_dim))

            handles.append(attn.q_proj.register_forward_hook(query_hook))

        def key_hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            on_key(output.reshape(output.shape[0], output.shape[1], heads, head_dim))

        handles.append(attn.k_proj.register_forward_hook(key_hook))
        return handles

    def _block_tokens(self, output: Any) -> torch.Tensor:
        return output[0] if isinstance(output, tuple) else output

    def forward(self, pixel_values: torch.Tensor) -> Any:
        return self.core(pixel_values=pixel_values)
