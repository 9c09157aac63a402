"""Adapter contracts as types, attach lifecycle, prepare() argument errors (public API)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

import tokenprune as tp
from tokenprune.tiny import TINY_VISION_LAYERS, tiny_llava, tiny_llava_next

from .test_adapters_llava import chat, picture

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def next_model():
    return tiny_llava_next(seed=3)


@pytest.fixture(scope="module")
def llava_model():
    return tiny_llava(seed=4)


def _pipe(adapter: str = "llava_next", **options) -> tp.Pipeline:
    return tp.Pipeline(adapter=adapter, allocator="hired", selector="cls_final", budget=0.2, **options)


def _image_tokens(processor, image, text) -> int:
    ids = processor(images=image, text=text, return_tensors="pt")["input_ids"]
    return int((ids == processor.image_token_id).sum())


def _wrapped(model, processor) -> list[str]:
    return [n for n in ("replace_image_token", "get_text_with_replacements") if n in processor.__dict__] + [
        n for n in ("get_image_features",) if n in model.model.__dict__
    ]


# ------------------------------------------------------------------ contracts as types


def test_builtin_adapters_are_typed_and_pipeline_dispatches_by_type():
    assert isinstance(tp.build_adapter("llava_next"), tp.VLMAdapter)
    assert isinstance(tp.build_adapter("llava"), tp.VLMAdapter)
    assert isinstance(tp.build_adapter("sharegpt4v"), tp.VLMAdapter)
    assert isinstance(tp.build_adapter("vision_tower"), tp.TowerAdapter)
    assert issubclass(tp.VLMAdapter, tp.Adapter) and issubclass(tp.TowerAdapter, tp.Adapter)

    @dataclass(frozen=True)
    class DuckTyped(tp.Adapter):  # has prepare/prune methods but is neither contract
        def prepare(self, *args, **kwargs):
            return {"dispatched": True}

        def prune(self, *args, **kwargs):
            return ["dispatched"]

    pipe = tp.Pipeline(adapter=DuckTyped(), allocator="equal", selector="cls_final", budget=0.5)
    with pytest.raises(tp.ConfigError, match="needs a VLM adapter"):
        pipe.prepare(None, None, images=None, text="x")
    with pytest.raises(tp.ConfigError, match="needs an adapter that prunes bare towers"):
        pipe.prune(None, torch.zeros(1, 3, 8, 8))
    assert pipe.part_label("adapter") == "DuckTyped" and pipe.part_label("selector") == "'cls_final'"


def test_vlm_adapter_must_implement_every_hook():
    class Incomplete(tp.VLMAdapter):
        def prepare(self, *args, **kwargs):
            return {}

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()


# ------------------------------------------------------------------ attach lifecycle (issue 11.1)


def test_attach_twice_on_one_model_is_refused_and_leaves_nothing_behind(next_model):
    model, processor = next_model
    image, text = picture(100, 70, 1), chat(processor)
    stock = _image_tokens(processor, image, text)
    first, second = _pipe().attach(model, processor), _pipe(newline="none").attach(model, processor)
    first.__enter__()
    with pytest.raises(tp.ConfigError, match="already inside a Pipeline.attach"):
        second.__enter__()
    assert _image_tokens(processor, image, text) < stock  # the first context still prunes
    first.__exit__(None, None, None)
    assert _wrapped(model, processor) == []
    assert _image_tokens(processor, image, text) == stock
    with _pipe().attach(model, processor):  # free again afterwards
        assert _image_tokens(processor, image, text) < stock
    assert _image_tokens(processor, image, text) == stock


def test_attach_from_three_threads_never_leaves_a_wrapper(next_model):
    model, processor = next_model
    image, text = picture(90, 60, 2), chat(processor)
    stock = _image_tokens(processor, image, text)
    start = threading.Barrier(3)
    outcomes: list[str] = []

    def worker() -> None:
        pipe = _pipe()
        start.wait()
        try:
            with pipe.attach(model, processor):
                start_inner = _image_tokens(processor, image, text)
                outcomes.append("pruned" if start_inner < stock else "stock")
        except tp.ConfigError:
            outcomes.append("refused")

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(outcomes) == 3 and "stock" not in outcomes and "pruned" in outcomes
    assert _wrapped(model, processor) == []
    assert _image_tokens(processor, image, text) == stock


# ------------------------------------------------------------------ prepare() errors (issue 11.10)


def test_prepare_text_none_is_a_config_error(llava_model):
    model, processor = llava_model
    with pytest.raises(tp.ConfigError, match="text must be a string or a non-empty list of strings"):
        _pipe("llava").prepare(model, processor, images=picture(40, 40, 0), text=None)


def test_prepare_question_not_a_string_is_a_config_error(llava_model):
    model, processor = llava_model
    with pytest.raises(tp.ConfigError, match="question must be a string"):
        _pipe("llava").prepare(model, processor, images=picture(40, 40, 0), text=chat(processor), question=5)


def test_fraction_budget_works():
    pipe = tp.Pipeline(allocator="hired", selector="cls_final", budget=Fraction(1, 5))
    assert pipe.budget == tp.parse_budget(0.2)
    with pytest.raises(tp.BudgetError):
        tp.Pipeline(allocator="hired", selector="cls_final", budget=Fraction(7, 5))


@pytest.mark.parametrize("adapter", ["llava", "llava_next"])
def test_a_stacked_4d_pixel_batch_is_a_clear_error(adapter, llava_model, next_model):
    model, processor = llava_model if adapter == "llava" else next_model
    batch = torch.rand(2, 3, 60, 60)
    with pytest.raises(tp.ConfigError, match=r"images\[0\] is a 4-D array .* a stacked batch"):
        _pipe(adapter).prepare(model, processor, images=batch, text=chat(processor))


def test_truncation_is_named_when_it_cuts_image_placeholders(llava_model):
    model, processor = llava_model
    with pytest.raises(tp.ConfigError, match=r"truncation=True \(max_length=8\) cut image placeholders"):
        _pipe("llava").prepare(
            model, processor, images=picture(40, 40, 0), text=chat(processor), truncation=True, max_length=8
        )


def test_numpy_option_values_are_accepted_like_numpy_budgets():
    pipe = tp.Pipeline(
        allocator="hired", selector="cls_final", budget=np.float32(0.2), alpha=np.float32(0.3),
        selector_options={"final_layer": np.int64(-2)},
    )  # fmt: skip
    assert pipe.allocator.alpha == 0.3 and type(pipe.allocator.alpha) is float
    assert pipe.selector.final_layer == -2 and type(pipe.selector.final_layer) is int
    assert pipe.budget == tp.parse_budget(0.2)


def test_last_stats_are_cleared_by_a_failed_prepare(llava_model):
    model, processor = llava_model
    pipe = _pipe("llava")
    pipe.prepare(model, processor, images=picture(40, 40, 0), text=chat(processor))
    assert len(pipe.last_stats) == 1
    with pytest.raises(tp.ConfigError):
        pipe.prepare(model, processor, images=[picture(40, 40, 0)] * 2, text=chat(processor))
    assert pipe.last_stats == []


def test_docs_state_the_tiny_towers_depth():
    text = (DOCS / "adapters.md").read_text()
    assert f"a {TINY_VISION_LAYERS}-block CLIP tower" in text
