"""Feature detection of the generate path and attach hooks (adapters/_generate_inputs.py);
the ``inputs_embeds`` fallback forced on the installed transformers gives the stock tokens."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import tokenprune as tp
from tokenprune.adapters import _generate_inputs
from tokenprune.adapters._generate_inputs import generate_path, processor_count_hooks
from tokenprune.tiny import tiny_llava_next

pytestmark = pytest.mark.compat  # also run against every supported transformers (make test-compat)


class _NewModel:
    def forward(self, input_ids=None, mm_encoder_outputs=None, **kwargs): ...

    def prepare_inputs_for_generation(self, input_ids, inputs_embeds=None, **kwargs): ...


class _OldModel:
    def forward(self, input_ids=None, inputs_embeds=None, **kwargs): ...

    def prepare_inputs_for_generation(self, input_ids, inputs_embeds=None, **kwargs): ...


class _NoWayModel:
    def forward(self, input_ids=None): ...

    def prepare_inputs_for_generation(self, input_ids): ...


def test_generate_path_is_detected_from_signatures():
    assert generate_path(_NewModel()) == "mm_encoder_outputs"
    assert generate_path(_OldModel()) == "inputs_embeds"
    with pytest.raises(tp.IncompatibleError, match="neither mm_encoder_outputs nor inputs_embeds"):
        generate_path(_NoWayModel())


class _InlineNextProcessor:
    """A LLaVA-NeXT processor of older releases: no replace_image_token, counts inline."""

    image_token = "<image>"
    vision_feature_select_strategy = "default"

    def _get_number_of_features(self, orig_height, orig_width, height, width):
        return 999


class _InlineLlavaProcessor:
    """A LLaVA processor of older releases: the count is patches + num_additional_image_tokens."""

    image_token = "<image>"
    vision_feature_select_strategy = "default"
    patch_size = 8
    num_additional_image_tokens = 1

    class image_processor:
        do_center_crop = True
        crop_size = {"height": 56, "width": 56}


def test_attach_count_hooks_without_replace_image_token():
    sizes = []
    hooks = processor_count_hooks(_InlineNextProcessor(), lambda size: sizes.append(size) or 40)
    assert hooks["_get_number_of_features"](60, 100, 56, 56) == 41  # the processor subtracts the CLS
    assert sizes == [(60, 100)]
    hooks = processor_count_hooks(_InlineLlavaProcessor(), lambda size: 10)
    # (56 // 8) ** 2 + extra - 1 == 10
    assert hooks == {"num_additional_image_tokens": 10 - 49 + 1}
    with pytest.raises(tp.IncompatibleError, match="cannot set the image-token count"):
        processor_count_hooks(type("P", (), {"image_token": "<image>"})(), lambda size: 1)


def test_forced_inputs_embeds_path_is_the_stock_model_and_feeds_exactly_the_kept_count(monkeypatch):
    monkeypatch.setattr(_generate_inputs, "generate_path", lambda model: "inputs_embeds")
    model, processor = tiny_llava_next(seed=5)
    images = [Image.new("RGB", (90, 50), (250, 20, 20)), Image.new("RGB", (40, 130), (20, 90, 250))]
    texts = ["<image> what?", "<image> and this one?"]
    full = tp.Pipeline(adapter="llava_next", allocator="equal", selector="cls_final", budget=1.0, newline="row")
    ours = full.prepare(model, processor, images=images, text=texts)
    assert "inputs_embeds" in ours and "mm_encoder_outputs" not in ours
    stock = processor(images=images, text=texts, return_tensors="pt", padding=True, padding_side="left")
    assert torch.equal(ours["input_ids"], stock["input_ids"])
    with torch.inference_mode():
        mine = model.generate(**ours, max_new_tokens=5, do_sample=False)
        theirs = model.generate(**stock, max_new_tokens=5, do_sample=False)
    assert torch.equal(mine, theirs)  # prompt ids included, as on the stock path

    pruned = tp.Pipeline(adapter="llava_next", allocator="equal", selector="cls_final", budget=0.2)
    inputs = pruned.prepare(model, processor, images=images, text=texts)
    seen = {}

    def first_prefill(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"])

    handle = model.model.language_model.register_forward_pre_hook(first_prefill, with_kwargs=True)
    try:
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
    finally:
        handle.remove()
    placeholders = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    assert placeholders == [sum(s.kept) for s in pruned.last_stats]
    torch.testing.assert_close(seen["embeds"], inputs["inputs_embeds"], rtol=0, atol=0)
