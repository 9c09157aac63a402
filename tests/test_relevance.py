"""CLIP relevance scorers: cosines, truncation, re-normalisation, and the CLS-reuse fast path."""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tokenprune.adapters.relevance import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    REUSED_TOWER_CLS,
    SCORER_FORWARD,
    HFClipScorer,
    OpenClipScorer,
    hf_vision_core,
    renormalize,
)

import tokenprune
from tokenprune import ConfigError, ContractError, Needs, SignalError

pytestmark = pytest.mark.compat  # also run against every supported transformers (make test-compat)

transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

MEAN, STD = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
SIZE = 28  # two 14-px patches per side

# --------------------------------------------------------------------------- tiny models

_WORDS = ["the", "cat", "dog", "a", "photo", "of", "red", "car"]


def _tiny_vocab() -> tuple[dict[str, int], list[str]]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab: dict[str, int] = {}
    for c in letters:
        vocab[c] = len(vocab)
    for c in letters:
        vocab[c + "</w>"] = len(vocab)
    merges = []
    for word in _WORDS:  # merge each word left to right into one token
        piece = word[0]
        for i, c in enumerate(word[1:], start=1):
            nxt = c + ("</w>" if i == len(word) - 1 else "")
            merges.append(f"{piece} {nxt}")
            piece = piece + nxt
            vocab.setdefault(piece, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("clip_tok")
    vocab, merges = _tiny_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return _clip_tokenizer(folder)


def _clip_tokenizer(folder: Any) -> Any:
    """The tiny CLIP tokenizer from ``folder``'s ``vocab.json`` and ``merges.txt``.

    transformers 5 spells it ``CLIPTokenizer(vocab=..., merges=...)`` (one tokenizers-backed
    class); 4.x's ``CLIPTokenizer`` is the slow one (``vocab_file``, ``merges_file``), its
    tokenizers-backed twin ``CLIPTokenizerFast``.
    """
    vocab, merges = str(folder / "vocab.json"), str(folder / "merges.txt")
    if "vocab_file" in inspect.signature(transformers.CLIPTokenizer.__init__).parameters:
        return transformers.CLIPTokenizerFast(vocab_file=vocab, merges_file=merges)
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges)


def _clip_config(
    tokenizer: Any, *, heads: int = 2, hidden: int = 32, layers: int = 2
) -> Any:
    vocab_size = len(tokenizer)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    bos = tokenizer.convert_tokens_to_ids("<|startoftext|>")
    return transformers.CLIPConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "eos_token_id": eos,
            "bos_token_id": bos,
            "pad_token_id": eos,
        },
        vision_config={
            "hidden_size": hidden,
            "intermediate_size": 64,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "image_size": SIZE,
            "patch_size": 14,
        },
        projection_dim=16,
    )


def _seeded(build: Any, seed: int) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


@pytest.fixture(scope="module")
def hf_clip(hf_tokenizer: Any) -> Any:
    return _seeded(lambda: transformers.CLIPModel(_clip_config(hf_tokenizer)), 0)


@pytest.fixture()
def hf_scorer(hf_clip: Any, hf_tokenizer: Any) -> HFClipScorer:
    return HFClipScorer(hf_clip, hf_tokenizer)


def _hf_tower_copy(clip: Any) -> Any:
    """A separate CLIPVisionModel (a VLM's tower) holding copies of the CLIP's vision weights."""
    tower = transformers.CLIPVisionModel(clip.config.vision_config).eval()
    _core(tower).load_state_dict(clip.vision_model.state_dict())
    return tower


def _core(tower: Any) -> Any:
    """The module holding a ``CLIPVisionModel``'s layers: itself, or before transformers 5 its ``.vision_model``."""
    return getattr(tower, "vision_model", tower)


@torch.no_grad()
def _hf_raw_cls(tower: Any, pixels: torch.Tensor) -> torch.Tensor:
    return tower(pixel_values=pixels).last_hidden_state[:, 0]


