"""Timing helpers shared by the benchmarks (a library, nothing to run).

Benchmarks compare variants measured side by side in one run: every round runs each
variant once, in an order rotated from round to round (so no variant always runs first,
after the same neighbour, or on a cold cache), after untimed warm-up rounds; the tables
show medians and ratios of medians. Both wall time and process CPU time (all threads) are
recorded: wall time is the latency a user sees, CPU time is the work done, which other
processes on a shared machine stretch less.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

T = TypeVar("T")

__all__ = ["Samples", "environment", "load_average", "markdown_table", "rotated", "sync", "timed"]


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
