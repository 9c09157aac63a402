"""Qwen2.5-VL / Qwen2-VL: the adapter, its M-RoPE positions, the CLS-free tap and strategies.

The position tests capture what the LLM receives (``inputs_embeds``, ``position_ids``) with a
forward pre-hook on the language model, in a stock run (the processor + ``generate``) and in
a pruned run (``Pipeline.prepare`` + ``generate``), prefill and every decoding step.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from PIL import Image
from tokenprune.adapters import qwen2_5_vl as qwen_adapter
from tokenprune.adapters.qwen2_5_vl import generate_extends_positions
from tokenprune.adapters.taps import QwenVisionTap, tap_for

import tokenprune as tp
from tokenprune.cli import main
from tokenprune.tiny import save_tiny, tiny_llava, tiny_qwen2_5_vl, tiny_qwen2_vl

pytestmark = pytest.mark.compat  # also run against every supported transformers (make test-compat)

FAMILIES = {"qwen2_5_vl": tiny_qwen2_5_vl, "qwen2_vl": tiny_qwen2_vl}
NEW_TOKENS = 4

# The Qwen adapters hand generate explicit M-RoPE position_ids; generate extends them per new
# token only from transformers 5.2 (which brought _prepare_position_ids_for_generation). Below,
# prepare and attach refuse (test_a_generate_that_cannot_carry_positions_is_refused).
needs_positions = pytest.mark.skipif(
    not generate_extends_positions(transformers.Qwen2_5_VLForConditionalGeneration),
    reason=f"transformers {transformers.__version__}: generate does not extend explicit position_ids "
    "(needs >= 5.2); the Qwen adapters refuse it",
)
# attach sets the count through the processor's replace_image_token (transformers >= 5.10)
needs_replace_image_token = pytest.mark.skipif(
    not hasattr(transformers.Qwen2_5_VLProcessor, "replace_image_token"),
    reason=f"transformers {transformers.__version__}: Qwen2_5_VLProcessor has no replace_image_token "
    "(needs >= 5.10); attach refuses it",
)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    model, processor = FAMILIES[request.param]()
    return request.param, model, processor


@pytest.fixture(scope="module")
def qwen25():
    return tiny_qwen2_5_vl()


def _images():
    # 70x40 -> 2 x 4 merged tokens (window-aligned); 100x100 -> 6 x 6 (3 x 3 windows of 2 x 2)
    return [Image.new("RGB", (70, 40), (200, 30, 30)), _noise(100, 100, 1)]


def _noise(width, height, seed):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _prompt(processor, images=2, text="What is it?"):
    content = [{"type": "image"}, {"type": "text", "text": text}] + [{"type": "image"}] * (images - 1)
    content.append({"type": "text", "text": " Answer briefly."})
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


class _LLMInputs:
    """Records ``inputs_embeds`` and ``position_ids`` of every language-model call."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.model.language_model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls.append((kwargs["inputs_embeds"].detach().clone(), kwargs["position_ids"].detach().clone()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _stock_run(model, processor, images, texts):
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    with _LLMInputs(model) as seen, torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return inputs, seen.calls, out[:, inputs["input_ids"].shape[1] :]


def _pruned_run(pipe, model, processor, images, texts):
    inputs = pipe.prepare(model, processor, images=images, text=texts)
    with _LLMInputs(model) as seen, torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return inputs, seen.calls, out[:, inputs["input_ids"].shape[1] :]


