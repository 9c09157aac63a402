"""The benchmarks' own machinery: the dispatch counter, the tap's op budget, and the GPU
set's smoke mode (benchmarks/gpu.sh --smoke on the CPU with tiny sizes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenprune.adapters.taps import tap_for

import tokenprune as tp

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from _common import OpCounter, build_clip_tower


def test_op_counter_sees_kernels_views_and_host_reads() -> None:
    x = torch.ones(4)

    def work() -> None:
        y = (x * 2).view(2, 2)
        bool(y.sum() > 0)

    counter = OpCounter.of(work)
    # mul, sum, gt and the host read are kernels; the view costs none
    assert counter.kernels == 4 and counter.ops == 5
    assert counter.host_reads == 1


@pytest.mark.parametrize("wide", [False, True])
def test_the_tap_adds_three_kernels_per_tapped_block_and_no_host_reads(wide: bool) -> None:
    tower = build_clip_tower(torch.device("cpu"), torch.float32, width=128, layers=4, image_size=56)
    pixels = torch.randn(3, 3, 56, 56)
    tap = tap_for(tower)
    needs = tp.Needs(cls_attention={0, 2}, wide_cls_attention={0, 2} if wide else set())

    def plain() -> None:
        tower(pixel_values=pixels, output_hidden_states=True)

    def tapped() -> None:
        with tap.capture(needs, feature_layer=-2):
            tower(pixel_values=pixels)

    tapped()  # the per-geometry scale matrix is built once, then cached
    base, with_tap = OpCounter.of(plain), OpCounter.of(tapped)
    # per tapped block: spread the query, one bmm for every head (and the wide row), one
    # softmax; features and rows are views, nothing is copied, nothing read on the host
    assert with_tap.kernels - base.kernels == 3 * 2
    assert with_tap.host_reads == base.host_reads == 0


def test_gpu_set_smoke_mode_writes_every_table(tmp_path: Path) -> None:
    """`benchmarks/gpu.sh --smoke` runs every GPU benchmark on the CPU with tiny sizes."""
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu.sh"), "--smoke", str(tmp_path)],
        env=env, capture_output=True, text=True, check=False,
    )
    logs = {p.name: p.read_text()[-2000:] for p in tmp_path.glob("*.log")}
    assert done.returncode == 0, (done.stdout, logs)
    summary = (tmp_path / "summary.md").read_text()
    for step in ("e2e", "strategies", "tap", "relevance"):
        assert f"| {step} |" in summary and "| ok |" in summary
        assert "|---|" in (tmp_path / f"{step}.md").read_text()  # a Markdown table came out
    e2e = (tmp_path / "e2e.md").read_text()
    assert "cudagraph: unavailable" in e2e  # reported, not raised, on a CPU
    assert "images/s" in e2e and "TTFT − LLM" in e2e
    assert "| B |" in (tmp_path / "strategies.md").read_text()
