"""Benchmark: LLaVA-NeXT end to end, pruned vs full, on a proxy with LLaVA-NeXT-7B's proportions.

LLaVA-NeXT-7B cannot run here (no weights, no GPU), so a real
``LlavaNextForConditionalGeneration`` with random weights stands in for it. The proxy
keeps what decides the speed-ups:

* the token counts: 336-px crops of 14-px patches (24 x 24 = 576 tokens, 577 with CLS),
  the llava-v1.6 grid pinpoints, a 672 x 672 image cut into a 2 x 2 grid + thumbnail: 2,880
  image tokens (2,928 with the stock model's 48 row newlines) and a ~60-token prompt;
* the vision / LLM FLOP ratio: ViT-L/14-336 on 5 x 577 tokens vs Vicuna-7B's prefill
  (tokenprune/cost.py) is about 4.4 %; the proxy's tower (24 blocks, width
  ``--vision-width``) and LLM (width ``--llm-width``, depth chosen to match) keep it.

Variants, interleaved (order rotated every round) after warm-up rounds:

* ``stock``: ``processor(images, text)`` then ``model(**stock)`` (tower + packing + LLM);
* ``100 %``: ``Pipeline(adapter="llava_next", allocator="hired", selector="cls_final",
  budget=1.0, newline="row")``, exactly the stock model's input; the reference of every ratio;
* ``40 %``, ``20 %``, ``10 %``: the same pipeline at that budget (no newline tokens).

Measured per variant: LLM prefill (the language model's own forward, timed by hooks),
time to first token (prepare + the prefill call), decode tokens/s (a greedy loop from the
prefill's cache), KV-cache bytes (summed over the returned cache's tensors), and the peak
tensor memory of the prefill call (CUDA: ``max_memory_allocated``; CPU: the profiler's
allocation events, see :class:`PeakMemory`). Then the analytic FLOPs and KV cache of the
real 7B and 13B at the same token counts. Not run in CI::

    .venv/bin/python benchmarks/e2e.py                      # CPU, 2.5-4.5 minutes (load-dependent)
    .venv/bin/python benchmarks/e2e.py --device cuda --dtype float16 --repeats 10 \\
        --vision-width 1024 --llm-width 4096 --llm-layers 32  # the real shapes on a GPU
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import tokenprune as tp
from tokenprune.cost import KNOWN_LLMS, LLMShape, kv_cache_bytes, prefill_flops

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Samples, environment, markdown_table, rotated, sync, timed

#: ``image_grid_pinpoints`` of the llava-v1.6 checkpoints, as (height, width).
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
CROP_SIZE, PATCH_SIZE = 336, 14
VISION_LAYERS = 24
VICUNA_MLP_RATIO = 11008 / 4096
#: ~60 prompt tokens with the byte-level tokenizer and the Vicuna-style template.
QUESTION = "What is written on the red sign, and why?"
MiB = 2**20


# --------------------------------------------------------------------------- analytic


def vision_flops(crops: int, width: int, layers: int, *, mlp: int | None = None) -> int:
    """FLOPs of a CLIP ViT forward over ``crops`` crops of 336 px, 14-px patches (577 tokens).

    Per block ``8·n·d² + 4·n²·d + 4·n·d·m`` (q/k/v/o, scores and weighted sum, a two-matmul
    MLP), plus the patch embedding ``2·576·(3·14²)·d``; 2 FLOPs per multiply-add, as in
    tokenprune/cost.py.
    """
    n, d, m = (CROP_SIZE // PATCH_SIZE) ** 2 + 1, width, mlp or 4 * width
    block = 8 * n * d * d + 4 * n * n * d + 4 * n * d * m
    patches = 2 * (n - 1) * 3 * PATCH_SIZE * PATCH_SIZE * d
    return crops * (layers * block + patches)


def proxy_llm(width: int, layers: int) -> LLMShape:
    """A Llama of ``width`` with Vicuna's MLP ratio and 128-wide heads."""
    return LLMShape(
        hidden_size=width,
        intermediate_size=round(width * VICUNA_MLP_RATIO),
        num_layers=layers,
        num_attention_heads=max(1, width // 128),
    )


@dataclass(frozen=True)
class Proportions:
    """The FLOP budget of the real model and of the proxy chosen to match it."""

    full_tokens: int
    image_tokens: int
    crops: int
    real_vision: int
    real_llm: int
    proxy_vision: int
    proxy_llm_shape: LLMShape
    proxy_llm: int

    @property
    def real_ratio(self) -> float:
        return self.real_vision / self.real_llm

    @property
    def proxy_ratio(self) -> float:
        return self.proxy_vision / self.proxy_llm


def proportions(
    full_tokens: int, image_tokens: int, crops: int, vision_width: int, llm_width: int, llm_layers: int | None
) -> Proportions:
    """Match the proxy's vision/LLM FLOP ratio to LLaVA-NeXT-7B's at ``full_tokens``."""
    real_vision = vision_flops(crops, 1024, VISION_LAYERS)
    real_llm = prefill_flops(full_tokens, "vicuna-7b")
    proxy_vision = vision_flops(crops, vision_width, VISION_LAYERS)
    if llm_layers is None:
        per_layer = prefill_flops(full_tokens, proxy_llm(llm_width, 1))
        llm_layers = max(1, round(proxy_vision * real_llm / real_vision / per_layer))
    shape = proxy_llm(llm_width, llm_layers)
    return Proportions(
        full_tokens, image_tokens, crops, real_vision, real_llm, proxy_vision, shape, prefill_flops(full_tokens, shape)
    )


# --------------------------------------------------------------------------- the proxy


def build_processor() -> Any:
    """A ``LlavaNextProcessor`` at llava-v1.6 geometry with the byte-level tiny tokenizer."""
    import transformers
    from tokenprune.tiny import TINY_CHAT_TEMPLATE, tiny_tokenizer

    images = transformers.LlavaNextImageProcessor(
        size={"shortest_edge": CROP_SIZE},
        crop_size={"height": CROP_SIZE, "width": CROP_SIZE},
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
    )
    return transformers.LlavaNextProcessor(
        image_processor=images,
        tokenizer=tiny_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=TINY_CHAT_TEMPLATE,
    )


def build_proxy(
    processor: Any, vision_width: int, llm: LLMShape, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> Any:
    """A random ``LlavaNextForConditionalGeneration`` at LLaVA-NeXT geometry for ``processor``."""
    import transformers

    tokenizer = processor.tokenizer
    vision = transformers.CLIPVisionConfig(
        hidden_size=vision_width,
        intermediate_size=4 * vision_width,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=max(1, vision_width // 64),
        image_size=CROP_SIZE,
        patch_size=PATCH_SIZE,
    )
    text = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=llm.hidden_size,
        intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_attention_heads,
        num_key_value_heads=llm.num_attention_heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = transformers.LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=processor.image_token_id,
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(CROP_SIZE // PATCH_SIZE) ** 2,
    )
    # Built on the target device in the target dtype: a 7B-sized proxy never exists in float32 on the host.
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = transformers.LlavaNextForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval()


class LLMClock:
    """Times the language model's own forward (hooks), only while ``active``."""

    def __init__(self, model: Any, device: torch.device) -> None:
        self.device = device
        self.active = False
        self.last: tuple[float, float] = (0.0, 0.0)
        self._start: tuple[float, float] = (0.0, 0.0)
        language_model = model.model.language_model
        self._handles = [
            language_model.register_forward_pre_hook(self._before),
            language_model.register_forward_hook(self._after),
        ]

    def _before(self, *_: Any) -> None:
        if self.active:
            sync(self.device)
            self._start = (time.perf_counter(), time.process_time())

    def _after(self, *_: Any) -> None:
        if self.active:
            sync(self.device)
            self.last = (time.perf_counter() - self._start[0], time.process_time() - self._start[1])

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def cache_bytes(cache: Any) -> int:
    """Bytes held by a transformers cache's key and value tensors."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def greedy_decode(model: Any, logits: torch.Tensor, cache: Any, attention_mask: torch.Tensor, steps: int) -> None:
    """``steps`` greedy tokens, one forward each, continuing the prefill's cache."""
    token = logits[:, -1].argmax(dim=-1, keepdim=True)
    mask = attention_mask
    for _ in range(steps):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)


# --------------------------------------------------------------------------- memory


class PeakMemory:
    """Peak tensor memory of one call above what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before the call.
    CPU: torch keeps no CPU allocation statistics, so the call runs under the profiler with
    ``profile_memory=True``, and the peak is the largest running sum of its allocation
    events (frees count negative) in time order. Both count tensors only
    (not the allocator's cache, libraries' scratch buffers or the Python heap). The CPU
    path reads the profiler's event tree (``torch._C._profiler``, not a public API); when
    that is unavailable, memory is reported as not measured.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated during the prefill call minus memory allocated before it"
        return (
            "peak of the bytes of tensors allocated during the prefill call and still alive "
            "(torch profiler allocation events, profile_memory=True)"
        )

    def measure(self, fn: Callable[[], Any]) -> tuple[int | None, Any]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            result = fn()
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - base, result
        try:
            from torch._C._profiler import _EventType
            from torch.profiler import ProfilerActivity, profile
        except ImportError:
            return None, fn()
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
        try:
            nodes = list(prof.profiler.kineto_results.experimental_event_tree())
        except AttributeError:
            return None, result
        events: list[tuple[int, int]] = []
        while nodes:
            node = nodes.pop()
            nodes.extend(node.children)
            if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
                events.append((node.start_time_ns, int(node.extra_fields.alloc_size)))
        # The running sum of allocations (frees are negative) from the call's start; the
        # profiler's own running total carries over from earlier profiling sessions.
        live = peak = 0
        for _, size in sorted(events):
            live += size
            peak = max(peak, live)
        return peak, result


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler backend's start/stop lines (written to fd 2 from C++)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# --------------------------------------------------------------------------- variants


@dataclass
class Variant:
    """One way to get the model's inputs, and what was measured for it."""

    name: str
    prepare: Callable[[], dict[str, Any]]
    pipeline: tp.Pipeline | None = None
    image_tokens: int = 0
    prefill_length: int = 0
    kv_bytes: int = 0
    peak_bytes: int | None = None
    llm: Samples = field(default_factory=Samples)
    ttft: Samples = field(default_factory=Samples)
    decode: Samples = field(default_factory=Samples)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (every variant once each)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed rounds first (at least 1: it also measures KV cache and memory)"
    )
    parser.add_argument("--budgets", default="0.4,0.2,0.1", help="pruned budgets besides 100%% (fractions)")
    parser.add_argument("--new-tokens", type=int, default=8, help="greedy decode steps after the prefill")
    parser.add_argument("--image", default="672x672", help="image WIDTHxHEIGHT in pixels")
    parser.add_argument("--vision-width", type=int, default=128, help="proxy tower width (ViT-L: 1024)")
    parser.add_argument("--llm-width", type=int, default=2048, help="proxy LLM width (Vicuna-7B: 4096)")
    parser.add_argument(
        "--llm-layers", type=int, default=None, help="proxy LLM depth (default: matches the 7B vision/LLM FLOP ratio)"
    )
    parser.add_argument("--no-memory", action="store_true", help="do not measure peak memory")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    width_px, height_px = (int(v) for v in args.image.lower().split("x"))
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]

    from PIL import Image

    pixels = torch.randint(0, 256, (height_px, width_px, 3), generator=torch.Generator().manual_seed(0))
    image = Image.fromarray(pixels.to(torch.uint8).numpy())

    # The stock input of this image (same geometry and template as the real model) sets the
    # token count at which the proxy's vision/LLM FLOP ratio is matched to the 7B's.
    processor = build_processor()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    stock = processor(images=image, text=text, return_tensors="pt")
    stock_ids, crops = stock["input_ids"], int(stock["pixel_values"].shape[1])
    stock_image_tokens = int((stock_ids == processor.image_token_id).sum())
    plan = proportions(
        int(stock_ids.shape[1]), stock_image_tokens, crops, args.vision_width, args.llm_width, args.llm_layers
    )
    model = build_proxy(processor, args.vision_width, plan.proxy_llm_shape, device, dtype)

    def stock_inputs() -> dict[str, Any]:
        inputs = processor(images=image, text=text, return_tensors="pt")
        inputs = {k: v.to(device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        return inputs

    variants = [Variant("stock (processor + model)", stock_inputs)]
    for budget in [1.0, *budgets]:
        options = {"newline": "row"} if budget == 1.0 else {}
        pipe = tp.Pipeline(adapter="llava_next", allocator="hired", selector="cls_final", budget=budget, **options)
        label = f"{budget:.0%}" + (" (newline=row)" if budget == 1.0 else "")
        variants.append(
            Variant(label, lambda p=pipe: p.prepare(model, processor, images=image, text=text), pipeline=pipe)
        )
    reference = variants[1]

    clock = LLMClock(model, device)
    memory = PeakMemory(device)
    memory_measured = not args.no_memory
    start = time.perf_counter()
    # The first warm-up round also measures the KV cache and peak memory (untimed: the
    # profiler that counts CPU allocations slows the call down).
    warmup = max(1, args.warmup)
    with torch.inference_mode():
        for round_index in range(warmup + args.repeats):
            timing = round_index >= warmup
            for variant in rotated(variants, round_index):
                prepare_wall, prepare_cpu, inputs = timed(variant.prepare, device)

                def call(inputs: dict[str, Any] = inputs) -> Any:
                    return model(**inputs, use_cache=True, logits_to_keep=1)

                if round_index == 0:
                    peak, out = memory.measure(call) if memory_measured else (None, call())
                    variant.peak_bytes = peak
                    memory_measured = memory_measured and peak is not None
                    variant.kv_bytes = cache_bytes(out.past_key_values)
                    variant.prefill_length = int(inputs["input_ids"].shape[1])
                    variant.image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
                    prefill_wall = prefill_cpu = 0.0
                else:
                    clock.active = True
                    prefill_wall, prefill_cpu, out = timed(call, device)
                    clock.active = False

                def decode(out: Any = out, mask: torch.Tensor = inputs["attention_mask"]) -> None:
                    greedy_decode(model, out.logits, out.past_key_values, mask, args.new_tokens)

                decode_wall, decode_cpu, _ = timed(decode, device)
                if timing:
                    variant.llm.add(*clock.last)
                    variant.ttft.add(prepare_wall + prefill_wall, prepare_cpu + prefill_cpu)
                    variant.decode.add(decode_wall, decode_cpu)
                del out, inputs, call, decode  # the next variant must not share memory with this one
    clock.remove()
    elapsed = time.perf_counter() - start
    report(args, plan, variants, reference, memory.method if memory_measured else None, device, dtype, elapsed)


# --------------------------------------------------------------------------- report


def _ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}×" if reference else "-"


def report(
    args: argparse.Namespace,
    plan: Proportions,
    variants: list[Variant],
    reference: Variant,
    memory_method: str | None,
    device: torch.device,
    dtype: torch.dtype,
    elapsed: float,
) -> None:
    shape = plan.proxy_llm_shape
    print(f"\n{environment(device, dtype)}; timed part took {elapsed:.0f} s")
    print(
        f"\n### Proportions (FLOPs at the stock input of a {args.image} image: {plan.full_tokens} tokens = "
        f"{plan.image_tokens} image tokens, row newlines included, + {plan.full_tokens - plan.image_tokens} "
        "prompt tokens)\n"
    )
    rows = [
        [
            "LLaVA-NeXT-7B",
            f"ViT-L/14-336: width 1024, MLP 4096, 24 blocks, {plan.crops} crops",
            f"{plan.real_vision / 1e12:.3f} T",
            "Vicuna-7B: width 4096, MLP 11008, 32 layers",
            f"{plan.real_llm / 1e12:.2f} T",
            f"{plan.real_ratio:.2%}",
        ],
        [
            "proxy (this run)",
            f"width {args.vision_width}, MLP {4 * args.vision_width}, 24 blocks, {plan.crops} crops",
            f"{plan.proxy_vision / 1e12:.4f} T",
            (
                f"width {shape.hidden_size}, MLP {shape.intermediate_size}, "
                f"{shape.num_layers} layer{'s' if shape.num_layers != 1 else ''}, {shape.num_attention_heads} heads"
            ),
            f"{plan.proxy_llm / 1e12:.3f} T",
            f"{plan.proxy_ratio:.2%}",
        ],
    ]
    print(
        markdown_table(
            ["model", "vision tower (577 tokens per crop)", "vision FLOPs", "LLM", "LLM prefill FLOPs", "vision / LLM"],
            rows,
            left=2,
        )
    )

    print(
        f"\n### Measured on the proxy: medians of {args.repeats} interleaved rounds after {args.warmup} warm-up; "
        f"ratios to the 100 % row (= stock input)\n"
    )
    ref_llm, ref_ttft, ref_decode = reference.llm.wall_median, reference.ttft.wall_median, reference.decode.wall_median
    ref_peak = reference.peak_bytes
    rows = []
    for v in variants:
        decode_rate = args.new_tokens / v.decode.wall_median
        row = [
            v.name,
            v.image_tokens,
            v.prefill_length,
            f"{v.llm.wall_median * 1e3:.0f}",
            _ratio(ref_llm, v.llm.wall_median),
            _ratio(reference.llm.cpu_median, v.llm.cpu_median),
            f"{v.ttft.wall_median * 1e3:.0f}",
            f"{(v.ttft.wall_median - v.llm.wall_median) * 1e3:.0f}",
            _ratio(ref_ttft, v.ttft.wall_median),
            f"{decode_rate:.1f}",
            _ratio(ref_decode, v.decode.wall_median),
            f"{v.kv_bytes / MiB:.1f}",
            _ratio(v.kv_bytes, reference.kv_bytes),
        ]
        if memory_method:
            assert v.peak_bytes is not None and ref_peak is not None
            row += [f"{v.peak_bytes / MiB:.0f}", _ratio(v.peak_bytes, ref_peak)]
        rows.append(row)
    headers = [
        "variant",
        "image tokens",
        "prefill tokens",
        "LLM prefill (ms)",
        "prefill speed-up",
        "speed-up (CPU time)",
        "TTFT (ms)",
        "TTFT − LLM (ms)",
        "TTFT speed-up",
        "decode tok/s",
        "decode ×",
        "KV cache (MiB)",
        "KV ×",
    ]
    if memory_method:
        headers += ["peak memory (MiB)", "peak ×"]
    print(markdown_table(headers, rows))
    bytes_per_value = torch.finfo(dtype).bits // 8
    analytic_kv = kv_cache_bytes(reference.prefill_length, shape, bytes_per_value)
    print(
        f"\nLLM prefill: the language model's forward (hooks), wall time. TTFT: prepare (stock: the processor) + "
        f"the prefill call (stock: tower + packing + LLM); TTFT − LLM is everything before the language model "
        f"(image processor, tower, strategies, projector, tokenizer). Decode: {args.new_tokens} greedy steps from the "
        f"prefill's cache. KV cache: bytes of the returned cache's tensors (analytic check for the 100 % row: "
        f"{analytic_kv / MiB:.1f} MiB). Peak memory: {memory_method or 'not measured'}."
    )

    print("\n### Analytic prefill cost of the real LLMs at the same token counts (tokenprune/cost.py, fp16 KV)\n")
    rows = []
    full_7b, full_13b = (prefill_flops(reference.prefill_length, llm) for llm in ("vicuna-7b", "vicuna-13b"))
    full_proxy = prefill_flops(reference.prefill_length, shape)
    kv_full = kv_cache_bytes(reference.prefill_length, "vicuna-7b")
    for v in variants[1:]:
        n = v.prefill_length
        f7, f13, fp, kv = (
            prefill_flops(n, "vicuna-7b"),
            prefill_flops(n, "vicuna-13b"),
            prefill_flops(n, shape),
            kv_cache_bytes(n, "vicuna-7b"),
        )
        rows.append(
            [
                v.name,
                n,
                f"{f7 / 1e12:.1f}",
                _ratio(full_7b, f7),
                f"{f13 / 1e12:.1f}",
                _ratio(full_13b, f13),
                _ratio(full_proxy, fp),
                f"{kv / MiB:.0f}",
                _ratio(kv, kv_full),
            ]
        )
    print(
        markdown_table(
            [
                "budget",
                "prefill tokens",
                "7B TFLOPs",
                "7B speed-up",
                "13B TFLOPs",
                "13B speed-up",
                "proxy speed-up (FLOPs)",
                "7B KV (MiB)",
                "KV ×",
            ],
            rows,
        )
    )
    print(
        f"\nHERO Table 4 check: Vicuna-7B prefill over 2,673 tokens = "
        f"{prefill_flops(2673, 'vicuna-7b') / 1e12:.1f} TFLOPs (paper: 38.4), over 583 = "
        f"{prefill_flops(583, 'vicuna-7b') / 1e12:.1f} (paper: 7.7); "
        f"13B at 2,673 = {prefill_flops(2673, KNOWN_LLMS['vicuna-13b']) / 1e12:.1f}."
    )

    twenty = next((v for v in variants if v.pipeline is not None and v.pipeline.budget.to_config() == 0.2), None)
    if twenty is not None:
        speedup = ref_llm / twenty.llm.wall_median
        kv_ratio = twenty.kv_bytes / reference.kv_bytes
        image_ratio = twenty.image_tokens / reference.image_tokens
        print(
            f"\nTargets at 20 %: LLM prefill {speedup:.2f}× faster than full "
            f"({'met' if speedup >= 4.5 else 'NOT met'}, target ≥ 4.5×; analytic 7B: "
            f"{full_7b / prefill_flops(twenty.prefill_length, 'vicuna-7b'):.2f}×); KV cache {kv_ratio:.3f}× "
            f"({'met' if kv_ratio <= 0.21 else 'NOT met'}, target ≤ 0.21×; image tokens alone "
            f"{image_ratio:.3f}×, the {twenty.prefill_length - twenty.image_tokens} prompt tokens are not pruned)."
        )


if __name__ == "__main__":
    main()
