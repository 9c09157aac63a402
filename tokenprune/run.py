"""The main job: ``tokenprune run`` — prune one image for one prompt, side by side with the
unpruned model, and show what was kept.

With no arguments it runs on a built-in tiny LLaVA-NeXT with random weights (so the text it
generates is noise: the point is the mechanics, the budgets and the timings) and a bundled
sample picture. ``--model PATH`` runs the same on a real local checkpoint
(``LlavaNextForConditionalGeneration``, ``LlavaForConditionalGeneration``; the adapter is
picked from the model class unless ``--adapter`` says otherwise).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ._subcommand import add_command
from .experiments.validate import check_run_arguments
from .pipeline import Pipeline
from .runtime import (
    BUILTIN_MODEL,
    DTYPES,
    chat_prompt,
    default_device,
    load_model,
    read_config_file,
)

__all__ = ["add_run_parser", "run", "show", "load_model"]  # load_model: re-exported from tokenprune.runtime

#: Default strategies where the model's tower has no CLS token (HiRED's need one).
_CLS_FREE_DEFAULTS = {"allocator": "equal", "selector": "dart"}


def _median_time(function: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall time of ``repeats`` calls after one untimed warm-up call."""
    times, result = [], function()
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _model_image_pipeline(args: argparse.Namespace) -> tuple[Any, Any, str, Any, str, Pipeline]:
    """Model, processor, a description of it, the image, its name and the pipeline."""
    from PIL import Image

    torch.manual_seed(args.seed)
    device = args.device or default_device()
    if args.model:
        model, processor, detected = load_model(args.model, device=device, dtype=DTYPES[args.dtype])
        source = f"checkpoint {args.model}"
    else:
        model, processor, detected = load_model(BUILTIN_MODEL, device=device, seed=args.seed)
        source = "built-in tiny LLaVA-NeXT with RANDOM weights (mechanics demo: its text is noise; use --model PATH for a real checkpoint)"
    if args.image:
        image = Image.open(args.image).convert("RGB")
        image_name = args.image
    else:
        from .experiments import sample_image

        image, image_name = sample_image(), "built-in sample picture"
    spec: dict[str, Any] = {"adapter": detected, "allocator": "hired", "selector": "cls_final", "budget": "0.2"}
    if detected.startswith("qwen"):
        spec.update(_CLS_FREE_DEFAULTS)
    if getattr(args, "config", None):
        loaded = read_config_file(Path(args.config))
        spec.update(loaded.get("base", loaded))
    # explicit command-line choices win over the config file and the defaults
    for part in ("adapter", "allocator", "selector", "budget"):
        if getattr(args, part) is not None:
            spec[part] = getattr(args, part)
    pipe = Pipeline.from_dict(spec)
    return model, processor, source, image, image_name, pipe


def _draw(pipe: Pipeline, model: Any, processor: Any, image: Any, out: str) -> Path:
    from .visualize import crops_to_images, kept_tokens_figure

    image_tokens, stats = pipe.last_images[0], pipe.last_stats[0]
    inputs = pipe.adapter._image_inputs(processor, [image])  # type: ignore[union-attr]
    crops, _, _ = pipe.adapter._crops_and_layouts(model, processor, inputs["pixel_values"], inputs.get("image_sizes"))  # type: ignore[union-attr]
    image_processor = processor.image_processor
    pictures = crops_to_images(crops[0], getattr(image_processor, "image_mean", None), getattr(image_processor, "image_std", None))
    title = f"allocator {pipe.part_label('allocator')}, selector {pipe.part_label('selector')}, budget {pipe.budget}"
    return kept_tokens_figure(pictures, image_tokens.layout, image_tokens.selection, stats.allocated, out, title=title)


