"""HERO's prompt relevance with and without reusing the tower's CLS (not run in CI).

A LLaVA-NeXT image of a 2x2 grid is 5 crops (thumbnail + 4 tiles) of 336². HERO needs, per
crop, the cosine between a CLIP image embedding and the prompt's text embedding. LLaVA's
vision tower IS CLIP ViT-L/14-336's image encoder, so the tower's last-layer CLS, which the
VLM computes anyway, only needs CLIP's post-layernorm and projection:

* slow path: a second ViT-L forward of the 5 crops through the scorer's image encoder;
* fast path: post-layernorm + projection of the reused CLS (text encoding in both).

The prompt's text embedding is cached per scorer, so the fast path is timed twice: with a
new prompt every call (the text tower runs) and with a repeated prompt (a cache hit, as
when one question is asked of many images). A batch of ``--batch`` images is scored with
one ``score_batch`` call (one text forward for all prompts, one head pass) and compared
with one ``score`` call per image.

Weights are random (same timing as the real ones). The VLM's tower is a separate
``CLIPVisionModel`` holding copies of the scorer's vision weights, as in a real LLaVA: the
scorer detects that the values are equal once (reported as the one-time check), then
reuses the decision. Runs are interleaved; the table shows medians.

    .venv/bin/python benchmarks/relevance.py --repeats 3            # CPU, ~2-3 min
    .venv/bin/python benchmarks/relevance.py --device cuda --dtype float16 --repeats 20
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from tokenprune.adapters.relevance import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    REUSED_TOWER_CLS,
    SCORER_FORWARD,
    HFClipScorer,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    OpCounter,
    base_parser,
    clip_vit_config,
    environment,
    interleaved,
    markdown_table,
    setup,
    timed,
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


def _models(crop: int, layers: int, text_layers: int, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any]:
    import transformers

    vision = clip_vit_config(1024, layers, crop, 14, hidden_act="quick_gelu")
    config = transformers.CLIPConfig(
        text_config={
            "vocab_size": 49408,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": text_layers,
            "num_attention_heads": 12,
            "max_position_embeddings": 77,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
            "hidden_act": "quick_gelu",
        },
        vision_config=vision.to_dict(),
        projection_dim=768,
    )
    torch.manual_seed(0)
    clip = transformers.CLIPModel(config).eval()
    tower = transformers.CLIPVisionModel(config.vision_config).eval()
    tower.load_state_dict(clip.vision_model.state_dict())
    return clip.to(device, dtype), tower.to(device, dtype)


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(
        __doc__.split("\n\n")[0],
        ("--crops", int, 5, "partitions of the image (5 = 2x2 grid + thumbnail)"),
        ("--crop-size", int, 336, "crop side in pixels"),
        ("--layers", int, 24, "vision blocks (24 = ViT-L; fewer for a smoke run)"),
        ("--text-layers", int, 12, "text blocks (12 = CLIP-L; fewer for a smoke run)"),
        ("--batch", int, 8, "images per batch for the score_batch row"),
    )
    args = parser.parse_args(argv)
    device, dtype = setup(args)

    clip, tower = _models(args.crop_size, args.layers, args.text_layers, dtype, device)
    scorer = HFClipScorer(clip, _OpenClipBpe(77))
    pixels = torch.randn(args.crops, 3, args.crop_size, args.crop_size).to(device, dtype)
    batch_pixels = pixels.repeat(args.batch, 1, 1, 1)
    stats = {"pixel_mean": OPENAI_CLIP_MEAN, "pixel_std": OPENAI_CLIP_STD}

    def tower_cls(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return tower(pixel_values=images).last_hidden_state[:, 0]  # what the tap records

    check_s, _, _ = timed(lambda: scorer.match_tower(tower), device)  # one-time, then cached
    cls, batch_cls = tower_cls(pixels), tower_cls(batch_pixels)
    calls = 0

    def fresh_prompt() -> str:  # a prompt the cache has not seen
        nonlocal calls
        calls += 1
        return f"{PROMPT} ({calls})"

    steps = {
        "tower": lambda: tower_cls(pixels),
        "slow": lambda: scorer.score(pixels, fresh_prompt(), **stats),
        "fast, new prompt": lambda: scorer.score(pixels, fresh_prompt(), **stats, tower=tower, tower_cls=cls),
        "fast, repeated prompt": lambda: scorer.score(pixels, PROMPT, **stats, tower=tower, tower_cls=cls),
        "batch: one score per image": lambda: [
            scorer.score(pixels, PROMPT, **stats, tower=tower, tower_cls=cls) for _ in range(args.batch)
        ],
        "batch: score_batch": lambda: scorer.score_batch(
            batch_pixels, [PROMPT] * args.batch, [args.crops] * args.batch, **stats, tower=tower,
            tower_cls=batch_cls,
        ),
    }
    samples = interleaved(steps, device, warmup=args.warmup, repeats=args.repeats)
    with torch.inference_mode():
        slow = scorer.score(pixels, PROMPT, **stats)
        assert scorer.last_path == SCORER_FORWARD
        fast = scorer.score(pixels, PROMPT, **stats, tower=tower, tower_cls=cls)
        assert scorer.last_path == REUSED_TOWER_CLS, scorer.last_reason
        repeated = OpCounter.of(steps["fast, repeated prompt"])
    med = {name: s.wall_median for name, s in samples.items()}
    gap = float((fast - slow).abs().max())

    print(f"\n{environment(device, dtype)}; {args.crops} crops of {args.crop_size}², {args.layers} vision blocks, "
          f"medians of {args.repeats} interleaved rounds\n")
    tower_ms = med["tower"]
    rows = [
        ["relevance only", f"{med['slow'] * 1e3:.1f}", f"{med['fast, new prompt'] * 1e3:.1f}",
         f"{med['fast, repeated prompt'] * 1e3:.2f}", f"{med['slow'] / med['fast, new prompt']:.1f}×",
         f"{med['slow'] / med['fast, repeated prompt']:.1f}×"],
        ["tower forward + relevance", f"{(tower_ms + med['slow']) * 1e3:.1f}",
         f"{(tower_ms + med['fast, new prompt']) * 1e3:.1f}", f"{(tower_ms + med['fast, repeated prompt']) * 1e3:.1f}",
         f"{(tower_ms + med['slow']) / (tower_ms + med['fast, new prompt']):.2f}×",
         f"{(tower_ms + med['slow']) / (tower_ms + med['fast, repeated prompt']):.2f}×"],
    ]
    print(markdown_table(["step (ms)", "scorer forward (slow)", "reused CLS, new prompt", "reused CLS, cached prompt",
                          "speed-up (new prompt)", "speed-up (cached prompt)"], rows))
    per_image, batched = med["batch: one score per image"], med["batch: score_batch"]
    print(
        f"\nBatch of {args.batch} images, one prompt: {per_image * 1e3:.2f} ms as {args.batch} score calls, "
        f"{batched * 1e3:.2f} ms as one score_batch ({per_image / batched:.1f}×).\n"
        f"Cached-prompt fast path per image: {repeated.kernels} kernels, {repeated.host_reads} device->host reads.\n"
        f"Tower forward alone: {tower_ms * 1e3:.1f} ms; one-time weight check (values compared, then cached per "
        f"tower): {check_s * 1e3:.1f} ms; max |fast - slow| = {gap:.2e}.\n"
        f"Target (tower + relevance, fast vs slow) ≥ 1.8×: "
        f"{(tower_ms + med['slow']) / (tower_ms + med['fast, repeated prompt']):.2f}× with the prompt cached, "
        f"{(tower_ms + med['slow']) / (tower_ms + med['fast, new prompt']):.2f}× with a new prompt."
    )


if __name__ == "__main__":
    main()
