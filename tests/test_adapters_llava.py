"""LLaVA-1.5 / LLaVA-NeXT / ShareGPT4V adapters on unmodified transformers 5 (tiny random models)."""

from __future__ import annotations

import inspect

import pytest
import torch
from PIL import Image
from tokenprune.adapters._generate_inputs import forward_inputs
from tokenprune.adapters.llava_next_partitioner import LlavaNextPartitioner

import tokenprune as tp
from tokenprune.tiny import tiny_llava, tiny_llava_next

pytestmark = pytest.mark.compat  # also run against every supported transformers (make test-compat)


def picture(width: int, height: int, seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def chat(processor, question: str = "What is in the image?") -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


@pytest.fixture(scope="module")
def next_model():
    return tiny_llava_next(seed=1)


@pytest.fixture(scope="module")
def llava_model():
    return tiny_llava(seed=2)


def greedy(model, inputs, tokens: int = 6) -> torch.Tensor:
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    return out[:, -tokens:]


def fed_images(model, inputs) -> list[torch.Tensor]:
    """The image embeddings ``prepare`` hands the LLM, one tensor per prompt row, on either
    generate path (``mm_encoder_outputs`` or ``inputs_embeds``)."""
    if "mm_encoder_outputs" in inputs:
        return list(inputs["mm_encoder_outputs"]["image"].pooler_output)
    mask = inputs["input_ids"] == model.config.image_token_id
    return [embeds[row_mask] for embeds, row_mask in zip(inputs["inputs_embeds"], mask)]


def pooled(output) -> list[torch.Tensor]:
    """``get_image_features``' per-image tensors (a ModelOutput, or a plain list in older releases)."""
    return list(getattr(output, "pooler_output", output))


# ------------------------------------------------------------------------- identity


def test_llava_next_full_budget_with_row_newlines_is_the_stock_model(next_model):
    model, processor = next_model
    images = [picture(90, 50, 0), picture(40, 130, 1)]
    texts = [chat(processor), chat(processor, "Describe it.")]
    pipe = tp.Pipeline(adapter="llava_next", allocator="hired", selector="cls_final", budget=1.0, newline="row")
    ours = pipe.prepare(model, processor, images=images, text=texts)
    stock = processor(images=images, text=texts, return_tensors="pt", padding=True, padding_side="left")
    assert torch.equal(ours["input_ids"], stock["input_ids"])
    assert torch.equal(greedy(model, ours), greedy(model, stock))
    with torch.inference_mode():
        stock_features = pooled(model.model.get_image_features(stock["pixel_values"], stock["image_sizes"]))
    for mine, theirs in zip(fed_images(model, ours), stock_features):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)


def test_llava_full_budget_is_the_stock_model(llava_model):
    model, processor = llava_model
    images = [picture(64, 64, 2), picture(120, 40, 3)]
    texts = [chat(processor)] * 2
    pipe = tp.Pipeline(adapter="llava", allocator="equal", selector="cls_final", budget=1.0)
    ours = pipe.prepare(model, processor, images=images, text=texts)
    stock = processor(images=images, text=texts, return_tensors="pt", padding=True, padding_side="left")
    assert torch.equal(ours["input_ids"], stock["input_ids"])
    assert torch.equal(greedy(model, ours), greedy(model, stock))


# ------------------------------------------------------------------------- what the LLM sees


