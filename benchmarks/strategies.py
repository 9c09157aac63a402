"""Benchmark: every registered allocator and selector, timed against the vision tower.

Strategies run between the vision tower and the LLM, so their cost is worth measuring as
a share of the tower's forward, on the same machine in the same run. One LLaVA-NeXT
image (default 672 x 448 px, width x height: a 2 x 2 grid plus the thumbnail, 5
partitions of 24 x 24 = 576 tokens, 8 token rows of each tile padding) gets
realistic signals at CLIP ViT-L/14-336's shapes: 16 heads of float32 CLS attention for
every layer any strategy needs, features, keys and CLS embeddings of width 1024 in the
tower's dtype, prompt relevance. ``Layout`` comes from the LLaVA-NeXT partitioner (real
``valid`` masks and 2-D ``overlap``).

Each round runs the tower forward once (HF ``CLIPVisionModel``, ViT-L/14-336 config,
random weights, SDPA, 5 crops, ``output_hidden_states=True`` as LLaVA runs it), then every
strategy ``--inner`` times, in an order rotated every round, after ``--warmup`` untimed
rounds. Allocators get budgets of 20 % and 40 % of the image's 2,880 tokens; selectors get
the ``hired`` allocator's 20 % budgets; whole ``Pipeline.apply`` calls of the papers'
pairings are timed too. The table gives median times and their ratio to the tower's
median (target: at most 0.5 % for every strategy). Every registered name and preset is
included, so a new strategy shows up without editing this file. Not run in CI::

    .venv/bin/python benchmarks/strategies.py                       # CPU, about 2-3 minutes
    .venv/bin/python benchmarks/strategies.py --device cuda --dtype float16 --repeats 20
"""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenprune.adapters.llava_next_partitioner import LlavaNextPartitioner

import tokenprune as tp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    Samples,
    base_parser,
    build_clip_tower,
    environment,
    markdown_table,
    quiet_stderr,
    rotated,
    setup,
    timed,
)

#: ``image_grid_pinpoints`` of the llava-v1.6 checkpoints, as (height, width).
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
CROP_SIZE, PATCH_SIZE = 336, 14
TOWER_LAYERS = 24
#: The papers' pairings, timed as a whole ``Pipeline.apply`` (checks included).
PIPELINES = (("hired", "cls_final"), ("hero", "hero"), ("equal", "prumerge"), ("equal", "prumerge_plus"))


@dataclass
class Variant:
    """One timed call: a strategy (or pipeline) at one budget."""

    name: str
    kind: str
    budget: str
    run: Callable[[], object]
    batch: int = 1
    kept: int | None = None
    ops: int | None = None
    error: str | None = None


def cls_attention(generator: torch.Generator, partitions: int, heads: int, tokens: int) -> torch.Tensor:
    """CLS->patch attention shaped like CLIP's: softmax over CLS + patches, CLS column dropped.

    Random logits plus a few strong "artefact" tokens shared by all heads of a partition
    (about 2 %, as CLIP-L's late layers show), and a large CLS self-logit.
    """
    logits = torch.randn(partitions, heads, tokens + 1, generator=generator)
    spikes = torch.rand(partitions, 1, tokens, generator=generator) < 0.02
    logits[..., 1:] += spikes * 6.0
    logits[..., 0] += 4.0
    return logits.softmax(dim=-1)[..., 1:].contiguous()


