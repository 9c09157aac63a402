"""Writing the converted tensors: safetensors shards of a bounded size, resized vocabulary rows,
and the checks of the buffers transformers recomputes."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tokenprune.errors import ConfigError

from .mapping import _Action, _Target
from .reader import CheckpointError, _Checkpoint

if TYPE_CHECKING:
    from transformers import LlavaConfig


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
