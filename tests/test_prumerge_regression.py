"""PruMerge / PruMerge+ outputs pinned (issue 12: the batched path replaced a per-partition loop).

``tests/data/prumerge_golden.pt`` holds the selections (indices, extra tokens, merged
features) on the cases below: LLaVA-NeXT layouts with padding, single images and a mixed
batch, budgets that cut the adaptive count, every count / iqr_scope / neighbours / merge /
summary / spatial mode and both reference presets, on smooth signals and on coarse ones
full of ties. When written, the per-partition loop gave the same indices and extra tokens
everywhere, and the same features (rtol 1e-5) on the smooth signals; on the coarse ones it
broke exactly equal key similarities by float32 rounding, the batched path (float64
similarities) by the lower index. Regenerate only for an intended behaviour change::

    .venv/bin/python -m tests.test_prumerge_regression --write
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenprune.adapters.llava_next_partitioner import LlavaNextPartitioner

import tokenprune as tp
from tokenprune import testing as tpt

GOLDEN = Path(__file__).parent / "data" / "prumerge_golden.pt"

#: (height, width) in pixels: 2x2, 1x2, 2x1, 1x3, 3x1 grids and padded in-betweens.
SIZES = ((448, 672), (336, 672), (672, 336), (336, 1008), (1008, 336), (480, 640), (700, 500), (300, 900))
PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))

CASES: dict[str, tuple[str, dict[str, Any], float]] = {
    # name: (selector, options, budget fraction)
    "pm_default": ("prumerge", {}, 0.2),
    "pm_tiny_budget": ("prumerge", {}, 0.01),
    "pm_all_sum": ("prumerge", {"neighbours": "all", "merge": "sum"}, 0.3),
    "pm_nosummary_k3": ("prumerge", {"summary": False, "k": 3}, 0.2),
    "pm_k0": ("prumerge", {"k": 0, "heads": "sum"}, 0.2),
    "pm_k_large": ("prumerge", {"k": 1000, "neighbours": "all"}, 0.1),
    "pm_auto_partition": ("prumerge", {"count": "auto"}, 1.0),
    "pm_auto_cut": ("prumerge", {"count": "auto", "min_tokens": 3}, 0.02),
    "pm_auto_batch": ("prumerge", {"count": "auto", "iqr_scope": "batch", "wide_head": True, "min_tokens": 0}, 1.0),
    "pm_auto_batch_cut": ("prumerge", {"count": "auto", "iqr_scope": "batch", "summary": False}, 0.03),
    "pm_reference": ("prumerge@reference", {}, 1.0),
    "pm_reference_cut": ("prumerge@reference", {}, 0.02),
    "pp_default": ("prumerge_plus", {}, 0.2),
    "pp_share_half_sum": ("prumerge_plus", {"spatial_share": 0.5, "merge": "sum", "neighbours": "all"}, 0.3),
    "pp_share_zero": ("prumerge_plus", {"spatial_share": 0.0, "summary": False}, 0.1),
    "pp_grid_auto": ("prumerge_plus", {"count": "auto"}, 1.0),
    "pp_grid_auto_cut": ("prumerge_plus", {"count": "auto", "iqr_scope": "batch", "min_tokens": 2}, 0.05),
    "pp_stride_auto": ("prumerge_plus", {"spatial": "stride", "count": "auto"}, 1.0),
    "pp_stride_fixed": ("prumerge_plus", {"spatial": "stride", "fixed_ratio": 0.1, "k": 5}, 0.15),
    "pp_stride_fixed_cut": ("prumerge_plus@reference", {"count": "budget", "fixed_ratio": 0.25}, 0.1),
    "pp_reference": ("prumerge_plus@reference", {}, 1.0),
    "pp_reference_cut": ("prumerge_plus@reference", {}, 0.04),
}


def layouts(side: int) -> list[tp.Layout]:
    """The eight mixed LLaVA-NeXT layouts at ``side`` tokens per crop side (24 = CLIP-L/336)."""
    scale = 24 // side
    partitioner = LlavaNextPartitioner(
        tuple((h // scale, w // scale) for h, w in PINPOINTS), 336 // scale, 14
    )
    return [partitioner.layout((h // scale, w // scale)) for h, w in SIZES]


def smooth_signals(needs: tp.Needs, layout: tp.Layout, seed: int) -> tp.Signals:
    """Peaked softmax attention, Gaussian keys (8 wide) and features (2 wide): no exact ties."""
    generator = torch.Generator().manual_seed(seed)
    p, n = layout.num_partitions, layout.tokens_per_partition
    resolved = needs.resolve(24)

    def attention(heads: int) -> torch.Tensor:
        return (torch.randn(p, heads, n + 1, generator=generator) * 2.5).softmax(-1)[..., 1:].contiguous()

    return tp.Signals(
        features=torch.randn(p, n, 2, generator=generator),
        cls_attention={layer: attention(4) for layer in resolved.cls_attention},
        wide_cls_attention={layer: attention(1) for layer in resolved.wide_cls_attention},
        keys={layer: torch.randn(p, n, 8, generator=generator) for layer in resolved.keys},
        num_layers=24,
    )


def run_case(name: str, side: int, kind: str) -> dict[str, Any]:
    """Every partition of every image of every run (the batch of 8, then two images alone),
    flattened: ``indices`` (int16) and ``features`` concatenated, ``sizes`` and ``extra``
    per partition (one tensor each keeps the file small)."""
    selector, options, budget = CASES[name]
    pipe = tp.Pipeline(allocator="equal", selector=selector, budget=budget, selector_options=options)
    chosen = layouts(side)
    make = smooth_signals if kind == "smooth" else tpt._signals
    signals = [make(pipe.needs, layout, seed) for seed, layout in enumerate(chosen)]
    runs = [pipe.apply_batch(chosen, signals)]
    if side < 24:  # single images (their own pooled ratio); small sides keep the file small
        runs += [pipe.apply_batch(chosen[:1], signals[:1]), pipe.apply_batch(chosen[5:6], signals[5:6])]
    indices, features, sizes, extra = [], [], [], []
    for results in runs:
        for result in results:
            selection = result.selection
            assert selection.features is not None
            indices += selection.indices
            features += [f[:, :2] for f in selection.features]  # 2 columns pin the merge (it is per column)
            sizes += [int(i.numel()) for i in selection.indices]
            extra += list(selection.extra_tokens or (0,) * selection.num_partitions)
    return {
        "indices": torch.cat(indices).to(torch.int16),
        "features": torch.cat(features),
        "sizes": torch.tensor(sizes),
        "extra": torch.tensor(extra),
    }


KEYS = [(name, side, kind) for name in CASES for side, kind in ((24, "smooth"), (6, "coarse"), (12, "coarse"))]


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    return torch.load(GOLDEN, weights_only=True)


def _key(name: str, side: int, kind: str) -> str:
    return f"{name}/{side}/{kind}"


@pytest.mark.parametrize("name,side,kind", KEYS)
def test_outputs_equal_the_pinned_outputs(golden, name, side, kind):
    expected = golden[_key(name, side, kind)]
    got = run_case(name, side, kind)
    assert torch.equal(got["sizes"], expected["sizes"])
    assert torch.equal(got["extra"], expected["extra"])
    assert torch.equal(got["indices"], expected["indices"])
    assert got["features"].dtype == expected["features"].dtype
    torch.testing.assert_close(got["features"], expected["features"], rtol=1e-5, atol=1e-6)


def _write() -> None:
    GOLDEN.parent.mkdir(exist_ok=True)
    data = {_key(*key): run_case(*key) for key in KEYS}
    torch.save(data, GOLDEN)
    print(f"wrote {len(data)} cases to {GOLDEN} ({GOLDEN.stat().st_size} bytes)")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.test_prumerge_regression --write")
    _write()
