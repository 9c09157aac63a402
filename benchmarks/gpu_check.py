"""GPU check in one call: every built-in strategy through ``prepare`` + ``generate`` on the tiny
models (LLaVA-NeXT: one image, then a 3-image batch, then ``attach``; Qwen2.5-VL: the
received-attention / key strategies) in float32, float16 and bfloat16, then the CUDA-only
tests (no host sync in the hot path and in the tap's capture). Prints one line per case and
exits non-zero if any failed. On a CPU-only machine it runs float32 only and the CUDA tests skip::

    .venv/bin/python benchmarks/gpu_check.py            # also run by benchmarks/gpu.sh
    .venv/bin/python benchmarks/gpu_check.py --no-tests
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import traceback
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

import tokenprune as tp
from tokenprune.tiny import tiny_llava_next, tiny_qwen2_5_vl

LLAVA_PAIRS = [("hired", "cls_final"), ("hero", "hero"), ("equal", "spatial"), ("equal", "prumerge"),
               ("equal", "prumerge_plus"), ("equal", "dart"), ("equal", "hero"), ("hired@reference", "cls_final"),
               ("hero@reference", "hero@reference"), ("equal", "prumerge@reference")]
QWEN_SELECTORS = ("dart", "spatial", "attention_received")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-tests", action="store_true", help="skip the CUDA pytest step")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = (torch.float32, torch.float16, torch.bfloat16) if device == "cuda" else (torch.float32,)
    rng = np.random.default_rng(0)
    results = {"ok": 0, "failed": 0}

    def image(height: int, width: int) -> Image.Image:
        return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))

    def case(name: str, fn: Callable[[], None]) -> None:
        start = time.perf_counter()
        try:
            fn()
            results["ok"] += 1
            print(f"ok   {name} ({time.perf_counter() - start:.2f} s)", flush=True)
        except Exception:  # noqa: BLE001 -- report every case, then fail at the end
            results["failed"] += 1
            print(f"FAIL {name}\n{traceback.format_exc(limit=6)}", flush=True)

    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {device} ({name})", flush=True)
    one = "USER: <image>\nWhat? ASSISTANT:"
    two = ["USER: <image>\nOne? ASSISTANT:", "USER: <image>\n<image>\nTwo? ASSISTANT:"]
    for dtype in dtypes:
        model, processor = tiny_llava_next(0)
        model = model.to(device, dtype)
        images = [image(90, 60), image(50, 130), image(70, 70)]
        for allocator, selector in LLAVA_PAIRS:
            # HERO's allocator without a relevance scorer (none offline): visual term only
            options = {"saliency_weight": 1.0} if allocator.startswith("hero") else None
            pipe = tp.Pipeline(adapter="llava_next", allocator=allocator, selector=selector, budget=0.3,
                               allocator_options=options)

            def llava(pipe: tp.Pipeline = pipe) -> None:
                inputs = pipe.prepare(model, processor, images=images[0], text=one)
                model.generate(**inputs, max_new_tokens=3, do_sample=False)
                inputs = pipe.prepare(model, processor, images=images, text=two)
                model.generate(**inputs, max_new_tokens=3, do_sample=False)
                if pipe.adaptive or not pipe.allocator.exact:
                    return  # attach needs fixed counts (Pipeline.attach says so)
                with pipe.attach(model, processor):
                    stock = processor(images=images[0], text=one, return_tensors="pt").to(device)
                    model.generate(**stock, max_new_tokens=3, do_sample=False)

            case(f"llava_next {allocator}+{selector} {dtype}", llava)
        qwen, qwen_processor = tiny_qwen2_5_vl(0)
        qwen = qwen.to(device, dtype)
        content = [{"type": "image"}, {"type": "text", "text": "What?"}]
        text = qwen_processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        for selector in QWEN_SELECTORS:
            pipe = tp.Pipeline(adapter="qwen2_5_vl", allocator="equal", selector=selector, budget=0.25)

            def qwen_run(pipe: tp.Pipeline = pipe) -> None:
                inputs = pipe.prepare(qwen, qwen_processor, images=image(64, 96), text=text)
                qwen.generate(**inputs, max_new_tokens=3, do_sample=False)

            case(f"qwen2_5_vl equal+{selector} {dtype}", qwen_run)
    if not args.no_tests:
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_sync_free.py",
                   "-k", "cuda", "-rs"]
        print("$ " + " ".join(command[1:]), flush=True)
        rc = subprocess.call(command)
        results["ok" if rc == 0 else "failed"] += 1
        print(f"{'ok  ' if rc == 0 else 'FAIL'} CUDA tests (exit {rc})", flush=True)
    print(f"{results['ok']} passed, {results['failed']} failed", flush=True)
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
