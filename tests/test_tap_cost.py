"""What a tap's capture adds to the tower's own forward (issue 12 item 3): no host read
outside validation mode, and a bounded number of dispatched operators per recorded block,
so a hook on every block, a per-token loop or a per-block host read fails here."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

import tokenprune as tp
from tokenprune import testing as tpt
from tokenprune.adapters.taps import tap_for

DEPTH = 8
#: Operators one recorded block may add (measured: 11-12 HF/timm CLS row, ~27 open_clip
#: MultiheadAttention with every signal: its keys are re-projected), plus a constant.
PER_BLOCK, CONSTANT = 30, 4


def _count(fn) -> tpt.DispatchCount:  # type: ignore[no-untyped-def]
    fn()  # warm lazy caches (the tap's per-geometry scale matrix, capture plans)
    with torch.no_grad(), tp.validation(False), tpt.count_dispatch() as count:
        fn()
    return count


def _hf(_) -> tuple[nn.Module, object]:  # type: ignore[no-untyped-def]
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=DEPTH, num_attention_heads=4,
                              image_size=32, patch_size=8)
    tower = CLIPVisionModel._from_config(config, attn_implementation="sdpa").eval()
    pixels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return tower, lambda: tower(pixel_values=pixels)


def _timm(_) -> tuple[nn.Module, object]:  # type: ignore[no-untyped-def]
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    tower = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=DEPTH, num_heads=4, num_classes=0).eval()
    pixels = torch.randn(5, 3, 32, 32)
    return tower, lambda: tower.forward_features(pixels)


def _open_clip(_) -> tuple[nn.Module, object]:  # type: ignore[no-untyped-def]
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    tower = VisionTransformer(image_size=32, patch_size=8, width=64, layers=DEPTH, heads=4, mlp_ratio=2.0).eval()
    pixels = torch.randn(5, 3, 32, 32)
    return tower, lambda: tower(pixels)


NEEDS = {
    "cls_final": tp.Needs(cls_attention={-1}),
    "hired": tp.Needs(cls_attention={0, -2}),
    "prumerge": tp.Needs(wide_cls_attention={-1}, keys={-1}),
    "hero": tp.Needs(cls_attention={-1}, cls_embedding={-1}, keys={-1}),
}


@pytest.mark.parametrize("build", [_hf, _timm, _open_clip], ids=["transformers", "timm", "open_clip"])
@pytest.mark.parametrize("name", sorted(NEEDS))
def test_cls_tap_reads_nothing_and_adds_a_bounded_count_per_recorded_block(build, name) -> None:
    tower, forward = build(None)
    tap = tap_for(tower)
    needs = NEEDS[name]

    def tapped() -> None:
        with tap.capture(needs, feature_layer=-2):
            forward()

    plain, with_tap = _count(forward), _count(tapped)
    assert with_tap.reads == 0, with_tap.read_names
    blocks = len(needs.resolve(DEPTH).layers)
    added = with_tap.ops - plain.ops
    assert 0 < added <= PER_BLOCK * blocks + CONSTANT, (added, blocks)
    # a hook computing a row on every block would add at least DEPTH x the cheapest row
    assert added < 8 * DEPTH


def _qwen_inputs(name: str):  # type: ignore[no-untyped-def]
    import numpy as np
    from PIL import Image

    from tokenprune.tiny import tiny_qwen2_5_vl, tiny_qwen2_vl

    model, processor = {"qwen2_5_vl": tiny_qwen2_5_vl, "qwen2_vl": tiny_qwen2_vl}[name](0)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((64, 96), (56, 56))]
    inputs = processor.image_processor(images, return_tensors="pt")
    tower = model.model.visual
    return tower, lambda: tower(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_tap_reads_the_grid_once_whatever_the_recorded_blocks(name) -> None:
    tower, forward = _qwen_inputs(name)
    tap = tap_for(tower)
    depth = len(tower.blocks)
    plain = _count(forward)
    extra = {}
    for label, needs in {
        "keys": tp.Needs(keys={1}),
        "received, one block": tp.Needs(received_attention={0}),
        "received, every block": tp.Needs(received_attention=set(range(depth))),
    }.items():

        def tapped(needs: tp.Needs = needs) -> None:
            with tap.capture(needs):
                forward()

        count = _count(tapped)
        extra[label] = collections.Counter(count.read_names) - collections.Counter(plain.read_names)
        assert count.ops - plain.ops <= 100 * len(needs.layers) + 30, (label, count.ops - plain.ops)
    # one read of the grid (the Qwen2.5-VL window index is then computed from the host copy);
    # received attention: the longest segment once per distinct cu_seqlens (full, windowed),
    # never once per block.
    windowed = name == "qwen2_5_vl"
    assert sum(extra["keys"].values()) <= 1 + (4 if windowed else 0), extra
    assert sum(extra["received, every block"].values()) <= sum(extra["keys"].values()) + 2, extra