def _tiny_open_clip(seed: int = 0) -> Any:
    from open_clip.model import CLIP

    return _seeded(
        lambda: CLIP(
            embed_dim=16,
            vision_cfg={
                "image_size": SIZE,
                "patch_size": 14,
                "width": 32,
                "layers": 2,
                "head_width": 16,
                "mlp_ratio": 2.0,
            },
            text_cfg={
                "context_length": 77,
                "vocab_size": 49408,
                "width": 32,
                "heads": 2,
                "layers": 2,
            },
        ),
        seed,
    )


@torch.no_grad()
def _open_clip_raw_cls(visual: Any, pixels: torch.Tensor) -> torch.Tensor:
    captured: dict[str, torch.Tensor] = {}
    hook = visual.transformer.register_forward_hook(
        lambda m, i, o: captured.__setitem__("x", o)
    )
    try:
        visual(pixels)
    finally:
        hook.remove()
    return captured["x"][:, 0]


def _pixels(count: int = 3, seed: int = 1, size: int = SIZE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, size, size, generator=generator)


def _score(scorer: Any, pixels: torch.Tensor, prompt: Any, **kwargs: Any) -> torch.Tensor:
    """``scorer.score`` with the VLM pixels normalised by OpenAI's CLIP statistics."""
    return scorer.score(pixels, prompt, pixel_mean=MEAN, pixel_std=STD, **kwargs)


# --------------------------------------------------------------------------- cosines


def test_hf_score_equals_hand_computed_cosine(
    hf_scorer: HFClipScorer, hf_clip: Any, hf_tokenizer: Any
) -> None:
    pixels = _pixels()
    scores = hf_scorer.score(
        pixels, "a photo of the cat", pixel_mean=MEAN, pixel_std=STD
    )
    with torch.no_grad():
        image = hf_clip.get_image_features(pixel_values=pixels)
        text = hf_clip.get_text_features(
            **hf_tokenizer(["a photo of the cat"], return_tensors="pt")
        )
    image = getattr(image, "pooler_output", image)
    text = getattr(text, "pooler_output", text)
    expected = F.cosine_similarity(image, text.expand_as(image), dim=-1)
    assert scores.dtype == torch.float32 and scores.shape == (3,)
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=0)
    assert hf_scorer.last_path == SCORER_FORWARD


def test_open_clip_score_equals_hand_computed_cosine() -> None:
    model = _tiny_open_clip()
    scorer = OpenClipScorer(model)
    pixels = _pixels()
    scores = scorer.score(pixels, "a photo of a dog", pixel_mean=MEAN, pixel_std=STD)
    tokens = open_clip.SimpleTokenizer()(["a photo of a dog"])
    with torch.no_grad():
        expected = (
            model.encode_image(pixels, normalize=True)
            @ model.encode_text(tokens, normalize=True)[0]
        )
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=0)


def test_identical_pixels_score_identically_and_ranking_follows_cosines(
    hf_scorer: HFClipScorer,
) -> None:
    pixels = _pixels(4)
    pixels[3] = pixels[1]
    scores = hf_scorer.score(pixels, "red car", pixel_mean=MEAN, pixel_std=STD)
    assert scores[3] == scores[1]
    assert len(set(scores[:3].tolist())) == 3
    # The ranking is the ranking of the embeddings' cosines with the prompt, computed apart.
    images = hf_scorer.embed_partitions(pixels, pixel_mean=MEAN, pixel_std=STD)
    text = hf_scorer.embed_prompt("red car")
    assert torch.equal(
        torch.argsort(scores, stable=True), torch.argsort(images @ text, stable=True)
    )
    assert bool((scores.abs() <= 1 + 1e-6).all())


def test_different_prompts_give_different_scores(hf_scorer: HFClipScorer) -> None:
    pixels = _pixels()
    cat = hf_scorer.score(pixels, "the cat", pixel_mean=MEAN, pixel_std=STD)
    dog = hf_scorer.score(pixels, "the dog", pixel_mean=MEAN, pixel_std=STD)
    assert not torch.allclose(cat, dog)


# --------------------------------------------------------------------------- prompts


