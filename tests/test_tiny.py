"""The tiny local LLaVA / LLaVA-NeXT factories: real transformers objects, no download."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tokenprune import ConfigError
from tokenprune.tiny import (
    TINY_CHAT_TEMPLATE,
    TINY_CROP_SIZE,
    TINY_PATCH_SIZE,
    save_tiny,
    tiny_llava,
    tiny_llava_next,
    tiny_tokenizer,
)

pytestmark = pytest.mark.compat  # also run against every supported transformers (make test-compat)

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"


def _image(height: int, width: int, seed: int = 0) -> object:
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def llava_next() -> tuple[object, object]:
    return tiny_llava_next()


@pytest.fixture(scope="module")
def llava() -> tuple[object, object]:
    return tiny_llava()


def test_tokenizer_has_one_image_token_and_round_trips_text() -> None:
    tokenizer = tiny_tokenizer()
    ids = tokenizer("a <image> b")["input_ids"]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert ids[0] == tokenizer.bos_token_id  # BOS prepended, as Llama tokenizers do
    assert ids.count(image_id) == 1
    text = "Wörter, 123 & <html>!"
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"]  # byte level: nothing unknown
    assert {tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token} == {"<pad>", "</s>", "<s>"}


def test_llava_next_config_geometry(llava_next: tuple[object, object]) -> None:
    model, processor = llava_next
    config = model.config
    assert isinstance(model, transformers.LlavaNextForConditionalGeneration)
    assert isinstance(processor, transformers.LlavaNextProcessor)
    assert config.vision_config.image_size == TINY_CROP_SIZE == 56
    assert config.vision_config.patch_size == TINY_PATCH_SIZE == 8
    assert config.vision_feature_layer == -2
    assert config.vision_feature_select_strategy == "default"
    assert config.image_token_id == processor.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    # (height, width) pinpoints of the 1x2, 2x1, 2x2, 3x1 and 1x3 grids, scaled to 56 px crops.
    expected = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]
    assert config.image_grid_pinpoints == expected
    assert processor.image_processor.image_grid_pinpoints == expected
    crop = processor.image_processor.crop_size  # a SizeDict, or a dict in older releases
    assert dict(crop)["height"] == dict(crop)["width"] == 56 if isinstance(crop, dict) else crop.height == crop.width == 56


def test_llava_next_processor_tokens_match_model_features(llava_next: tuple[object, object]) -> None:
    model, processor = llava_next
    # 40 x 90 (h x w): best pinpoint (56, 112) -> 1x2 tiles; canvas 7 x 14 tokens, unpadded
    # to int(round(40 * 14 / 90)) = 6 rows -> padding (7 - 6) // 2 = 0 rows cut, so 7 rows kept:
    # 49 thumbnail + 7 * 14 tiles + 7 newlines = 154.
    inputs = processor(images=_image(40, 90), text=PROMPT, return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 3, 56, 56)
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 154
    with torch.no_grad():  # the model itself checks features == placeholders
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
    features = getattr(features, "pooler_output", features)  # a list of tensors before 5.x
    assert sum(int(f.shape[0]) for f in features) == 154


def test_llava_processor_and_model(llava: tuple[object, object]) -> None:
    model, processor = llava
    assert isinstance(model, transformers.LlavaForConditionalGeneration)
    assert isinstance(processor.image_processor, transformers.CLIPImageProcessor)
    inputs = processor(images=_image(30, 80), text=PROMPT, return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 56, 56)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 7 * 7
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))


@pytest.mark.parametrize("family", ["llava_next", "llava"])
def test_generate_smoke(family: str, request: pytest.FixtureRequest) -> None:
    # no wall-clock assertion: tests assert behaviour; speed is what benchmarks/ measure
    model, processor = request.getfixturevalue(family)
    inputs = processor(images=_image(45, 70), text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


def test_chat_template_renders_llava_prompt(llava_next: tuple[object, object]) -> None:
    _, processor = llava_next
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    assert processor.chat_template == TINY_CHAT_TEMPLATE
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == "USER: <image>\nDescribe. ASSISTANT:"
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    assert processor.apply_chat_template(plain) == "USER: Hi ASSISTANT: Yo</s>"


def test_same_seed_same_weights_and_global_rng_untouched() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first, _ = tiny_llava(seed=7)
    assert torch.equal(torch.rand(3), expected_next)  # building did not consume the global RNG
    second, _ = tiny_llava(seed=7)
    other, _ = tiny_llava(seed=8)
    a, b, c = first.state_dict(), second.state_dict(), other.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point() and a[k].numel() > 1)


def test_pil_image_processor_variant_matches_torchvision_cut() -> None:
    _, fast = tiny_llava_next()
    _, slow = tiny_llava_next(image_processor="pil")
    # LlavaNextImageProcessorPil where it exists; before it, the slow LlavaNextImageProcessor
    # (and the torchvision one is LlavaNextImageProcessorFast)
    pil_class = getattr(transformers, "LlavaNextImageProcessorPil", transformers.LlavaNextImageProcessor)
    assert isinstance(slow.image_processor, pil_class) and type(slow.image_processor) is not type(fast.image_processor)
    image = _image(150, 41)  # tall: a 3x1 grid
    a = fast(images=image, text=PROMPT, return_tensors="pt")
    b = slow(images=image, text=PROMPT, return_tensors="pt")
    assert a["pixel_values"].shape == b["pixel_values"].shape == (1, 4, 3, 56, 56)
    assert torch.equal(a["input_ids"], b["input_ids"])


@pytest.mark.parametrize("family", ["llava_next", "llava"])
def test_save_and_reload_offline(family: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    model, processor = request.getfixturevalue(family)
    save_tiny(model, processor, tmp_path)
    reloaded = type(model).from_pretrained(tmp_path, local_files_only=True)
    reloaded_processor = transformers.AutoProcessor.from_pretrained(tmp_path, local_files_only=True)
    if type(reloaded_processor.image_processor) is not type(processor.image_processor):
        # the stock AutoProcessor of some releases (5.0 - 5.x) loads a saved slow image
        # processor as the fast one, whose pixels differ slightly; ask for the saved one
        reloaded_processor = transformers.AutoProcessor.from_pretrained(tmp_path, local_files_only=True, use_fast=False)
    assert type(reloaded_processor) is type(processor)
    assert type(reloaded_processor.image_processor) is type(processor.image_processor)
    assert reloaded_processor.chat_template == processor.chat_template
    assert reloaded_processor.image_token_id == processor.image_token_id
    image = _image(33, 77, seed=3)
    a = processor(images=image, text=PROMPT, return_tensors="pt")
    b = reloaded_processor(images=image, text=PROMPT, return_tensors="pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(model(**a).logits, reloaded(**b).logits)
    assert reloaded.generation_config.pad_token_id == processor.tokenizer.pad_token_id


def test_bad_geometry_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        tiny_llava(crop_size=60, patch_size=8)
    with pytest.raises(ConfigError, match="rows, cols"):
        tiny_llava_next(grids=((0, 2),))