def _placeholder_embeddings(model, inputs) -> torch.Tensor:
    captured = {}

    def grab(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            model(**forward_inputs(inputs))
    finally:
        handle.remove()
    mask = inputs["input_ids"] == model.config.image_token_id
    return captured["embeds"][mask]


def test_llm_sees_exactly_the_projected_selected_features_in_canvas_order(next_model):
    model, processor = next_model
    image = picture(100, 60, 4)
    text = chat(processor)
    pipe = tp.Pipeline(adapter="llava_next", allocator="hired", selector="cls_final", budget=0.3)
    inputs = pipe.prepare(model, processor, images=image, text=text)
    stats = pipe.last_stats[0]
    k = stats.image_tokens
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == k == sum(stats.kept)
    assert stats.newline_tokens == 0 and k == pipe.image_budget(LlavaNextPartitioner.from_model(model).layout((60, 100)))
    text_only = processor.tokenizer(text.replace(processor.image_token, ""), return_tensors="pt")["input_ids"]
    assert stats.prefill_length == inputs["input_ids"].shape[1] == text_only.shape[1] + k

    # Recompute the expected sequence independently: stock features, our selection.
    stock = processor(images=image, text=text, return_tensors="pt")
    with torch.inference_mode():
        hidden = model.model.vision_tower(stock["pixel_values"][0], output_hidden_states=True).hidden_states[-2][:, 1:]
    partitioner = LlavaNextPartitioner.from_model(model, processor)
    geometry = partitioner.geometry((60, 100))
    layout = partitioner.layout((60, 100))
    result_selection = _selection_of(pipe, model, processor, image, text)
    thumb = hidden[0, result_selection.indices[0]]
    canvas = geometry.canvas_index()
    tile_tokens, positions = [], []
    for p, idx in enumerate(result_selection.indices[1:]):
        tile_tokens.append(hidden[p + 1, idx])
        positions.append(canvas[p, idx])
    order = torch.argsort(torch.cat(positions))
    expected_vision = torch.cat([thumb, torch.cat(tile_tokens)[order]])
    with torch.inference_mode():
        expected = model.model.multi_modal_projector(expected_vision[None])[0]
    torch.testing.assert_close(_placeholder_embeddings(model, inputs), expected, rtol=1e-5, atol=1e-5)
    assert layout.num_partitions == len(result_selection.indices)


def _selection_of(pipe, model, processor, image, text):
    adapter = pipe.adapter
    inputs = adapter._image_inputs(processor, [image])
    return adapter.prune_pixels(pipe, model, processor, inputs["pixel_values"], inputs["image_sizes"], [text])[0].selection


def test_row_newlines_follow_each_kept_canvas_row_and_are_counted_separately(next_model):
    model, processor = next_model
    image = picture(110, 56, 5)
    pipe = tp.Pipeline(adapter="llava_next", allocator="equal", selector="spatial", budget=0.2, newline="row")
    inputs = pipe.prepare(model, processor, images=image, text=chat(processor))
    stats = pipe.last_stats[0]
    selection = _selection_of(pipe, model, processor, image, chat(processor))
    geometry = LlavaNextPartitioner.from_model(model).geometry((56, 110))
    width = geometry.canvas_shape[1]
    rows = {int(geometry.canvas_index()[p, i]) // width for p, idx in enumerate(selection.indices[1:]) for i in idx}
    assert stats.newline_tokens == len(rows)
    assert stats.image_tokens == sum(stats.kept) + len(rows)
    embeds = _placeholder_embeddings(model, inputs)
    newline = model.model.image_newline.detach()
    is_newline = (embeds == newline).all(dim=1)
    assert int(is_newline.sum()) == len(rows) and not bool(is_newline[: stats.kept[0]].any())
    assert bool(is_newline[-1])  # the last kept canvas row ends with a newline


# ------------------------------------------------------------------------- batches


def test_batch_of_images_of_different_sizes_equals_single_runs(next_model):
    model, processor = next_model
    images = [picture(90, 50, 6), picture(30, 150, 7), picture(160, 160, 8)]
    texts = [chat(processor, q) for q in ("What is it?", "Colours?", "Count the shapes in this picture.")]
    pipe = tp.Pipeline(adapter="llava_next", allocator="hired", selector="cls_final", budget=0.25)
    batch = pipe.prepare(model, processor, images=images, text=texts)
    batch_stats = pipe.last_stats
    batch_tokens = greedy(model, batch)
    for i, (image, text) in enumerate(zip(images, texts)):
        single = pipe.prepare(model, processor, images=image, text=text)
        assert pipe.last_stats[0].kept == batch_stats[i].kept
        torch.testing.assert_close(
            fed_images(model, single)[0],
            fed_images(model, batch)[i],
            rtol=1e-5,
            atol=1e-5,
        )
        assert torch.equal(greedy(model, single)[0], batch_tokens[i])


def test_one_prompt_with_two_images(llava_model):
    model, processor = llava_model
    text = "USER: <image>\n<image>\nCompare them. ASSISTANT:"
    pipe = tp.Pipeline(adapter="llava", allocator="equal", selector="cls_final", budget=10)
    inputs = pipe.prepare(model, processor, images=[picture(50, 50, 9), picture(70, 40, 10)], text=text)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 20
    assert [s.image_tokens for s in pipe.last_stats] == [10, 10]
    assert greedy(model, inputs).shape == (1, 6)


def test_adaptive_selector_reports_its_own_count(llava_model):
    model, processor = llava_model
    pipe = tp.Pipeline(adapter="llava", allocator="equal", selector="prumerge", budget=1.0, count="auto")
    inputs = pipe.prepare(model, processor, images=picture(64, 48, 11), text=chat(processor))
    stats = pipe.last_stats[0]
    assert stats.image_tokens == sum(stats.kept) <= stats.budget
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == stats.image_tokens
    greedy(model, inputs)


# ------------------------------------------------------------------------- attach


def test_attach_agrees_with_prepare_and_restores_everything(next_model):
    model, processor = next_model
    image, text = picture(100, 70, 12), chat(processor)
    pipe = tp.Pipeline(adapter="llava_next", allocator="hired", selector="cls_final", budget=0.2)
    prepared = pipe.prepare(model, processor, images=image, text=text)
    expected = greedy(model, prepared)
    signature = inspect.signature(model.model.get_image_features)
    before = processor(images=image, text=text, return_tensors="pt")
    stock_tokens = greedy(model, before)
    processor_attributes = dict(processor.__dict__)
    with pipe.attach(model, processor):
        assert inspect.signature(model.model.get_image_features) == signature
        attached = processor(images=image, text=text, return_tensors="pt")
        assert torch.equal(attached["input_ids"], prepared["input_ids"])
        assert torch.equal(greedy(model, attached), expected)
        assert pipe.last_stats[0].kept == tuple(pipe.last_stats[0].kept)
    assert "get_image_features" not in model.model.__dict__
    assert processor.__dict__ == processor_attributes
    after = processor(images=image, text=text, return_tensors="pt")
    assert torch.equal(after["input_ids"], before["input_ids"])
    assert torch.equal(greedy(model, after), stock_tokens)


def test_attach_restores_after_an_exception(llava_model):
    model, processor = llava_model
    pipe = tp.Pipeline(adapter="llava", allocator="equal", selector="cls_final", budget=0.5)
    processor_attributes = dict(processor.__dict__)
    with pytest.raises(RuntimeError, match="boom"):
        with pipe.attach(model, processor):
            raise RuntimeError("boom")
    assert "get_image_features" not in model.model.__dict__ and processor.__dict__ == processor_attributes


# ------------------------------------------------------------------------- errors


def test_clear_errors(next_model, llava_model):
    next_m, next_p = next_model
    llava_m, llava_p = llava_model
    image = picture(60, 60, 13)
    nxt = tp.Pipeline(adapter="llava_next", allocator="hired", selector="cls_final", budget=0.2)
    with pytest.raises(tp.IncompatibleError, match="adapter 'llava_next' works with LlavaNextForConditionalGeneration"):
        nxt.prepare(llava_m, llava_p, images=image, text=chat(llava_p))
    with pytest.raises(tp.IncompatibleError, match="needs a LlavaNextProcessor"):
        nxt.prepare(next_m, llava_p, images=image, text=chat(llava_p))
    with pytest.raises(tp.ConfigError, match="has no image token '<image>'"):
        nxt.prepare(next_m, next_p, images=image, text="USER: describe ASSISTANT:")
    with pytest.raises(tp.ConfigError, match=r"hold 1 image token\(s\) '<image>' but 2 image\(s\)"):
        nxt.prepare(next_m, next_p, images=[image, image], text=chat(next_p))
    with pytest.raises(tp.ConfigError, match="the image processor rejected the images"):
        nxt.prepare(next_m, next_p, images="not an image", text=chat(next_p))
    adaptive = tp.Pipeline(adapter="llava", allocator="equal", selector="prumerge", budget=0.5, count="auto")
    with pytest.raises(tp.ConfigError, match="chooses its own count.*Use Pipeline.prepare"):
        with adaptive.attach(llava_m, llava_p):
            pass
    rows = tp.Pipeline(adapter="llava_next", allocator="hired", selector="cls_final", budget=0.2, newline="row")
    with pytest.raises(tp.ConfigError, match="newline='row'"):
        with rows.attach(next_m, next_p):
            pass
    with pytest.raises(tp.ConfigError, match="Pipeline.prepare needs a VLM adapter"):
        tp.Pipeline(allocator="hired", selector="cls_final", budget=0.2).prepare(next_m, next_p, images=image, text="x")


def test_processor_from_another_checkpoint_is_refused(next_model):
    model, _ = next_model
    _, other = tiny_llava_next(seed=1, crop_size=64, patch_size=8)
    pipe = tp.Pipeline(adapter="llava_next", allocator="hired", selector="cls_final", budget=0.2)
    with pytest.raises(tp.IncompatibleError):
        pipe.prepare(model, other, images=picture(50, 50, 14), text=chat(other))


def test_tower_without_cls_and_a_cls_strategy_fails_before_any_forward(llava_model):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    model, processor = llava_model
    siglip = SiglipVisionModel(
        SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=24, num_attention_heads=4, image_size=56, patch_size=8)
    )
    original = model.model.vision_tower
    calls = []
    siglip.register_forward_pre_hook(lambda *a: calls.append(1))
    model.model.vision_tower = siglip
    try:
        pipe = tp.Pipeline(adapter="llava", allocator="equal", selector="cls_final", budget=0.5)
        with pytest.raises(tp.IncompatibleError, match=r"selector 'cls_final' needs cls_attention.*no CLS token"):
            pipe.prepare(model, processor, images=picture(50, 50, 15), text=chat(processor))
        with pytest.raises(tp.IncompatibleError, match="no CLS token"):
            with pipe.attach(model, processor):
                pass
        assert calls == []
    finally:
        model.model.vision_tower = original


def test_sharegpt4v_requires_its_padding_processor(llava_model):
    model, processor = llava_model
    pipe = tp.Pipeline(adapter="sharegpt4v", allocator="equal", selector="cls_final", budget=0.5)
    with pytest.raises(tp.IncompatibleError, match="pads images to a square"):
        pipe.prepare(model, processor, images=picture(50, 50, 16), text=chat(processor))
    relaxed = tp.Pipeline(adapter="sharegpt4v", allocator="equal", selector="cls_final", budget=0.5, require_padding=False)
    relaxed.prepare(model, processor, images=picture(50, 50, 16), text=chat(processor))
    assert relaxed.last_stats[0].image_tokens == 24


# ------------------------------------------------------------------------- prompt relevance


def clip_scorer_sharing_the_tower(model, folder):
    """A tiny CLIP (text tower + the model's own vision tower weights) and its HFClipScorer,
    the tokenizer files written to ``folder``."""
    import json

    import transformers
    from tokenprune.adapters.relevance import HFClipScorer

    from .test_relevance import _clip_config, _clip_tokenizer, _tiny_vocab

    vocab, merges = _tiny_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = _clip_tokenizer(folder)  # 4.x spells the tokenizers-backed one CLIPTokenizerFast
    tower = model.model.vision_tower
    clip = transformers.CLIPModel(
        transformers.CLIPConfig(
            text_config=_clip_config(tokenizer).text_config.to_dict(),
            vision_config=tower.config.to_dict(),
            projection_dim=16,
        )
    ).eval()
    clip.vision_model.load_state_dict(getattr(tower, "vision_model", tower).state_dict())
    return clip, HFClipScorer(clip, tokenizer)


def test_hero_with_a_clip_scorer_reuses_the_tower_cls(next_model, tmp_path_factory):
    model, processor = next_model
    _, scorer = clip_scorer_sharing_the_tower(model, tmp_path_factory.mktemp("clip_tokenizer"))

    image, text = picture(120, 60, 17), chat(processor, "Where is the red car?")
    missing = tp.Pipeline(adapter="llava_next", allocator="hero", selector="hero", budget=0.3)
    with pytest.raises(tp.ConfigError, match="relevance_scorer="):
        missing.prepare(model, processor, images=image, text=text)
    pipe = tp.Pipeline(adapter="llava_next", allocator="hero", selector="hero", budget=0.3, relevance_scorer=scorer)
    inputs = pipe.prepare(model, processor, images=image, text=text)
    assert scorer.last_path == "reused_tower_cls"
    stats = pipe.last_stats[0]
    assert sum(stats.kept) == stats.budget == int((inputs["input_ids"] == model.config.image_token_id).sum())
    with pipe.attach(model, processor):
        attached = processor(images=image, text=text, return_tensors="pt")
        assert torch.equal(greedy(model, attached), greedy(model, inputs))


def test_nested_image_lists_and_questions_follow_the_hf_batching_convention(llava_model):
    model, processor = llava_model
    texts = ["USER: <image>\nOne? ASSISTANT:", "USER: <image>\n<image>\nTwo? ASSISTANT:"]
    images = [[picture(40, 40, 20)], [picture(50, 30, 21), picture(30, 50, 22)]]
    pipe = tp.Pipeline(adapter="llava", allocator="equal", selector="cls_final", budget=5)
    inputs = pipe.prepare(model, processor, images=images, text=texts, question=["one", "two"])
    assert (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist() == [5, 10]
    with pytest.raises(tp.ConfigError, match="1 questions for 2 texts"):
        pipe.prepare(model, processor, images=images, text=texts, question=["only one"])


def test_attach_binds_get_image_features_arguments_by_name(llava_model):
    model, processor = llava_model
    pipe = tp.Pipeline(adapter="llava", allocator="equal", selector="cls_final", budget=7)
    pixels = processor.image_processor([picture(40, 40, 23)], return_tensors="pt")["pixel_values"]
    with pipe.attach(model, processor):
        out = model.model.get_image_features(pixels, -2, "default")  # positional, as the signature allows
        assert pooled(out)[0].shape[0] == 7
        with pytest.raises(tp.ConfigError, match=r"vision_feature_layer=-1\) differs from the model config's -2"):
            model.model.get_image_features(pixels, vision_feature_layer=-1)