def test_hf_long_prompt_is_truncated_to_the_context(hf_scorer: HFClipScorer) -> None:
    pixels = _pixels()
    long_prompt = " ".join(["cat"] * 500)
    ids = hf_scorer.tokenize(long_prompt)
    assert ids.shape == (1, 77)
    assert int(ids[0, -1]) == hf_scorer.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    long_score = hf_scorer.score(pixels, long_prompt, pixel_mean=MEAN, pixel_std=STD)
    # 75 words + start + end fill the 77 positions: the 500-word prompt must score the same.
    fitting = hf_scorer.score(
        pixels, " ".join(["cat"] * 75), pixel_mean=MEAN, pixel_std=STD
    )
    shorter = hf_scorer.score(
        pixels, " ".join(["cat"] * 74), pixel_mean=MEAN, pixel_std=STD
    )
    torch.testing.assert_close(long_score, fitting, atol=1e-6, rtol=0)
    assert not torch.allclose(long_score, shorter, atol=1e-6, rtol=0)


def test_open_clip_long_prompt_is_truncated_to_the_context() -> None:
    scorer = OpenClipScorer(_tiny_open_clip())
    pixels = _pixels()
    long_prompt = " ".join(["word"] * 500)
    ids = scorer.tokenize(long_prompt)
    assert ids.shape == (1, 77) and int(ids[0, -1]) == 49407  # end of text kept
    long_score = scorer.score(pixels, long_prompt, pixel_mean=MEAN, pixel_std=STD)
    fitting = scorer.score(
        pixels, " ".join(["word"] * 75), pixel_mean=MEAN, pixel_std=STD
    )
    torch.testing.assert_close(long_score, fitting, atol=1e-6, rtol=0)


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt_is_a_signal_error(hf_scorer: HFClipScorer, prompt: str) -> None:
    with pytest.raises(SignalError, match="non-empty prompt"):
        hf_scorer.score(_pixels(), prompt, pixel_mean=MEAN, pixel_std=STD)


def test_missing_or_wrong_prompt(hf_scorer: HFClipScorer) -> None:
    with pytest.raises(SignalError, match="needs a prompt"):
        hf_scorer.score(_pixels(), None, pixel_mean=MEAN, pixel_std=STD)  # type: ignore[arg-type]
    with pytest.raises(ContractError, match="prompt must be a str"):
        hf_scorer.score(_pixels(), 3, pixel_mean=MEAN, pixel_std=STD)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- pixels


def test_renormalize_hand_computed() -> None:
    pixels = torch.zeros(1, 3, 2, 2)  # 0 under mean .5 / std .5 is the raw intensity .5
    out = renormalize(
        pixels, from_mean=(0.5,) * 3, from_std=(0.5,) * 3, to_mean=MEAN, to_std=STD
    )
    expected = torch.tensor([(0.5 - m) / s for m, s in zip(MEAN, STD)])
    torch.testing.assert_close(out[0, :, 1, 1], expected)
    same = renormalize(
        pixels + 0.3, from_mean=MEAN, from_std=STD, to_mean=MEAN, to_std=STD
    )
    assert torch.equal(same, pixels + 0.3)  # no round-off when nothing changes