def show(args: argparse.Namespace) -> int:
    """``tokenprune show``: the kept-token picture for one image + prompt, any pipeline."""
    check_run_arguments(args)  # every argument, before the checkpoint loads
    model, processor, source, image, image_name, pipe = _model_image_pipeline(args)
    with torch.inference_mode():
        pipe.prepare(model, processor, images=image, text=chat_prompt(processor, args.prompt), question=args.prompt)
    stats = pipe.last_stats[0]
    print(f"model: {source}\nimage: {image_name} ({image.width}x{image.height} px)")
    print(pipe.describe())
    print("kept per partition: " + ", ".join(f"{n} {k}/{a}" for n, k, a in zip(stats.partitions, stats.kept, stats.allocated)))
    path = _draw(pipe, model, processor, image, args.out)
    print(f"wrote {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    check_run_arguments(args)  # every argument, before the checkpoint loads
    model, processor, source, image, image_name, pipe = _model_image_pipeline(args)
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.set_device(device)  # timing synchronises the current device
    text = chat_prompt(processor, args.prompt)
    print(f"model:    {source}")
    print(f"image:    {image_name} ({image.width}x{image.height} px)")
    print(pipe.describe())
    print()

    with torch.inference_mode():
        prepare_s, pruned = _median_time(
            lambda: pipe.prepare(model, processor, images=image, text=text, question=args.prompt), args.repeats
        )
        stats = pipe.last_stats[0]
        image_tokens = pipe.last_images[0]
        prefill_s, _ = _median_time(lambda: model(**pruned), args.repeats)
        process_s, full = _median_time(lambda: processor(images=image, text=text, return_tensors="pt").to(device), args.repeats)
        full_s, _ = _median_time(lambda: model(**full), args.repeats)
        generated = model.generate(**pruned, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = processor.tokenizer.decode(generated[0, pruned["input_ids"].shape[1] :], skip_special_tokens=True)

    layout = image_tokens.layout
    width = max(len(n) for n in stats.partitions) + 2
    print(f"{'partition':<{width}}{'valid':>7}{'budget':>8}{'kept':>7}")
    for name, valid, allocated, kept in zip(stats.partitions, layout.capacity.tolist(), stats.allocated, stats.kept):
        print(f"{name:<{width}}{valid:>7}{allocated:>8}{kept:>7}")
    print(f"{'total':<{width}}{int(layout.capacity.sum()):>7}{stats.budget:>8}{sum(stats.kept):>7}")
    if stats.newline_tokens:
        print(f"(+{stats.newline_tokens} newline tokens)")
    print()
    full_prefill = int(full["attention_mask"].sum())
    pruned_ttft, full_ttft = prepare_s + prefill_s, process_s + full_s
    rows = [
        ("image tokens to the LLM", f"{stats.image_tokens}", f"{stats.stock_image_tokens}"),
        ("prefill tokens", f"{stats.prefill_length}", f"{full_prefill}"),
        ("preprocessing (+ vision, pruning) s", f"{prepare_s:.4f}", f"{process_s:.4f}"),
        ("forward s (full: vision + LLM)", f"{prefill_s:.4f}", f"{full_s:.4f}"),
        ("time to first token s", f"{pruned_ttft:.4f}", f"{full_ttft:.4f}"),
    ]
    print(f"{'':<38}{'pruned':>10}{'full':>10}")
    for label, a, b in rows:
        print(f"{label:<38}{a:>10}{b:>10}")
    print(f"time to first token, full / pruned: {full_ttft / pruned_ttft:.2f}x (median of {args.repeats})")
    if not args.model:
        print("(the tiny model's LLM is as small as its vision tower, so pruning buys little here;")
        print(" benchmarks/e2e.py measures a LLaVA-NeXT-7B-shaped model)")
    print()
    print(f"generated ({args.max_new_tokens} tokens max, greedy): {answer!r}")

    path = _draw(pipe, model, processor, image, args.out)
    print(f"wrote {path} (kept tokens outlined, pruned ones dimmed, padding grey)")
    return 0


def _common_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    parser.add_argument("--model", help="local checkpoint folder (default: built-in tiny random LLaVA-NeXT)")
    parser.add_argument("--image", help="image file (default: a built-in sample picture)")
    parser.add_argument("--prompt", default="What is in this picture? Answer briefly.", help="the question")
    parser.add_argument("--adapter", help="adapter name (default: from the model class)")
    parser.add_argument("--allocator", help="allocator name or preset (default: hired)")
    parser.add_argument("--selector", help="selector name or preset (default: cls_final)")
    parser.add_argument("--budget", help="fraction (0.2, '20%%') or token count per image (default 0.2)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=out, help="PNG of the kept tokens (default: %(default)s)")


def add_run_parser(sub: Any) -> None:
    summary = "prune one image for one prompt, compare with the full model, draw the kept tokens"
    parser = add_command(sub, "run", summary, __doc__)
    _common_arguments(parser, "tokenprune_run.png")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (median)")
    parser.set_defaults(func=run)
    shower = sub.add_parser(
        "show",
        help="draw the kept tokens over the thumbnail and each tile, with per-partition budgets",
        description="Draw what a pipeline keeps of one image: kept tokens over the thumbnail and each tile "
        "(tile grid laid out as in the image), padding greyed, budgets as bars. The pipeline comes from "
        "--allocator/--selector/--budget or from --config (a pipeline dict, or a sweep config's 'base').",
    )
    _common_arguments(shower, "tokenprune_show.png")
    shower.add_argument("--config", help="YAML/TOML pipeline config (or sweep config: its 'base' is used)")
    shower.set_defaults(func=show)
