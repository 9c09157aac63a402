"""What the LLaVA-family adapters hand to transformers, on every supported transformers version.

The adapters prune between the vision tower and the LLM, then let the model's own
``generate`` run. How pruned image embeddings reach the LLM depends on what the installed
transformers offers; everything here is chosen by *feature detection* (signatures and
attributes of the objects at hand), never by version strings:

* :func:`generate_path` — ``"mm_encoder_outputs"`` when the model's ``forward`` accepts
  pre-computed encoder outputs (transformers 5.18 and later); otherwise
  ``"inputs_embeds"``: the adapter embeds the prompt itself, writes the pruned image
  embeddings into the image placeholders (exactly as the stock model's ``masked_scatter``
  does) and passes ``inputs_embeds`` together with ``input_ids`` and ``attention_mask``.
  ``generate`` then runs the first step on the embeddings, derives positions from the
  attention mask as it does for the stock model, and returns the prompt ids in front of
  the new tokens, as it does for the stock model.
* :func:`processor_count_hooks` — for ``attach``: how to make the processor emit ``K``
  image placeholders: ``replace_image_token`` (newer processors), the LLaVA-NeXT
  processor's ``_get_number_of_features`` (older ones, which expand inline), or the
  LLaVA processor's ``num_additional_image_tokens`` term of its inline count (older
  LLaVA processors have no per-image hook; the count is one constant per processor).
* :func:`image_features_output` — what a wrapped ``get_image_features`` returns: a
  ``BaseModelOutputWithPooling`` where the stock method is annotated to return one,
  otherwise the plain sequence of per-image tensors older models concatenate.

transformers is imported lazily.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from tokenprune.errors import IncompatibleError

__all__ = [
    "GeneratePath",
    "generate_path",
    "generate_inputs",
    "forward_inputs",
    "prompt_hook",
    "processor_count_hooks",
    "image_features_output",
]

GeneratePath = Literal["mm_encoder_outputs", "inputs_embeds"]


def _parameters(method: Any) -> set[str]:
    try:
        return set(inspect.signature(method).parameters)
    except (TypeError, ValueError):
        return set()


def generate_path(model: Any) -> GeneratePath:
    """How pruned image embeddings reach ``model.generate`` with the installed transformers.

    ``"mm_encoder_outputs"`` when ``model.forward`` takes that argument, else
    ``"inputs_embeds"`` when ``model.prepare_inputs_for_generation`` forwards
    ``inputs_embeds``. Raises :class:`IncompatibleError` when neither is available.
    """
    if "mm_encoder_outputs" in _parameters(model.forward):
        return "mm_encoder_outputs"
    if "inputs_embeds" in _parameters(getattr(model, "prepare_inputs_for_generation", None)):
        return "inputs_embeds"
    raise IncompatibleError(
        f"{type(model).__name__}.generate accepts neither mm_encoder_outputs nor inputs_embeds; "
        "tokenprune needs one of them to hand pruned image embeddings to the LLM"
    )


def generate_inputs(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    embeddings: Sequence[torch.Tensor],
    path: GeneratePath | None = None,
) -> dict[str, Any]:
    """kwargs for ``model.generate``: the tokenized prompts with ``K`` placeholders per image
    and the pruned image embeddings (one ``[K, D]`` tensor per image, in prompt order).

    ``path`` forces a path (tests); by default :func:`generate_path` picks it.
    """
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    images = tuple(e.to(device) for e in embeddings)
    if (path or generate_path(model)) == "mm_encoder_outputs":
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        encoded = BaseModelOutputWithPooling(pooler_output=images)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_encoder_outputs": {"image": encoded}}
    with torch.inference_mode():
        embeds = model.get_input_embeddings()(input_ids)
        placeholders = (input_ids == model.config.image_token_id).unsqueeze(-1)
        image_rows = torch.cat(images).to(embeds.dtype) if images else embeds.new_empty(0, embeds.shape[-1])
        embeds = embeds.masked_scatter(placeholders, image_rows)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "inputs_embeds": embeds}


def forward_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` from ``prepare`` made fit for a plain forward call ``model(**...)``.

    On the ``inputs_embeds`` path ``generate`` needs ``input_ids`` beside the embeddings
    (for the returned prompt and its length), but ``forward`` takes only one of the two.
    """
    if "inputs_embeds" in inputs:
        return {key: value for key, value in inputs.items() if key != "input_ids"}
    return dict(inputs)


