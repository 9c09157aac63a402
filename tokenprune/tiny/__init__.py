"""Tiny, randomly initialised VLMs with their real processors, for tests and demos.

Not part of the adapter registry's import path: nothing here is imported unless asked for.
``transformers`` is imported inside the factories, so importing this package is cheap.
"""

from .llava import (
    TINY_CHAT_TEMPLATE,
    TINY_CROP_SIZE,
    TINY_GRIDS,
    TINY_PATCH_SIZE,
    TINY_VISION_LAYERS,
    save_tiny,
    tiny_llava,
    tiny_llava_next,
    tiny_tokenizer,
)
from .qwen import (
    TINY_QWEN_CHAT_TEMPLATE,
    TINY_QWEN_FULL_ATTENTION_BLOCKS,
    TINY_QWEN_MAX_PIXELS,
    TINY_QWEN_MIN_PIXELS,
    TINY_QWEN_PATCH_SIZE,
    TINY_QWEN_VISION_LAYERS,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
    tiny_qwen_tokenizer,
)

__all__ = [
    "TINY_CHAT_TEMPLATE",
    "TINY_CROP_SIZE",
    "TINY_GRIDS",
    "TINY_PATCH_SIZE",
    "TINY_VISION_LAYERS",
    "TINY_QWEN_CHAT_TEMPLATE",
    "TINY_QWEN_FULL_ATTENTION_BLOCKS",
    "TINY_QWEN_MAX_PIXELS",
    "TINY_QWEN_MIN_PIXELS",
    "TINY_QWEN_PATCH_SIZE",
    "TINY_QWEN_VISION_LAYERS",
    "save_tiny",
    "tiny_llava",
    "tiny_llava_next",
    "tiny_tokenizer",
    "tiny_qwen2_5_vl",
    "tiny_qwen2_vl",
    "tiny_qwen_tokenizer",
]
