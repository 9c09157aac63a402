"""Benchmark: what ``Pipeline.prepare`` costs before the LLM, next to the stock path (issue 12, item 5).

Both paths are timed up to the LLM's ``inputs_embeds`` — the model's own forward runs and
is stopped by a pre-hook on its language model, so the packing of image embeddings into
the prompt is the model's code on both sides:

* ``stock``: ``processor(images, text)`` then ``model.model(**stock)``: embeddings of the
  prompt, ``get_image_features`` (the tower, unpadding/newlines for LLaVA-NeXT) and the
  scatter into the placeholders;
* ``A+S``: ``pipe.prepare(model, processor, images, text)`` (processor, tower with the
  tap, allocation, selection, projection, tokenization) then ``model.model(**prepared)``
  (prompt embeddings and the scatter of the pruned embeddings).

On the tiny models (``tokenprune.tiny``) at 1 CPU thread the tower is cheap, so the
difference is prepare's fixed overhead: the target is ≤ 1 ms of CPU time over stock. The
second table counts the aten operators ``prepare`` dispatches (``count_dispatch``,
noise-free) for one image and for a batch of 8 images of mixed sizes (target ≤ 2×), and
its host reads outside validation mode::

    .venv/bin/python benchmarks/prepare_overhead.py                 # CPU, ~1-2 minutes
    .venv/bin/python benchmarks/prepare_overhead.py --repeats 200   # steadier medians
    .venv/bin/python benchmarks/prepare_overhead.py --profile equal # + cProfile of prepare
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

import tokenprune as tp
from tokenprune.testing import count_dispatch
from tokenprune.tiny import tiny_llava, tiny_llava_next

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, environment, markdown_table, rotated

#: (allocator, selector) pairs measured; both non-adaptive.
PAIRS = (("equal", "cls_final"), ("hired", "cls_final"))
#: Targets (issue 12, item 5).
OVERHEAD_TARGET_MS = 1.0
BATCH_RATIO_TARGET = 2.0
#: (width, height) of the one image, and of the batch of 8 (mixed LLaVA-NeXT grids).
ONE_IMAGE = (90, 50)
BATCH_IMAGES = ((90, 50), (40, 130), (100, 100), (160, 50), (50, 160), (64, 48), (70, 120), (120, 60))


def picture(width: int, height: int, seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def chat(processor: Any, question: str = "What is in the image?") -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


class _Stop(Exception):
    """Raised by the language model's pre-hook: everything before the LLM has run."""


