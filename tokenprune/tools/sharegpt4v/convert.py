"""Convert ShareGPT4V / LLaVA-1.5 checkpoints (original LLaVA layout) to ``LlavaForConditionalGeneration``.

ShareGPT4V (Chen et al. 2023, "ShareGPT4V: Improving Large Multi-Modal Models with Better
Captions") is released in the layout of the original LLaVA code base: one Llama causal LM
whose ``config.json`` carries ``mm_*`` fields, with the vision tower and the projector stored
under ``model.vision_tower.vision_tower.*`` and ``model.mm_projector.*``. This package writes a
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

``transformers`` and ``safetensors`` are imported inside functions.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tokenprune.errors import ConfigError, IncompatibleError
from tokenprune.runtime import DTYPES

from .config import (
    _infer_vision_config,
    _llava_options,
    _LlavaOptions,
    _load_vision_config,
    _text_config,
)
from .mapping import _SRC_VISION, _plan, _strip, _target
from .reader import CheckpointError, _Checkpoint, _open_checkpoint, _read_json
from .template import VICUNA_V1_CHAT_TEMPLATE
from .tokenizer import IMAGE_TOKEN, _prepare_tokenizer
from .writer import _parse_size, _ShardWriter, _write_weights

if TYPE_CHECKING:
    from transformers import CLIPVisionConfig

__all__ = ["OUTPUT_DTYPES", "convert_sharegpt4v"]

logger = logging.getLogger(__name__)

#: ``dtype`` names the conversion casts to (the runtime's table without ``auto``).
OUTPUT_DTYPES: dict[str, torch.dtype] = {name: dtype for name, dtype in DTYPES.items() if dtype is not None}


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
    if isinstance(dtype, torch.dtype) and dtype in OUTPUT_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in OUTPUT_DTYPES:
        return OUTPUT_DTYPES[dtype]
    raise ConfigError(f"dtype must be None (keep the source's) or one of {sorted(OUTPUT_DTYPES)}, got {dtype!r}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
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
