"""Reading a (possibly sharded) checkpoint folder safely: names, shapes and dtypes first, data shard by shard.

``.bin`` shards are read only with ``torch.load(..., weights_only=True)``; a pickle holding
anything but tensors is refused. Shards are streamed one at a time (memory-mapped when the
file allows it).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenprune.errors import ConfigError

_MAX_LISTED = 20


class CheckpointError(ConfigError):
    """A checkpoint's files, tensor names, shapes or contents are not what the conversion needs."""


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


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
