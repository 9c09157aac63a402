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
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import tokenprune as tp
from tokenprune.cost import KNOWN_LLMS, LLMShape, kv_cache_bytes, prefill_flops

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    Samples,
    base_parser,
    clip_vit_config,
    environment,
    interleaved,
    markdown_table,
    quiet_stderr,
    rotated,
    setup,
    sync,
    timed,
)

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
    vision = clip_vit_config(vision_width, VISION_LAYERS, CROP_SIZE, PATCH_SIZE)
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
        self.keep_embeds = False  # keep the next forward's inputs_embeds (the LLM-only modes replay them)
        self.embeds: torch.Tensor | None = None
        self.last: tuple[float, float] = (0.0, 0.0)
        self._start: tuple[float, float] = (0.0, 0.0)
        language_model = model.model.language_model
        self._handles = [
            language_model.register_forward_pre_hook(self._before, with_kwargs=True),
            language_model.register_forward_hook(self._after),
        ]

    def _before(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if self.keep_embeds:
            self.embeds = kwargs.get("inputs_embeds")
            self.keep_embeds = False
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


_IDS = "_input_ids"  # kept beside inputs_embeds for the token counts, never passed to the model


def as_inputs_embeds(model: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """``prepare``'s output as ``inputs_embeds``: the pruned image embeddings scattered into the
    image-token positions, as the model does with ``mm_encoder_outputs``. Every transformers
    version accepts ``inputs_embeds``; ``mm_encoder_outputs`` is new in 5.18."""
    outputs = inputs.get("mm_encoder_outputs")
    if outputs is None:
        return inputs
    input_ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(input_ids)
    features = torch.cat(list(outputs["image"].pooler_output)).to(embeds.dtype)
    mask = (input_ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
    return {
        "inputs_embeds": embeds.masked_scatter(mask, features),
        "attention_mask": inputs["attention_mask"],
        _IDS: input_ids,
    }


def model_kwargs(inputs: dict[str, Any]) -> dict[str, Any]:
    """What the model's forward takes of ``inputs``."""
    return {key: value for key, value in inputs.items() if key != _IDS}


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
        with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
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
    embeds: torch.Tensor | None = None  # what the language model received (B = 1)
    llm: Samples = field(default_factory=Samples)
    ttft: Samples = field(default_factory=Samples)
    decode: Samples = field(default_factory=Samples)


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(
        __doc__.splitlines()[0],
        ("--budgets", str, "0.4,0.2,0.1", "pruned budgets besides 100%% (fractions)"),
        ("--new-tokens", int, 8, "greedy decode steps after the prefill"),
        ("--image", str, "672x672", "image WIDTHxHEIGHT in pixels"),
        ("--vision-width", int, 128, "proxy tower width (ViT-L: 1024)"),
        ("--llm-width", int, 2048, "proxy LLM width (Vicuna-7B: 4096)"),
        ("--llm-layers", int, None, "proxy LLM depth (default: matches the 7B vision/LLM FLOP ratio)"),
        ("--llm-modes", str, "eager,cudagraph", "LLM-only prefill modes: eager, cudagraph (CUDA only), compile"),
        ("--batch-sizes", str, "1,4,8", "images per call for the throughput rows (stock and 20%%); '' for none"),
    )
    parser.add_argument("--no-memory", action="store_true", help="do not measure peak memory")
    args = parser.parse_args(argv)
    device, dtype = setup(args)
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
            Variant(
                label,
                lambda p=pipe: as_inputs_embeds(model, p.prepare(model, processor, images=image, text=text)),
                pipeline=pipe,
            )
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
                    return model(**model_kwargs(inputs), use_cache=True, logits_to_keep=1)

                if round_index == 0:
                    clock.keep_embeds = True
                    peak, out = memory.measure(call) if memory_measured else (None, call())
                    variant.embeds = clock.embeds
                    variant.peak_bytes = peak
                    memory_measured = memory_measured and peak is not None
                    variant.kv_bytes = cache_bytes(out.past_key_values)
                    token_ids = inputs.get("input_ids", inputs.get(_IDS))
                    variant.prefill_length = int(token_ids.shape[1])
                    variant.image_tokens = int((token_ids == model.config.image_token_id).sum())
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
    modes = [m.strip() for m in args.llm_modes.split(",") if m.strip()]
    llm_only = measure_llm_only(model, variants, modes, args.warmup, args.repeats, device)
    sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    batch_budget = 0.2 if 0.2 in budgets else (budgets[0] if budgets else 1.0)
    throughput = measure_batches(model, processor, image, text, sizes, batch_budget, args, device, dtype)
    elapsed = time.perf_counter() - start
    report(args, plan, variants, reference, memory.method if memory_measured else None, device, dtype, elapsed)
    report_llm_only(llm_only, variants, reference)
    report_batches(throughput, batch_budget)
    report_ttft(variants)


# --------------------------------------------------------------------------- LLM-only modes


def _llm_runner(language_model: Any, embeds: torch.Tensor, mode: str, device: torch.device) -> Callable[[], Any]:
    """A call running the language model's prefill over ``embeds`` in ``mode`` (no cache)."""
    if mode == "eager":
        return lambda: language_model(inputs_embeds=embeds, use_cache=False)
    if mode == "compile":
        compiled = torch.compile(language_model, mode="max-autotune-no-cudagraphs", dynamic=False)
        return lambda: compiled(inputs_embeds=embeds, use_cache=False)
    if mode == "cudagraph":
        if device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        static = embeds.clone()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm up outside the graph (allocator, lazy inits)
            for _ in range(2):
                language_model(inputs_embeds=static, use_cache=False)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            language_model(inputs_embeds=static, use_cache=False)
        return graph.replay
    raise ValueError(f"unknown LLM mode {mode!r}; use eager, cudagraph or compile")


def measure_llm_only(
    model: Any, variants: list[Variant], modes: list[str], warmup: int, repeats: int, device: torch.device
) -> dict[str, dict[str, Samples] | str]:
    """Per mode: the LLM prefill of every variant's own inputs_embeds (B = 1), interleaved;
    a mode that fails on this torch/transformers/device is reported with why, not raised."""
    language_model = model.model.language_model
    results: dict[str, dict[str, Samples] | str] = {}
    with torch.inference_mode():
        for mode in modes:
            try:
                runners = {v.name: _llm_runner(language_model, v.embeds, mode, device) for v in variants}
                results[mode] = interleaved(runners, device, warmup=warmup, repeats=repeats)
            except Exception as error:  # noqa: BLE001  (a mode a version lacks is reported, not fatal)
                results[mode] = f"unavailable: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
            finally:
                runners = {}
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    torch.cuda.empty_cache()
    return results


def report_llm_only(results: dict[str, dict[str, Samples] | str], variants: list[Variant], reference: Variant) -> None:
    print(
        "\n### LLM prefill alone, per mode (the language model over each variant's own inputs_embeds, batch 1, "
        "no cache; `cudagraph` replays one captured CUDA graph per input length: no per-launch overhead)\n"
    )
    modes = list(results)
    rows = []
    for v in variants:
        row: list[object] = [v.name, v.prefill_length]
        for mode in modes:
            samples = results[mode]
            if isinstance(samples, str):
                row += ["-", "-"]
                continue
            row += [
                f"{samples[v.name].wall_median * 1e3:.1f}",
                _ratio(samples[reference.name].wall_median, samples[v.name].wall_median),
            ]
        rows.append(row)
    headers = ["variant", "prefill tokens"]
    for mode in modes:
        headers += [f"{mode} (ms)", f"{mode} speed-up"]
    print(markdown_table(headers, rows))
    for mode in modes:
        if isinstance(results[mode], str):
            print(f"\n{mode}: {results[mode]}")


# --------------------------------------------------------------------------- batches


def measure_batches(
    model: Any,
    processor: Any,
    image: Any,
    text: str,
    sizes: list[int],
    budget: float,
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[tuple[str, int], Samples]:
    """Time to first token of a call on ``B`` copies of the image, stock vs pruned, interleaved."""
    pipe = tp.Pipeline(adapter="llava_next", allocator="hired", selector="cls_final", budget=budget)

    def stock(batch: int) -> dict[str, Any]:
        inputs = processor(images=[image] * batch, text=[text] * batch, return_tensors="pt", padding=True)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        return inputs

    def pruned(batch: int) -> dict[str, Any]:
        return as_inputs_embeds(model, pipe.prepare(model, processor, images=[image] * batch, text=[text] * batch))

    calls = {(name, b): (lambda f=f, b=b: model(**model_kwargs(f(b)), use_cache=True, logits_to_keep=1))
             for b in sizes for name, f in (("stock", stock), (f"{budget:.0%}", pruned))}
    return interleaved(calls, device, warmup=args.warmup, repeats=args.repeats)


def report_batches(samples: dict[tuple[str, int], Samples], budget: float) -> None:
    if not samples:
        return
    print(f"\n### Batches: B copies of the image per call, TTFT (processor or prepare + prefill), stock vs {budget:.0%}\n")
    rows = []
    for (name, batch), times in samples.items():
        stock = samples[("stock", batch)].wall_median
        rows.append([name, batch, f"{times.wall_median * 1e3:.0f}", f"{batch / times.wall_median:.1f}",
                     _ratio(stock, times.wall_median)])
    print(markdown_table(["variant", "images per call", "TTFT (ms)", "images/s", "speed-up vs stock"], rows, left=2))


def report_ttft(variants: list[Variant]) -> None:
    """The headline lines: TTFT and its part before the LLM, pruned vs stock."""
    stock = variants[0]
    stock_ttft, stock_pre = stock.ttft.wall_median, stock.ttft.wall_median - stock.llm.wall_median
    lines = []
    for v in variants[2:]:
        pre = v.ttft.wall_median - v.llm.wall_median
        lines.append(
            f"- {v.name}: TTFT {_ratio(stock_ttft, v.ttft.wall_median)} faster than stock "
            f"({v.ttft.wall_median * 1e3:.1f} vs {stock_ttft * 1e3:.1f} ms); TTFT − LLM (processor, tower, "
            f"strategies, projector) {pre * 1e3:.1f} ms vs stock {stock_pre * 1e3:.1f} ms "
            f"({'≤ stock: met' if pre <= stock_pre else 'over stock: NOT met'})"
        )
    print("\n### Time to first token, pruned vs stock (eager LLM)\n")
    print("\n".join(lines))


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