def _stock_keep(pipe, stock_ids, image_token_id):
    """bool [B, L]: the stock tokens the pruned prompt should still hold (computed here, not by the adapter)."""
    keep = torch.ones_like(stock_ids, dtype=torch.bool)
    flat = []
    for image in pipe.last_images:
        rows, cols = image.layout.grid
        side = image.layout.tokens_per_side
        kept = torch.zeros(rows * cols, dtype=torch.bool)
        indices = image.selection.indices[0].cpu()
        kept[(indices // side) * cols + indices % side] = True
        flat.append(kept)
    keep[stock_ids == image_token_id] = torch.cat(flat)
    return keep


def _assert_positions_follow_stock(stock_calls, pruned_calls, stock_inputs, keep):
    """Prefill: each remaining token has its stock (t, h, w) and embedding; decoding continues the stock positions."""
    stock_mask = stock_inputs["attention_mask"].bool()
    (stock_embeds, stock_pos), (pruned_embeds, pruned_pos) = stock_calls[0], pruned_calls[0]
    assert pruned_pos.shape[0] == 4 and stock_pos.shape[0] == 4
    for row in range(stock_mask.shape[0]):
        wanted = stock_mask[row] & keep[row]
        got = pruned_pos.shape[-1] - int(wanted.sum())  # left padding of the pruned row
        assert torch.equal(pruned_pos[1:, row, got:], stock_pos[1:, row, wanted]), f"row {row}: M-RoPE positions moved"
        torch.testing.assert_close(pruned_embeds[row, got:], stock_embeds[row, wanted], rtol=0, atol=0)
    assert len(stock_calls) == len(pruned_calls) == NEW_TOKENS
    for step, ((_, stock_step), (_, pruned_step)) in enumerate(zip(stock_calls[1:], pruned_calls[1:]), start=1):
        assert torch.equal(pruned_step[1:], stock_step[1:]), f"decoding step {step}: positions differ from stock"


def _stock_and_dart_runs(family, budget):
    """The stock run and an ``equal`` + ``dart`` run at ``budget`` of the same two images and prompt."""
    name, model, processor = family
    images, text = _images(), _prompt(processor)
    stock = _stock_run(model, processor, images, [text])
    pipe = tp.Pipeline(adapter=name, allocator="equal", selector="dart", budget=budget)
    return pipe, stock, _pruned_run(pipe, model, processor, images, [text])


@needs_positions
def test_budget_one_feeds_the_llm_exactly_the_stock_input(family):
    _, (stock_inputs, stock_calls, stock_tokens), (inputs, calls, tokens) = _stock_and_dart_runs(family, 1.0)
    assert torch.equal(inputs["input_ids"], stock_inputs["input_ids"])
    assert torch.equal(tokens, stock_tokens)
    for (stock_embeds, stock_pos), (embeds, pos) in zip(stock_calls, calls):
        assert torch.equal(pos, stock_pos)
        assert torch.equal(embeds, stock_embeds)


@needs_positions
def test_pruned_tokens_keep_their_stock_positions_two_images_of_different_sizes(family):
    _, model, _ = family
    pipe, (stock_inputs, stock_calls, _), (inputs, calls, _) = _stock_and_dart_runs(family, 0.25)
    # a fraction of each image's merged tokens, floored: 2 of 8 and 9 of 36
    assert [s.kept for s in pipe.last_stats] == [(2,), (9,)]
    assert [s.stock_image_tokens for s in pipe.last_stats] == [8, 36]
    image_id = model.config.image_token_id
    assert int((inputs["input_ids"] == image_id).sum()) == 11
    assert calls[0][0].shape[1] == stock_calls[0][0].shape[1] - (44 - 11)
    keep = _stock_keep(pipe, stock_inputs["input_ids"], image_id)
    _assert_positions_follow_stock(stock_calls, calls, stock_inputs, keep)
    # the text after the images continues from its stock positions (the last prompt token)
    assert torch.equal(calls[0][1][1:, 0, -1], stock_calls[0][1][1:, 0, -1])


@needs_positions
def test_a_batch_of_two_prompts_keeps_every_row_on_its_stock_positions(qwen25):
    model, processor = qwen25
    first, second = _prompt(processor, images=1, text="Colour?"), _prompt(processor, images=2, text="Which is larger, really?")
    images = [_noise(40, 90, 2), *_images()]
    stock_inputs, stock_calls, _ = _stock_run(model, processor, [[images[0]], images[1:]], [first, second])
    pipe = tp.Pipeline(adapter="qwen2_5_vl", allocator="equal", selector="attention_received", budget=0.3)
    inputs, calls, _ = _pruned_run(pipe, model, processor, images, [first, second])
    assert len(pipe.last_stats) == 3
    keep = _stock_keep(pipe, stock_inputs["input_ids"], model.config.image_token_id)
    _assert_positions_follow_stock(stock_calls, calls, stock_inputs, keep)
    assert inputs["attention_mask"][0, 0] == 0 or inputs["attention_mask"][1, 0] == 0  # left padded
    prefill = [s.prefill_length for s in pipe.last_stats]
    assert prefill[0] == int(inputs["attention_mask"][0].sum()) and prefill[1] == prefill[2]


@needs_positions
def test_done_when_dart_prunes_a_real_qwen2_5_vl_through_its_generate(qwen25):
    model, processor = qwen25
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    pipe = tp.Pipeline(adapter="qwen2_5_vl", allocator="equal", selector="dart", budget=0.25)
    image = _noise(120, 64, 5)  # 4 x 8 merged tokens
    inputs = pipe.prepare(model, processor, images=image, text=_prompt(processor, images=1))
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    stats = pipe.last_stats[0]
    assert (stats.stock_image_tokens, stats.budget, stats.image_tokens) == (32, 8, 8)


@pytest.mark.parametrize(
    ("part", "name"),
    [("selector", "cls_final"), ("selector", "hero"), ("selector", "prumerge"), ("selector", "prumerge_plus"),
     ("allocator", "hired"), ("allocator", "hero")],
)
def test_cls_strategies_are_refused_before_any_forward(part, name):
    parts = {"allocator": "equal", "selector": "spatial", part: name}
    with pytest.raises(tp.IncompatibleError, match="has no CLS token"):
        tp.Pipeline(adapter="qwen2_5_vl", budget=0.2, **parts)


def test_the_tap_refuses_cls_needs_before_hooking(qwen25):
    model, _ = qwen25
    tap = tap_for(model.model.visual)
    assert isinstance(tap, QwenVisionTap) and not tap.has_cls_token
    with pytest.raises(tp.IncompatibleError, match="no CLS token"):
        with tap.capture(tp.Needs(cls_attention={0})):
            pass
    assert not model.model.visual._forward_pre_hooks


@needs_positions
@pytest.mark.parametrize("selector", ["spatial", {"name": "spatial", "mode": "pool"}, "attention_received", "dart"])
def test_selectors_that_need_no_cls_run_on_qwen(qwen25, selector):
    model, processor = qwen25
    pipe = tp.Pipeline(adapter="qwen2_5_vl", allocator="equal", selector=selector, budget=0.5)
    inputs = pipe.prepare(model, processor, images=_images(), text=_prompt(processor))
    model.generate(**inputs, max_new_tokens=1)
    for stats, image in zip(pipe.last_stats, pipe.last_images):
        assert stats.image_tokens == sum(stats.kept) <= stats.budget == stats.stock_image_tokens // 2
        assert bool(image.layout.valid[0, image.selection.indices[0]].all())


def _block_qk(model, pixel_values, grid, layer):
    """Reference: the block's rotated q, k ``[L, H, d]`` (block order) from its own input, and its segments."""
    tower = model.model.visual
    block = tower.blocks[layer]
    seen = {}

    def grab(module, args, kwargs):
        seen.update(hidden=args[0], cu=kwargs["cu_seqlens"], rotary=kwargs["position_embeddings"])

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        tower(pixel_values, grid_thw=grid)
    handle.remove()
    attn = block.attn
    length = seen["hidden"].shape[0]
    with torch.no_grad():
        qkv = attn.qkv(block.norm1(seen["hidden"])).reshape(length, 3, attn.num_heads, -1)
    cos, sin = seen["rotary"]

    def rotate(x):
        half = x.shape[-1] // 2
        turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos[:, None] + turned * sin[:, None]

    return rotate(qkv[:, 0].float()), rotate(qkv[:, 1].float()), seen["cu"].tolist()


def _dense_received(model, pixel_values, grid, layer):
    """Reference: the block's full softmax map per segment, column sums per patch ``[H, L]`` (block order)."""
    q, k, bounds = _block_qk(model, pixel_values, grid, layer)
    scale = model.model.visual.blocks[layer].attn.scaling
    received = torch.zeros(q.shape[1], q.shape[0])
    for start, end in zip(bounds[:-1], bounds[1:]):
        weights = torch.softmax(torch.einsum("qhd,khd->hqk", q[start:end], k[start:end]) * scale, dim=-1)
        received[:, start:end] = weights.sum(dim=1)
    return received


def _to_raster(name, tower, grid, per_unit):
    """Columns of ``per_unit`` (one per merge unit, block order) in merged raster order."""
    if name != "qwen2_5_vl":
        return per_unit
    if hasattr(tower, "get_window_index"):  # before transformers 5.x moved it to vision_utils
        order = tower.get_window_index(grid)[0]
    else:
        from transformers.vision_utils import get_vision_window_index

        order = get_vision_window_index(grid, 2, tower.window_size, tower.patch_size)[0]
    raster = torch.empty_like(per_unit)
    raster[:, order] = per_unit
    return raster


def test_received_attention_matches_the_dense_map_in_raster_order(family):
    name, model, processor = family
    inputs = processor.image_processor(_images(), return_tensors="pt")
    pixel_values, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    tower = model.model.visual
    layers = sorted({0, tower.config.depth - 1})
    with torch.no_grad(), tap_for(tower).capture(tp.Needs(received_attention=set(layers))) as record:
        tower(pixel_values, grid_thw=grid)
    patches = grid.prod(-1)
    for layer in layers:
        dense = _dense_received(model, pixel_values, grid, layer)  # block order (window-permuted for 2.5)
        per_unit = _to_raster(name, tower, grid, dense.view(dense.shape[0], -1, 4).sum(-1))
        expected = per_unit.split((patches // 4).tolist(), dim=1)
        for image, (got, want) in enumerate(zip(record.received_attention(layer), expected)):
            torch.testing.assert_close(got, want / patches[image], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[0]), rtol=1e-4, atol=1e-5)
    features = model.model.get_image_features(pixel_values, grid)
    features = getattr(features, "pooler_output", features)  # a tuple of tensors before 5.x
    assert all(torch.equal(a, b) for a, b in zip(record.features(), features))


def test_keys_come_per_merged_token_in_raster_order(family):
    name, model, processor = family
    inputs = processor.image_processor([_noise(100, 100, 3)], return_tensors="pt")
    pixel_values, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    tower = model.model.visual
    with torch.no_grad(), tap_for(tower).capture(tp.Needs(keys={1})) as record:
        tower(pixel_values, grid_thw=grid)
    _, k, _ = _block_qk(model, pixel_values, grid, 1)
    expected = _to_raster(name, tower, grid, k.reshape(36, -1).T).T  # 4 patches of a unit, concatenated
    torch.testing.assert_close(record.keys(1)[0].float(), expected, rtol=1e-5, atol=1e-6)


def test_attention_received_is_refused_on_a_tower_that_cannot_compute_it():
    model, processor = tiny_llava()
    pipe = tp.Pipeline(adapter="llava", allocator="equal", selector="attention_received", budget=0.5)
    with pytest.raises(tp.IncompatibleError, match="received_attention"):
        pipe.prepare(model, processor, images=Image.new("RGB", (56, 56)), text="USER: <image>\nHi ASSISTANT:")


def test_dart_runs_on_llava_through_generate():
    model, processor = tiny_llava()
    pipe = tp.Pipeline(adapter="llava", allocator="equal", selector="dart", budget=0.3)
    inputs = pipe.prepare(model, processor, images=_noise(56, 56, 4), text="USER: <image>\nHi ASSISTANT:")
    model.generate(**inputs, max_new_tokens=1)
    assert pipe.last_stats[0].image_tokens == int(0.3 * 49)


def test_dart_keeps_the_pivots_and_the_tokens_least_like_them():
    # tokens 0-3 are near-copies of one direction (token 0 has the largest norm: the pivot),
    # 4 and 5 point elsewhere; with one pivot and budget 3 it keeps 0, then the two least similar
    features = torch.tensor([[3.0, 0.1], [1.0, 0.0], [1.0, 0.05], [1.0, 0.02], [0.0, 1.0], [-1.0, 0.2]])
    layout = tp.Layout(3, (0, 0), False, torch.tensor([[True] * 6 + [False] * 3]), grid=(2, 3))
    signals = tp.Signals(features=torch.cat([features, torch.zeros(3, 2)])[None])
    selection = tp.build_selector("dart", pivots=1).select(layout, signals, torch.tensor([3]))
    assert selection.indices[0].tolist() == [0, 4, 5]
    two = tp.build_selector("dart", pivots=2).select(layout, signals, torch.tensor([3]))
    assert two.indices[0].tolist() == [0, 4, 5]  # pivots 0 and 5 (largest L1 norms), then 4


def test_layout_grid_is_checked_and_sets_the_full_token_count():
    valid = torch.zeros(1, 16, dtype=torch.bool)
    valid[0, :4] = True
    layout = tp.Layout(4, (0, 0), False, valid, grid=(1, 4))
    assert layout.full_tokens == 4 and tp.Pipeline(allocator="equal", selector="spatial", budget=0.5).image_budget(layout) == 2
    with pytest.raises(tp.ContractError, match="outside"):
        tp.Layout(4, (0, 0), False, torch.ones(1, 16, dtype=torch.bool), grid=(1, 4))
    with pytest.raises(tp.ContractError, match="max"):
        tp.Layout(4, (0, 0), False, valid, grid=(1, 3))


def test_prepare_refuses_a_text_without_one_image_token_per_image(qwen25):
    model, processor = qwen25
    pipe = tp.Pipeline(adapter="qwen2_5_vl", allocator="equal", selector="dart", budget=0.5)
    with pytest.raises(tp.ConfigError, match="image token"):
        pipe.prepare(model, processor, images=_images(), text=_prompt(processor, images=1))
    with pytest.raises(tp.ConfigError, match="video"):
        pipe.prepare(model, processor, images=_images()[:1], text=_prompt(processor, images=1) + "<|video_pad|>")


@needs_positions
def test_run_on_a_saved_tiny_qwen_checkpoint(tmp_path, capsys):
    model, processor = tiny_qwen2_5_vl(seed=3)
    save_tiny(model, processor, tmp_path / "ckpt")
    image = tmp_path / "photo.png"
    _noise(90, 50, 6).save(image)
    code = main(
        ["run", "--model", str(tmp_path / "ckpt"), "--image", str(image), "--budget", "0.25",
         "--repeats", "1", "--max-new-tokens", "2", "--out", str(tmp_path / "k.png")]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "adapter:   qwen2_5_vl(" in printed and "selector:  dart(" in printed
    assert "image tokens to the LLM                        4        18" in printed
    assert (tmp_path / "k.png").is_file()


@needs_positions
@needs_replace_image_token
def test_attach_prunes_the_processor_and_generate_calls_of_a_harness(qwen25):
    model, processor = qwen25
    images, texts = [_noise(40, 90, 2), *_images()], [_prompt(processor, images=1), _prompt(processor)]
    pipe = tp.Pipeline(adapter="qwen2_5_vl", allocator="equal", selector="dart", budget=0.25)
    prepared_inputs, prepared_calls, prepared_tokens = _pruned_run(pipe, model, processor, images, texts)
    with pipe.attach(model, processor):
        inputs = processor(images=[[images[0]], images[1:]], text=texts, return_tensors="pt", padding=True)
        assert torch.equal(inputs["input_ids"], prepared_inputs["input_ids"])
        with _LLMInputs(model) as seen, torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(out[:, inputs["input_ids"].shape[1] :], prepared_tokens)
    for (embeds, pos), (want_embeds, want_pos) in zip(seen.calls, prepared_calls):
        assert torch.equal(pos, want_pos) and torch.equal(embeds, want_embeds)
    assert "generate" not in model.__dict__ and "replace_image_token" not in processor.__dict__
    stock = processor(images=[images[1]], text=[_prompt(processor, images=1)], return_tensors="pt")
    assert int((stock["input_ids"] == model.config.image_token_id).sum()) == 8  # restored: stock count


def test_a_generate_that_cannot_carry_positions_is_refused(qwen25, monkeypatch):
    # what transformers < 5.2 looks like (on those it is the real state)
    monkeypatch.setattr(qwen_adapter, "generate_extends_positions", lambda model: False)
    model, processor = qwen25
    pipe = tp.Pipeline(adapter="qwen2_5_vl", allocator="equal", selector="dart", budget=0.5)
    with pytest.raises(tp.IncompatibleError, match=r"position_ids.*>= 5\.2"):
        pipe.prepare(model, processor, images=_images(), text=_prompt(processor))
    with pytest.raises(tp.IncompatibleError, match=r">= 5\.2"):
        with pipe.attach(model, processor):
            pass  # pragma: no cover


@needs_positions
def test_attach_refuses_a_processor_without_replace_image_token(qwen25, monkeypatch):
    # what transformers < 5.10 looks like (on those it is the real state)
    model, processor = qwen25
    for cls in type(processor).__mro__:
        if "replace_image_token" in vars(cls):
            monkeypatch.delattr(cls, "replace_image_token")
    pipe = tp.Pipeline(adapter="qwen2_5_vl", allocator="equal", selector="dart", budget=0.5)
    with pytest.raises(tp.IncompatibleError, match="replace_image_token.*prepare"):
        with pipe.attach(model, processor):
            pass  # pragma: no cover


def test_attach_needs_a_fixed_token_count(qwen25):
    model, processor = qwen25
    pipe = tp.Pipeline(adapter="qwen2_5_vl", allocator="equal", selector={"name": "spatial", "mode": "pool"}, budget=0.5)
    with pytest.raises(tp.ConfigError, match="prepare"):
        with pipe.attach(model, processor):
            pass


def test_tiny_qwen_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    first, processor = tiny_qwen2_5_vl(seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    second, _ = tiny_qwen2_5_vl(seed=7)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    vision = first.config.vision_config
    assert 0 < len(vision.fullatt_block_indexes) < vision.depth  # windowed and full blocks both exist
    tokens = processor.tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|image_pad|>", "<|video_pad|>", "<|vision_end|>"])
    assert len(set(tokens)) == 4 and processor.tokenizer.unk_token_id not in tokens


def test_the_invariant_suite_covers_the_cls_free_selectors_and_grid_layouts():
    from hypothesis import given, settings

    from tokenprune import testing as tpt

    assert {"dart", "attention_received"} <= set(tp.list_selectors())
    seen = []

    @settings(max_examples=200, derandomize=True)
    @given(tpt.layouts())
    def collect(layout):
        seen.append(layout.grid)

    collect()
    assert any(grid is not None and grid[0] != grid[1] for grid in seen)


def test_runtime_detects_the_qwen_adapter_from_its_model_classes():
    from tokenprune import runtime

    owners = runtime.adapters_by_model_class()
    assert owners["Qwen2_5_VLForConditionalGeneration"] == owners["Qwen2VLForConditionalGeneration"] == "qwen2_5_vl"
