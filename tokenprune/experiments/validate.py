"""Up-front checks of what a user asked for, run before any model loads.

``tokenprune sweep``, ``run`` and ``show`` call these first, so a typo costs a second, not
the minutes a 7B checkpoint takes to load. Each raises a one-line
:class:`~tokenprune.ConfigError` that says what was wrong and what is allowed.
"""

from __future__ import annotations

import os
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, TokenpruneError, did_you_mean
from ..pipeline import Pipeline

__all__ = [
    "check_device",
    "check_generation",
    "check_image_file",
    "check_output_file",
    "check_output_folder",
    "check_positive_int",
    "check_prompt",
    "check_relevance_scorer",
    "check_run_arguments",
    "read_config_file",
]


def check_positive_int(value: object, what: str) -> int:
    """``value`` as an int >= 1 (bools and strings refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be at least 1 (an int), got {value!r}")
    return value


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML (``.yaml``/``.yml``) or TOML config file's top-level mapping; every problem
    (missing, unreadable, not valid) is a one-line :class:`ConfigError`."""
    from ..runtime import read_config_file as read

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config {file} does not exist" if not file.exists() else f"config {file} is not a file")
    try:
        return read(file)
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"config {file} cannot be read: {error}") from None
    except ConfigError as error:  # YAML errors span lines
        raise ConfigError(" ".join(str(error).split())) from None


def check_prompt(prompt: object, what: str = "prompt") -> str:
    """A prompt template whose only field is ``{question}`` (write ``{{`` for a literal brace)."""
    if not isinstance(prompt, str):
        raise ConfigError(f"{what} must be a string with {{question}} in it, got {type(prompt).__name__}")
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(prompt) if field is not None]
    except ValueError as error:
        raise ConfigError(f"{what} {prompt!r} is not a valid template ({error}); write {{{{ and }}}} for literal braces") from None
    unknown = sorted({field for field in fields if field != "question"})
    if unknown:
        raise ConfigError(
            f"{what} {prompt!r} has unknown fields {unknown}; the only field is {{question}} "
            "(write {{ and }} for literal braces)"
        )
    if "question" not in fields:
        raise ConfigError(f"{what} must contain '{{question}}', got {prompt!r}")
    return prompt


_INT_AT_LEAST_1 = ("max_new_tokens", "max_length", "num_beams", "num_return_sequences", "top_k", "num_beam_groups")
_NON_NEGATIVE_FLOAT = ("temperature", "repetition_penalty", "length_penalty", "top_p", "min_p", "typical_p")


def _generation_keys() -> set[str]:
    try:
        from transformers import GenerationConfig
    except ImportError:  # checked again by generate() itself
        return set()
    return {key for key in GenerationConfig().to_dict() if not key.startswith("_")} - {"transformers_version"}


def check_generation(generation: object, what: str = "generation") -> dict[str, Any]:
    """``generate()`` settings: known names, ints >= 1 for counts, numbers >= 0 for the rest."""
    if not isinstance(generation, Mapping):
        raise ConfigError(f"{what} must be a mapping of generate() settings, got {type(generation).__name__}")
    known = _generation_keys()
    for key, value in generation.items():
        if known and key not in known:
            hint = did_you_mean(key, sorted(known), n=1)
            raise ConfigError(f"{what}: {key!r} is not a generate() setting (transformers GenerationConfig).{hint}")
        if key in _INT_AT_LEAST_1:
            check_positive_int(value, f"{what}.{key}")
        elif key in _NON_NEGATIVE_FLOAT and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0
        ):
            raise ConfigError(f"{what}.{key} must be a number >= 0, got {value!r}")
        elif key == "do_sample" and not isinstance(value, bool):
            raise ConfigError(f"{what}.do_sample must be true or false, got {value!r}")
    if known:
        from transformers import GenerationConfig

        try:
            GenerationConfig(**generation).validate()
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{what}: {' '.join(str(error).split())}") from None
    return dict(generation)


