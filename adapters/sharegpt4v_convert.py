"""Convert ShareGPT4V / LLaVA-1.5 checkpoints (original LLaVA layout) to ``LlavaForConditionalGeneration``.

ShareGPT4V (Chen et al. 2023, "ShareGPT4V: Improving Large Multi-Modal Models with Better
Captions") is released in the layout of the original LLaVA code base: one Llama causal LM
whose ``config.json`` carries ``mm_*`` fields, with the vision tower and the projector stored
under ``model.vision_tower.vision_tower.*`` and ``model.mm_projector.*``. This module writes a
``transformers`` ``LlavaForConditionalGeneration`` directory (sharded safetensors, a
``LlavaConfig`` and a ``LlavaProcessor``) that ``from_pretrained`` loads offline.

Guarantees:

* every source tensor is used exactly once and every target tensor is written exactly once;
  anything else is a :class:`CheckpointError` naming the keys. Two kinds of source tensors are
  *checked* instead of copied, because ``transformers`` recomputes them: the RoPE
  ``rotary_emb.inv_freq`` buffers (checked against ``rope_theta``) and the CLIP
  ``embeddings.position_ids`` buffer (checked to be ``0..n-1``). From a separate CLIP
  checkpoint given as ``vision_tower``, the text tower, the projections and ``logit_scale``
  are skipped (logged), as LLaVA's ``CLIPVisionModel.from_pretrained`` skips them.
* ``.bin`` shards are read only with ``torch.load(..., weights_only=True)``; a pickle holding
  anything but tensors is refused. Shards are streamed one at a time (memory-mapped when the
  file allows it) and written shard by shard: the model is never held twice in memory.
* the output appears at ``dst`` only when complete (written to a sibling temporary folder,
  then renamed).

``transformers`` and ``safetensors`` are imported inside functions: this module is imported
with the adapters package and must stay cheap to import.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pickle
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from tokenprune.errors import ConfigError, IncompatibleError, TokenpruneError

if TYPE_CHECKING:
    from transformers import CLIPVisionConfig, LlavaConfig

__all__ = [
    "VICUNA_V1_CHAT_TEMPLATE",
    "VICUNA_V1_SYSTEM_PROMPT",
    "CheckpointError",
    "add_convert_parser",
    "convert_sharegpt4v",
    "main",
    "run_convert_sharegpt4v",
]

logger = logging.getLogger(__name__)


class CheckpointError(ConfigError):
    """A checkpoint's files, tensor names, shapes or contents are not what the conversion needs."""


#: The system prompt of LLaVA's ``conv_vicuna_v1`` (ShareGPT4V's ``share4v_v1``) template.
VICUNA_V1_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

#: Vicuna v1 conversation format (``SeparatorStyle.TWO``, ``sep=" "``, ``sep2="</s>"``):
#: ``"{system} USER: <image>\n{question} ASSISTANT: {answer}</s>USER: ... ASSISTANT:"``.
#: Without a system message the Vicuna system prompt is used, as in LLaVA's evaluation code.
#: Images of a message are rendered before its text, each as ``<image>\n``.
VICUNA_V1_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set system = messages[0]['content'] -%}"
    "{%- else -%}{%- set system = messages[0]['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}{%- endif -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = '" + VICUNA_V1_SYSTEM_PROMPT.replace("'", "\\'") + "' -%}"
    "{%- set turns = messages -%}"
    "{%- endif -%}"
    "{{- system ~ ' ' -}}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' -}}"
    "{%- else -%}{{- raise_exception('Vicuna v1 knows the roles system (first message only), "
    "user and assistant, got ' ~ message['role']) -}}"
    "{%- endif -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}{{- '<image>\n' -}}{%- endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{- item['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{- eos_token if eos_token is defined else '</s>' -}}"
    "{%- else -%}{{- ' ' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

_IMAGE_TOKEN = "<image>"
_PAD_TOKEN = "<pad>"
_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
# OpenAI CLIP ViT widths whose head count is known (head dim 64); other widths need a config.
_CLIP_HEADS_BY_WIDTH = {768: 12, 1024: 16}
_MAX_LISTED = 20