def realistic_signals(
    needs: tp.Needs,
    layout: tp.Layout,
    *,
    heads: int,
    width: int,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
) -> tp.Signals:
    """Signals for ``needs`` at the tower's shapes: attention float32, the rest in ``dtype``
    (what the tap returns), on ``device``; features and relevance always."""
    generator = torch.Generator().manual_seed(seed)
    resolved = needs.resolve(TOWER_LAYERS)
    p, n = layout.num_partitions, layout.tokens_per_partition

    def hidden(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    return tp.Signals(
        features=hidden(p, n, width),
        cls_attention={
            layer: cls_attention(generator, p, heads, n).to(device) for layer in sorted(resolved.cls_attention)
        },
        wide_cls_attention={
            layer: cls_attention(generator, p, 1, n).to(device) for layer in sorted(resolved.wide_cls_attention)
        },
        cls_embedding={layer: hidden(p, width) for layer in sorted(resolved.cls_embedding)},
        keys={layer: hidden(p, n, width) for layer in sorted(resolved.keys)},
        # per head, a distribution over the tokens like a CLS row (column means of softmax rows)
        received_attention={
            layer: cls_attention(generator, p, heads, n).to(device) for layer in sorted(resolved.received_attention)
        },
        # raw CLIP image-text cosines sit around 0.15-0.35
        relevance=(0.15 + 0.2 * torch.rand(p, generator=generator)).to(device),
        prompt="What is written on the red sign next to the bus stop?",
        num_layers=TOWER_LAYERS,
    )


def variants(layout: tp.Layout, signals: tp.Signals, patterns: list[str], batch: int = 1) -> list[Variant]:
    """Every registered allocator (20 %, 40 %) and selector (hired's 20 % budgets), and the
    pipelines, each called once on a batch of ``batch`` copies of the image (the batched
    entry points ``allocate_batch`` / ``select_batch`` / ``apply_batch`` when ``batch > 1``)."""

    def wanted(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)

    totals = {share: tp.parse_budget(share).tokens(layout.full_tokens) for share in (0.2, 0.4)}
    budgets = tp.build_allocator("hired").allocate(layout, signals, totals[0.2])
    layouts, many = [layout] * batch, [signals] * batch
    out: list[Variant] = []
    for name in tp.list_allocators():
        if not wanted(name):
            continue
        allocator = tp.build_allocator(name)
        for share, total in totals.items():
            run = (lambda a=allocator, t=total: a.allocate(layout, signals, t)) if batch == 1 else (
                lambda a=allocator, t=total: a.allocate_batch(layouts, many, [t] * batch)
            )
            out.append(Variant(name, "allocator", f"{share:.0%} ({total})", run, batch))
    for name in tp.list_selectors():
        if not wanted(name):
            continue
        selector = tp.build_selector(name)
        run = (lambda s=selector: s.select(layout, signals, budgets)) if batch == 1 else (
            lambda s=selector: s.select_batch(layouts, many, [budgets] * batch)
        )
        out.append(Variant(name, "selector", "20% via hired", run, batch))
    for allocator_name, selector_name in PIPELINES:
        label = f"{allocator_name} + {selector_name}"
        if not (wanted(allocator_name) or wanted(selector_name) or wanted(label)):
            continue
        pipe = tp.Pipeline(allocator=allocator_name, selector=selector_name, budget=0.2)
        run = (lambda p=pipe: p.apply(layout, signals)) if batch == 1 else (lambda p=pipe: p.apply_batch(layouts, many))
        out.append(Variant(label, "Pipeline.apply", f"20% ({totals[0.2]})", run, batch))
    return out


def count_ops(fn: Callable[[], object]) -> int | None:
    """Leaf aten operators one call dispatches: on a GPU each is at least one kernel launch
    (a few microseconds), a floor that FLOPs do not show."""
    try:
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:  # the backend's start/stop lines
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and not e.cpu_children)


