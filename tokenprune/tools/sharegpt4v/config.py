"""The target configuration: the ``mm_*`` fields of an original LLaVA config, checked, and the
CLIP vision config (given, or read off the weights' shapes)."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tokenprune.errors import IncompatibleError

from .reader import CheckpointError, _listing, _read_json

if TYPE_CHECKING:
    from transformers import CLIPVisionConfig

# OpenAI CLIP ViT widths whose head count is known (head dim 64); other widths need a config.
_CLIP_HEADS_BY_WIDTH = {768: 12, 1024: 16}


@dataclass(frozen=True)
class _LlavaOptions:
    """What the ``mm_*`` fields of an original LLaVA config say, checked."""

    select_layer: int
    select_strategy: Literal["default", "full"]
    pad_to_square: bool
    mm_hidden_size: int | None
    vision_tower_name: str | None


_LLAVA_ONLY_KEYS = {
    "architectures", "model_type", "_name_or_path", "transformers_version", "torch_dtype", "dtype",
    "image_aspect_ratio", "image_grid_pinpoints", "tokenizer_model_max_length", "tokenizer_padding_side",
    "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "use_mm_proj", "unfreeze_mm_vision_tower",
    "tune_vision_tower", "freeze_vision_tower", "tune_entire_model", "tune_vit_from_layer",
}  # fmt: skip


def _llava_options(config: Mapping[str, Any], path: Path) -> _LlavaOptions:
    architectures = config.get("architectures") or []
    if not (
        isinstance(architectures, list) and len(architectures) == 1 and isinstance(architectures[0], str)
    ):
        raise CheckpointError(f"{path}: 'architectures' must list one class name, got {architectures!r}")
    if not architectures[0].endswith("LlamaForCausalLM"):
        raise IncompatibleError(
            f"{path}: architecture {architectures[0]!r} is not a Llama-based LLaVA model; this converter "
            "handles the LLaVA-1.5 / ShareGPT4V layout (LlavaLlamaForCausalLM, Share4VLlamaForCausalLM)"
        )
    projector = config.get("mm_projector_type", "linear")  # LLaVA's own default when the field is absent
    if projector != "mlp2x_gelu":
        raise IncompatibleError(
            f"{path}: mm_projector_type is {projector!r}; LlavaForConditionalGeneration's projector is "
            "Linear-GELU-Linear, i.e. LLaVA's 'mlp2x_gelu' only"
        )
    feature = config.get("mm_vision_select_feature", "patch")
    strategies: dict[str, Literal["default", "full"]] = {
        "patch": "default",
        "cls_patch": "full",
    }
    if feature not in strategies:
        raise IncompatibleError(
            f"{path}: mm_vision_select_feature is {feature!r}; allowed: 'patch', 'cls_patch'"
        )
    aspect = config.get("image_aspect_ratio", "square")
    if aspect not in ("pad", "square", None):
        raise IncompatibleError(
            f"{path}: image_aspect_ratio is {aspect!r}; allowed: 'pad' or 'square' (LLaVA-1.5 style). "
            "'anyres' checkpoints are LLaVA-NeXT models, not LlavaForConditionalGeneration"
        )
    merge = config.get("mm_patch_merge_type", "flat")
    if merge != "flat":
        raise IncompatibleError(
            f"{path}: mm_patch_merge_type is {merge!r}; only 'flat' (LLaVA-1.5 style) converts"
        )
    for flag in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if config.get(flag):
            raise IncompatibleError(
                f"{path}: {flag} is true; LlavaForConditionalGeneration has no image start/end/patch tokens"
            )
    layer = config.get("mm_vision_select_layer", -2)
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise CheckpointError(f"{path}: mm_vision_select_layer must be an int, got {layer!r}")
    hidden = config.get("mm_hidden_size")
    tower = config.get("mm_vision_tower", config.get("vision_tower"))
    return _LlavaOptions(
        layer,
        strategies[feature],
        aspect == "pad",
        hidden,
        tower if isinstance(tower, str) else None,
    )


def _text_config(config: Mapping[str, Any], vocab_size: int, dtype: str, tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    known = set(LlamaConfig().to_dict()) | {"rope_theta", "rope_scaling"}
    # rope_scaling: null is the old spelling of "no scaling"; passing it only earns a deprecation warning
    fields = {
        k: v
        for k, v in config.items()
        if k in known and k not in _LLAVA_ONLY_KEYS and not (k == "rope_scaling" and v is None)
    }
    fields.update(
        vocab_size=vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype=dtype,
    )
    return LlamaConfig.from_dict(fields)


def _vision_config_from_json(data: Mapping[str, Any], origin: str) -> CLIPVisionConfig:
    from transformers import CLIPVisionConfig

    if data.get("model_type") == "clip" or "vision_config" in data:
        data = data.get("vision_config") or {}
    model_type = data.get("model_type", "clip_vision_model")
    if model_type != "clip_vision_model":
        raise IncompatibleError(
            f"{origin}: vision config has model_type {model_type!r}; only CLIP vision towers convert"
        )
    fields = {
        k: v for k, v in data.items() if k not in ("architectures", "transformers_version", "_name_or_path")
    }
    return CLIPVisionConfig.from_dict(fields)


def _load_vision_config(
    value: str | os.PathLike[str] | Mapping[str, Any] | Any,
) -> CLIPVisionConfig:
    from transformers import CLIPVisionConfig, PreTrainedConfig

    if isinstance(value, CLIPVisionConfig):
        return value
    if isinstance(value, PreTrainedConfig):
        return _vision_config_from_json(value.to_dict(), "vision_config")
    if isinstance(value, Mapping):
        return _vision_config_from_json(value, "vision_config")
    path = Path(value)
    if path.is_dir():
        path = path / "config.json"
    return _vision_config_from_json(_read_json(path), str(path))


def _infer_vision_config(shapes: Mapping[str, tuple[int, ...]]) -> CLIPVisionConfig:
    """Read a CLIP vision config off the tensor shapes (names relative to the vision model).

    Hidden size, channels and patch size come from the patch embedding, the image size from
    the position-embedding count (one CLS position plus a square grid), the depth from the
    encoder layer indices and the MLP width from ``fc1``. The head count is not visible in the
    shapes: it is taken from OpenAI CLIP (head dim 64) for widths 768 and 1024 only. Activation
    (``quick_gelu``) and layer-norm epsilon (1e-5) are OpenAI CLIP's.
    """
    from transformers import CLIPVisionConfig

    needed = (
        "embeddings.patch_embedding.weight",
        "embeddings.position_embedding.weight",
        "encoder.layers.0.mlp.fc1.weight",
    )
    absent = [n for n in needed if n not in shapes]
    if absent:
        raise CheckpointError(f"cannot infer the vision config: the vision tower lacks {_listing(absent)}")
    hidden, channels, patch, patch_w = shapes["embeddings.patch_embedding.weight"]
    positions = shapes["embeddings.position_embedding.weight"][0]
    side = math.isqrt(positions - 1)
    if patch != patch_w or side * side != positions - 1:
        raise CheckpointError(
            f"cannot infer the vision config: patch embedding {patch}x{patch_w} and {positions} positions "
            "are not a square patch grid plus one CLS position; pass vision_config / --vision-config"
        )
    layer_ids = {int(m.group(1)) for n in shapes if (m := re.match(r"^encoder\.layers\.(\d+)\.", n))}
    depth = max(layer_ids) + 1
    if layer_ids != set(range(depth)):
        raise CheckpointError(
            f"cannot infer the vision config: encoder layer indices {sorted(layer_ids)} have gaps"
        )
    if hidden not in _CLIP_HEADS_BY_WIDTH:
        raise CheckpointError(
            f"cannot infer the vision tower's number of attention heads from its width {hidden} (known: "
            f"{sorted(_CLIP_HEADS_BY_WIDTH)}); pass vision_config / --vision-config with a CLIP vision config"
        )
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=shapes["encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=depth,
        num_attention_heads=_CLIP_HEADS_BY_WIDTH[hidden],
        num_channels=channels,
        image_size=side * patch,
        patch_size=patch,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=768,
    )
