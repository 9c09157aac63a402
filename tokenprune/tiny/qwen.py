"""Tiny, randomly initialised Qwen2.5-VL and Qwen2-VL models with their real processors.

Built locally from small configs (no download, no weights file): the family's own vision
tower (patch embedding, 2-D rotary positions, 2 x 2 patch merger; window attention with
full-attention blocks for Qwen2.5-VL), a two-block Qwen2 LLM with M-RoPE, a byte-level
tokenizer holding Qwen's vision special tokens (``<|vision_start|>``, ``<|image_pad|>``,
``<|video_pad|>``, ``<|vision_end|>``) and a ChatML template, and the real
``Qwen2VLImageProcessor`` with small ``min_pixels`` / ``max_pixels``.

Geometry: 8-px patches, 2 x 2 merge, so one LLM token covers 16 x 16 pixels; images are
resized to between 2 x 2 and 8 x 8 merged tokens (``TINY_QWEN_MIN_PIXELS`` /
``TINY_QWEN_MAX_PIXELS``). Qwen2.5-VL's windows are 2 x 2 merged tokens (32 px), so an
image of more than 2 x 2 tokens really is cut into several windows.

``transformers`` is imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Literal

from .llava import _build, _finish, _image_processor, _text_fields, _transformers

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "TINY_QWEN_CHAT_TEMPLATE",
    "TINY_QWEN_FULL_ATTENTION_BLOCKS",
    "TINY_QWEN_MAX_PIXELS",
    "TINY_QWEN_MIN_PIXELS",
    "TINY_QWEN_PATCH_SIZE",
    "TINY_QWEN_VISION_LAYERS",
    "tiny_qwen2_5_vl",
    "tiny_qwen2_vl",
    "tiny_qwen_tokenizer",
]

#: Side of one vision patch in pixels; with the 2 x 2 merge one LLM token is 16 x 16 px.
TINY_QWEN_PATCH_SIZE = 8
#: Fewest pixels an image is resized to: 2 x 2 merged tokens.
TINY_QWEN_MIN_PIXELS = (2 * TINY_QWEN_PATCH_SIZE) ** 2 * 4
#: Most pixels an image is resized to: 64 merged tokens (8 x 8 for a square image).
TINY_QWEN_MAX_PIXELS = (2 * TINY_QWEN_PATCH_SIZE) ** 2 * 64
#: Blocks of the tiny vision tower.
TINY_QWEN_VISION_LAYERS = 4
#: Qwen2.5-VL blocks with full (not windowed) attention; the last block is one, as in the
#: released configs ((7, 15, 23, 31) of 32).
TINY_QWEN_FULL_ATTENTION_BLOCKS = (1, 3)

#: ChatML, Qwen's own prompt format; image items render as
#: ``<|vision_start|><|image_pad|><|vision_end|>`` where they stand in the message.
TINY_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def tiny_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte symbols, no merges) plus Qwen's special tokens.

    Any text encodes without an unknown token; each special token is one token. No BOS is
    added, as with Qwen's tokenizers.
    """
    transformers = _transformers()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(_SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return _tokenizer_class(transformers)(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(_SPECIAL_TOKENS[1:]),
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        padding_side="left",
        model_max_length=4096,
    )


def _tokenizer_class(transformers: Any) -> Any:
    """``PreTrainedTokenizerFast``, or ``Qwen2TokenizerFast`` where the Qwen processors accept
    nothing else (before 5.0 they check the tokenizer's class)."""
    wanted = getattr(transformers.Qwen2VLProcessor, "tokenizer_class", None)
    names = wanted if isinstance(wanted, tuple) else (wanted,)
    if "Qwen2TokenizerFast" in names:
        return transformers.Qwen2TokenizerFast
    return transformers.PreTrainedTokenizerFast


def _text_config(tokenizer: Any) -> dict[str, Any]:
    # head_dim 16: the rotary half (8) splits into t, h, w sections
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]}
    if "rope_parameters" in inspect.signature(_transformers().Qwen2VLTextConfig.__init__).parameters:
        fields: dict[str, Any] = {"rope_parameters": rope}
    else:  # before 5.0: rope_theta apart, the rest as rope_scaling
        fields = {"rope_theta": rope.pop("rope_theta"), "rope_scaling": rope}
    return _text_fields(tokenizer, hidden_size=64, bos_token_id=None, **fields)


def _special_ids(tokenizer: Any) -> dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def _processor(transformers: Any, family: str, tokenizer: Any, image_processor: str) -> Any:
    kwargs = dict(
        patch_size=TINY_QWEN_PATCH_SIZE,
        temporal_patch_size=2,
        merge_size=2,
        size={"shortest_edge": TINY_QWEN_MIN_PIXELS, "longest_edge": TINY_QWEN_MAX_PIXELS},
    )
    images = _image_processor(transformers, "Qwen2VLImageProcessor", image_processor, **kwargs)
    videos = transformers.Qwen2VLVideoProcessor(**kwargs)
    return getattr(transformers, f"{family}Processor")(
        image_processor=images, tokenizer=tokenizer, video_processor=videos, chat_template=TINY_QWEN_CHAT_TEMPLATE
    )


#: Vision settings both families share: 4 blocks of width 32, 8-px patches, 2 x 2 merge.
_VISION = {
    "depth": TINY_QWEN_VISION_LAYERS,
    "num_heads": 4,
    "patch_size": TINY_QWEN_PATCH_SIZE,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}


def _assemble(family: str, vision: dict[str, Any], seed: int, image_processor: str) -> tuple[Any, Any]:
    """Processor, config and model of ``family`` (the transformers class prefix) around a tiny tower."""
    transformers = _transformers()
    tokenizer = tiny_qwen_tokenizer()
    processor = _processor(transformers, family, tokenizer, image_processor)
    config = getattr(transformers, f"{family}Config")(
        vision_config={**_VISION, **vision}, text_config=_text_config(tokenizer), **_special_ids(tokenizer)
    )
    model = _build(getattr(transformers, f"{family}ForConditionalGeneration"), config, seed)
    return _finish(model, tokenizer), processor


def tiny_qwen2_5_vl(
    seed: int = 0, *, image_processor: Literal["torchvision", "pil"] = "torchvision"
) -> tuple[Any, Any]:
    """A random tiny ``Qwen2_5_VLForConditionalGeneration`` and its ``Qwen2_5_VLProcessor``.

    The vision tower has :data:`TINY_QWEN_VISION_LAYERS` blocks, windows of 2 x 2 merged
    tokens and full attention in blocks :data:`TINY_QWEN_FULL_ATTENTION_BLOCKS`. The same seed
    gives the same weights; the global RNG is left untouched.
    """
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "out_hidden_size": 64,
        "window_size": 4 * TINY_QWEN_PATCH_SIZE,
        "fullatt_block_indexes": list(TINY_QWEN_FULL_ATTENTION_BLOCKS),
        "tokens_per_second": 2,
    }
    return _assemble("Qwen2_5_VL", vision, seed, image_processor)


def tiny_qwen2_vl(
    seed: int = 0, *, image_processor: Literal["torchvision", "pil"] = "torchvision"
) -> tuple[Any, Any]:
    """A random tiny ``Qwen2VLForConditionalGeneration`` and its ``Qwen2VLProcessor``.

    Qwen2-VL's tower has no window attention: every block attends over the whole image. Its
    width is ``vision_config.embed_dim`` (``hidden_size`` there is the LLM width).
    """
    return _assemble("Qwen2VL", {"embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2}, seed, image_processor)
