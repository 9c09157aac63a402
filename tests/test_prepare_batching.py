"""``Pipeline.prepare`` works on the whole batch (issue 12, items 4 and 5): op counts, host
reads, one text-encoder forward for a batch's prompts, and the batched gather in LLM order
equal to the per-image ``order_tokens`` path. Op counts, never times."""

from __future__ import annotations

import pytest
import torch
from tokenprune.adapters.llava import LlavaAdapter
from tokenprune.adapters.llava_next import LlavaNextAdapter

import tokenprune as tp
from tokenprune.testing import count_dispatch
from tokenprune.tiny import tiny_llava, tiny_llava_next

from .test_adapters_llava import chat, clip_scorer_sharing_the_tower, picture

pytestmark = pytest.mark.compat

#: (width, height): the 1x2, 2x1, 2x2, 3x1 and 1x3 grids of the tiny LLaVA-NeXT, and more.
SIZES = ((90, 50), (40, 130), (100, 100), (160, 50), (50, 160), (64, 48), (70, 120), (120, 60))


@pytest.fixture(scope="module")
def next_model():
    return tiny_llava_next(seed=1)


def _counted(pipe, model, processor, images):
    texts = [chat(processor)] * len(images)
    with torch.inference_mode(), tp.validation(False):
        pipe.prepare(model, processor, images=images, text=texts)  # lazy imports, per-size caches
        with count_dispatch() as count:
            pipe.prepare(model, processor, images=images, text=texts)
    return count


def test_a_batch_of_8_dispatches_at_most_twice_the_ops_of_one_image_and_one_host_read(next_model):
    model, processor = next_model
    pipe = tp.Pipeline(adapter="llava_next", allocator="equal", selector="cls_final", budget=0.2)
    images = [picture(w, h, seed) for seed, (w, h) in enumerate(SIZES)]
    one = _counted(pipe, model, processor, images[:1])
    batch = _counted(pipe, model, processor, images)
    # Per image only the processor's own work grows (its resize/pad/normalise ops, ~57 per
    # image); the tower, the strategies, the gather, the projector and the tokenizer run
    # once per batch. Before batching: 2.8x.
    assert batch.ops <= 2 * one.ops, (one, batch)
    # The one read: the processor's image_sizes (a host tensor, no device sync) for the
    # partitioner. Budgets, selections, the gather order and prompt lengths read nothing.
    assert batch.reads <= 1 and one.reads <= 1, (one.read_names, batch.read_names)
    assert batch.read_names == ["Tensor.tolist"], batch.read_names


def test_llava_prepare_reads_nothing_back():
    model, processor = tiny_llava(seed=2)
    pipe = tp.Pipeline(adapter="llava", allocator="equal", selector="cls_final", budget=0.2)
    images = [picture(w, h, seed) for seed, (w, h) in enumerate(SIZES)]
    one = _counted(pipe, model, processor, images[:1])
    batch = _counted(pipe, model, processor, images)
    assert batch.reads == one.reads == 0, batch.read_names
    assert batch.ops <= 2 * one.ops, (one, batch)


