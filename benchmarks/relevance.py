"""HERO's prompt relevance with and without reusing the tower's CLS (not run in CI).

A LLaVA-NeXT image of a 2x2 grid is 5 crops (thumbnail + 4 tiles) of 336². HERO needs, per
crop, the cosine between a CLIP image embedding and the prompt's text embedding. LLaVA's
vision tower IS CLIP ViT-L/14-336's image encoder, so the tower's last-layer CLS, which the
VLM computes anyway, only needs CLIP's post-layernorm and projection:

* slow path: a second ViT-L forward of the 5 crops through the scorer's image encoder;
* fast path: post-layernorm + projection of the reused CLS (text encoding in both).

Weights are random (same timing as the real ones). The VLM's tower is a separate
``CLIPVisionModel`` holding copies of the scorer's vision weights, as in a real LLaVA: the
scorer detects that the values are equal once (reported as the one-time check), then
reuses the decision. Runs are interleaved; the table shows medians.

    .venv/bin/python benchmarks/relevance.py --repeats 3            # CPU, ~2-3 min
    .venv/bin/python benchmarks/relevance.py --device cuda --dtype float16 --repeats 20
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from tokenprune.adapters.relevance import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    REUSED_TOWER_CLS,
    SCORER_FORWARD,
    HFClipScorer,
)

PROMPT = "What is written on the red sign next to the bus stop, and which way does the arrow point?"


class _OpenClipBpe:
    """OpenAI's CLIP BPE (bundled with open_clip, so no download) behind a transformers-style call."""

    def __init__(self, context_length: int) -> None:
        from open_clip import SimpleTokenizer

        self._tokenizer = SimpleTokenizer(context_length=context_length)

    def __call__(
        self, texts: list[str], *, max_length: int, **_: Any
    ) -> dict[str, torch.Tensor]:
        ids = self._tokenizer(texts, context_length=max_length)
        length = int(
            (ids != 0).sum(dim=1).max()
        )  # drop the padding, as a transformers tokenizer would
        return {"input_ids": ids[:, :length]}


def _models(crop: int, layers: int, dtype: torch.dtype, device: str) -> tuple[Any, Any]:
    import transformers

    config = transformers.CLIPConfig(
        text_config={
            "vocab_size": 49408,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "max_position_embeddings": 77,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
            "hidden_act": "quick_gelu",
        },
        vision_config={
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": layers,
            "num_attention_heads": 16,
            "image_size": crop,
            "patch_size": 14,
            "hidden_act": "quick_gelu",
        },
        projection_dim=768,
    )
    torch.manual_seed(0)
    clip = transformers.CLIPModel(config).eval()
    tower = transformers.CLIPVisionModel(config.vision_config).eval()
    tower.load_state_dict(clip.vision_model.state_dict())
    return clip.to(device, dtype), tower.to(device, dtype)


def _timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "float16", "bfloat16"]
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--crops",
        type=int,
        default=5,
        help="partitions of the image (5 = 2x2 grid + thumbnail)",
    )
    parser.add_argument("--crop-size", type=int, default=336)
    parser.add_argument(
        "--layers",
        type=int,
        default=24,
        help="vision blocks (24 = ViT-L; fewer for a smoke run)",
    )
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    clip, tower = _models(args.crop_size, args.layers, dtype, args.device)
    scorer = HFClipScorer(clip, _OpenClipBpe(77))
    pixels = torch.randn(
        args.crops, 3, args.crop_size, args.crop_size, device=args.device, dtype=dtype
    )
    stats = {"pixel_mean": OPENAI_CLIP_MEAN, "pixel_std": OPENAI_CLIP_STD}

    def tower_forward() -> torch.Tensor:
        with torch.inference_mode():
            return tower(pixel_values=pixels).last_hidden_state[
                :, 0
            ]  # what the tap records

    check_s, _ = _timed(
        lambda: scorer.match_tower(tower), args.device
    )  # one-time, then cached
    cls = tower_forward()  # warm-up
    scorer.score(pixels, PROMPT, **stats)
    times: dict[str, list[float]] = {"tower": [], "slow": [], "fast": []}
    fast_scores = slow_scores = None
    for _ in range(args.repeats):
        t, cls = _timed(tower_forward, args.device)
        times["tower"].append(t)
        t, slow_scores = _timed(
            lambda: scorer.score(pixels, PROMPT, **stats), args.device
        )
        assert scorer.last_path == SCORER_FORWARD
        times["slow"].append(t)
        t, fast_scores = _timed(
            lambda cls=cls: scorer.score(
                pixels, PROMPT, **stats, tower=tower, tower_cls=cls
            ),
            args.device,
        )
        assert scorer.last_path == REUSED_TOWER_CLS, scorer.last_reason
        times["fast"].append(t)
    assert fast_scores is not None and slow_scores is not None
    gap = float((fast_scores - slow_scores).abs().max())
    med = {k: statistics.median(v) for k, v in times.items()}

    print(
        f"device={args.device} dtype={args.dtype} crops={args.crops}x{args.crop_size}² vision blocks={args.layers} "
        f"repeats={args.repeats} threads={torch.get_num_threads()}"
    )
    print()
    print("| step | scorer forward (slow) | reused tower CLS (fast) | speed-up |")
    print("|---|---:|---:|---:|")
    print(
        f"| relevance only | {med['slow'] * 1e3:.1f} ms | {med['fast'] * 1e3:.1f} ms | {med['slow'] / med['fast']:.1f}× |"
    )
    whole_slow, whole_fast = med["tower"] + med["slow"], med["tower"] + med["fast"]
    print(
        f"| tower forward + relevance | {whole_slow * 1e3:.1f} ms | {whole_fast * 1e3:.1f} ms "
        f"| {whole_slow / whole_fast:.2f}× |"
    )
    print()
    print(
        f"tower forward alone: {med['tower'] * 1e3:.1f} ms; one-time weight check (values compared, "
        f"then cached per tower): {check_s * 1e3:.1f} ms; max |fast - slow| = {gap:.2e}"
    )


if __name__ == "__main__":
    main()
