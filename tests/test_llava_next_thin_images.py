"""Budget 1.0 + ``newline="row"`` is the stock LLaVA-NeXT input for every image size,
extreme aspect ratios included (issue 11.4: zero-width unpadded canvases)."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

import tokenprune as tp
from tokenprune.adapters.llava_next_partitioner import LlavaNextPartitioner
from tokenprune.tiny import tiny_llava_next

from .test_adapters_llava import fed_images, pooled

pytestmark = pytest.mark.compat  # also run against every supported transformers (make test-compat)


def _sizes(count: int, seed: int) -> list[tuple[int, int]]:
    """(height, width): random sizes, a third of them thinner than 1:12 either way."""
    rng = random.Random(seed)
    sizes = []
    for index in range(count):
        short = rng.randint(1, 24)
        if index % 3 == 0:  # long sides capped for CI time: what matters is the aspect ratio
            long = rng.randint(12 * short, min(60 * short, 400))
        else:
            long = rng.randint(short, 12 * short)
        sizes.append((long, short) if rng.random() < 0.5 else (short, long))
    return sizes


@pytest.fixture(scope="module")
def next_model():
    return tiny_llava_next(seed=3)


def test_zero_width_canvas_still_gets_the_stock_newlines(next_model):
    """2 x 24 px (width x height): the unpadded canvas has no column, the stock model
    feeds 49 thumbnail tokens + 7 newlines = 56."""
    model, processor = next_model
    geometry = LlavaNextPartitioner.from_model(model).geometry((24, 2))
    assert geometry.kept_shape[1] == 0 and geometry.newline_only_rows == geometry.kept_shape[0] > 0
    image = Image.new("RGB", (2, 24), (200, 10, 30))
    pipe = tp.Pipeline(adapter="llava_next", allocator="equal", selector="cls_final", budget=1.0, newline="row")
    ours = pipe.prepare(model, processor, images=image, text="<image> thin")
    stock = processor(images=image, text="<image> thin", return_tensors="pt")
    assert torch.equal(ours["input_ids"], stock["input_ids"])
    assert pipe.last_stats[0].image_tokens == pipe.last_stats[0].stock_image_tokens == 56


@pytest.mark.parametrize("seed", range(4))
def test_full_budget_with_row_newlines_is_the_stock_input_for_random_sizes(next_model, seed):
    model, processor = next_model
    sizes = _sizes(20, seed)
    generator = torch.Generator().manual_seed(seed)
    images = [
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8).numpy())
        for h, w in sizes
    ]
    texts = ["<image> look"] * len(images)
    pipe = tp.Pipeline(adapter="llava_next", allocator="equal", selector="cls_final", budget=1.0, newline="row")
    ours = pipe.prepare(model, processor, images=images, text=texts)
    stock = processor(images=images, text=texts, return_tensors="pt", padding=True, padding_side="left")
    assert torch.equal(ours["input_ids"], stock["input_ids"]), sizes
    with torch.inference_mode():
        expected = pooled(model.model.get_image_features(stock["pixel_values"], stock["image_sizes"]))
    for size, mine, theirs in zip(sizes, fed_images(model, ours), expected):
        assert mine.shape == theirs.shape, size
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6, msg=lambda m: f"{size}: {m}")
