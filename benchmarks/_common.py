"""Timing helpers shared by the benchmarks (a library, nothing to run).

Benchmarks compare variants measured side by side in one run: every round runs each
variant once, in an order rotated from round to round (so no variant always runs first,
after the same neighbour, or on a cold cache), after untimed warm-up rounds; the tables
show medians and ratios of medians. Both wall time and process CPU time (all threads) are
recorded: wall time is the latency a user sees, CPU time is the work done, which other
processes on a shared machine stretch less.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode

T = TypeVar("T")
K = TypeVar("K")

__all__ = [
    "OpCounter",
    "Samples",
    "base_parser",
    "build_clip_tower",
    "clip_vit_config",
    "environment",
    "interleaved",
    "load_average",
    "markdown_table",
    "quiet_stderr",
    "rotated",
    "setup",
    "sync",
    "timed",
]

#: LLaVA's vision tower, CLIP ViT-L/14-336.
VIT_L = {"width": 1024, "layers": 24, "image_size": 336, "patch_size": 14}


def base_parser(
    description: str, *flags: tuple[str, type, Any, str], repeats: int = 3, warmup: int = 1
) -> argparse.ArgumentParser:
    """The flags every benchmark takes (device, dtype, repeats, warm-up rounds, CPU threads),
    then the benchmark's own ``flags``: ``(name, type, default, help)`` each."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=repeats, help="timed rounds (every variant once each)")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    for name, kind, default, text in flags:
        parser.add_argument(name, type=kind, default=default, help=text)
    return parser


def interleaved(
    calls: dict[K, Callable[[], Any]], device: torch.device, *, warmup: int, repeats: int
) -> dict[K, Samples]:
    """Time every call once per round, in an order rotated each round, after ``warmup``
    untimed rounds (at least one), under ``inference_mode``; the samples per call."""
    samples = {key: Samples() for key in calls}
    warmup = max(1, warmup)
    with torch.inference_mode():
        for round_index in range(warmup + repeats):
            for key in rotated(list(calls), round_index):
                wall, cpu, _ = timed(calls[key], device)
                if round_index >= warmup:
                    samples[key].add(wall, cpu)
    return samples


def setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """Apply ``--threads``; the device and dtype the flags name."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device), getattr(torch, args.dtype)


def clip_vit_config(
    width: int = VIT_L["width"],
    layers: int = VIT_L["layers"],
    image_size: int = VIT_L["image_size"],
    patch_size: int = VIT_L["patch_size"],
    **extra: Any,
) -> Any:
    """A transformers ``CLIPVisionConfig``: ViT-L/14-336 by default, 64-wide heads, MLP 4x."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 64),
        image_size=image_size,
        patch_size=patch_size,
        **extra,
    )


def build_clip_tower(
    device: torch.device, dtype: torch.dtype, *, attn: str = "sdpa", seed: int = 0, **config: Any
) -> torch.nn.Module:
    """A ``CLIPVisionModel`` (LLaVA's tower; ViT-L/14-336 unless ``config`` says otherwise),
    random weights, on ``device`` in ``dtype``, eval mode."""
    from transformers import CLIPVisionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModel._from_config(clip_vit_config(**config), attn_implementation=attn)
    return model.to(device=device, dtype=dtype).eval()


class OpCounter(TorchDispatchMode):
    """Counts the aten operators a block of code dispatches (run it under ``no_grad``).

    ``ops``: every operator; ``kernels``: those that are not views (metadata only: views and
    ``_unsafe_view``); on a GPU each launches
    at least one kernel, a few microseconds of host time that FLOPs do not show;
    ``host_reads``: ``aten._local_scalar_dense`` calls (``.item()``, ``bool(tensor)``,
    ``.tolist()``), each a device->host sync on an accelerator.
    """

    def __init__(self) -> None:
        super().__init__()
        self.by_name: collections.Counter[str] = collections.Counter()
        self.kernels = 0
        self.host_reads = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.by_name[str(func)] += 1
        if not func.is_view and func is not torch.ops.aten._unsafe_view.default:
            self.kernels += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            self.host_reads += 1
        return func(*args, **(kwargs or {}))

    @property
    def ops(self) -> int:
        return sum(self.by_name.values())

    @classmethod
    def of(cls, fn: Callable[[], Any]) -> OpCounter:
        """The counts of one call of ``fn``."""
        counter = cls()
        with torch.no_grad(), counter:
            fn()
        return counter


@contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence what C++ writes to fd 2 meanwhile (the profiler backend's start/stop lines)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a clock read after it includes that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float, Any]:
    """``(wall seconds, process CPU seconds, fn's result)`` of one call, synchronised."""
    sync(device)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    result = fn()
    sync(device)
    return time.perf_counter() - start_wall, time.process_time() - start_cpu, result


@dataclass
class Samples:
    """Wall and CPU times of one variant's timed runs."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def add(self, wall: float, cpu: float) -> None:
        self.wall.append(wall)
        self.cpu.append(cpu)

    @property
    def wall_median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)


def rotated(items: Sequence[T], round_index: int) -> list[T]:
    """``items`` rotated by ``round_index``: each variant takes its turn at every position."""
    shift = round_index % len(items) if items else 0
    return list(items[shift:]) + list(items[:shift])


def load_average() -> str:
    """The 1/5/15-minute load averages, to judge how busy a shared machine was."""
    try:
        return "/".join(f"{value:.1f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def environment(device: torch.device, dtype: torch.dtype) -> str:
    """One line naming what the numbers were measured on."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return (
        f"{where}, {str(dtype).removeprefix('torch.')}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, load average {load_average()}"
    )


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, left: int = 1) -> str:
    """A Markdown table; the first ``left`` columns are left-aligned, the others right."""
    align = ["---" if i < left else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
