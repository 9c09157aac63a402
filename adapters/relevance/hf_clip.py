"""Prompt relevance with a Hugging Face transformers ``CLIPModel``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from tokenprune import ConfigError

from ._base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipRelevanceScorer
from ._weights import Trunk

if TYPE_CHECKING:
    from torch import nn

__all__ = ["HFClipScorer", "hf_vision_core"]

_CORE_PARTS = ("embeddings", "pre_layrnorm", "encoder", "post_layernorm")
_WRAPPERS = ("vision_model", "vision_tower", "model")


def hf_vision_core(module: object) -> nn.Module | None:
    """The transformers module that holds a CLIP image encoder's own layers, or ``None``.

    Accepts a ``CLIPModel``, ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, the
    ``CLIPVisionTransformer`` of older transformers releases, or a VLM holding one of
    them as ``vision_tower`` / ``vision_model`` (also under ``.model``, as LLaVA does).
    Parameter names are taken relative to the returned module, so a ``CLIPVisionModel``
    tower compares with a ``CLIPModel``'s ``vision_model`` whichever transformers release
    nests them.
    """
    level: list[object] = [module]
    for _ in range(4):  # breadth first, a few wrappers deep
        for candidate in level:
            if all(hasattr(candidate, part) for part in _CORE_PARTS):
                return candidate  # type: ignore[return-value]
        level = [
            w
            for c in level
            for name in _WRAPPERS
            if (w := getattr(c, name, None)) is not None
        ]
    return None


class HFClipScorer(ClipRelevanceScorer):
    """CLIP relevance from a transformers ``CLIPModel`` and its tokenizer.

    Args:
        model: a ``CLIPModel`` (anything with ``vision_model``, ``text_model``,
            ``visual_projection``, ``text_projection`` and a CLIP ``config``). It is put in
            eval mode.
        tokenizer: the model's ``CLIPTokenizer`` (or any callable tokenizer of the
            transformers kind). Prompts longer than the text tower's context
            (``text_config.max_position_embeddings``, 77 for CLIP) are truncated; the
            end-of-text token is kept.
        image_mean, image_std: the statistics the model was trained with. A ``CLIPModel``
            does not store them (its image processor does); the default is OpenAI's CLIP
            normalisation. :meth:`from_pretrained` reads them from the checkpoint's image
            processor config.

    The fast path reuses a transformers CLIP tower's last-layer CLS through
    ``post_layernorm`` + ``visual_projection`` of this model (see
    :class:`ClipRelevanceScorer` for when it applies).
    """

    framework: ClassVar[str] = "transformers"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
    ) -> None:
        missing = [
            a
            for a in (
                "vision_model",
                "text_model",
                "visual_projection",
                "text_projection",
                "config",
            )
            if getattr(model, a, None) is None
        ]
        if missing:
            raise ConfigError(
                f"HFClipScorer needs a transformers CLIPModel; {type(model).__name__} lacks {missing}"
            )
        if not callable(tokenizer):
            raise ConfigError(
                f"HFClipScorer needs a callable tokenizer, got {type(tokenizer).__name__}"
            )
        config = model.config
        super().__init__(
            image_mean=image_mean,
            image_std=image_std,
            image_size=int(config.vision_config.image_size),
            context_length=int(config.text_config.max_position_embeddings),
        )
        self.model = model.eval()
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> HFClipScorer:
        """Load a ``CLIPModel``, its tokenizer and its normalisation from local files only.

        ``name_or_path`` is a directory, or a hub name already in the local cache:
        tokenprune never downloads. Without an image-processor config the statistics
        default to OpenAI's CLIP normalisation.
        """
        from huggingface_hub.errors import HFValidationError
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        try:
            model = CLIPModel.from_pretrained(
                name_or_path, local_files_only=True, dtype=dtype
            )
            tokenizer = AutoTokenizer.from_pretrained(
                name_or_path, local_files_only=True
            )
        except (OSError, HFValidationError) as error:  # a missing local path is not a repo id either
            raise ConfigError(
                f"could not load a CLIPModel and tokenizer from {name_or_path!r} without downloading "
                f"({error}); download the checkpoint first and pass its directory"
            ) from error
        mean: Sequence[float] = OPENAI_CLIP_MEAN
        std: Sequence[float] = OPENAI_CLIP_STD
        try:
            processor = AutoImageProcessor.from_pretrained(
                name_or_path, local_files_only=True
            )
        except (OSError, ValueError, ImportError):
            processor = None
        if processor is not None and getattr(processor, "image_mean", None) is not None:
            mean, std = processor.image_mean, processor.image_std
        if device is not None:
            model = model.to(device)
        return cls(model, tokenizer, image_mean=mean, image_std=std)

    # ------------------------------------------------------------------ hooks

    @property
    def device(self) -> torch.device:
        return self.model.visual_projection.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.visual_projection.weight.dtype

    def tokenize_batch(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        encoded = self.tokenizer(
            list(prompts),
            truncation=True,
            max_length=self.context_length,
            padding=len(prompts) > 1,
            return_tensors="pt",
        )
        ids = encoded["input_ids"]
        return ids, encoded.get("attention_mask", torch.ones_like(ids))

    def _encode_text(self, token_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(token_ids)
        out = self.model.text_model(input_ids=token_ids, attention_mask=attention_mask)
        pooled = out.pooler_output if hasattr(out, "pooler_output") else out[1]
        return self.model.text_projection(pooled)

    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model.vision_model(pixel_values=pixels)
        pooled = out.pooler_output if hasattr(out, "pooler_output") else out[1]
        return self.model.visual_projection(pooled)

    def _project_cls(self, cls: torch.Tensor) -> torch.Tensor:
        core = hf_vision_core(self.model.vision_model)
        assert core is not None
        return self.model.visual_projection(core.post_layernorm(cls))

    def _own_trunk(self) -> Trunk | str:
        core = hf_vision_core(self.model.vision_model)
        if core is None:
            return f"the scorer's vision model ({type(self.model.vision_model).__name__}) is not a CLIP ViT"
        return Trunk(core, head=("post_layernorm",))

    def _trunk_of(self, tower: nn.Module) -> Trunk | str:
        core = hf_vision_core(tower)
        if core is None:
            return (
                f"the tower ({type(tower).__name__}) is not a transformers CLIP vision model, "
                "so its CLS cannot stand in for this scorer's"
            )
        return Trunk(core, head=("post_layernorm",))
