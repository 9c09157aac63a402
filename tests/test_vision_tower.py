"""The ``vision_tower`` adapter: prune a bare tower's tokens in one forward, on every framework."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import tokenprune as tp
from tokenprune.adapters.vision_tower import TowerPruneOutput, VisionTower

pytestmark = pytest.mark.compat  # also run against every supported transformers (make test-compat)

WIDTH, HEADS, DEPTH, PATCH, IMAGE = 64, 4, 3, 8, 32
SIDE = IMAGE // PATCH
TOKENS = SIDE * SIDE


def _pixels(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def _clip(attn: str = "sdpa") -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=DEPTH,
        num_attention_heads=HEADS, image_size=IMAGE, patch_size=PATCH,
    )
    return CLIPVisionModel._from_config(config, attn_implementation=attn).eval()


def _siglip() -> nn.Module:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    config = SiglipVisionConfig(
        hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=DEPTH,
        num_attention_heads=HEADS, image_size=IMAGE, patch_size=PATCH,
    )
    return SiglipVisionModel(config).eval()


def _timm() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(
        img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, num_classes=0
    ).eval()


def _open_clip() -> nn.Module:
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(
        image_size=IMAGE, patch_size=PATCH, width=WIDTH, layers=DEPTH, heads=HEADS, mlp_ratio=2.0
    ).eval()


def _reference_features(tower: nn.Module, pixels: torch.Tensor, layer: int) -> torch.Tensor:
    """Patch tokens at the output of block ``layer``, from each tower's own API."""
    with torch.no_grad():
        if type(tower).__module__.startswith("transformers."):
            hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states
            prefix = 1 if hasattr(getattr(tower, "vision_model", tower).embeddings, "class_embedding") else 0
            return hidden[layer % DEPTH + 1][:, prefix:]
        if type(tower).__module__.startswith("timm."):
            return tower.forward_intermediates(pixels, indices=[layer % DEPTH], output_fmt="NLC")[1][0]
        out = tower.forward_intermediates(pixels, indices=[layer % DEPTH], output_fmt="NLC")
        return out["image_intermediates"][0]


# --------------------------------------------------------------------------- test strategies


@dataclass(frozen=True)
class KeyNormTopK(tp.Selector):
    """Test selector for towers without CLS: top-b tokens by the norm of their last-block keys."""

    @property
    def needs(self) -> tp.Needs:
        return tp.Needs(keys={-1})

    def select(self, layout: tp.Layout, signals: tp.Signals, budgets: torch.Tensor) -> tp.Selection:
        scores = signals.key(-1).float().norm(dim=-1).masked_fill(~layout.valid, float("-inf"))
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        return tp.Selection(tuple(order[p, : int(b)].sort().values for p, b in enumerate(budgets.tolist())))


@dataclass(frozen=True)
class KeepFirstPlusMean(tp.Selector):
    """Test merging selector: the first b-1 valid tokens plus one token averaging the others."""

    @property
    def needs(self) -> tp.Needs:
        return tp.Needs(features=True)

    def select(self, layout: tp.Layout, signals: tp.Signals, budgets: torch.Tensor) -> tp.Selection:
        assert signals.features is not None
        indices, features, extra = [], [], []
        for p, budget in enumerate(budgets.tolist()):
            valid = torch.nonzero(layout.valid[p]).flatten()
            kept = valid[: max(budget - 1, 0)]
            rest = valid[max(budget - 1, 0) :]
            rows = [signals.features[p][kept]]
            if budget > 0 and rest.numel():
                rows.append(signals.features[p][rest].mean(0, keepdim=True))
            indices.append(kept)
            features.append(torch.cat(rows))
            extra.append(len(rows) - 1)
        return tp.Selection(tuple(indices), features=tuple(features), extra_tokens=tuple(extra))


@dataclass(frozen=True)
class _EvenShares(tp.BudgetAllocator):
    """Test allocator: equal weights (geometry only)."""

    def allocate(self, layout: tp.Layout, signals: tp.Signals, total: int) -> torch.Tensor:
        return tp.apportion(torch.ones(layout.num_partitions), total, layout.capacity)


def _pipeline(
    selector: object = "example_topk",
    allocator: object = "example_attention_mass",
    budget: float | int = 0.25,
    **adapter: object,
) -> tp.Pipeline:
    return tp.Pipeline("vision_tower", allocator=allocator, selector=selector, budget=budget, adapter_options=adapter)


# --------------------------------------------------------------------------- tests


def test_registered_with_its_option() -> None:
    assert "vision_tower" in tp.list_adapters()
    adapter = tp.build_adapter("vision_tower", feature_layer=-1)
    assert isinstance(adapter, VisionTower) and adapter.feature_layer == -1
    with pytest.raises(tp.ConfigError):
        tp.build_adapter("vision_tower", feature_layer="-2")