# Original LLaVA layout.
_SRC_VISION = "model.vision_tower.vision_tower."
_SRC_PROJECTOR = {
    "model.mm_projector.0.": "linear_1.",
    "model.mm_projector.2.": "linear_2.",
}
_SRC_LM_HEAD = "lm_head."
_SRC_LM = "model."
_INV_FREQ = re.compile(r"^layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_POSITION_IDS = "embeddings.position_ids"
# Parts of a full CLIP checkpoint that a LLaVA vision tower never loads.
_CLIP_NON_VISION = (
    "text_model.",
    "text_projection.",
    "visual_projection.",
    "logit_scale",
)


# --------------------------------------------------------------------------- checkpoint files


@dataclass(frozen=True)
class _TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class _Checkpoint:
    """The tensors of a (possibly sharded) checkpoint folder: names, shapes and dtypes, no data."""

    directory: Path
    files: tuple[Path, ...]
    tensors: dict[str, _TensorInfo]

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)``, one shard file at a time."""
        for file in self.files:
            yield from _read_shard(file)


def _find_weight_files(directory: Path, what: str) -> tuple[tuple[Path, ...], dict[str, str] | None]:
    candidates = (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    )
    for index_name, single_name in candidates:
        index_path = directory / index_name
        if index_path.is_file():
            index = _read_json(index_path)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(
                    f"{index_path} has no 'weight_map' object mapping tensor names to shard files"
                )
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (directory / n).is_file()]
            if missing:
                raise CheckpointError(
                    f"{index_path} lists shard files that do not exist: {_listing(missing)}"
                )
            return tuple(directory / n for n in names), weight_map
        if (directory / single_name).is_file():
            return (directory / single_name,), None
    raise CheckpointError(
        f"no weights found in {what} folder {directory}: expected model.safetensors, "
        "model.safetensors.index.json + shards, pytorch_model.bin, or pytorch_model.bin.index.json + shards"
    )


def _torch_load(file: Path, *, mmap: bool) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{file} was refused by torch.load(weights_only=True): it holds Python objects other than "
            f"tensors ({first_line}). tokenprune never unpickles arbitrary objects; re-save the state "
            "dict as plain tensors (or as safetensors) with code you trust."
        ) from error


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = _torch_load(file, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise CheckpointError(f"{file} could not be read by torch.load: {error}") from error
        state = _torch_load(file, mmap=False)  # legacy (non-zip) torch.save format
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{file} does not hold a state dict (a mapping from str names to tensors)")
    return dict(state)


def _read_shard(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if file.name.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(file), framework="pt", device="cpu") as shard:
            for name in shard.keys():  # noqa: SIM118  (safe_open is not iterable)
                yield name, shard.get_tensor(name)
    else:
        state = _load_bin(file)
        while state:  # hand tensors over one by one so a consumer can drop them early
            name = next(iter(state))
            yield name, state.pop(name)


def _scan_shard(file: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    if file.name.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(file), framework="pt", device="cpu") as shard:
            infos = {}
            for name in shard.keys():  # noqa: SIM118  (safe_open is not iterable)
                piece = shard.get_slice(name)
                infos[name] = (
                    tuple(piece.get_shape()),
                    _safetensors_dtype(piece.get_dtype(), file, name),
                )
            return infos
    return {name: (tuple(t.shape), t.dtype) for name, t in _load_bin(file).items()}


def _safetensors_dtype(code: str, file: Path, name: str) -> torch.dtype:
    table = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U8": torch.uint8, "BOOL": torch.bool,
    }  # fmt: skip
    if code not in table:
        raise CheckpointError(
            f"{file}: tensor {name!r} has dtype {code}, which this converter does not handle"
        )
    return table[code]


def _open_checkpoint(directory: Path, what: str) -> _Checkpoint:
    if not directory.is_dir():
        raise ConfigError(f"{what} must be an existing folder, got {str(directory)!r}")
    files, weight_map = _find_weight_files(directory, what)
    tensors: dict[str, _TensorInfo] = {}
    duplicates: list[str] = []
    for file in files:
        for name, (shape, dtype) in _scan_shard(file).items():
            if name in tensors:
                duplicates.append(name)
            tensors[name] = _TensorInfo(file, shape, dtype)
    if duplicates:
        raise CheckpointError(f"tensors stored in more than one shard of {directory}: {_listing(duplicates)}")
    if weight_map is not None:
        stored = {name: info.file.name for name, info in tensors.items()}
        absent = sorted(set(weight_map) - set(stored))
        unlisted = sorted(set(stored) - set(weight_map))
        misplaced = sorted(n for n in set(stored) & set(weight_map) if stored[n] != weight_map[n])
        problems = []
        if absent:
            problems.append(f"listed in the index but in no shard: {_listing(absent)}")
        if unlisted:
            problems.append(f"in a shard but not in the index: {_listing(unlisted)}")
        if misplaced:
            problems.append(f"in another shard than the index says: {_listing(misplaced)}")
        if problems:
            raise CheckpointError(
                f"the weight index of {directory} does not match its shards; tensors " + "; ".join(problems)
            )
    return _Checkpoint(directory, files, tensors)


# --------------------------------------------------------------------------- configuration


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ConfigError(f"{path} does not exist") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


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


# --------------------------------------------------------------------------- tokenizer


_TOKENIZER_FILES = ("special_tokens_map.json", "added_tokens.json")


def _prepare_tokenizer(src: Path, source_rows: int) -> tuple[Any, list[str]]:
    """The source tokenizer with ``<image>`` (and ``<pad>`` if it has no pad token) added, left padding."""
    from transformers import AutoTokenizer

    files = [
        f
        for f in sorted(src.iterdir())
        if f.is_file() and (f.name.startswith("tokenizer") or f.name in _TOKENIZER_FILES)
    ]
    if not files:
        raise CheckpointError(
            f"{src} holds no tokenizer files (tokenizer.json / tokenizer.model, tokenizer_config.json)"
        )
    # Load from a copy without config.json: the original LLaVA config (model_type "llava" or
    # "share4v") is not a transformers config and must not steer the tokenizer class.
    with tempfile.TemporaryDirectory(prefix="tokenprune-tokenizer-") as scratch:
        for file in files:
            shutil.copy2(file, Path(scratch) / file.name)
        try:
            before = AutoTokenizer.from_pretrained(scratch, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(
                scratch,
                local_files_only=True,
                extra_special_tokens={"image_token": _IMAGE_TOKEN},
            )
        except (OSError, ValueError, ImportError, TypeError) as error:
            raise CheckpointError(
                f"could not load the tokenizer of {src}: {error}. A sentencepiece-only Llama tokenizer "
                "(tokenizer.model without tokenizer.json) needs the 'sentencepiece' or 'protobuf' package"
            ) from error
    if len(before) > source_rows:
        raise CheckpointError(
            f"the tokenizer of {src} has {len(before)} tokens but the embedding matrix only {source_rows} rows: "
            "tokenizer and weights do not belong together"
        )
    added = [] if _IMAGE_TOKEN in before.get_vocab() else [_IMAGE_TOKEN]
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": _PAD_TOKEN})
        added.append(_PAD_TOKEN)
    image_ids = tokenizer.encode(_IMAGE_TOKEN, add_special_tokens=False)
    if image_ids != [tokenizer.convert_tokens_to_ids(_IMAGE_TOKEN)]:
        raise CheckpointError(
            f"the tokenizer of {src} splits {_IMAGE_TOKEN!r} into {image_ids}; it must be one token"
        )
    tokenizer.padding_side = "left"  # batched generation appends after the prompt
    for loading_detail in (
        "is_local",
        "local_files_only",
    ):  # would be saved into tokenizer_config.json
        tokenizer.init_kwargs.pop(loading_detail, None)
    return tokenizer, added


# --------------------------------------------------------------------------- target model


@dataclass(frozen=True)
class _Target:
    """Names and shapes of the tensors a ``LlavaForConditionalGeneration`` checkpoint holds."""

    shapes: dict[str, tuple[int, ...]]
    lm: dict[str, str]  # name relative to the Llama decoder -> full name
    vision: dict[str, str]  # name relative to the CLIP vision model (no "vision_model.") -> full name
    projector: dict[str, str]  # "linear_1.weight", ... -> full name
    lm_head: dict[str, str]  # "weight" -> full name (empty when tied)
    resized: frozenset[str]  # full names whose first dim is the vocabulary
    vocab_size: int


def _strip(name: str, prefix: str) -> str:
    return name.removeprefix(prefix)


def _target(config: LlavaConfig) -> _Target:
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        for tied in getattr(model, "_tied_weights_keys", None) or {}:
            shapes.pop(tied, None)
    module_names = {id(module): name for name, module in model.named_modules()}

    def part(module: torch.nn.Module, normalise: bool = False) -> dict[str, str]:
        prefix = module_names[id(module)] + "."
        names = {}
        for local in module.state_dict():
            full = prefix + local
            if full in shapes:
                names[_strip(local, "vision_model.") if normalise else local] = full
        return names

    inner = model.model
    lm = part(inner.language_model)
    lm_head = part(model.lm_head)
    resized = frozenset({lm["embed_tokens.weight"], *lm_head.values()})
    return _Target(
        shapes, lm, part(inner.vision_tower, normalise=True), part(inner.multi_modal_projector), lm_head,
        resized, config.text_config.vocab_size,
    )  # fmt: skip


# --------------------------------------------------------------------------- name mapping


@dataclass(frozen=True)
class _Action:
    """What to do with one source tensor."""

    kind: Literal["copy", "resize", "check_inv_freq", "check_position_ids", "skip"]
    target: str | None = None


def _map_source_name(name: str, target: _Target) -> _Action | None:
    if name.startswith(_SRC_VISION):
        local = _strip(_strip(name, _SRC_VISION), "vision_model.")
        return _vision_action(local, target)
    for prefix, local_prefix in _SRC_PROJECTOR.items():
        if name.startswith(prefix):
            full = target.projector.get(local_prefix + name[len(prefix) :])
            return _Action("copy", full) if full else None
    if name.startswith(_SRC_LM_HEAD):
        full = target.lm_head.get(name[len(_SRC_LM_HEAD) :])
        return _Action("resize", full) if full else None
    if name.startswith(_SRC_LM) and not name.startswith(("model.vision_tower.", "model.mm_projector.")):
        local = name[len(_SRC_LM) :]
        if local in target.lm:
            full = target.lm[local]
            return _Action("resize" if full in target.resized else "copy", full)
        if _INV_FREQ.match(local):
            return _Action("check_inv_freq")
    return None


def _vision_action(local: str, target: _Target) -> _Action | None:
    if local in target.vision:
        return _Action("copy", target.vision[local])
    if local == _POSITION_IDS:
        return _Action("check_position_ids")
    return None


def _map_tower_name(name: str, target: _Target) -> _Action | None:
    if name.startswith(_CLIP_NON_VISION):
        return _Action("skip")
    return _vision_action(_strip(name, "vision_model."), target)


def _plan(
    source: _Checkpoint, tower: _Checkpoint | None, target: _Target
) -> tuple[dict[str, _Action], dict[str, _Action]]:
    """Map every source (and tower) tensor; raise one error naming every problem."""
    source_plan: dict[str, _Action] = {}
    tower_plan: dict[str, _Action] = {}
    unexpected: list[str] = []
    filled: dict[str, str] = {}
    duplicates: list[str] = []
    bad_shapes: list[str] = []
    inputs: list[tuple[str, _Checkpoint, dict[str, _Action], Any]] = [
        ("", source, source_plan, _map_source_name)
    ]
    if tower is not None:
        inputs.append((f"{tower.directory}: ", tower, tower_plan, _map_tower_name))
    for label, checkpoint, plan, mapper in inputs:
        for name, info in checkpoint.tensors.items():
            action = mapper(name, target)
            if action is None:
                unexpected.append(label + name)
                continue
            plan[name] = action
            if action.target is None:
                continue
            if action.target in filled:
                duplicates.append(f"{action.target} (from {filled[action.target]} and {label + name})")
                continue
            filled[action.target] = label + name
            expected = target.shapes[action.target]
            shape = info.shape
            fits = (
                len(shape) == len(expected) and shape[1:] == expected[1:] and shape[0] <= expected[0]
                if action.kind == "resize"
                else shape == expected
            )
            if not fits:
                bad_shapes.append(f"{label + name} {list(shape)} -> {action.target} {list(expected)}")
    missing = sorted(set(target.shapes) - set(filled))
    problems = []
    if unexpected:
        problems.append(
            f"{len(unexpected)} source tensor(s) with no place in LlavaForConditionalGeneration: {_listing(sorted(unexpected))}"
        )
    if missing:
        problems.append(
            f"{len(missing)} LlavaForConditionalGeneration tensor(s) that no source tensor fills: {_listing(missing)}"
        )
    if duplicates:
        problems.append(f"tensors filled twice: {_listing(duplicates)}")
    if bad_shapes:
        problems.append(f"shape mismatches (source -> target): {_listing(bad_shapes)}")
    if problems:
        raise CheckpointError("the checkpoint does not convert:\n  " + "\n  ".join(problems))
    return source_plan, tower_plan


# --------------------------------------------------------------------------- writing


def _parse_size(value: int | str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", value, flags=re.IGNORECASE)
        if not match:
            raise ConfigError(
                f"max_shard_size must be bytes (int) or like '5GB', '500MB', '2GiB', got {value!r}"
            )
        unit = (match.group(2) or "B").upper()
        scale = 1 if unit == "B" else (1024 if "I" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
        size = int(float(match.group(1)) * scale)
    else:
        raise ConfigError(f"max_shard_size must be an int or a str, got {type(value).__name__}")
    if size <= 0:
        raise ConfigError(f"max_shard_size must be positive, got {value!r}")
    return size


class _ShardWriter:
    """Collects tensors into safetensors shards of at most ``max_bytes`` (a bigger tensor gets its own)."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.untyped_storage().nbytes() != nbytes:
            tensor = tensor.clone()  # a view into a bigger storage: safetensors wants its own
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = tensor
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(
            self.pending,
            str(self.directory / f"shard-{len(self.shards)}.partial"),
            metadata={"format": "pt"},
        )
        self.shards.append(sorted(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        if self.pending:
            self._flush()
        count = len(self.shards)
        if count == 1:
            os.replace(self.directory / "shard-0.partial", self.directory / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.directory / f"shard-{i}.partial", self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _resize_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Append rows equal to the mean of the existing rows (computed in float32)."""
    extra = rows - tensor.shape[0]
    if extra == 0:
        return tensor
    mean = tensor.float().mean(dim=0, keepdim=True).to(tensor.dtype)
    return torch.cat([tensor, mean.expand(extra, *tensor.shape[1:])], dim=0)


def _check_inv_freq(name: str, tensor: torch.Tensor, head_dim: int, theta: float) -> None:
    expected = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    ok = tensor.shape == expected.shape and torch.allclose(tensor.double(), expected, rtol=1e-2, atol=0.0)
    if not ok:
        raise CheckpointError(
            f"{name} does not match rope_theta={theta} and head_dim={head_dim}; transformers recomputes "
            "this buffer from the config, so the checkpoint would not convert faithfully"
        )


def _check_position_ids(name: str, tensor: torch.Tensor, positions: int) -> None:
    expected = torch.arange(positions)
    if tensor.numel() != positions or not torch.equal(tensor.reshape(-1).long(), expected):
        raise CheckpointError(f"{name} is not 0..{positions - 1}; transformers recomputes it, so it must be")


def _write_weights(
    writer: _ShardWriter,
    checkpoint: _Checkpoint,
    plan: Mapping[str, _Action],
    target: _Target,
    config: LlavaConfig,
    dtype: torch.dtype | None,
) -> None:
    text = config.text_config
    theta = float(text.rope_parameters["rope_theta"])
    positions = (config.vision_config.image_size // config.vision_config.patch_size) ** 2 + 1
    for name, tensor in checkpoint.iter_tensors():
        action = plan[name]
        if action.kind == "check_inv_freq":
            _check_inv_freq(name, tensor, text.head_dim, theta)
        elif action.kind == "check_position_ids":
            _check_position_ids(name, tensor, positions)
        elif action.kind in ("copy", "resize"):
            assert action.target is not None
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            if action.kind == "resize":
                tensor = _resize_rows(tensor, target.vocab_size)
            writer.add(action.target, tensor)
        del tensor


# --------------------------------------------------------------------------- processor, config


def _processor(tokenizer: Any, vision: CLIPVisionConfig, options: _LlavaOptions) -> Any:
    from transformers import LlavaImageProcessor, LlavaProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    size = vision.image_size
    images = LlavaImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_pad=options.pad_to_square,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=options.select_strategy,
        num_additional_image_tokens=1,
        chat_template=VICUNA_V1_CHAT_TEMPLATE,
    )


_SAMPLING_ONLY = ("temperature", "top_p", "top_k", "typical_p", "min_p", "epsilon_cutoff", "eta_cutoff")


def _save_generation_config(src: Path, out: Path, tokenizer: Any) -> None:
    """The source's generation config with the converted token ids.

    LLaVA checkpoints set ``temperature`` / ``top_p`` without ``do_sample``, which transformers 5
    refuses to save; those sampling-only fields are dropped (logged) unless ``do_sample`` is true.
    """
    from transformers import GenerationConfig

    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    source = src / "generation_config.json"
    fields = _read_json(source) if source.is_file() else {}
    fields = {k: v for k, v in fields.items() if k not in ("transformers_version", "_from_model_config")}
    if not fields.get("do_sample"):
        dropped = sorted(k for k in _SAMPLING_ONLY if k in fields)
        if dropped:
            logger.info("generation_config.json: dropping %s (set without do_sample=true)", dropped)
        fields = {k: v for k, v in fields.items() if k not in _SAMPLING_ONLY}
    try:
        GenerationConfig.from_dict({**fields, **ids}).save_pretrained(out)
    except ValueError as error:  # anything else strict validation refuses
        logger.warning("generation_config.json of %s not kept (%s); writing token ids only", src, error)
        GenerationConfig(**ids).save_pretrained(out)


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ConfigError(f"dtype must be None (keep the source's) or one of {sorted(_DTYPES)}, got {dtype!r}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


# --------------------------------------------------------------------------- entry point


def convert_sharegpt4v(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    vision_config: str | os.PathLike[str] | Mapping[str, Any] | Any | None = None,
    vision_tower: str | os.PathLike[str] | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Convert an original-layout ShareGPT4V / LLaVA-1.5 checkpoint to a ``LlavaForConditionalGeneration`` folder.

    Args:
        src: folder with the original ``config.json`` (``mm_*`` fields), the weights
            (``pytorch_model*.bin`` or ``*.safetensors``, sharded with an index or not) and the
            Llama tokenizer.
        dst: output folder; must not exist or be empty. Written only when complete.
        vision_config: CLIP vision config (a ``config.json`` path or its folder, a dict, or a
            ``CLIPVisionConfig``; a full ``CLIPConfig`` gives its ``vision_config``). Default:
            ``vision_tower``'s ``config.json`` if given, else read off the weights' shapes.
        vision_tower: local CLIP checkpoint folder (``CLIPVisionModel`` or ``CLIPModel``), required
            when ``src`` holds no vision tower weights (plain LLaVA-1.5 checkpoints name the tower
            instead), refused when it does.
        dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"`` for every floating tensor; ``None``
            keeps each tensor's stored dtype.
        max_shard_size: largest output shard, in bytes or like ``"5GB"`` / ``"2GiB"``.

    Returns:
        ``dst`` as a ``Path``.

    Raises:
        ConfigError: bad arguments or ``dst`` not empty. CheckpointError (a ConfigError): missing
            or unexpected tensors (all named), shape mismatches, unreadable or unsafe files.
        IncompatibleError: a LLaVA variant ``LlavaForConditionalGeneration`` cannot express.
    """
    # tokenprune, a parent package, has already run its compat shim before transformers loads
    from transformers import LlavaConfig

    src_dir, dst_dir = Path(src), Path(dst)
    out_dtype = _resolve_dtype(dtype)
    shard_bytes = _parse_size(max_shard_size)
    if not src_dir.is_dir():
        raise ConfigError(f"src must be an existing checkpoint folder, got {str(src_dir)!r}")
    if dst_dir.exists() and (not dst_dir.is_dir() or any(dst_dir.iterdir())):
        raise ConfigError(f"dst {str(dst_dir)!r} exists and is not an empty folder; refusing to overwrite it")
    source_config = _read_json(src_dir / "config.json")
    options = _llava_options(source_config, src_dir / "config.json")

    source = _open_checkpoint(src_dir, "src")
    has_tower = any(name.startswith(_SRC_VISION) for name in source.tensors)
    tower: _Checkpoint | None = None
    if vision_tower is not None:
        if has_tower:
            raise ConfigError(
                f"{src_dir} already holds vision tower weights ({_SRC_VISION}*); vision_tower / --vision-tower "
                "would replace them and leave them unused. Drop the option to keep the checkpoint's own tower"
            )
        tower = _open_checkpoint(Path(vision_tower), "vision_tower")
    elif not has_tower:
        raise CheckpointError(
            f"{src_dir} holds no vision tower weights ({_SRC_VISION}*): its config names the tower "
            f"{options.vision_tower_name!r} instead. Pass vision_tower= / --vision-tower PATH to a local copy "
            "of that CLIP checkpoint (a CLIPVisionModel or CLIPModel folder)"
        )

    if vision_config is not None:
        vision = _load_vision_config(vision_config)
    elif tower is not None:
        vision = _load_vision_config(tower.directory)
    else:
        vision_shapes = {
            _strip(_strip(n, _SRC_VISION), "vision_model."): info.shape
            for n, info in source.tensors.items()
            if n.startswith(_SRC_VISION)
        }
        vision = _infer_vision_config(vision_shapes)
    if options.mm_hidden_size is not None and options.mm_hidden_size != vision.hidden_size:
        raise IncompatibleError(
            f"config.json says mm_hidden_size={options.mm_hidden_size} but the vision config has "
            f"hidden_size={vision.hidden_size}"
        )
    depth = vision.num_hidden_layers
    if not -(depth + 1) <= options.select_layer <= depth:
        raise IncompatibleError(
            f"mm_vision_select_layer={options.select_layer} is outside the {depth + 1} hidden states of a "
            f"{depth}-layer vision tower"
        )

    embed_name = "model.embed_tokens.weight"
    if embed_name not in source.tensors:
        raise CheckpointError(f"{src_dir} has no {embed_name}; it is not an original-layout LLaVA checkpoint")
    source_rows = source.tensors[embed_name].shape[0]
    tokenizer, added_tokens = _prepare_tokenizer(src_dir, source_rows)
    vocab_size = max(source_rows, len(tokenizer))

    floating = {i.dtype for i in source.tensors.values() if i.dtype.is_floating_point}
    if tower is not None:
        floating |= {i.dtype for i in tower.tensors.values() if i.dtype.is_floating_point}
    if out_dtype is not None:
        config_dtype = _dtype_name(out_dtype)
    elif len(floating) == 1:
        config_dtype = _dtype_name(next(iter(floating)))
    else:
        config_dtype = str(source_config.get("torch_dtype", "float32"))
    vision.dtype = config_dtype
    side = vision.image_size // vision.patch_size
    config = LlavaConfig(
        vision_config=vision,
        text_config=_text_config(source_config, vocab_size, config_dtype, tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids(_IMAGE_TOKEN),
        image_seq_length=side * side + (1 if options.select_strategy == "full" else 0),
        projector_hidden_act="gelu",
        vision_feature_layer=options.select_layer,
        vision_feature_select_strategy=options.select_strategy,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(source_config.get("tie_word_embeddings", False)),
    )
    config.dtype = config_dtype
    target = _target(config)
    source_plan, tower_plan = _plan(source, tower, target)
    skipped = sorted(n for n, a in tower_plan.items() if a.kind == "skip")
    if skipped:
        logger.info(
            "skipping %d non-vision tensors of the CLIP checkpoint %s",
            len(skipped),
            tower.directory if tower else "",
        )
    if added_tokens:
        logger.info(
            "added tokens %s; new embedding rows are the mean of the existing ones",
            added_tokens,
        )

    dst_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dst_dir.name}.partial-", dir=dst_dir.parent))
    try:
        writer = _ShardWriter(work, shard_bytes)
        _write_weights(writer, source, source_plan, target, config, out_dtype)
        if tower is not None:
            _write_weights(writer, tower, tower_plan, target, config, out_dtype)
        writer.finish()
        config.save_pretrained(work)
        _save_generation_config(src_dir, work, tokenizer)
        _processor(tokenizer, vision, options).save_pretrained(work)
        if dst_dir.exists():
            dst_dir.rmdir()  # checked empty above
        os.replace(work, dst_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return dst_dir


# --------------------------------------------------------------------------- command line


def add_convert_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``convert sharegpt4v SRC DST [options]`` to an ``add_subparsers()`` object; returns ``convert``."""
    convert = subparsers.add_parser(
        "convert",
        help="convert a released checkpoint to a transformers checkpoint",
        description="Convert a released checkpoint to a transformers checkpoint folder.",
    )
    formats = convert.add_subparsers(dest="format", required=True, metavar="FORMAT")
    sharegpt4v = formats.add_parser(
        "sharegpt4v",
        help="ShareGPT4V / LLaVA-1.5 (original LLaVA layout) -> LlavaForConditionalGeneration",
        description=(
            "Convert a ShareGPT4V or LLaVA-1.5 checkpoint in the original LLaVA layout "
            "(LlavaLlamaForCausalLM / Share4VLlamaForCausalLM) to a transformers "
            "LlavaForConditionalGeneration folder with its LlavaProcessor."
        ),
    )
    sharegpt4v.add_argument(
        "src",
        metavar="SRC",
        help="original checkpoint folder (config.json, weights, tokenizer)",
    )
    sharegpt4v.add_argument("dst", metavar="DST", help="output folder (must not exist or be empty)")
    sharegpt4v.add_argument(
        "--vision-config",
        metavar="PATH",
        help="CLIP vision config.json (or its folder); default: read off the weights",
    )
    sharegpt4v.add_argument(
        "--vision-tower",
        metavar="PATH",
        help="local CLIP checkpoint folder; required when SRC holds no vision tower weights",
    )
    sharegpt4v.add_argument("--dtype", choices=sorted(_DTYPES), help="cast floating tensors (default: keep)")
    sharegpt4v.add_argument("--max-shard-size", default="5GB", help="largest output shard (default: 5GB)")
    sharegpt4v.set_defaults(func=run_convert_sharegpt4v)
    return convert


def run_convert_sharegpt4v(args: argparse.Namespace) -> int:
    """Handler of ``tokenprune convert sharegpt4v``: 0 on success, 2 with a message on a tokenprune error."""
    try:
        out = convert_sharegpt4v(
            args.src,
            args.dst,
            vision_config=args.vision_config,
            vision_tower=args.vision_tower,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
        )
    except TokenpruneError as error:
        print(f"tokenprune convert sharegpt4v: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone ``convert`` command line (``tokenprune convert ...`` without the rest of the CLI)."""
    parser = argparse.ArgumentParser(prog="tokenprune")
    add_convert_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return int(args.func(args))