# ---------------------------------------------------------------------------- attach


def processor_count_hooks(processor: Any, image_tokens: Callable[[tuple[int, int] | None], int]) -> dict[str, Any]:
    """Per-instance replacements (attribute name -> value) that make ``processor`` expand each
    image token to ``image_tokens(image_size)`` placeholders; ``image_size`` is the image's
    ``(height, width)`` or None where the processor does not know it per image.

    Raises :class:`IncompatibleError` when the processor offers no way in.
    """
    image_token = processor.image_token
    replace = getattr(processor, "replace_image_token", None)
    if replace is not None:

        @functools.wraps(replace)
        def replace_image_token(image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
            sizes = image_inputs.get("image_sizes")
            size = None if sizes is None else _size(sizes[image_idx])
            return image_token * image_tokens(size)

        return {"replace_image_token": replace_image_token}
    # Without the CLS token the processor subtracts one after this call (strategy "default").
    dropped = int(getattr(processor, "vision_feature_select_strategy", None) == "default")
    count = getattr(processor, "_get_number_of_features", None)
    if count is not None:

        @functools.wraps(count)
        def _get_number_of_features(orig_height: int, orig_width: int, *args: Any, **kwargs: Any) -> int:
            return image_tokens((int(orig_height), int(orig_width))) + dropped

        return {"_get_number_of_features": _get_number_of_features}
    crop = _processed_size(processor)
    patch = getattr(processor, "patch_size", None)
    if crop is not None and patch and hasattr(processor, "num_additional_image_tokens"):
        # Inline count: (height // patch) * (width // patch) + num_additional_image_tokens - dropped.
        patches = (crop[0] // int(patch)) * (crop[1] // int(patch))
        return {"num_additional_image_tokens": image_tokens(None) - patches + dropped}
    raise IncompatibleError(
        f"Pipeline.attach cannot set the image-token count of {type(processor).__name__} (it has no "
        "replace_image_token, _get_number_of_features or num_additional_image_tokens); use "
        "Pipeline.prepare(model, processor, images=..., text=...) and model.generate(**inputs)"
    )


def prompt_hook(processor: Any, remember: Callable[[list[str]], None]) -> dict[str, Any]:
    """A per-instance wrapper that hands ``remember`` the processor's texts before the model
    runs (for prompt-relevance strategies in ``attach``); empty when there is no way in."""
    token = re.escape(processor.image_token)
    for name in ("get_text_with_replacements", "_check_special_mm_tokens"):
        original = getattr(processor, name, None)
        if original is None:
            continue
        # _check_special_mm_tokens (older processors) sees the texts after expansion: one run
        # of placeholders per image (images placed back to back read as one there)
        expanded = name == "_check_special_mm_tokens"

        def wrapper(text: list[str], *args: Any, _original: Any = original, _expanded: bool = expanded, **kwargs: Any) -> Any:
            texts = [str(t) for t in text]
            remember([re.sub(f"(?:{token})+", processor.image_token, t) for t in texts] if _expanded else texts)
            return _original(text, *args, **kwargs)

        return {name: functools.wraps(original)(wrapper)}
    return {}


def image_features_output(get_image_features: Any, embeddings: Sequence[torch.Tensor]) -> Any:
    """What a replacement of ``get_image_features`` returns so that the model's own forward
    reads ``embeddings``: a ``BaseModelOutputWithPooling`` where the stock method is annotated
    to return one, else the plain list of per-image tensors that older models concatenate."""
    annotation = inspect.signature(get_image_features).return_annotation
    if "ModelOutput" in str(annotation):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(pooler_output=tuple(embeddings))
    return list(embeddings)


def _size(size: Any) -> tuple[int, int]:
    values = size.tolist() if hasattr(size, "tolist") else size
    return int(values[0]), int(values[1])


def _processed_size(processor: Any) -> tuple[int, int] | None:
    """``(height, width)`` of the pixel values the image processor emits, when fixed."""
    images = getattr(processor, "image_processor", None)
    size = getattr(images, "crop_size", None) if getattr(images, "do_center_crop", False) else None
    if size is None:
        size = getattr(images, "size", None)

    def read(key: str) -> Any:
        return size.get(key) if isinstance(size, dict) else getattr(size, key, None)

    if size is None:
        return None
    height, width, edge = read("height"), read("width"), read("shortest_edge")
    if height is not None and width is not None:
        return int(height), int(width)
    return (int(edge), int(edge)) if edge is not None else None
