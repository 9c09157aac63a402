"""Benchmark: reading CLS attention with the tap vs ``output_attentions=True``.

A CLIP ViT-L/14-336 tower (LLaVA-1.5 / LLaVA-NeXT geometry, random weights) runs on a
LLaVA-NeXT-sized batch of crops (default 5 crops of 336 px) three ways, interleaved:

* ``plain SDPA``: the tower as LLaVA runs it (SDPA kernel, ``output_hidden_states=True``
  for the feature layer), no attention read.
* ``SDPA + tap``: the same kernel with the tap computing HiRED's needs (per-head CLS
  attention of blocks 0 and 22) and the features at block -2.
* ``eager + output_attentions``: how the HERO release reads attention: eager attention
  and every layer's full ``[B, H, L, L]`` map materialised.

Prints a Markdown table of median times and ratios, and the memory held by what each path
returns (tap rows + features vs the full maps + hidden states). Not run in CI::

    .venv/bin/python benchmarks/tap.py --device cpu --dtype float32 --repeats 3
    .venv/bin/python benchmarks/tap.py --device cuda --dtype float16 --repeats 20
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable, Iterable

import torch

import tokenprune as tp
from tokenprune.adapters.taps import tap_for

HIRED_NEEDS = tp.Needs(cls_attention={0, 22})
FEATURE_LAYER = -2


def _bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_towers(device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The SDPA tower and an eager copy with the same random weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
    )
    sdpa = CLIPVisionModel._from_config(config, attn_implementation="sdpa").to(device=device, dtype=dtype).eval()
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    return sdpa, eager


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--crops", type=int, default=5, help="crops of 336 px (LLaVA-NeXT 2x2 + thumbnail: 5)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path (interleaved)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per path first")
    parser.add_argument("--verbose", action="store_true", help="print every run's time")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)

    sdpa, eager = build_towers(device, dtype)
    pixels = torch.randn(args.crops, 3, 336, 336, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    tap = tap_for(sdpa)
    kept: dict[str, tuple[int, int]] = {}  # path -> (attention bytes, all returned bytes)

    def plain() -> None:
        out = sdpa(pixel_values=pixels, output_hidden_states=True)
        kept["plain SDPA"] = (0, _bytes(out.hidden_states))

    def tapped() -> None:
        with tap.capture(HIRED_NEEDS, feature_layer=FEATURE_LAYER) as record:
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
    wall: dict[str, list[float]] = {name: [] for name in paths}
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    peaks: dict[str, int] = {}
    names = list(paths)
    with torch.no_grad():
        for round_index in range(args.warmup + args.repeats):
            # rotate the order every round so no path always runs first (caches, thermals)
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                _sync(device)
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                paths[name]()
                _sync(device)
                elapsed_wall, elapsed_cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
                if device.type == "cuda":
                    peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated(device))
                if round_index >= args.warmup:
                    wall[name].append(elapsed_wall)
                    cpu[name].append(elapsed_cpu)
                if args.verbose:
                    print(f"round {round_index}: {name}: wall {elapsed_wall:.3f} s, cpu {elapsed_cpu:.3f} s", flush=True)

    timed = cpu if use_cpu_time else wall
    medians = {name: statistics.median(values) for name, values in timed.items()}
    base, tap_time = medians["plain SDPA"], medians["SDPA + tap"]
    maps_bytes = kept["eager + output_attentions"][0]
    mib = 2**20
    clock = "CPU time" if use_cpu_time else "wall time"
    print(
        f"\nCLIP ViT-L/14-336, {args.crops} crops, {args.dtype} on {device} "
        f"({torch.get_num_threads()} threads), medians of {args.repeats} interleaved runs "
        f"after {args.warmup} warm-up; ratios of {clock}\n"
    )
    header = "| path | wall (s) |" + (" CPU time (s) |" if use_cpu_time else "")
    header += " × plain SDPA | × SDPA + tap | attention returned (MiB) | all returned (MiB) |"
    if peaks:
        header += " peak GPU memory (MiB) |"
    print(header)
    print("|---|" + "---:|" * (header.count("|") - 2))
    for name in names:
        attention, total = kept[name]
        row = f"| {name} | {statistics.median(wall[name]):.2f} |"
        if use_cpu_time:
            row += f" {statistics.median(cpu[name]):.2f} |"
        row += (
            f" {medians[name] / base:.3f} | {medians[name] / tap_time:.3f} "
            f"| {attention / mib:.2f} | {total / mib:.1f} |"
        )
        if peaks:
            row += f" {peaks[name] / mib:.0f} |"
        print(row)
    tap_attention, tap_total = kept["SDPA + tap"]
    print(
        f"\nTargets: tap / plain SDPA = {tap_time / base:.3f} (≤ 1.05); "
        f"output_attentions / tap = {medians['eager + output_attentions'] / tap_time:.2f} (≥ 1.4); "
        f"tap attention rows / full maps = {tap_attention / maps_bytes:.4%}; "
        f"tap rows + features / full maps = {tap_total / maps_bytes:.2%} (≤ 1%)"
    )

if __name__ == "__main__":
    main()
