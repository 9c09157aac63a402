"""CPU proxy of the prune path's GPU cost: dispatched aten ops and host reads per ``Pipeline.apply``.

On a GPU the strategies are bound by operator launches and host syncs, not FLOPs. This
counts both on the CPU with a ``TorchDispatchMode`` (:func:`tokenprune.testing.count_dispatch`):
every dispatched aten operator (about one kernel launch each), and every device->host read
(``aten._local_scalar_dense``, ``nonzero`` and other data-dependent shapes, ``tolist``).
Layouts come from the LLaVA-NeXT partitioner; signals are random at CLIP-L's shapes (16
heads; a narrow width, which does not change the counts). Rows: the papers' pairings on one
5-partition image (672 x 448 px, a 2 x 2 grid plus the thumbnail), and a batch of 8 images of
mixed grids; the ratio batch / one image is what batching saves (8 = no batching at all)::

    .venv/bin/python benchmarks/dispatch_count.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tokenprune.adapters.llava_next_partitioner import LlavaNextPartitioner

import tokenprune as tp
from tokenprune.testing import count_dispatch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table

from strategies import CROP_SIZE, LLAVA_NEXT_PINPOINTS, PATCH_SIZE, realistic_signals

PAIRS = (
    ("hired", "cls_final"),
    ("hero", "hero"),
    ("equal", "spatial"),
    ("equal", "prumerge"),
    ("equal", "prumerge_plus"),
    ("equal", "dart"),
    ("equal", "attention_received"),
)
#: Targets (issue 12): ops per one-image apply, and batch-of-8 / one-image ops.
OPS_TARGET = {"hired+cls_final": 80, "hero+hero": 100, "equal+spatial": 60, "equal+prumerge": 200, "equal+prumerge_plus": 250}
BATCH_RATIO_TARGET = 2.0
#: (width, height) in pixels: 2x2 (5 partitions), 1x2, 2x1, 1x3, 3x1 grids.
MIXED_IMAGES = ((672, 448), (672, 336), (336, 672), (1008, 336), (336, 1008), (640, 480), (500, 700), (900, 300))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--width", type=int, default=64, help="feature width (does not change the counts)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    partitioner = LlavaNextPartitioner(LLAVA_NEXT_PINPOINTS, CROP_SIZE, PATCH_SIZE)
    layouts = [partitioner.layout((h, w)) for w, h in MIXED_IMAGES]
    rows = []
    for allocator, selector in PAIRS:
        pipe = tp.Pipeline(allocator=allocator, selector=selector, budget=args.budget)
        signals = [
            realistic_signals(pipe.needs, layout, heads=16, width=args.width, device=torch.device("cpu"),
                              dtype=torch.float32, seed=seed)
            for seed, layout in enumerate(layouts)
        ]
        pipe.apply(layouts[0], signals[0])  # warm caches (lazy imports, lru caches)
        with count_dispatch() as one:
            pipe.apply(layouts[0], signals[0])
        with count_dispatch() as batch:
            pipe.apply_batch(layouts, signals)
        name = f"{allocator}+{selector}"
        ratio = batch.ops / one.ops
        rows.append(
            (
                name,
                f"{one.ops} (≤ {OPS_TARGET[name]})" if name in OPS_TARGET else f"{one.ops}",
                f"{batch.ops}",
                f"{ratio:.2f}× (≤ {BATCH_RATIO_TARGET:g}×)",
                f"{one.reads} / {batch.reads}",
            )
        )
    print(f"torch {torch.__version__}, budget {args.budget:g}, batch of {len(layouts)} mixed LLaVA-NeXT images")
    print(
        markdown_table(
            ["pipeline", "ops per apply, 1 image (target)", "ops, batch of 8", "batch ÷ 1 (target)", "host reads 1 / 8 (target ≤ 1 per batch)"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
