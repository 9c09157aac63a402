"""Progress bars with an ETA for long sweeps (tqdm), quiet when nobody is watching.

The bar shows only on an interactive terminal and only on rank 0, unless forced: logs of
batch jobs stay free of carriage-return noise, and eight ranks do not draw eight bars.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, TypeVar

__all__ = ["progress", "progress_enabled"]

T = TypeVar("T")


def progress_enabled(force: bool | None = None, *, rank: int = 0, stream: TextIO | None = None) -> bool:
    """Whether a bar should be drawn.

    ``force=True``/``False`` decides outright; otherwise the environment variable
    ``TOKENPRUNE_PROGRESS`` (``1``/``0``) does when set; otherwise a bar is drawn on rank 0
    when ``stream`` (default stderr) is a terminal.
    """
    if force is not None:
        return bool(force)
    setting = os.environ.get("TOKENPRUNE_PROGRESS", "").strip().lower()
    if setting in ("1", "true", "yes", "on"):
        return True
    if setting in ("0", "false", "no", "off"):
        return False
    target = sys.stderr if stream is None else stream
    return rank == 0 and bool(getattr(target, "isatty", lambda: False)())


def progress(
    items: Iterable[T],
    *,
    total: int | None = None,
    description: str | None = None,
    unit: str = "sample",
    force: bool | None = None,
    rank: int = 0,
    initial: int = 0,
    stream: TextIO | None = None,
) -> Iterator[T]:
    """Iterate ``items`` with a tqdm bar (rate and ETA) when :func:`progress_enabled`.

    ``initial`` counts work already done (rows a restart skips) so the ETA covers only what
    is left. Disabled, it yields the items unchanged at no cost.
    """
    if not progress_enabled(force, rank=rank, stream=stream):
        yield from items
        return
    from tqdm.auto import tqdm

    options: dict[str, Any] = {
        "total": total if total is not None else (len(items) if hasattr(items, "__len__") else None),  # type: ignore[arg-type]
        "desc": description,
        "unit": unit,
        "initial": initial,
        "file": sys.stderr if stream is None else stream,
        "dynamic_ncols": True,
        "smoothing": 0.1,
    }
    with tqdm(items, **options) as bar:
        yield from bar
