"""ShareGPT4V / LLaVA-1.5 checkpoints (original LLaVA layout) -> ``LlavaForConditionalGeneration``.

One step a module: :mod:`.reader` (checkpoint folders, safely), :mod:`.config` (the ``mm_*``
fields and the CLIP vision config), :mod:`.tokenizer` (``<image>`` and pad tokens),
:mod:`.mapping` (tensor names, planned and checked), :mod:`.writer` (safetensors shards),
:mod:`.template` (the Vicuna v1 chat template), :mod:`.convert` (the entry point
:func:`convert_sharegpt4v`) and :mod:`.cli` (``tokenprune convert sharegpt4v``).

The names below load on first use, so importing the package (the CLI does, to build its
parser) costs nothing.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "VICUNA_V1_CHAT_TEMPLATE",
    "VICUNA_V1_SYSTEM_PROMPT",
    "CheckpointError",
    "add_convert_parser",
    "convert_sharegpt4v",
    "main",
    "run_convert_sharegpt4v",
]

_HOME = {
    "VICUNA_V1_CHAT_TEMPLATE": "template",
    "VICUNA_V1_SYSTEM_PROMPT": "template",
    "CheckpointError": "reader",
    "convert_sharegpt4v": "convert",
    "add_convert_parser": "cli",
    "main": "cli",
    "run_convert_sharegpt4v": "cli",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(__all__)
