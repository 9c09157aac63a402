"""Attention taps on tiny real towers (transformers CLIP/SigLIP, timm ViT, open_clip ViT).

Every tap output is checked against an independent reference: the eager attention maps
(``output_attentions`` / timm's unfused path / ``need_weights=True``), the towers' own
intermediate outputs, or a hand computation from a block's input.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

import tokenprune as tp
from tokenprune.adapters.taps import (
    CaptureBusyError,
    OpenClipVitTap,
    TimmVitTap,
    TransformersVisionTap,
    check_needs,
    tap_for,
)

pytestmark = pytest.mark.compat  # also run against every supported transformers (make test-compat)

WIDTH, HEADS, DEPTH, PATCH, IMAGE = 64, 4, 3, 8, 32
HEAD_DIM = WIDTH // HEADS
TOKENS = (IMAGE // PATCH) ** 2
LAYERS = (0, 1, -1)  # first, middle, negative
ATOL = 1e-5


def _pixels(batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=generator)


def _hook_snapshot(model: nn.Module) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    return {
        name: (tuple(module._forward_hooks), tuple(module._forward_pre_hooks))
        for name, module in model.named_modules()
    }


def _softmax_row(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Hand computation: ``query`` [B, H, hd], ``keys`` [B, H, L, hd] -> CLS row without column 0."""
    logits = (query[:, :, None, :] * keys).sum(-1) * scale
    return torch.softmax(logits, dim=-1)[..., 1:]


# --------------------------------------------------------------------------- towers


def _timm_vit(**overrides: object) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    options: dict[str, object] = dict(
        img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, num_classes=0
    )
    options.update(overrides)
    model = VisionTransformer(**options).eval()
    if overrides.get("qk_norm"):
        for block in model.blocks:  # non-trivial norms, so a tap reading pre-norm q/k would fail
            for norm in (block.attn.q_norm, block.attn.k_norm):
                nn.init.normal_(norm.weight, 1.0, 0.5)
                nn.init.normal_(norm.bias, 0.0, 0.5)
    return model


def _open_clip_tower_has(option: str) -> bool:
    """Whether open_clip's VisionTransformer takes ``option`` (qk_norm, scaled_cosine_attn: 3.x only)."""
    from open_clip.transformer import VisionTransformer

    return option in inspect.signature(VisionTransformer.__init__).parameters