def check_device(device: object, what: str = "device") -> str | None:
    """A torch device this machine has: ``cpu``, ``cuda``, ``cuda:N`` (N < GPU count), ``mps``."""
    if device is None:
        return None
    if not isinstance(device, str):
        raise ConfigError(f"{what} must be a string such as 'cpu', 'cuda' or 'cuda:1', got {device!r}")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{what} {device!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{what} {device!r}: CUDA is not available on this machine; use 'cpu'")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConfigError(f"{what} {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"{what} {device!r}: MPS is not available on this machine; use 'cpu'")
    elif parsed.type != "cpu":
        raise ConfigError(f"{what} {device!r}: tokenprune runs on cpu, cuda or mps")
    return device


def _writable_ancestor(path: Path, what: str) -> None:
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{what} {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: {ancestor} is not writable")


def check_output_folder(path: str | os.PathLike[str], what: str = "output") -> Path:
    """A folder that exists or can be created (not a file, not inside one, writable)."""
    folder = Path(path)
    if folder.exists():
        if not folder.is_dir():
            raise ConfigError(f"{what} {folder} is a file; give a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"{what} {folder} is not writable")
        return folder
    _writable_ancestor(folder, what)
    return folder


def check_output_file(path: str | os.PathLike[str], what: str = "--out") -> Path:
    """An image file to write: a picture extension PIL saves, not a folder, in a writable place."""
    from PIL import Image

    file = Path(path)
    if file.is_dir():
        raise ConfigError(f"{what} {file} is a folder; give a file name such as {file / 'kept.png'}")
    saveable = sorted(ext for ext, kind in Image.registered_extensions().items() if kind in Image.SAVE)
    if file.suffix.lower() not in saveable:
        raise ConfigError(
            f"{what} {file}: give a picture file name ending in .png (or {', '.join(e for e in ('.jpg', '.webp') if e in saveable)})"
        )
    _writable_ancestor(file, what)
    return file


def check_image_file(path: str | os.PathLike[str], what: str = "--image") -> Path:
    """An image file PIL can decode completely."""
    from PIL import Image

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{what} {file} does not exist" if not file.exists() else f"{what} {file} is not a file")
    try:
        with Image.open(file) as image:
            image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ConfigError(f"{what} {file} cannot be read as an image: {' '.join(str(error).split())}") from None
    return file


def check_relevance_scorer(pipeline: Pipeline, what: str = "pipeline") -> None:
    """A pipeline whose strategies need prompt relevance must name a scorer that exists."""
    if not pipeline.needs.relevance:
        return
    spec = getattr(pipeline.adapter, "relevance_scorer", None)
    if spec is None:
        raise ConfigError(
            f"{what}: allocator {pipeline.allocator.describe()} / selector {pipeline.selector.describe()} need "
            "prompt relevance; give the adapter a scorer, e.g. adapter: {name: llava_next, "
            "relevance_scorer: 'hf:/path/to/clip'}"
        )
    if isinstance(spec, str):
        path = spec[3:] if spec.startswith("hf:") else spec.split(":", 2)[-1] if spec.startswith("open_clip:") else None
        if path and "://" not in path and not Path(path).exists():
            raise ConfigError(f"{what}: relevance_scorer {spec!r}: {path} does not exist")


def check_run_arguments(args: Any) -> Pipeline:
    """Every argument of ``tokenprune run`` / ``show``; returns the pipeline they describe
    (without the adapter when the model decides it)."""
    for name in ("repeats", "max_new_tokens"):
        if getattr(args, name, None) is not None:
            check_positive_int(getattr(args, name), f"--{name.replace('_', '-')}")
    if args.model is not None and not (Path(args.model) / "config.json").is_file():
        raise ConfigError(f"--model {args.model!s}: no config.json there; give a local checkpoint folder")
    if args.image is not None:
        check_image_file(args.image)
    check_device(args.device, "--device")
    check_output_file(args.out)
    spec: dict[str, Any] = {"allocator": "hired", "selector": "cls_final", "budget": "0.2"}
    if getattr(args, "config", None):
        loaded = read_config_file(args.config)
        base = loaded.get("base", loaded)
        if not isinstance(base, Mapping):
            raise ConfigError(f"--config {args.config}: 'base' must be a pipeline mapping, got {base!r}")
        spec.update(base)
    for part in ("adapter", "allocator", "selector", "budget"):
        if getattr(args, part, None) is not None:
            spec[part] = getattr(args, part)
    try:
        pipeline = Pipeline.from_dict(spec)
    except (TypeError, ValueError) as error:
        if isinstance(error, TokenpruneError):
            raise
        raise ConfigError(f"pipeline {spec}: {error}") from None  # e.g. a value of the wrong kind
    check_relevance_scorer(pipeline)
    return pipeline