def kept_tokens(result: object) -> int | None:
    if isinstance(result, list):  # a batch: the first image's
        return kept_tokens(result[0]) if result else None
    if isinstance(result, torch.Tensor):
        return int(result.sum())
    if isinstance(result, tp.Selection):
        return result.total
    selection = getattr(result, "selection", None)
    return selection.total if isinstance(selection, tp.Selection) else None


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(
        __doc__.splitlines()[0],
        ("--inner", int, 5, "calls of every strategy per round"),
        ("--image", str, "672x448", "image WIDTHxHEIGHT in pixels (default 672x448)"),
        ("--heads", int, 16, "attention heads of the signals"),
        ("--width", int, 1024, "width of features, keys, CLS embeddings"),
        ("--tower-layers", int, TOWER_LAYERS, "tower blocks (24 = ViT-L; fewer only for a smoke run)"),
        ("--target", float, 0.5, "target: strategy time <= this %% of the tower"),
        ("--only", str, "*", "comma-separated name patterns to time (default: all)"),
        ("--batch-sizes", str, "1", "images per call, e.g. 1,8: each row per batch, as %% of the tower on as many"),
    )
    args = parser.parse_args(argv)
    device, dtype = setup(args)
    width_px, height_px = (int(v) for v in args.image.lower().split("x"))

    partitioner = LlavaNextPartitioner(LLAVA_NEXT_PINPOINTS, CROP_SIZE, PATCH_SIZE)
    layout = partitioner.layout((height_px, width_px))
    strategies = [tp.build_allocator(n) for n in tp.list_allocators()]
    strategies += [tp.build_selector(n) for n in tp.list_selectors()]
    needs = tp.Needs.union(*(s.needs for s in strategies))
    signals = realistic_signals(needs, layout, heads=args.heads, width=args.width, device=device, dtype=dtype)
    sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    patterns = [p.strip() for p in args.only.split(",")]
    timed_variants = [v for batch in sizes for v in variants(layout, signals, patterns, batch)]
    twenty_percent = tp.parse_budget(0.2).tokens(layout.full_tokens)
    selector_budgets = tp.build_allocator("hired").allocate(layout, signals, twenty_percent).tolist()

    tower = build_clip_tower(device, dtype, width=1024, layers=args.tower_layers, image_size=CROP_SIZE)
    crops = layout.num_partitions
    pixels = torch.randn(crops, 3, CROP_SIZE, CROP_SIZE, generator=torch.Generator().manual_seed(1))
    pixels = pixels.to(device, dtype)

    def tower_forward(batch: int) -> object:
        with torch.inference_mode():
            return tower(pixel_values=pixels.repeat(batch, 1, 1, 1), output_hidden_states=True).hidden_states[-2]

    tower_samples = {batch: Samples() for batch in sizes}
    samples = {id(v): Samples() for v in timed_variants}
    for round_index in range(args.warmup + args.repeats):
        timing = round_index >= args.warmup
        for batch in sizes:
            wall, cpu, _ = timed(lambda b=batch: tower_forward(b), device)
            if timing:
                tower_samples[batch].add(wall, cpu)
        for variant in rotated(timed_variants, round_index):
            if variant.error:
                continue
            for _ in range(args.inner):
                try:
                    wall, cpu, result = timed(variant.run, device)
                except Exception as error:  # noqa: BLE001  (a strategy that fails here is reported, the rest timed)
                    variant.error = f"{type(error).__name__}: {error}"
                    break
                variant.kept = kept_tokens(result)
                if timing:
                    samples[id(variant)].add(wall, cpu)
            if round_index == 0 and not variant.error:
                variant.ops = count_ops(variant.run)

    tower_wall = {b: t.wall_median for b, t in tower_samples.items()}
    tower_cpu = {b: t.cpu_median for b, t in tower_samples.items()}
    print(
        f"\n{environment(device, dtype)}\n"
        f"image {width_px}x{height_px} px -> LLaVA-NeXT tiles {layout.tiles} + thumbnail, "
        f"{layout.num_partitions} x {layout.tokens_per_partition} tokens, capacity {layout.capacity.tolist()}; "
        f"signals: {args.heads} heads, width {args.width}, needs {needs.describe()}\n"
        f"tower: CLIP ViT-L/14-336 ({args.tower_layers} blocks), {crops} crops, SDPA: "
        + ", ".join(f"B={b}: median {tower_wall[b] * 1e3:.0f} ms wall, {tower_cpu[b] * 1e3:.0f} ms CPU" for b in sizes)
        + f" over {args.repeats} rounds; "
        f"strategies: medians of {args.repeats * args.inner} calls after {args.warmup} warm-up round(s)\n"
    )
    rows = []
    failures = []
    for variant in timed_variants:
        if variant.error:
            rows.append([variant.name, variant.kind, variant.budget, variant.batch, *["-"] * 6, f"error: {variant.error}"])
            failures.append(variant.name)
            continue
        times = samples[id(variant)]
        share_wall = 100 * times.wall_median / tower_wall[variant.batch]
        share_cpu = 100 * times.cpu_median / tower_cpu[variant.batch]
        ok = share_wall <= args.target
        if not ok:
            failures.append(f"{variant.name} ({variant.kind}, {variant.budget}, B={variant.batch})")
        rows.append(
            [
                variant.name,
                variant.kind,
                variant.budget,
                variant.batch,
                variant.kept if variant.kept is not None else "-",
                variant.ops if variant.ops is not None else "-",
                f"{times.wall_median * 1e3:.2f}",
                f"{times.cpu_median * 1e3:.2f}",
                f"{share_wall:.3f}",
                f"{share_cpu:.3f}",
                "pass" if ok else "FAIL",
            ]
        )
    headers = [
        "strategy",
        "kind",
        "budget",
        "B",
        "kept",
        "aten ops",
        "wall (ms)",
        "CPU (ms)",
        "% of tower (wall)",
        "% of tower (CPU)",
        f"≤ {args.target}% (wall)",
    ]
    print(markdown_table(headers, rows, left=3))
    print("\nB: images per call (the batched entry point when B > 1); % of the tower forward on as many images.")
    slowest = max(
        (v for v in timed_variants if not v.error),
        key=lambda v: samples[id(v)].wall_median,
        default=None,
    )
    summary = f"\n{len(timed_variants) - len(failures)} of {len(timed_variants)} within {args.target}% of the tower"
    if slowest is not None:
        summary += (
            f"; slowest: {slowest.name} ({slowest.kind}) at {100 * samples[id(slowest)].wall_median / tower_wall[slowest.batch]:.3f}%"
        )
    print(summary + (f"; over the target: {', '.join(failures)}" if failures else ""))
    print(f"selector budgets (hired at 20%): {selector_budgets}")


if __name__ == "__main__":
    main()
