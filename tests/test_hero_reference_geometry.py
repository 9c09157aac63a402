"""The released HERO code's tile geometry on LLaVA-NeXT (issue 11.11): ``int()`` of the
scaled size and a valid region exactly that long, versus HF's unpadding, which keeps one
row more when the padding is odd; and its newline policy (one per canvas row)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import tokenprune as tp
from tokenprune.adapters.llava_next_partitioner import LlavaNextPartitioner
from tokenprune.tiny import tiny_llava_next

pytestmark = pytest.mark.compat  # also run against every supported transformers (make test-compat)

# LLaVA-NeXT (CLIP ViT-L/14-336): 24 x 24 tokens per crop, the released pinpoints.
PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def _capacity(size: tuple[int, int], rule: str) -> list[int]:
    partitioner = LlavaNextPartitioner(PINPOINTS, crop_size=336, patch_size=14, unpad_rule=rule)
    return partitioner.layout(size).capacity.tolist()


def test_2x2_grid_valid_counts_released_vs_hf():
    size = (690, 1000)  # (height, width): 2 x 2 grid, scaled height 33.12 token rows of 48
    assert _capacity(size, "reference") == [576, 408, 408, 384, 384]
    assert _capacity(size, "hf") == [576, 408, 408, 408, 408]


@pytest.mark.parametrize("size", [(430, 1440), (1440, 430)], ids=["1x3", "3x1"])
def test_1x3_and_3x1_grids_valid_counts_released_vs_hf(size):
    assert _capacity(size, "reference") == [576, 504, 504, 504]
    assert _capacity(size, "hf") == [576, 528, 528, 528]


def test_unknown_unpad_rule_is_a_config_error():
    with pytest.raises(tp.ConfigError, match="unpad_rule must be 'hf'"):
        LlavaNextPartitioner(PINPOINTS, crop_size=336, patch_size=14, unpad_rule="round")


def test_reference_geometry_and_canvas_newlines_on_the_adapter():
    model, processor = tiny_llava_next(seed=4)
    image = Image.new("RGB", (100, 69), (30, 120, 200))
    pipe = tp.Pipeline(
        adapter="llava_next", allocator="equal", selector="cls_final", budget=0.3, geometry="reference", newline="canvas"
    )
    inputs = pipe.prepare(model, processor, images=image, text="<image> what?")
    stats = pipe.last_stats[0]
    geometry = LlavaNextPartitioner.from_model(model, unpad_rule="reference").geometry((69, 100))
    assert pipe.adapter.partitioner(model).layout((69, 100)).capacity.tolist() == (
        LlavaNextPartitioner.from_model(model, unpad_rule="reference").layout((69, 100)).capacity.tolist()
    )
    assert stats.newline_tokens == geometry.canvas_shape[0]  # every canvas row, padding rows too
    assert stats.image_tokens == sum(stats.kept) + geometry.canvas_shape[0]
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == stats.image_tokens
    newline = model.model.image_newline.detach()
    if "inputs_embeds" in inputs:
        embeds = inputs["inputs_embeds"][0][inputs["input_ids"][0] == model.config.image_token_id]
    else:
        embeds = inputs["mm_encoder_outputs"]["image"].pooler_output[0]
    assert int((embeds == newline).all(dim=1).sum()) == geometry.canvas_shape[0]
    assert not bool((embeds[: stats.kept[0]] == newline).all(dim=1).any())