@pytest.mark.parametrize("make_tower", [_clip, _timm, _open_clip], ids=["transformers", "timm", "open_clip"])
def test_kept_features_are_the_towers_features_at_the_kept_indices(make_tower) -> None:
    tower = make_tower()
    pixels = _pixels(3)
    pipe = _pipeline(budget=0.25)
    outputs = pipe.prune(tower, pixels)
    reference = _reference_features(tower, pixels, -2)
    assert len(outputs) == 3
    for image, output in enumerate(outputs):
        assert isinstance(output, TowerPruneOutput)
        (indices,) = output.indices
        assert indices.numel() == TOKENS // 4 and bool((indices[1:] > indices[:-1]).all())
        assert output.features.shape == (TOKENS // 4, WIDTH)
        assert torch.equal(output.features, reference[image][indices])
        assert output.stats.kept == (TOKENS // 4,) and output.stats.budget == TOKENS // 4
        assert output.budgets.tolist() == [TOKENS // 4]


def test_kept_indices_follow_the_eager_attention_of_the_last_block() -> None:
    tower = _clip()
    eager = _clip("eager")
    eager.load_state_dict(tower.state_dict())
    pixels = _pixels(2)
    pipe = _pipeline(budget=5)
    outputs = pipe.adapter.prune(pipe, tower, pixels)
    with torch.no_grad():
        attention = eager(pixel_values=pixels, output_attentions=True).attentions[-1][:, :, 0, 1:].sum(1)
    for image, output in enumerate(outputs):
        expected = torch.topk(attention[image], 5).indices.sort().values
        assert output.indices[0].tolist() == expected.tolist()


def test_feature_layer_option_changes_the_features() -> None:
    tower = _timm()
    pixels = _pixels(1)
    pipe = _pipeline(budget=1.0, feature_layer=0)
    (output,) = pipe.adapter.prune(pipe, tower, pixels)
    assert torch.equal(output.features, _reference_features(tower, pixels, 0)[0])


def test_layouts_group_consecutive_crops_into_images() -> None:
    tower = _open_clip()
    pixels = _pixels(3)
    two_tiles = tp.Layout(
        tokens_per_side=SIDE, tiles=(1, 2), has_thumbnail=False, valid=torch.ones(2, TOKENS, dtype=torch.bool)
    )
    valid = torch.ones(1, TOKENS, dtype=torch.bool)
    valid[0, :4] = False  # a padded single crop
    single = tp.Layout.single(SIDE, valid=valid)
    pipe = _pipeline(budget=8)
    first, second = pipe.prune(tower, pixels, [two_tiles, single])
    reference = _reference_features(tower, pixels, -2)
    assert first.stats.partitions == ("tile r0c0", "tile r0c1") and sum(first.stats.kept) == 8
    assert first.features.shape == (8, WIDTH)
    expected = torch.cat([reference[p][idx] for p, idx in enumerate(first.indices)])
    assert torch.equal(first.features, expected)
    assert second.indices[0].min() >= 4  # padding never kept
    assert torch.equal(second.features, reference[2][second.indices[0]])


def test_merging_selector_features_are_returned() -> None:
    tower = _clip()
    pixels = _pixels(1)
    pipe = _pipeline(selector=KeepFirstPlusMean(), budget=4)
    (output,) = pipe.adapter.prune(pipe, tower, pixels)
    reference = _reference_features(tower, pixels, -2)[0]
    assert output.indices[0].tolist() == [0, 1, 2]
    expected = torch.cat([reference[:3], reference[3:].mean(0, keepdim=True)])
    torch.testing.assert_close(output.features, expected, atol=1e-6, rtol=0)
    assert output.stats.kept == (4,)


def test_siglip_runs_key_strategies_and_refuses_cls_ones_before_the_forward() -> None:
    tower = _siglip()
    pixels = _pixels(2)
    pipe = _pipeline(selector=KeyNormTopK(), allocator=_EvenShares(), budget=0.5)
    outputs = pipe.adapter.prune(pipe, tower, pixels)
    reference = _reference_features(tower, pixels, -2)
    assert torch.equal(outputs[1].features, reference[1][outputs[1].indices[0]])

    forwards = []
    tower.register_forward_pre_hook(lambda module, args: forwards.append(1))
    pipe = _pipeline(budget=0.5)
    with pytest.raises(tp.IncompatibleError) as info:
        pipe.adapter.prune(pipe, tower, pixels)
    message = str(info.value)
    assert "SiglipVisionModel" in message and "example_attention_mass" in message
    assert forwards == []


def test_bad_inputs_fail_before_the_forward() -> None:
    tower = _clip()
    forwards = []
    tower.register_forward_pre_hook(lambda module, args: forwards.append(1))
    pipe = _pipeline(budget=0.5)
    with pytest.raises(tp.ContractError, match="2 partitions in total but pixel_values holds 3"):
        pipe.adapter.prune(pipe, tower, _pixels(3), [tp.Layout.single(SIDE), tp.Layout.single(SIDE)])
    with pytest.raises(tp.ContractError, match="pixel_values must be"):
        pipe.adapter.prune(pipe, tower, _pixels(1)[0])
    deep = _pipeline(budget=0.5, feature_layer=-9)
    with pytest.raises(tp.IncompatibleError, match="feature_layer -9"):
        deep.adapter.prune(deep, tower, _pixels(1))
    with pytest.raises(tp.IncompatibleError, match="no attention tap"):
        pipe.adapter.prune(pipe, nn.Linear(3, 3), _pixels(1))
    assert forwards == []
    with pytest.raises(tp.ContractError, match="gave 16 per crop"):
        pipe.adapter.prune(pipe, tower, _pixels(1), [tp.Layout.single(3)])


def test_relevance_needs_are_explicit() -> None:
    @dataclass(frozen=True)
    class RelevanceEven(_EvenShares):
        @property
        def needs(self) -> tp.Needs:
            return tp.Needs(relevance=True)

    tower = _clip()
    pipe = tp.Pipeline("vision_tower", allocator=RelevanceEven(), selector="example_topk", budget=0.5)
    with pytest.raises(tp.IncompatibleError, match="relevance"):
        pipe.adapter.prune(pipe, tower, _pixels(2))
    outputs = pipe.adapter.prune(pipe, tower, _pixels(2), relevance=torch.tensor([0.1, 0.2]), prompt="a dog")
    assert [o.stats.kept for o in outputs] == [(8,), (8,)]
