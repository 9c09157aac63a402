"""The source Llama tokenizer, prepared for LlavaProcessor: ``<image>`` (and a pad token) added."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from .reader import CheckpointError

IMAGE_TOKEN = "<image>"
_PAD_TOKEN = "<pad>"
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
                extra_special_tokens={"image_token": IMAGE_TOKEN},
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
    added = [] if IMAGE_TOKEN in before.get_vocab() else [IMAGE_TOKEN]
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": _PAD_TOKEN})
        added.append(_PAD_TOKEN)
    image_ids = tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)
    if image_ids != [tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)]:
        raise CheckpointError(
            f"the tokenizer of {src} splits {IMAGE_TOKEN!r} into {image_ids}; it must be one token"
        )
    tokenizer.padding_side = "left"  # batched generation appends after the prompt
    for loading_detail in (
        "is_local",
        "local_files_only",
    ):  # would be saved into tokenizer_config.json
        tokenizer.init_kwargs.pop(loading_detail, None)
    return tokenizer, added