@pytest.mark.parametrize(
    ("allocator", "selector", "adapter_class"),
    [("hired", "cls_final", LlavaNextAdapter), ("equal", "spatial", LlavaNextAdapter), ("equal", "cls_final", LlavaAdapter)],
)
def test_batched_gather_in_llm_order_equals_the_per_image_order_tokens_path(
    next_model, monkeypatch, allocator, selector, adapter_class
):
    model, processor = next_model if adapter_class is LlavaNextAdapter else tiny_llava(seed=2)
    adapter = "llava_next" if adapter_class is LlavaNextAdapter else "llava"
    images = [picture(w, h, seed) for seed, (w, h) in enumerate(SIZES[:5])]
    texts = [chat(processor, f"question {i}") for i in range(len(images))]
    pipe = tp.Pipeline(adapter=adapter, allocator=allocator, selector=selector, budget=0.3)
    batched = pipe.prepare(model, processor, images=images, text=texts)
    batched_images = pipe.last_images
    calls = []
    original = adapter_class.order_tokens

    def per_image(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(adapter_class, "order_keys", lambda self, layout, geometry: None)
    monkeypatch.setattr(adapter_class, "order_tokens", per_image)
    reference = pipe.prepare(model, processor, images=images, text=texts)
    assert len(calls) == len(images)  # the reference really took the per-image path
    assert torch.equal(batched["input_ids"], reference["input_ids"])
    for mine, theirs in zip(batched_images, pipe.last_images):
        assert torch.equal(mine.embeddings, theirs.embeddings)
        assert mine.stats == theirs.stats


# ------------------------------------------------------------------------- relevance


@pytest.fixture(scope="module")
def clip_scorer(next_model, tmp_path_factory):
    return clip_scorer_sharing_the_tower(next_model[0], tmp_path_factory.mktemp("clip_tokenizer"))


def test_hero_scores_a_batch_with_one_text_forward_over_its_distinct_prompts(next_model, clip_scorer):
    model, processor = next_model
    clip, scorer = clip_scorer
    scorer.forget_prompts()
    batches: list[int] = []
    handle = clip.text_model.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(int(kwargs["input_ids"].shape[0])), with_kwargs=True
    )
    images = [picture(w, h, seed) for seed, (w, h) in enumerate(SIZES[:4])]
    questions = ["Where is the red car?", "How many dogs?", "Where is the red car?", "How many dogs?"]
    texts = [chat(processor, q) for q in questions]
    pipe = tp.Pipeline(adapter="llava_next", allocator="hero", selector="hero", budget=0.3, relevance_scorer=scorer)
    try:
        pipe.prepare(model, processor, images=images, text=texts, question=questions)
        assert batches == [2]  # ONE text-encoder forward, on the 2 distinct prompts
        assert scorer.last_path == "reused_tower_cls"
        batch_images = pipe.last_images
        pipe.prepare(model, processor, images=images, text=texts, question=questions)
        assert batches == [2]  # asked again: both prompts come from the scorer's cache
    finally:
        handle.remove()
    # Image by image: the same selection and (to float tolerance) the same embeddings.
    for i, (image, text, question) in enumerate(zip(images, texts, questions)):
        pipe.prepare(model, processor, images=image, text=text, question=question)
        single = pipe.last_images[0]
        assert single.stats.kept == batch_images[i].stats.kept
        torch.testing.assert_close(single.embeddings, batch_images[i].embeddings, rtol=1e-5, atol=1e-5)


def test_the_cached_tap_dies_with_its_tower():
    # the tap is cached on the tower, not in a global table (which kept every tower alive)
    import gc
    import weakref

    model, processor = tiny_llava_next(seed=2)
    pipe = tp.Pipeline(adapter="llava_next", allocator="equal", selector="cls_final", budget=0.5)
    with torch.inference_mode():
        pipe.prepare(model, processor, images=picture(90, 50, 0), text=chat(processor))
    tower = weakref.ref(model.model.vision_tower)
    del model
    gc.collect()
    assert tower() is None


def test_annotated_features_are_the_ones_gathered():
    # an annotate hook that replaces an image's features must not be bypassed by the batch gather
    import dataclasses

    from tokenprune.tower import run_batch

    layout = tp.Layout.single(2)
    features = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    signals = tp.Signals(features=features, num_layers=1)

    class Record:
        def signals(self):
            return signals

    class Tap:
        def capture(self, needs, feature_layer=None):
            import contextlib

            return contextlib.nullcontext(Record())

    pipe = tp.Pipeline(allocator="equal", selector="spatial", budget=0.5)
    kept = run_batch(pipe, Tap(), lambda: None, [layout, layout], feature_layer=None)
    assert kept.features is features
    moved = run_batch(pipe, Tap(), lambda: None, [layout, layout], feature_layer=None,
                      annotate=lambda i, s: dataclasses.replace(s, features=s.features + 100))
    assert moved.features is None  # the adapter then gathers per image from the annotated ones


def test_layout_masks_are_copied_once_per_device():
    layout = tp.Layout.single(3)
    assert layout.valid_on("cpu") is layout.valid
    first = layout.valid_on("meta")
    assert first.device.type == "meta" and layout.valid_on("meta") is first