class UpToLLM:
    """Runs ``model.model(**inputs)`` up to the language model's input (its pre-hook raises)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.embeds: torch.Tensor | None = None
        model.model.language_model.register_forward_pre_hook(self._stop, with_kwargs=True)

    def _stop(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        self.embeds = kwargs.get("inputs_embeds")
        raise _Stop

    def __call__(self, inputs: dict[str, Any]) -> torch.Tensor:
        kwargs = {k: v for k, v in inputs.items() if not (k == "input_ids" and "inputs_embeds" in inputs)}
        try:
            self.model.model(**kwargs)
        except _Stop:
            pass
        assert self.embeds is not None
        return self.embeds


def thread_cpu(fn: Callable[[], Any]) -> float:
    start = time.thread_time()
    fn()
    return time.thread_time() - start


def measure(calls: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """CPU seconds of each call per round, rounds rotated, after ``warmup`` untimed rounds."""
    samples: dict[str, list[float]] = {key: [] for key in calls}
    with torch.inference_mode():
        for round_index in range(warmup + repeats):
            for key in rotated(list(calls), round_index):
                spent = thread_cpu(calls[key])
                if round_index >= warmup:
                    samples[key].append(spent)
    return samples


def family_calls(name: str, model: Any, processor: Any, images: list[Any], texts: list[str], budget: float) -> dict[str, Callable[[], Any]]:
    run = UpToLLM(model)
    adapter = "llava_next" if name == "LLaVA-NeXT" else "llava"

    def stock() -> Any:
        inputs = processor(images=images, text=texts, return_tensors="pt", padding=True, padding_side="left")
        return run(dict(inputs))

    calls: dict[str, Callable[[], Any]] = {"stock": stock}
    for allocator, selector in PAIRS:
        pipe = tp.Pipeline(adapter=adapter, allocator=allocator, selector=selector, budget=budget)
        calls[f"{allocator}+{selector}"] = lambda p=pipe: run(p.prepare(model, processor, images=images, text=texts))
    return calls


def op_counts(adapter: str, model: Any, processor: Any, pairs: tuple[tuple[str, str], ...], budget: float) -> list[tuple[str, Any, Any]]:
    one_images = [picture(*ONE_IMAGE, seed=0)]
    batch_images = [picture(w, h, seed=i) for i, (w, h) in enumerate(BATCH_IMAGES)]
    rows = []
    for allocator, selector in pairs:
        pipe = tp.Pipeline(adapter=adapter, allocator=allocator, selector=selector, budget=budget)
        counts = []
        for images in (one_images, batch_images):
            texts = [chat(processor)] * len(images)
            with torch.inference_mode():
                pipe.prepare(model, processor, images=images, text=texts)  # warm caches
                with count_dispatch() as count:
                    pipe.prepare(model, processor, images=images, text=texts)
            counts.append(count)
        rows.append((f"{allocator}+{selector}", counts[0], counts[1]))
    return rows


def profile(model: Any, processor: Any, pair: tuple[str, str], budget: float, batch: int) -> None:
    pipe = tp.Pipeline(adapter="llava_next", allocator=pair[0], selector=pair[1], budget=budget)
    images = [picture(w, h, seed=i) for i, (w, h) in enumerate(BATCH_IMAGES[:batch])]
    texts = [chat(processor)] * batch
    with torch.inference_mode():
        for _ in range(3):
            pipe.prepare(model, processor, images=images, text=texts)
        profiler = cProfile.Profile(time.thread_time)
        profiler.enable()
        for _ in range(50):
            pipe.prepare(model, processor, images=images, text=texts)
        profiler.disable()
    print(f"\n### cProfile of 50 prepare calls ({pair[0]}+{pair[1]}, {batch} image(s)), thread CPU time\n")
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(45)
    with count_dispatch() as count:
        pipe.prepare(model, processor, images=images, text=texts)
    print(f"ops {count.ops}, host reads {count.reads}: {count.read_names}")


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(
        __doc__.splitlines()[0],
        ("--budget", float, 0.2, "fraction of each image's tokens kept"),
        ("--profile", str, "", "also cProfile prepare for this allocator ('equal' or 'hired')"),
        ("--profile-batch", int, 1, "images per profiled prepare call"),
        repeats=50,
        warmup=5,
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or 1)
    if args.device != "cpu":
        raise SystemExit("this benchmark measures CPU time on the tiny models: run it with --device cpu")
    families = {"LLaVA-NeXT": tiny_llava_next(seed=1), "LLaVA-1.5": tiny_llava(seed=2)}
    print(f"{environment(torch.device('cpu'), torch.float32)}; tiny models (tokenprune.tiny), budget {args.budget:g}")
    print(f"{args.repeats} timed rounds after {args.warmup} warm-up rounds, thread CPU time, order rotated each round\n")

    time_rows = []
    for name, (model, processor) in families.items():
        images = [picture(*ONE_IMAGE, seed=0)]
        texts = [chat(processor)]
        samples = measure(family_calls(name, model, processor, images, texts, args.budget), args.warmup, args.repeats)
        stock = samples.pop("stock")
        stock_ms, stock_min = statistics.median(stock) * 1e3, min(stock) * 1e3
        for pair, values in samples.items():
            ms, low = statistics.median(values) * 1e3, min(values) * 1e3
            over = ms - stock_ms
            met = "yes" if over <= OVERHEAD_TARGET_MS else "no"
            time_rows.append(
                (name, pair, f"{stock_ms:.2f}", f"{ms:.2f}", f"{over:+.2f} (≤ {OVERHEAD_TARGET_MS:g}) {met}",
                 f"{ms / stock_ms:.2f}×", f"{stock_min:.2f} / {low:.2f} ({low - stock_min:+.2f})")
            )
    print("### CPU time up to the LLM's inputs_embeds, one image, 1 thread (median, ms; min in the last column)\n")
    print(markdown_table(
        ["model", "pipeline", "stock", "prepare", "prepare − stock (target)", "÷ stock", "min: stock / prepare (diff)"],
        time_rows, left=2,
    ))

    op_rows = []
    for name, (model, processor) in families.items():
        adapter = "llava_next" if name == "LLaVA-NeXT" else "llava"
        for pair, one, batch in op_counts(adapter, model, processor, PAIRS, args.budget):
            ratio = batch.ops / one.ops
            met = "yes" if ratio <= BATCH_RATIO_TARGET else "no"
            op_rows.append((name, pair, one.ops, batch.ops, f"{ratio:.2f}× (≤ {BATCH_RATIO_TARGET:g}×) {met}", f"{one.reads} / {batch.reads}"))
    print(f"\n### Dispatched aten ops of prepare, 1 image vs a batch of {len(BATCH_IMAGES)} mixed sizes\n")
    print(markdown_table(["model", "pipeline", "ops, 1 image", "ops, 8 images", "8 ÷ 1 (target)", "host reads 1 / 8 (DESIGN: ≤ 1 per batch)"], op_rows, left=2))

    if args.profile:
        pair = next(p for p in PAIRS if p[0] == args.profile)
        profile(*families["LLaVA-NeXT"], pair, args.budget, args.profile_batch)


if __name__ == "__main__":
    main()
