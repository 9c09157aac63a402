"""One set of CLIP ViT weights in three frameworks: the three taps must agree.

The weights of a tiny transformers ``CLIPVisionModel`` are mapped by hand into a timm
``VisionTransformer`` (CLIP-style config: ``pre_norm``, class token, quick-GELU, no patch
bias) and an open_clip ``VisionTransformer``. The towers compute the same function, so the
taps must give the same CLS rows, CLS embeddings, keys and features.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tokenprune as tp
from tokenprune.adapters.taps import tap_for

pytestmark = pytest.mark.compat  # also run against every supported transformers (make test-compat)

WIDTH, HEADS, DEPTH, PATCH, IMAGE = 64, 4, 3, 8, 32
TOKENS = (IMAGE // PATCH) ** 2
ATOL = 1e-4
NEEDS = tp.Needs(cls_attention={0, 1, -1}, wide_cls_attention={-1}, cls_embedding={0, 1, -1}, keys={1})


def _hf_clip(hf_vision_tower) -> nn.Module:
    model = hf_vision_tower(mlp_ratio=4, hidden_act="quick_gelu")
    with torch.no_grad():  # make biases and norms non-trivial so a wrong mapping shows
        for name, parameter in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                parameter.copy_(1 + 0.3 * torch.randn_like(parameter))
            elif name.endswith("bias"):
                parameter.copy_(0.3 * torch.randn_like(parameter))
    return model


def _qkv(attn: nn.Module, part: str) -> torch.Tensor:
    return torch.cat([getattr(getattr(attn, f"{p}_proj"), part) for p in ("q", "k", "v")])


def _block_state(layer: nn.Module, prefix: str, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """A transformers CLIP encoder layer's weights under another framework's ``names``.

    ``names`` are templates (``{}`` = ``weight``/``bias``) for, in order: norm1, fused qkv,
    attention output, norm2, mlp fc1, mlp fc2.
    """
    attn = layer.self_attn
    sources = (layer.layer_norm1, None, attn.out_proj, layer.layer_norm2, layer.mlp.fc1, layer.mlp.fc2)
    return {
        f"{prefix}.{name.format(part)}": _qkv(attn, part) if source is None else getattr(source, part)
        for name, source in zip(names, sources, strict=True)
        for part in ("weight", "bias")
    }


def _to_timm(hf: nn.Module) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_ratio=4.0,
        pre_norm=True, class_token=True, act_layer="quick_gelu", norm_layer=nn.LayerNorm, num_classes=0,
    ).eval()
    hf = getattr(hf, "vision_model", hf)  # transformers < 5: CLIPVisionModel wraps its transformer
    embeddings = hf.embeddings
    state = {
        "patch_embed.proj.weight": embeddings.patch_embedding.weight,
        "cls_token": embeddings.class_embedding.reshape(1, 1, WIDTH),
        "pos_embed": embeddings.position_embedding.weight[None],
        "norm_pre.weight": hf.pre_layrnorm.weight,
        "norm_pre.bias": hf.pre_layrnorm.bias,
        "norm.weight": hf.post_layernorm.weight,
        "norm.bias": hf.post_layernorm.bias,
    }
    for i, layer in enumerate(hf.encoder.layers):
        timm_names = ("norm1.{}", "attn.qkv.{}", "attn.proj.{}", "norm2.{}", "mlp.fc1.{}", "mlp.fc2.{}")
        state.update(_block_state(layer, f"blocks.{i}", timm_names))
    model.load_state_dict(state, strict=True)
    return model


def _to_open_clip(hf: nn.Module) -> nn.Module:
    from open_clip.transformer import QuickGELU, VisionTransformer

    model = VisionTransformer(
        image_size=IMAGE, patch_size=PATCH, width=WIDTH, layers=DEPTH, heads=HEADS, mlp_ratio=4.0,
        act_layer=QuickGELU, output_dim=WIDTH,
    ).eval()
    hf = getattr(hf, "vision_model", hf)  # transformers < 5: CLIPVisionModel wraps its transformer
    embeddings = hf.embeddings
    state = {
        "conv1.weight": embeddings.patch_embedding.weight,
        "class_embedding": embeddings.class_embedding,
        "positional_embedding": embeddings.position_embedding.weight,
        "ln_pre.weight": hf.pre_layrnorm.weight,
        "ln_pre.bias": hf.pre_layrnorm.bias,
        "ln_post.weight": hf.post_layernorm.weight,
        "ln_post.bias": hf.post_layernorm.bias,
        "proj": torch.eye(WIDTH),
    }
    for i, layer in enumerate(hf.encoder.layers):
        open_clip_names = ("ln_1.{}", "attn.in_proj_{}", "attn.out_proj.{}", "ln_2.{}", "mlp.c_fc.{}", "mlp.c_proj.{}")
        state.update(_block_state(layer, f"transformer.resblocks.{i}", open_clip_names))
    model.load_state_dict(state, strict=True)
    return model


@pytest.fixture(scope="module")
def records(hf_vision_tower) -> dict[str, object]:
    hf = _hf_clip(hf_vision_tower)
    towers = {"transformers": hf, "timm": _to_timm(hf), "open_clip": _to_open_clip(hf)}
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    out = {}
    with torch.no_grad():
        for name, tower in towers.items():
            tap = tap_for(tower)
            assert tap.framework == name
            with tap.capture(NEEDS, feature_layer=-2) as record:
                tap.forward(pixels)
            out[name] = record
        # the mapping itself is right: the three towers' pooled CLS agree
        pooled = {
            "transformers": hf(pixel_values=pixels).pooler_output,
            "timm": towers["timm"].forward_head(towers["timm"].forward_features(pixels), pre_logits=True),
            "open_clip": towers["open_clip"](pixels),
        }
    torch.testing.assert_close(pooled["timm"], pooled["transformers"], atol=ATOL, rtol=0)
    torch.testing.assert_close(pooled["open_clip"], pooled["transformers"], atol=ATOL, rtol=0)
    return out


@pytest.mark.parametrize("framework", ["timm", "open_clip"])
def test_cls_rows_agree(records: dict[str, object], framework: str) -> None:
    reference, other = records["transformers"], records[framework]
    for layer in (0, 1, DEPTH - 1):
        assert other.cls_attention[layer].shape == (2, HEADS, TOKENS)
        torch.testing.assert_close(other.cls_attention[layer], reference.cls_attention[layer], atol=ATOL, rtol=0)
    torch.testing.assert_close(
        other.wide_cls_attention[DEPTH - 1], reference.wide_cls_attention[DEPTH - 1], atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("framework", ["timm", "open_clip"])
def test_cls_embeddings_keys_and_features_agree(records: dict[str, object], framework: str) -> None:
    reference, other = records["transformers"], records[framework]
    for layer in (0, 1, DEPTH - 1):
        torch.testing.assert_close(other.cls_embedding[layer], reference.cls_embedding[layer], atol=ATOL, rtol=0)
    torch.testing.assert_close(other.keys[1], reference.keys[1], atol=ATOL, rtol=0)
    assert other.features.shape == (2, TOKENS, WIDTH)
    torch.testing.assert_close(other.features, reference.features, atol=ATOL, rtol=0)
