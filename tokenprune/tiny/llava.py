"""Tiny, randomly initialised LLaVA-1.5 and LLaVA-NeXT models with their real processors.

Everything here is built locally from small configs (no download, no weights file): a
CLIP vision tower with a CLS token, a two-block Llama, a byte-level tokenizer with the
``<image>`` special token, and the family's own Hugging Face image processor. The objects
are the genuine ``transformers`` classes, so adapters, taps and partitioners are tested
against the code paths that run the real checkpoints, only smaller. The vision tower is
narrow (width 32) but as deep as CLIP ViT-L (24 blocks), so every strategy's default
layers (HiRED's blocks 0 and 22, HERO's 5-8 and 21, LLaVA's feature layer -2) exist.

The default geometry is deliberately not a power of two: crops of 56 px, patches of 8 px,
so a 7 x 7 token grid (odd, like nothing a lucky symmetric rounding could hide), and
LLaVA-NeXT grid pinpoints for the 1x2, 2x1, 2x2, 3x1 and 1x3 tile grids (the shapes of the
released checkpoints' ``image_grid_pinpoints``, scaled to the crop).

``transformers`` is imported inside the functions: this module is auto-imported with the
adapters package and must stay cheap to import.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from transformers import (
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

__all__ = [
    "TINY_VISION_LAYERS",
    "TINY_CROP_SIZE",
    "TINY_PATCH_SIZE",
    "TINY_GRIDS",
    "TINY_CHAT_TEMPLATE",
    "tiny_tokenizer",
    "tiny_llava",
    "tiny_llava_next",
    "save_tiny",
]

#: Blocks of the tiny vision tower: CLIP ViT-L's depth, so default layer numbers apply.
TINY_VISION_LAYERS = 24
#: Side of the square crop the tiny vision tower sees, in pixels.
TINY_CROP_SIZE = 56
#: Side of one vision patch, in pixels: ``56 // 8 = 7`` tokens per side.
TINY_PATCH_SIZE = 8
#: LLaVA-NeXT tile grids ``(rows, cols)`` of the released checkpoints' pinpoints.
TINY_GRIDS: tuple[tuple[int, int], ...] = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))

#: A Vicuna-style template (``USER: <image>\n... ASSISTANT:``), LLaVA's own prompt format.
#: A message's content is a string, or a list of ``{"type": "image"}`` / ``{"type": "text"}``
#: items; images are rendered before the text, as the LLaVA checkpoints were trained.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }}{{ ' ' }}"
    "{% else %}{{ message['role'] | upper }}{{ ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] if item['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '</s>' }}{% else %}{{ ' ' }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")


def _transformers() -> Any:
    import tokenprune  # noqa: F401  (its compat shim must run before transformers loads)
    import transformers

    return transformers


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte symbols, no merges) plus the special tokens.

    Any text encodes without an unknown token and decodes back exactly; ``<image>`` is a
    single special token, as in the LLaVA tokenizers.
    """
    transformers = _transformers()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    byte_symbols = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(_SPECIAL_TOKENS)}
    for symbol in sorted(byte_symbols):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    # Llama tokenizers prepend BOS; the LLaVA prompts are built on that.
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=4096,
        model_input_names=["input_ids", "attention_mask"],  # as LLaVA's (older releases default to token_type_ids too)
    )
    return tokenizer


def _vision_config(transformers: Any, image_size: int, patch_size: int) -> Any:
    return transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=TINY_VISION_LAYERS,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=16,
    )


def _image_processor(transformers: Any, class_name: str, backend: str, **kwargs: Any) -> Any:
    """The torchvision (``backend="torchvision"``) or PIL/numpy (``"pil"``) image processor of
    ``class_name``, built with ``kwargs``.

    Where ``<class_name>Pil`` exists (newer 5.x), ``<class_name>`` is the torchvision one.
    Before that (4.57 – 5.x), ``<class_name>`` is the slow PIL/numpy processor and the
    torchvision one is ``<class_name>Fast``.
    """
    if backend not in ("torchvision", "pil"):
        raise ValueError(f"image_processor must be 'torchvision' or 'pil', got {backend!r}")
    if hasattr(transformers, class_name + "Pil"):
        name = class_name + ("Pil" if backend == "pil" else "")
    else:
        name = class_name + ("Fast" if backend == "torchvision" else "")
    return getattr(transformers, name)(**kwargs)


def _text_fields(tokenizer: Any, hidden_size: int, **overrides: Any) -> dict[str, Any]:
    """The tiny LLM's config fields: two layers, 4 heads over 2 KV heads, ``tokenizer``'s ids."""
    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return {**fields, **overrides}


def _text_config(transformers: Any, tokenizer: Any) -> Any:
    return transformers.LlamaConfig(**_text_fields(tokenizer, hidden_size=32))


