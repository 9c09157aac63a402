"""Benchmark: reading CLS attention with the tap vs ``output_attentions=True``.

A CLIP ViT-L/14-336 tower (LLaVA-1.5 / LLaVA-NeXT geometry, random weights) runs on a
LLaVA-NeXT-sized batch of crops (default 5 crops of 336 px) three ways, interleaved:

* ``plain SDPA``: the tower as LLaVA runs it (SDPA kernel, ``output_hidden_states=True``
  for the feature layer), no attention read.
* ``SDPA + tap``: the same kernel with the tap computing HiRED's needs (per-head CLS
  attention of blocks 0 and 22) and the features at block -2.
* ``eager + output_attentions``: how the HERO release reads attention: eager attention
  and every layer's full ``[B, H, L, L]`` map materialised.

Prints a Markdown table of median times and ratios, the memory held by what each path
returns (tap rows + features vs the full maps + hidden states), and what the tap adds to
one forward in dispatched operators, kernels (non-view operators) and device->host reads,
counted with a dispatch mode (the same on every device). Not run in CI::

    .venv/bin/python benchmarks/tap.py --device cpu --dtype float32 --repeats 3
    .venv/bin/python benchmarks/tap.py --device cuda --dtype float16 --repeats 20
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from tokenprune.adapters.taps import tap_for

import tokenprune as tp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    VIT_L,
    OpCounter,
    Samples,
    base_parser,
    build_clip_tower,
    environment,
    markdown_table,
    rotated,
    setup,
    timed,
)

HIRED_NEEDS = tp.Needs(cls_attention={0, 22})
FEATURE_LAYER = -2


def _bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(
        __doc__.splitlines()[0],
        ("--crops", int, 5, "crops of 336 px (LLaVA-NeXT 2x2 + thumbnail: 5)"),
        ("--width", int, VIT_L["width"], "tower width (ViT-L: 1024)"),
        ("--layers", int, VIT_L["layers"], "tower blocks (>= 23: HiRED reads block 22)"),
    )
    parser.add_argument("--verbose", action="store_true", help="print every run's time")
    args = parser.parse_args(argv)
    device, dtype = setup(args)

    sdpa = build_clip_tower(device, dtype, width=args.width, layers=args.layers)
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    needs = tp.Needs(cls_attention={0, min(22, args.layers - 1)})
    pixels = torch.randn(args.crops, 3, 336, 336, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    tap = tap_for(sdpa)
    kept: dict[str, tuple[int, int]] = {}  # path -> (attention bytes, all returned bytes)

    def plain() -> None:
        out = sdpa(pixel_values=pixels, output_hidden_states=True)
        kept["plain SDPA"] = (0, _bytes(out.hidden_states))

    def tapped() -> None:
        with tap.capture(needs, feature_layer=FEATURE_LAYER) as record:
            sdpa(pixel_values=pixels)
        attention = _bytes(record.cls_attention.values())
        kept["SDPA + tap"] = (attention, attention + _bytes([record.features]))

    def full_maps() -> None:
        out = eager(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
        attention = _bytes(out.attentions)
        kept["eager + output_attentions"] = (attention, attention + _bytes(out.hidden_states))

    paths: dict[str, Callable[[], None]] = {
        "plain SDPA": plain,
        "SDPA + tap": tapped,
        "eager + output_attentions": full_maps,
    }
    # On a CPU the ratios use process CPU time (all threads): on a shared machine other
    # processes stretch wall time at random, not the work this process does. On CUDA: wall time.
    use_cpu_time = device.type == "cpu"
    samples = {name: Samples() for name in paths}
    peaks: dict[str, int] = {}
    names = list(paths)
    with torch.no_grad():
        counts = {name: OpCounter.of(paths[name]) for name in ("plain SDPA", "SDPA + tap")}
        for round_index in range(args.warmup + args.repeats):
            for name in rotated(names, round_index):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                wall, cpu, _ = timed(paths[name], device)
                if device.type == "cuda":
                    peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated(device))
                if round_index >= args.warmup:
                    samples[name].add(wall, cpu)
                if args.verbose:
                    print(f"round {round_index}: {name}: wall {wall:.3f} s, cpu {cpu:.3f} s", flush=True)

    medians = {name: (s.cpu_median if use_cpu_time else s.wall_median) for name, s in samples.items()}
    base, tap_time = medians["plain SDPA"], medians["SDPA + tap"]
    maps_bytes = kept["eager + output_attentions"][0]
    mib = 2**20
    print(
        f"\n{environment(device, dtype)}\nCLIP ViT (width {args.width}, {args.layers} blocks), {args.crops} crops of "
        f"336 px; medians of {args.repeats} interleaved runs after {args.warmup} warm-up; ratios of "
        f"{'CPU time' if use_cpu_time else 'wall time'}\n"
    )
    headers = ["path", "wall (ms)", "CPU time (ms)", "× plain SDPA", "× SDPA + tap", "attention returned (MiB)",
               "all returned (MiB)"]
    headers += ["peak GPU memory (MiB)"] if peaks else []
    rows = []
    for name in names:
        attention, total = kept[name]
        row = [name, f"{samples[name].wall_median * 1e3:.1f}", f"{samples[name].cpu_median * 1e3:.1f}",
               f"{medians[name] / base:.3f}", f"{medians[name] / tap_time:.3f}", f"{attention / mib:.2f}",
               f"{total / mib:.1f}"]
        rows.append(row + ([f"{peaks[name] / mib:.0f}"] if peaks else []))
    print(markdown_table(headers, rows))
    plain_count, tap_count = counts["plain SDPA"], counts["SDPA + tap"]
    print(
        "\nWhat the tap adds to one forward (dispatch-mode count, HiRED's needs + features): "
        f"{tap_count.ops - plain_count.ops} operators, {tap_count.kernels - plain_count.kernels} kernels "
        f"(non-view), {tap_count.host_reads - plain_count.host_reads} device->host reads "
        f"(plain forward: {plain_count.ops} operators, {plain_count.kernels} kernels)"
    )
    tap_attention, tap_total = kept["SDPA + tap"]
    print(
        f"\nTargets: tap / plain SDPA = {tap_time / base:.3f} (≤ 1.05); "
        f"output_attentions / tap = {medians['eager + output_attentions'] / tap_time:.2f} (≥ 1.4); "
        f"tap attention rows / full maps = {tap_attention / maps_bytes:.4%}; "
        f"tap rows + features / full maps = {tap_total / maps_bytes:.2%} (≤ 1%)"
    )


if __name__ == "__main__":
    main()