def test_vlm_normalisation_is_undone(hf_scorer: HFClipScorer) -> None:
    generator = torch.Generator().manual_seed(3)
    raw = torch.rand(2, 3, SIZE, SIZE, generator=generator)
    vlm_mean, vlm_std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    vlm_pixels = (raw - 0.5) / 0.5
    own_pixels = (raw - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(
        1, 3, 1, 1
    )
    from_vlm = hf_scorer.embed_partitions(
        vlm_pixels, pixel_mean=vlm_mean, pixel_std=vlm_std
    )
    from_own = hf_scorer.embed_partitions(own_pixels, pixel_mean=MEAN, pixel_std=STD)
    torch.testing.assert_close(from_vlm, from_own, atol=1e-5, rtol=0)
    # And the statistics matter: the same pixels read with the wrong ones embed differently.
    wrong = hf_scorer.embed_partitions(vlm_pixels, pixel_mean=MEAN, pixel_std=STD)
    assert not torch.allclose(wrong, from_own, atol=1e-3)


def test_pixels_at_another_resolution_are_resized(hf_scorer: HFClipScorer) -> None:
    raw = torch.rand(
        2, 3, 2 * SIZE, 2 * SIZE, generator=torch.Generator().manual_seed(4)
    )
    normalised = (raw - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(
        1, 3, 1, 1
    )
    prepared = hf_scorer.prepare_pixels(normalised, pixel_mean=MEAN, pixel_std=STD)
    assert prepared.shape == (2, 3, SIZE, SIZE)
    expected_raw = F.interpolate(
        raw, size=(SIZE, SIZE), mode="bicubic", antialias=True
    ).clamp(0, 1)
    expected = (expected_raw - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(
        STD
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(prepared, expected, atol=1e-5, rtol=0)
    scores = hf_scorer.score(normalised, "the cat", pixel_mean=MEAN, pixel_std=STD)
    assert scores.shape == (2,)


def test_non_square_pixels_are_centre_cropped(hf_scorer: HFClipScorer) -> None:
    pixels = torch.zeros(1, 3, SIZE, 2 * SIZE)
    pixels[..., : SIZE // 2] = 5.0  # a bright left quarter, cut away by the centre crop
    prepared = hf_scorer.prepare_pixels(pixels, pixel_mean=MEAN, pixel_std=STD)
    assert prepared.shape == (1, 3, SIZE, SIZE)
    torch.testing.assert_close(prepared, torch.zeros_like(prepared), atol=1e-5, rtol=0)


def test_bad_pixels_and_stats(hf_scorer: HFClipScorer) -> None:
    with pytest.raises(ContractError, match=r"\[P, C, H, W\]"):
        hf_scorer.score(
            torch.zeros(3, SIZE, SIZE), "cat", pixel_mean=MEAN, pixel_std=STD
        )
    nan = _pixels()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(SignalError, match="NaN"):
        hf_scorer.score(nan, "cat", pixel_mean=MEAN, pixel_std=STD)
    with pytest.raises(ConfigError, match="pixel_std must be > 0"):
        hf_scorer.score(_pixels(), "cat", pixel_mean=MEAN, pixel_std=(0.2, 0.0, 0.2))


def test_low_precision_scorer_returns_float32_on_the_pixels_device(
    hf_clip: Any, hf_tokenizer: Any
) -> None:
    scorer = HFClipScorer(copy.deepcopy(hf_clip).to(torch.bfloat16), hf_tokenizer)
    scores = scorer.score(_pixels().half(), "the cat", pixel_mean=MEAN, pixel_std=STD)
    assert scores.dtype == torch.float32 and scores.device == torch.device("cpu")
    assert bool(torch.isfinite(scores).all())


# --------------------------------------------------------------------------- fast path: transformers


def test_hf_fast_path_equals_slow_path_with_copied_weights(
    hf_scorer: HFClipScorer, hf_clip: Any
) -> None:
    tower = _hf_tower_copy(
        hf_clip
    )  # a CLIPVisionModel, as in LLaVA, vs the scorer's CLIPModel
    pixels = _pixels(5)
    cls = _hf_raw_cls(tower, pixels)
    fast = _score(hf_scorer, pixels, "the red car", tower=tower, tower_cls=cls)
    assert hf_scorer.last_path == REUSED_TOWER_CLS
    assert "equal" in (hf_scorer.last_reason or "")
    slow = hf_scorer.score(pixels, "the red car", pixel_mean=MEAN, pixel_std=STD)
    assert (
        hf_scorer.last_path == SCORER_FORWARD
        and hf_scorer.last_reason == "no tower given"
    )
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


def test_hf_fast_path_with_the_very_same_module(
    hf_scorer: HFClipScorer, hf_clip: Any
) -> None:
    pixels = _pixels()
    cls = _hf_raw_cls(hf_clip.vision_model, pixels)
    fast = _score(hf_scorer, pixels, "cat", tower=hf_clip.vision_model, tower_cls=cls)
    assert hf_scorer.last_path == REUSED_TOWER_CLS and "share" in (
        hf_scorer.last_reason or ""
    )
    torch.testing.assert_close(
        fast,
        hf_scorer.score(pixels, "cat", pixel_mean=MEAN, pixel_std=STD),
        atol=1e-5,
        rtol=0,
    )


def test_hf_weight_comparison_is_cached_and_sees_in_place_edits(
    hf_scorer: HFClipScorer, hf_clip: Any
) -> None:
    tower = _hf_tower_copy(hf_clip)
    pixels = _pixels()
    cls = _hf_raw_cls(tower, pixels)
    kwargs = {"pixel_mean": MEAN, "pixel_std": STD, "tower": tower, "tower_cls": cls}
    hf_scorer.score(pixels, "cat", **kwargs)
    hf_scorer.score(pixels, "dog", **kwargs)
    assert hf_scorer.last_path == REUSED_TOWER_CLS
    assert hf_scorer.weight_comparisons == 1  # the second call reused the decision
    with torch.no_grad():
        _core(tower).encoder.layers[1].mlp.fc1.weight[0, 0] += 1e-3  # one weight, in place
    hf_scorer.score(pixels, "cat", **kwargs)
    assert hf_scorer.last_path == SCORER_FORWARD
    assert "encoder.layers.1.mlp.fc1.weight" in (hf_scorer.last_reason or "")
    assert hf_scorer.weight_comparisons == 2


def test_hf_perturbed_tower_takes_the_slow_path(
    hf_scorer: HFClipScorer, hf_clip: Any
) -> None:
    tower = _hf_tower_copy(hf_clip)
    with torch.no_grad():
        _core(tower).pre_layrnorm.bias[3] += 1e-4
    pixels = _pixels()
    out = _score(hf_scorer, pixels, "cat", tower=tower, tower_cls=_hf_raw_cls(tower, pixels))
    assert hf_scorer.last_path == SCORER_FORWARD and "pre_layrnorm.bias" in (
        hf_scorer.last_reason or ""
    )
    torch.testing.assert_close(
        out, hf_scorer.score(pixels, "cat", pixel_mean=MEAN, pixel_std=STD)
    )
    assert hf_scorer.needs_for(tower) == Needs()


def test_post_layernorm_of_the_tower_does_not_matter(
    hf_scorer: HFClipScorer, hf_clip: Any
) -> None:
    # The fast path uses the scorer's own head on the tower's raw CLS.
    tower = _hf_tower_copy(hf_clip)
    with torch.no_grad():
        _core(tower).post_layernorm.weight.mul_(3.0)
    assert hf_scorer.match_tower(tower)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"hidden": 48}, "shape|architectures"),  # other shapes
        ({"layers": 3}, "architectures"),  # one block more
        ({"heads": 4}, "head_dim|num_heads"),  # same shapes, other attention heads
    ],
)
def test_hf_other_architectures_take_the_slow_path(
    hf_scorer: HFClipScorer,
    hf_clip: Any,
    hf_tokenizer: Any,
    changes: dict[str, int],
    reason: str,
) -> None:
    config = _clip_config(hf_tokenizer, **changes).vision_config
    tower = transformers.CLIPVisionModel(config).eval()
    if changes.get("heads"):  # equal values, yet a different computation
        getattr(tower, "vision_model", tower).load_state_dict(hf_clip.vision_model.state_dict())
    pixels = _pixels()
    _score(hf_scorer, pixels, "cat", tower=tower, tower_cls=_hf_raw_cls(tower, pixels))
    assert hf_scorer.last_path == SCORER_FORWARD
    assert any(word in (hf_scorer.last_reason or "") for word in reason.split("|")), (
        hf_scorer.last_reason
    )


def test_hf_other_dtype_takes_the_slow_path(
    hf_scorer: HFClipScorer, hf_clip: Any
) -> None:
    tower = _hf_tower_copy(hf_clip).to(torch.bfloat16)
    match = hf_scorer.match_tower(tower)
    assert not match and "bfloat16" in match.reason


def test_fast_path_needs_the_same_pixels(hf_scorer: HFClipScorer, hf_clip: Any) -> None:
    tower = _hf_tower_copy(hf_clip)
    pixels = _pixels()
    cls = _hf_raw_cls(tower, pixels)
    hf_scorer.score(
        pixels,
        "cat",
        pixel_mean=(0.5,) * 3,
        pixel_std=(0.5,) * 3,
        tower=tower,
        tower_cls=cls,
    )
    assert hf_scorer.last_path == SCORER_FORWARD and "normalised" in (
        hf_scorer.last_reason or ""
    )
    big = _pixels(size=2 * SIZE)
    hf_scorer.score(
        big, "cat", pixel_mean=MEAN, pixel_std=STD, tower=tower, tower_cls=cls
    )
    assert hf_scorer.last_path == SCORER_FORWARD and "56x56" in (
        hf_scorer.last_reason or ""
    )
    hf_scorer.score(pixels, "cat", pixel_mean=MEAN, pixel_std=STD, tower=tower)
    assert hf_scorer.last_path == SCORER_FORWARD and "tower_cls" in (
        hf_scorer.last_reason or ""
    )


def test_tower_cls_must_fit_the_partitions(
    hf_scorer: HFClipScorer, hf_clip: Any
) -> None:
    pixels = _pixels(3)
    with pytest.raises(ContractError, match="P = 3"):
        _score(hf_scorer, pixels, "cat", tower=hf_clip, tower_cls=torch.zeros(2, 32))


def test_needs_for(hf_scorer: HFClipScorer, hf_clip: Any) -> None:
    assert hf_scorer.needs_for(_hf_tower_copy(hf_clip)) == Needs(
        cls_embedding=frozenset({-1})
    )
    assert hf_scorer.needs_for(None) == Needs()
    assert hf_scorer.needs_for(_tiny_open_clip().visual) == Needs()  # other framework


def test_fast_path_with_a_tiny_llava_next_tower(hf_tokenizer: Any) -> None:
    from tokenprune.tiny import tiny_llava_next

    vlm, processor = tiny_llava_next()
    tower = vlm.model.vision_tower
    vision = tower.config.to_dict()
    clip = transformers.CLIPModel(
        transformers.CLIPConfig(
            text_config=_clip_config(hf_tokenizer).text_config.to_dict(),
            vision_config=vision,
            projection_dim=16,
        )
    ).eval()
    clip.vision_model.load_state_dict(getattr(tower, "vision_model", tower).state_dict())
    scorer = HFClipScorer(clip, hf_tokenizer)
    assert hf_vision_core(vlm) is _core(tower)
    image = torch.rand(3, 80, 120, generator=torch.Generator().manual_seed(5))
    pixel_values = processor.image_processor(
        images=[image], return_tensors="pt", do_rescale=False
    )["pixel_values"][0]
    stats = {
        "pixel_mean": processor.image_processor.image_mean,
        "pixel_std": processor.image_processor.image_std,
    }
    cls = _hf_raw_cls(tower, pixel_values)
    fast = scorer.score(pixel_values, "a red car", tower=vlm, tower_cls=cls, **stats)
    assert scorer.last_path == REUSED_TOWER_CLS
    torch.testing.assert_close(
        fast, scorer.score(pixel_values, "a red car", **stats), atol=1e-5, rtol=0
    )


# --------------------------------------------------------------------------- fast path: open_clip


def test_open_clip_fast_path_equals_slow_path() -> None:
    model = _tiny_open_clip()
    scorer = OpenClipScorer(model)
    pixels = _pixels(5)
    for tower, reason in (
        (model.visual, "share"),
        (copy.deepcopy(model.visual), "equal"),
    ):
        cls = _open_clip_raw_cls(tower, pixels)
        fast = _score(scorer, pixels, "a photo", tower=tower, tower_cls=cls)
        assert scorer.last_path == REUSED_TOWER_CLS and reason in (
            scorer.last_reason or ""
        )
        slow = scorer.score(pixels, "a photo", pixel_mean=MEAN, pixel_std=STD)
        assert scorer.last_path == SCORER_FORWARD
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


def test_open_clip_other_weights_take_the_slow_path() -> None:
    model = _tiny_open_clip(0)
    scorer = OpenClipScorer(model)
    pixels = _pixels()
    perturbed = copy.deepcopy(model.visual)
    with torch.no_grad():
        perturbed.transformer.resblocks[0].attn.in_proj_weight[1, 2] += 1e-3
    other_seed = _tiny_open_clip(1).visual
    for tower, reason in (
        (perturbed, "in_proj_weight"),
        (other_seed, "weights differ"),
    ):
        _score(scorer, pixels, "cat", tower=tower, tower_cls=_open_clip_raw_cls(tower, pixels))
        assert scorer.last_path == SCORER_FORWARD and reason in (
            scorer.last_reason or ""
        )
    # A transformers tower never stands in for an open_clip scorer.
    match = scorer.match_tower(
        transformers.CLIPVisionModel(
            transformers.CLIPVisionConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=SIZE,
                patch_size=14,
            )
        )
    )
    assert not match and "not an open_clip VisionTransformer" in match.reason