def _finish(model: Any, tokenizer: Any) -> Any:
    model.eval()
    generation = model.generation_config
    generation.bos_token_id = tokenizer.bos_token_id
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.do_sample = False
    return model


def _build(model_class: Any, config: Any, seed: int) -> Any:
    # A private RNG stream: building a tiny model must not move the caller's global seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config)


def _assemble(
    transformers: Any,
    family: Literal["Llava", "LlavaNext"],
    images: Any,
    tokenizer: Any,
    crop_size: int,
    patch_size: int,
    seed: int,
    **config_extra: Any,
) -> Any:
    """The family's processor, config and model around a tiny tower and LLM (``family`` is the
    transformers class prefix: ``Llava`` or ``LlavaNext``)."""
    processor = getattr(transformers, f"{family}Processor")(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=TINY_CHAT_TEMPLATE,
    )
    side = crop_size // patch_size
    config = getattr(transformers, f"{family}Config")(
        vision_config=_vision_config(transformers, crop_size, patch_size),
        text_config=_text_config(transformers, tokenizer),
        image_token_index=processor.image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=side * side,
        **config_extra,
    )
    model = _build(getattr(transformers, f"{family}ForConditionalGeneration"), config, seed)
    return _finish(model, tokenizer), processor


def tiny_llava_next(
    seed: int = 0,
    *,
    crop_size: int = TINY_CROP_SIZE,
    patch_size: int = TINY_PATCH_SIZE,
    grids: Sequence[tuple[int, int]] = TINY_GRIDS,
    image_processor: Literal["torchvision", "pil"] = "torchvision",
) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """A random tiny ``LlavaNextForConditionalGeneration`` and its ``LlavaNextProcessor``.

    Args:
        seed: weights are a deterministic function of it (the global RNG is left alone).
        crop_size: side of the tower's square input (``vision_config.image_size``).
        patch_size: the tower's patch size; ``crop_size // patch_size`` tokens per side.
        grids: tile grids ``(rows, cols)``; the pinpoints are ``(rows * crop, cols * crop)``
            as ``(height, width)``, HF's order.
        image_processor: ``"torchvision"`` for the fast ``LlavaNextImageProcessor``,
            ``"pil"`` for ``LlavaNextImageProcessorPil``.
    """
    transformers = _transformers()
    _check_geometry(crop_size, patch_size, grids)
    tokenizer = tiny_tokenizer()
    pinpoints = [[rows * crop_size, cols * crop_size] for rows, cols in grids]
    processor_kwargs: dict[str, Any] = dict(
        size={"shortest_edge": crop_size},
        crop_size={"height": crop_size, "width": crop_size},
        image_grid_pinpoints=pinpoints,
    )
    images = _image_processor(transformers, "LlavaNextImageProcessor", image_processor, **processor_kwargs)
    return _assemble(
        transformers,
        "LlavaNext",
        images,
        tokenizer,
        crop_size,
        patch_size,
        seed,
        image_grid_pinpoints=pinpoints,
    )


def tiny_llava(
    seed: int = 0,
    *,
    crop_size: int = TINY_CROP_SIZE,
    patch_size: int = TINY_PATCH_SIZE,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A random tiny LLaVA-1.5 (``LlavaForConditionalGeneration``) and its ``LlavaProcessor``.

    The image processor is ``CLIPImageProcessor`` (shortest edge to ``crop_size``, centre
    crop), as in the ``llava-hf/llava-1.5`` checkpoints.
    """
    transformers = _transformers()
    _check_geometry(crop_size, patch_size, ())
    tokenizer = tiny_tokenizer()
    images = transformers.CLIPImageProcessor(
        size={"shortest_edge": crop_size},
        crop_size={"height": crop_size, "width": crop_size},
    )
    return _assemble(transformers, "Llava", images, tokenizer, crop_size, patch_size, seed)


def save_tiny(model: Any, processor: Any, path: str | os.PathLike[str]) -> None:
    """Save a tiny model and its processor to one folder; ``from_pretrained(path)`` reloads both."""
    model.save_pretrained(path)
    processor.save_pretrained(path)


def _check_geometry(crop_size: int, patch_size: int, grids: Sequence[tuple[int, int]]) -> None:
    from tokenprune import ConfigError

    sizes_are_ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (crop_size, patch_size))
    if not (sizes_are_ints and 0 < patch_size <= crop_size):
        raise ConfigError(
            f"crop_size and patch_size must be ints with 0 < patch_size <= crop_size, "
            f"got crop_size={crop_size!r}, patch_size={patch_size!r}"
        )
    if crop_size % patch_size:
        raise ConfigError(
            f"crop_size ({crop_size}) must be a multiple of patch_size ({patch_size}) so the "
            "token grid covers the whole crop"
        )
    for grid in grids:
        if not (len(grid) == 2 and all(isinstance(n, int) and n >= 1 for n in grid)):
            raise ConfigError(f"grids must hold (rows, cols) pairs of ints >= 1, got {grid!r}")