def _open_clip_vit(**overrides: object) -> nn.Module:
    from open_clip.transformer import QuickGELU, VisionTransformer

    torch.manual_seed(0)
    options: dict[str, object] = dict(
        image_size=IMAGE, patch_size=PATCH, width=WIDTH, layers=DEPTH, heads=HEADS, mlp_ratio=2.0,
        act_layer=QuickGELU,
    )
    options.update(overrides)
    model = VisionTransformer(**options).eval()
    for block in model.transformer.resblocks:  # open_clip zero-inits in_proj_bias: make it count
        nn.init.normal_(block.attn.in_proj_bias, 0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def clip(hf_vision_tower) -> nn.Module:
    return hf_vision_tower()


@pytest.fixture(scope="module")
def clip_eager(clip: nn.Module, hf_vision_tower) -> nn.Module:
    eager = hf_vision_tower(attn="eager")
    eager.load_state_dict(clip.state_dict())
    return eager


ALL_NEEDS = tp.Needs(cls_attention=set(LAYERS), wide_cls_attention={1}, cls_embedding=set(LAYERS), keys={0, -1})


# --------------------------------------------------------------------------- transformers


def test_hf_cls_rows_equal_eager_attention_maps(clip: nn.Module, clip_eager: nn.Module) -> None:
    pixels = _pixels()
    with torch.no_grad():
        reference = clip_eager(pixel_values=pixels, output_attentions=True).attentions
        tap = tap_for(clip)
        with tap.capture(tp.Needs(cls_attention=set(LAYERS))) as record:
            clip(pixel_values=pixels)
    assert isinstance(tap, TransformersVisionTap) and tap.has_cls_token and tap.num_layers == DEPTH
    assert sorted(record.cls_attention) == [0, 1, DEPTH - 1]
    for layer in LAYERS:
        got = record.cls_attention[layer % DEPTH]
        assert got.shape == (2, HEADS, TOKENS) and got.dtype == torch.float32
        torch.testing.assert_close(got, reference[layer][:, :, 0, 1:], atol=ATOL, rtol=0)
        # softmax was over CLS too: each row misses exactly the CLS->CLS share
        torch.testing.assert_close(got.sum(-1), 1 - reference[layer][:, :, 0, 0], atol=ATOL, rtol=0)


def test_hf_outputs_are_bit_identical_with_the_tap(clip: nn.Module) -> None:
    pixels = _pixels()
    with torch.no_grad():
        plain = clip(pixel_values=pixels)
        with tap_for(clip).capture(ALL_NEEDS, feature_layer=-2):
            tapped = clip(pixel_values=pixels)
    assert torch.equal(plain.last_hidden_state, tapped.last_hidden_state)
    assert torch.equal(plain.pooler_output, tapped.pooler_output)


def test_hf_embeddings_features_keys_and_wide_head(clip: nn.Module) -> None:
    pixels = _pixels()
    with torch.no_grad():
        hidden = clip(pixel_values=pixels, output_hidden_states=True).hidden_states  # [embeddings, block 0, ...]
        with tap_for(clip).capture(ALL_NEEDS, feature_layer=-2) as record:
            clip(pixel_values=pixels)
        for layer in LAYERS:
            assert torch.equal(record.cls_embedding[layer % DEPTH], hidden[layer % DEPTH + 1][:, 0])
        assert torch.equal(record.features, hidden[-2][:, 1:])  # LLaVA's feature layer -2
        for layer in (0, -1):
            block = getattr(clip, "vision_model", clip).encoder.layers[layer]  # a wrapper before transformers 5.x
            keys = block.self_attn.k_proj(block.layer_norm1(hidden[layer % DEPTH]))
            torch.testing.assert_close(record.keys[layer % DEPTH], keys[:, 1:], atol=1e-6, rtol=0)
        # wide head by hand: one WIDTH-wide head, scale WIDTH ** -0.5
        block = getattr(clip, "vision_model", clip).encoder.layers[1]
        normed = block.layer_norm1(hidden[1])
        query = block.self_attn.q_proj(normed)[:, 0]
        keys = block.self_attn.k_proj(normed)
        wide = torch.softmax((keys @ query[:, :, None]).squeeze(-1) * WIDTH**-0.5, dim=-1)[:, None, 1:]
    torch.testing.assert_close(record.wide_cls_attention[1], wide, atol=ATOL, rtol=0)
    # the per-head row of the same block is a different quantity
    assert not torch.allclose(record.wide_cls_attention[1], record.cls_attention[1].mean(1, keepdim=True), atol=1e-3)


def test_signals_have_nonnegative_layers_and_depth(clip: nn.Module) -> None:
    with torch.no_grad(), tap_for(clip).capture(ALL_NEEDS, feature_layer=-2) as record:
        clip(pixel_values=_pixels(3))
    signals = record.signals(prompt="a cat")
    assert signals.num_layers == DEPTH and signals.num_partitions == 3
    assert sorted(signals.cls_attention) == [0, 1, 2]
    assert sorted(signals.keys) == [0, 2]
    torch.testing.assert_close(signals.attention(-1), signals.attention(2))
    assert signals.features.shape == (3, TOKENS, WIDTH)
    assert signals.partitions(slice(1, 2)).features.shape == (1, TOKENS, WIDTH)
    assert signals.prompt == "a cat"


def test_only_the_requested_blocks_are_hooked(clip: nn.Module) -> None:
    before = _hook_snapshot(clip)
    with tap_for(clip).capture(tp.Needs(cls_attention={1})):
        during = _hook_snapshot(clip)
    changed = sorted(name.removeprefix("vision_model.") for name in before if before[name] != during[name])
    assert changed == ["encoder.layers.1.self_attn.k_proj", "encoder.layers.1.self_attn.q_proj"]
    with tap_for(clip).capture(tp.Needs(keys={2})):
        during = _hook_snapshot(clip)
    changed = sorted(name.removeprefix("vision_model.") for name in before if before[name] != during[name])
    assert changed == ["encoder.layers.2.self_attn.k_proj"]


def test_hooks_are_removed_on_exit_and_on_exception(clip: nn.Module) -> None:
    before = _hook_snapshot(clip)
    tap = tap_for(clip)
    with tap.capture(ALL_NEEDS, feature_layer=-2):
        assert _hook_snapshot(clip) != before
        clip(pixel_values=_pixels())
    assert _hook_snapshot(clip) == before
    with pytest.raises(ZeroDivisionError), tap.capture(ALL_NEEDS, feature_layer=-2):
        clip(pixel_values=_pixels())
        1 / 0  # noqa: B018
    assert _hook_snapshot(clip) == before
    # and the tower can be captured again
    with tap.capture(tp.Needs(cls_attention={0})) as record:
        clip(pixel_values=_pixels())
    assert record.cls_attention[0].shape == (2, HEADS, TOKENS)


def test_exception_inside_the_forward_removes_hooks(clip: nn.Module) -> None:
    before = _hook_snapshot(clip)
    with pytest.raises(RuntimeError), tap_for(clip).capture(ALL_NEEDS):
        clip(pixel_values=torch.randn(2, 5, IMAGE, IMAGE))  # wrong channel count
    assert _hook_snapshot(clip) == before


def test_nested_capture_on_one_tower_is_an_error(clip: nn.Module) -> None:
    with tap_for(clip).capture(tp.Needs(cls_attention={0})):
        with pytest.raises(CaptureBusyError, match="already being captured"):
            with tap_for(clip).capture(tp.Needs(cls_attention={1})):
                pass  # pragma: no cover
    with tap_for(clip).capture(tp.Needs(cls_attention={0})):  # released after the error
        pass


def test_two_towers_captured_together_do_not_interfere(clip: nn.Module, hf_vision_tower) -> None:
    other = hf_vision_tower()
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    pixels = _pixels()
    needs = tp.Needs(cls_attention={0, 2}, cls_embedding={2})
    with torch.no_grad():
        with tap_for(clip).capture(needs) as alone_a:
            clip(pixel_values=pixels)
        with tap_for(other).capture(needs) as alone_b:
            other(pixel_values=pixels)
        with tap_for(clip).capture(needs) as a, tap_for(other).capture(needs) as b:
            clip(pixel_values=pixels)
            other(pixel_values=pixels)
    for layer in (0, 2):
        assert torch.equal(a.cls_attention[layer], alone_a.cls_attention[layer])
        assert torch.equal(b.cls_attention[layer], alone_b.cls_attention[layer])
        assert not torch.allclose(a.cls_attention[layer], b.cls_attention[layer])
    assert torch.equal(b.cls_embedding[2], alone_b.cls_embedding[2])


def test_several_forwards_in_one_capture_concatenate(clip: nn.Module) -> None:
    pixels = _pixels(4)
    needs = tp.Needs(cls_attention={1}, keys={1})
    with torch.no_grad():
        with tap_for(clip).capture(needs, feature_layer=-1) as whole:
            clip(pixel_values=pixels)
        with tap_for(clip).capture(needs, feature_layer=-1) as chunked:
            clip(pixel_values=pixels[:1])
            clip(pixel_values=pixels[1:])
    assert chunked.batch_size == 4
    torch.testing.assert_close(chunked.cls_attention[1], whole.cls_attention[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(chunked.features, whole.features, atol=ATOL, rtol=0)


def test_capture_without_forward_says_so(clip: nn.Module) -> None:
    with tap_for(clip).capture(tp.Needs(cls_attention={0})) as record:
        pass
    with pytest.raises(tp.SignalError, match="recorded no cls_attention for block 0"):
        record.signals()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_towers(clip: nn.Module, dtype: torch.dtype) -> None:
    pixels = _pixels()
    needs = tp.Needs(cls_attention={0, 2}, wide_cls_attention={2}, cls_embedding={2}, keys={2})
    with torch.no_grad():
        with tap_for(clip).capture(needs, feature_layer=-2) as full:
            clip(pixel_values=pixels)
        half = copy.deepcopy(clip).to(dtype)
        with tap_for(half).capture(needs, feature_layer=-2) as record:
            half(pixel_values=pixels.to(dtype))
    signals = record.signals()  # validates finiteness
    assert signals.cls_attention[2].dtype == torch.float32  # softmax in float32
    assert signals.wide_cls_attention[2].dtype == torch.float32
    assert signals.features.dtype == dtype and signals.keys[2].dtype == dtype
    assert signals.cls_embedding[2].dtype == dtype
    torch.testing.assert_close(signals.cls_attention[2], full.cls_attention[2], atol=3e-2, rtol=0)


def test_layer_out_of_range_is_refused_before_hooking(clip: nn.Module) -> None:
    before = _hook_snapshot(clip)
    with pytest.raises(tp.IncompatibleError, match="out of range"):
        with tap_for(clip).capture(tp.Needs(cls_attention={DEPTH})):
            pass  # pragma: no cover
    with pytest.raises(tp.IncompatibleError, match="feature_layer 5"):
        with tap_for(clip).capture(tp.Needs(), feature_layer=5):
            pass  # pragma: no cover
    assert _hook_snapshot(clip) == before


def test_siglip_serves_keys_and_features_but_refuses_cls_needs(hf_vision_tower) -> None:
    siglip = hf_vision_tower("siglip")
    tap = tap_for(siglip)
    assert isinstance(tap, TransformersVisionTap) and not tap.has_cls_token
    pixels = _pixels()
    with torch.no_grad():
        hidden = siglip(pixel_values=pixels, output_hidden_states=True).hidden_states
        with tap.capture(tp.Needs(keys={1}), feature_layer=-2) as record:
            siglip(pixel_values=pixels)
        block = getattr(siglip, "vision_model", siglip).encoder.layers[1]
        keys = block.self_attn.k_proj(block.layer_norm1(hidden[1]))
    assert torch.equal(record.features, hidden[-2])  # no CLS to drop
    torch.testing.assert_close(record.keys[1], keys, atol=1e-6, rtol=0)
    assert record.keys[1].shape == (2, TOKENS, WIDTH)

    before = _hook_snapshot(siglip)
    with pytest.raises(tp.IncompatibleError) as info:
        check_needs(tap, tp.Needs(cls_attention={-2}), "selector 'cls_final'")
    message = str(info.value)
    assert "SiglipVisionModel" in message and "'cls_final'" in message and "no CLS token" in message
    with pytest.raises(tp.IncompatibleError, match="SiglipVisionModel"):
        with tap.capture(tp.Needs(cls_embedding={2})):
            pass  # pragma: no cover
    assert _hook_snapshot(siglip) == before


def test_tap_for_rejects_unknown_modules_and_points_at_a_nested_tower(clip: nn.Module) -> None:
    with pytest.raises(tp.IncompatibleError, match="Supported: transformers CLIPVisionModel"):
        tap_for(nn.Linear(2, 2))

    class FakeVLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vision_tower = clip

    with pytest.raises(tp.IncompatibleError, match=r"\.vision_tower: pass that instead"):
        tap_for(FakeVLM())


def test_hf_wrapper_with_vision_model_is_accepted(clip: nn.Module) -> None:
    from transformers import CLIPVisionModelWithProjection

    wrapper = CLIPVisionModelWithProjection(clip.config).eval()
    tap = tap_for(wrapper)
    assert tap.core is wrapper.vision_model and tap.num_layers == DEPTH


# --------------------------------------------------------------------------- timm


def _timm_reference(model: nn.Module, pixels: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Full attention maps of timm's unfused path and every block's input."""
    reference = copy.deepcopy(model)
    maps: list[torch.Tensor] = []
    inputs: list[torch.Tensor] = []
    for block in reference.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda m, a, out: maps.append(out))
        block.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    with torch.no_grad():
        reference.forward_features(pixels)
    return maps, inputs


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"pre_norm": True, "act_layer": "quick_gelu"},
        {"qk_norm": True},
        {"reg_tokens": 2},
    ],
    ids=["plain", "clip_style", "qk_norm", "registers"],
)
def test_timm_cls_rows_keys_embeddings_and_features(overrides: dict[str, object]) -> None:
    model = _timm_vit(**overrides)
    assert model.blocks[0].attn.fused_attn  # the tapped model keeps its fused SDPA kernel
    pixels = _pixels()
    maps, inputs = _timm_reference(model, pixels)
    prefix = model.num_prefix_tokens
    tap = tap_for(model)
    assert isinstance(tap, TimmVitTap) and tap.prefix_tokens == prefix and tap.has_cls_token
    with torch.no_grad():
        plain = model(pixels)
        with tap.capture(ALL_NEEDS, feature_layer=-2) as record:
            tapped = model(pixels)
        _, intermediates = model.forward_intermediates(
            pixels, indices=[0, 1, 2], return_prefix_tokens=True, output_fmt="NLC"
        )
    assert torch.equal(plain, tapped)
    for layer in LAYERS:
        index = layer % DEPTH
        torch.testing.assert_close(record.cls_attention[index], maps[index][:, :, 0, prefix:], atol=ATOL, rtol=0)
        spatial, prefix_tokens = intermediates[index]
        assert torch.equal(record.cls_embedding[index], prefix_tokens[:, 0])
    assert torch.equal(record.features, intermediates[-2][0])
    for layer in (0, -1):
        attn = model.blocks[layer].attn
        with torch.no_grad():
            qkv = attn.qkv(model.blocks[layer].norm1(inputs[layer % DEPTH]))
            qkv = qkv.reshape(2, -1, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
            keys = attn.k_norm(qkv[1])  # [B, H, L, hd]
        expected = keys[:, :, prefix:].transpose(1, 2).reshape(2, TOKENS, WIDTH)
        torch.testing.assert_close(record.keys[layer % DEPTH], expected, atol=1e-6, rtol=0)
    # wide head by hand, from the normalised q and k of block 1
    attn = model.blocks[1].attn
    with torch.no_grad():
        qkv = attn.qkv(model.blocks[1].norm1(inputs[1])).reshape(2, -1, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        query = attn.q_norm(qkv[0])[:, :, 0].reshape(2, WIDTH)
        keys = attn.k_norm(qkv[1]).transpose(1, 2).reshape(2, -1, WIDTH)
        wide = torch.softmax((keys @ query[:, :, None]).squeeze(-1) * WIDTH**-0.5, dim=-1)[:, None, prefix:]
    torch.testing.assert_close(record.wide_cls_attention[1], wide, atol=ATOL, rtol=0)


def test_timm_unfused_tower_is_tapped_too() -> None:
    model = _timm_vit()
    pixels = _pixels()
    maps, _ = _timm_reference(model, pixels)
    for block in model.blocks:
        block.attn.fused_attn = False
    with torch.no_grad(), tap_for(model).capture(tp.Needs(cls_attention={2})) as record:
        model(pixels)
    torch.testing.assert_close(record.cls_attention[2], maps[2][:, :, 0, 1:], atol=ATOL, rtol=0)


def test_timm_without_class_token_has_no_cls() -> None:
    model = _timm_vit(class_token=False, global_pool="avg")
    tap = tap_for(model)
    assert not tap.has_cls_token and tap.prefix_tokens == 0
    with torch.no_grad(), tap.capture(tp.Needs(keys={0}), feature_layer=-1) as record:
        model(_pixels())
    assert record.features.shape == (2, TOKENS, WIDTH)
    with pytest.raises(tp.IncompatibleError, match="timm VisionTransformer tower has no CLS token"):
        check_needs(tap, tp.Needs(wide_cls_attention={0}), "selector 'prumerge'")


def test_timm_hooks_removed_and_half_precision() -> None:
    model = _timm_vit(qk_norm=True)
    before = _hook_snapshot(model)
    with pytest.raises(ValueError, match="boom"), tap_for(model).capture(ALL_NEEDS, feature_layer=-2):
        model(_pixels())
        raise ValueError("boom")
    assert _hook_snapshot(model) == before
    half = model.to(torch.bfloat16)
    with torch.no_grad(), tap_for(half).capture(tp.Needs(cls_attention={0}, keys={0})) as record:
        half(_pixels().to(torch.bfloat16))
    signals = record.signals()
    assert signals.cls_attention[0].dtype == torch.float32 and signals.keys[0].dtype == torch.bfloat16


# --------------------------------------------------------------------------- open_clip


def _open_clip_reference(model: nn.Module, pixels: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-head attention maps from each block's attention input, and those inputs ([B, L, D])."""
    inputs: list[torch.Tensor] = []
    batch_first = model.transformer.batch_first
    handles = [
        block.ln_1.register_forward_hook(lambda m, a, out: inputs.append(out)) for block in model.transformer.resblocks
    ]
    with torch.no_grad():
        model(pixels)
    for handle in handles:
        handle.remove()
    maps = []
    for block, normed in zip(model.transformer.resblocks, inputs):
        attn = block.attn
        with torch.no_grad():
            if isinstance(attn, nn.MultiheadAttention):
                maps.append(attn(normed, normed, normed, need_weights=True, average_attn_weights=False)[1])
            else:  # open_clip Attention, by hand
                q, k, _ = torch.nn.functional.linear(normed, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
                q = attn.ln_q(q.reshape(2, -1, HEADS, HEAD_DIM).transpose(1, 2))
                k = attn.ln_k(k.reshape(2, -1, HEADS, HEAD_DIM).transpose(1, 2))
                maps.append(torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1))
    if not batch_first:
        inputs = [x.transpose(0, 1) for x in inputs]
    return maps, inputs


def _sequence_first(model: nn.Module) -> nn.Module:
    """An open_clip tower running its blocks sequence-first (as older open_clip did)."""
    model.transformer.batch_first = False
    for block in model.transformer.resblocks:
        block.attn.batch_first = False
    return model


@pytest.mark.parametrize("variant", ["mha", "sequence_first", "custom_qk_norm"])
def test_open_clip_cls_rows_keys_embeddings_and_features(variant: str) -> None:
    if variant == "custom_qk_norm" and not _open_clip_tower_has("qk_norm"):
        pytest.skip("this open_clip (2.x) has no custom-attention (qk_norm) vision tower")
    if variant == "custom_qk_norm":
        model = _open_clip_vit(qk_norm=True)
        for block in model.transformer.resblocks:
            for norm in (block.attn.ln_q, block.attn.ln_k):
                nn.init.normal_(norm.weight, 1.0, 0.5)
                nn.init.normal_(norm.bias, 0.0, 0.5)
        assert not isinstance(model.transformer.resblocks[0].attn, nn.MultiheadAttention)
    else:
        model = _open_clip_vit()
        if variant == "sequence_first":
            _sequence_first(model)
    pixels = _pixels()
    maps, inputs = _open_clip_reference(model, pixels)
    tap = tap_for(model)
    assert isinstance(tap, OpenClipVitTap) and tap.has_cls_token
    with torch.no_grad():
        plain = model(pixels)
        with tap.capture(ALL_NEEDS, feature_layer=-2) as record:
            tapped = model(pixels)
    assert torch.equal(plain, tapped)
    for layer in LAYERS:
        index = layer % DEPTH
        torch.testing.assert_close(record.cls_attention[index], maps[index][:, :, 0, 1:], atol=ATOL, rtol=0)
    # block outputs = next block's input (before its ln_1); the last one via forward_intermediates
    if variant != "sequence_first":
        with torch.no_grad():
            out = model.forward_intermediates(pixels, indices=[0, 1, 2], output_fmt="NLC", output_extra_tokens=True)
        for index in range(DEPTH):
            assert torch.equal(record.cls_embedding[index], out["image_intermediates_prefix"][index][:, 0])
        assert torch.equal(record.features, out["image_intermediates"][-2])
    assert record.features.shape == (2, TOKENS, WIDTH)
    for layer in (0, -1):
        attn = model.transformer.resblocks[layer].attn
        with torch.no_grad():
            keys = torch.nn.functional.linear(
                inputs[layer % DEPTH], attn.in_proj_weight[WIDTH : 2 * WIDTH], attn.in_proj_bias[WIDTH : 2 * WIDTH]
            )
            if variant == "custom_qk_norm":
                keys = attn.ln_k(keys.reshape(2, -1, HEADS, HEAD_DIM)).reshape(2, -1, WIDTH)
        torch.testing.assert_close(record.keys[layer % DEPTH], keys[:, 1:], atol=1e-6, rtol=0)


def test_open_clip_sequence_first_matches_batch_first() -> None:
    pixels = _pixels()
    with torch.no_grad():
        model = _open_clip_vit()
        with tap_for(model).capture(ALL_NEEDS, feature_layer=-2) as batch_first:
            model(pixels)
        with tap_for(_sequence_first(model)).capture(ALL_NEEDS, feature_layer=-2) as sequence_first:
            model(pixels)
    for name in ("cls_attention", "wide_cls_attention", "cls_embedding", "keys"):
        for layer, tensor in getattr(batch_first, name).items():
            torch.testing.assert_close(getattr(sequence_first, name)[layer], tensor, atol=1e-5, rtol=0)
    torch.testing.assert_close(sequence_first.features, batch_first.features, atol=1e-5, rtol=0)


def test_open_clip_hooks_removed_and_scaled_cosine_refused() -> None:
    model = _open_clip_vit()
    before = _hook_snapshot(model)
    with pytest.raises(KeyError), tap_for(model).capture(ALL_NEEDS, feature_layer=-2):
        model(_pixels())
        raise KeyError("boom")
    assert _hook_snapshot(model) == before

    if not _open_clip_tower_has("scaled_cosine_attn"):
        return  # open_clip 2.x has no scaled-cosine vision tower to refuse
    cosine = _open_clip_vit(scaled_cosine_attn=True)
    before = _hook_snapshot(cosine)
    with pytest.raises(tp.IncompatibleError, match="scaled-cosine"):
        with tap_for(cosine).capture(tp.Needs(cls_attention={0})):
            pass  # pragma: no cover
    assert _hook_snapshot(cosine) == before


def test_open_clip_half_precision() -> None:
    model = _open_clip_vit().to(torch.bfloat16)
    with torch.no_grad(), tap_for(model).capture(tp.Needs(cls_attention={1}, wide_cls_attention={1})) as record:
        model(_pixels().to(torch.bfloat16))
    signals = record.signals()
    assert signals.cls_attention[1].dtype == torch.float32
    assert bool((signals.wide_cls_attention[1].sum(-1) <= 1 + 1e-6).all())