def test_open_clip_scorer_reads_the_models_preprocess_cfg() -> None:
    model = _tiny_open_clip()
    model.visual.preprocess_cfg = {
        "mean": (0.5, 0.5, 0.5),
        "std": (0.25, 0.25, 0.25),
        "size": SIZE,
    }
    scorer = OpenClipScorer(model)
    assert scorer.image_mean == (0.5, 0.5, 0.5) and scorer.image_std == (
        0.25,
        0.25,
        0.25,
    )
    assert scorer.image_size == (SIZE, SIZE) and scorer.context_length == 77


# --------------------------------------------------------------------------- construction


def test_hf_from_pretrained_loads_local_files(
    tmp_path: Path, hf_clip: Any, hf_tokenizer: Any
) -> None:
    hf_clip.save_pretrained(tmp_path)
    hf_tokenizer.save_pretrained(tmp_path)
    processor = transformers.CLIPImageProcessor(
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]
    )
    processor.save_pretrained(tmp_path)
    scorer = HFClipScorer.from_pretrained(str(tmp_path))
    assert scorer.image_mean == (0.5, 0.5, 0.5)
    pixels = _pixels()
    expected = HFClipScorer(
        hf_clip, hf_tokenizer, image_mean=(0.5,) * 3, image_std=(0.5,) * 3
    )
    torch.testing.assert_close(
        scorer.score(pixels, "cat", pixel_mean=MEAN, pixel_std=STD),
        expected.score(pixels, "cat", pixel_mean=MEAN, pixel_std=STD),
    )
    with pytest.raises(ConfigError, match="without downloading"):
        HFClipScorer.from_pretrained(str(tmp_path / "missing"))


def test_open_clip_from_pretrained_local_only(tmp_path: Path) -> None:
    name = "tokenprune-test-tiny-clip"
    config = {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": SIZE,
            "width": 32,
            "layers": 2,
            "patch_size": 14,
            "head_width": 16,
            "mlp_ratio": 2.0,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 2,
        },
    }
    (tmp_path / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    model = _tiny_open_clip(2)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    scorer = OpenClipScorer.from_pretrained(name, tmp_path / "weights.pt")
    pixels = _pixels()
    torch.testing.assert_close(
        scorer.score(pixels, "a dog", pixel_mean=MEAN, pixel_std=STD),
        OpenClipScorer(model).score(pixels, "a dog", pixel_mean=MEAN, pixel_std=STD),
    )
    with pytest.raises(ConfigError, match="local checkpoint file"):
        OpenClipScorer.from_pretrained(name, "openai")  # a download tag, refused
    with pytest.raises(ConfigError, match="download"):
        OpenClipScorer.from_pretrained("hf-hub:someone/some-clip")


def test_constructors_reject_other_models(hf_tokenizer: Any) -> None:
    with pytest.raises(ConfigError, match="CLIPModel"):
        HFClipScorer(torch.nn.Linear(2, 2), hf_tokenizer)
    with pytest.raises(ConfigError, match="open_clip model"):
        OpenClipScorer(torch.nn.Linear(2, 2))


def test_importing_the_scorers_stays_lazy() -> None:
    import subprocess
    import sys

    code = (
        "import sys, tokenprune, tokenprune.adapters.relevance; "
        "print(sorted(m for m in ('transformers', 'open_clip', 'timm') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
    assert tokenprune.__version__


# --------------------------------------------------------------------------- fast path: cache, batch


def _count_calls(module: Any) -> tuple[list[int], Any]:
    calls: list[int] = []
    return calls, module.register_forward_hook(lambda m, i, o: calls.append(1))


def test_repeated_prompt_hits_the_text_cache(hf_scorer: HFClipScorer, hf_clip: Any) -> None:
    calls, handle = _count_calls(hf_clip.text_model)
    try:
        first = hf_scorer.embed_prompt("the red car")
        again = hf_scorer.embed_prompt("the red car")
        assert len(calls) == 1  # the second question cost no text forward
        assert torch.equal(first, again)
        other = hf_scorer.embed_prompt("a dog")
        assert len(calls) == 2 and not torch.allclose(first, other)  # a different prompt misses
        pixels = _pixels()
        hf_scorer.score(pixels, "a dog", pixel_mean=MEAN, pixel_std=STD)
        assert len(calls) == 2
    finally:
        handle.remove()
    hf_scorer.forget_prompts()
    torch.testing.assert_close(hf_scorer.embed_prompt("the red car"), first, atol=0, rtol=0)


def test_text_cache_is_bounded_lru(hf_scorer: HFClipScorer, hf_clip: Any) -> None:
    hf_scorer.text_cache_size = 2
    for prompt in ("cat", "dog", "cat", "car"):  # "dog" is the least recently used
        hf_scorer.embed_prompt(prompt)
    calls, handle = _count_calls(hf_clip.text_model)
    try:
        hf_scorer.embed_prompts(["cat", "car"])
        assert calls == []
        hf_scorer.embed_prompt("dog")
        assert len(calls) == 1
    finally:
        handle.remove()


@pytest.mark.parametrize("framework", ["hf", "open_clip"])
def test_batched_prompts_equal_one_by_one(framework: str, hf_clip: Any, hf_tokenizer: Any) -> None:
    def build() -> Any:
        if framework == "hf":
            return HFClipScorer(hf_clip, hf_tokenizer)
        return OpenClipScorer(_tiny_open_clip(), open_clip.SimpleTokenizer())

    prompts = ["a photo of the red car", "cat", "a photo of the red car", "the dog of a cat"]
    together = build().embed_prompts(prompts)  # one forward, padded to the longest prompt
    alone = build()
    one_by_one = torch.stack([alone.embed_prompt(p) for p in prompts])
    assert together.shape == (4, one_by_one.shape[1])
    torch.testing.assert_close(together, one_by_one, atol=1e-6, rtol=0)


def test_score_batch_equals_per_image_scores(hf_scorer: HFClipScorer, hf_clip: Any) -> None:
    tower = _hf_tower_copy(hf_clip)
    pixels = _pixels(5)
    cls = _hf_raw_cls(tower, pixels)
    counts, prompts = [3, 2], ["red car", "the cat"]
    kwargs = {"pixel_mean": MEAN, "pixel_std": STD}
    batch = hf_scorer.score_batch(pixels, prompts, counts, tower=tower, tower_cls=cls, **kwargs)
    assert hf_scorer.last_path == REUSED_TOWER_CLS
    start = 0
    for scores, count, prompt in zip(batch, counts, prompts):
        alone = hf_scorer.score(
            pixels[start : start + count], prompt, tower=tower, tower_cls=cls[start : start + count], **kwargs
        )
        torch.testing.assert_close(scores, alone, atol=1e-6, rtol=0)
        start += count
    slow = hf_scorer.score_batch(pixels, prompts, counts, **kwargs)  # the scorer's own forward
    torch.testing.assert_close(torch.cat(slow), torch.cat(batch), atol=1e-5, rtol=0)
    with pytest.raises(ContractError, match="one prompt and one partition count per image"):
        hf_scorer.score_batch(pixels, prompts, [3, 3], **kwargs)


def test_weight_stamp_sees_a_replaced_parameter(hf_scorer: HFClipScorer, hf_clip: Any) -> None:
    tower = _hf_tower_copy(hf_clip)
    pixels = _pixels()
    kwargs = {"pixel_mean": MEAN, "pixel_std": STD, "tower": tower, "tower_cls": _hf_raw_cls(tower, pixels)}
    hf_scorer.score(pixels, "cat", **kwargs)
    assert hf_scorer.last_path == REUSED_TOWER_CLS
    fc1 = _core(tower).encoder.layers[0].mlp.fc1
    fc1.weight = torch.nn.Parameter(fc1.weight.detach() + 1e-3)  # a new tensor, not an in-place edit
    hf_scorer.score(pixels, "cat", **kwargs)
    assert hf_scorer.last_path == SCORER_FORWARD and "encoder.layers.0.mlp.fc1.weight" in (hf_scorer.last_reason or "")
