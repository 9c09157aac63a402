"""Prompt relevance with an open_clip model."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from tokenprune import ConfigError

from ._base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipRelevanceScorer
from ._weights import Trunk

if TYPE_CHECKING:
    from torch import nn

__all__ = ["OpenClipScorer", "open_clip_vision_trunk"]

_VIT_PARTS = (
    "conv1",
    "class_embedding",
    "positional_embedding",
    "ln_pre",
    "transformer",
    "ln_post",
)
# Children of an open_clip VisionTransformer that come after the raw CLS.
_HEAD = ("ln_post", "proj", "attn_pool", "attn_pool_contrastive")


def _vision_transformer(module: object) -> nn.Module | None:
    for candidate in (module, getattr(module, "visual", None)):
        if candidate is not None and all(
            hasattr(candidate, part) for part in _VIT_PARTS
        ):
            return candidate  # type: ignore[return-value]
    return None


def open_clip_vision_trunk(module: object) -> Trunk | str:
    """The trunk of an open_clip ``VisionTransformer`` (or a CLIP holding one in ``.visual``).

    Returns why not, as a string, when the module is not a ViT whose CLS the head pools
    (timm towers, attentional pooling, average pooling).
    """
    vit = _vision_transformer(module)
    if vit is None:
        return f"{type(module).__name__} is not an open_clip VisionTransformer"
    if getattr(vit, "attn_pool", None) is not None:
        return "the open_clip ViT pools with an attentional pooler, not its CLS token"
    pool_type = getattr(vit, "pool_type", "tok")
    if pool_type != "tok":
        return f"the open_clip ViT pools with pool_type={pool_type!r}, not its CLS token ('tok')"
    return Trunk(vit, head=_HEAD)


class OpenClipScorer(ClipRelevanceScorer):
    """CLIP relevance from an open_clip model (``encode_image`` / ``encode_text``).

    Args:
        model: an open_clip ``CLIP`` / ``CustomTextCLIP`` (as made by
            ``open_clip.create_model``); put in eval mode.
        tokenizer: open_clip tokenizer, called as ``tokenizer([text], context_length=n)``.
            Default: open_clip's bundled ``SimpleTokenizer`` (the OpenAI CLIP BPE; no
            download), right for the OpenAI-style CLIP models. Prompts longer than the
            model's ``context_length`` are truncated, keeping the end-of-text token.
        image_mean, image_std, image_size: default to ``model.visual.preprocess_cfg``
            (set by ``open_clip.create_model``), else OpenAI's statistics and the visual
            tower's ``image_size``.

    The fast path needs the image encoder to be an open_clip ``VisionTransformer`` that
    pools its CLS token (``pool_type='tok'``, no attentional pooler); it applies this
    model's ``ln_post`` and ``proj`` to the tower's raw last-block CLS.
    """

    framework: ClassVar[str] = "open_clip"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable[..., torch.Tensor] | None = None,
        *,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        image_size: int | tuple[int, int] | None = None,
    ) -> None:
        missing = [
            a
            for a in ("visual", "encode_image", "encode_text")
            if getattr(model, a, None) is None
        ]
        if missing:
            raise ConfigError(
                f"OpenClipScorer needs an open_clip model; {type(model).__name__} lacks {missing}"
            )
        preprocess: dict[str, Any] = dict(
            getattr(model.visual, "preprocess_cfg", None) or {}
        )
        size = (
            image_size
            or preprocess.get("size")
            or getattr(model.visual, "image_size", None)
        )
        if size is None:
            raise ConfigError(
                "OpenClipScorer could not tell the model's input size; pass image_size"
            )
        context_length = getattr(model, "context_length", None)
        if tokenizer is None:
            from open_clip import SimpleTokenizer

            tokenizer = SimpleTokenizer(context_length=context_length or 77)
        context_length = (
            context_length or getattr(tokenizer, "context_length", None) or 77
        )
        super().__init__(
            image_mean=image_mean or preprocess.get("mean") or OPENAI_CLIP_MEAN,
            image_std=image_std or preprocess.get("std") or OPENAI_CLIP_STD,
            image_size=size if isinstance(size, int) else tuple(size),
            context_length=int(context_length),
        )
        self.model = model.eval()
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        pretrained: str | Path | None = None,
        *,
        precision: str = "fp32",
        device: str | torch.device = "cpu",
        tokenizer: Callable[..., torch.Tensor] | None = None,
    ) -> OpenClipScorer:
        """Build ``model_name`` (an open_clip config name or ``local-dir:``) with local weights.

        ``pretrained`` must be a checkpoint FILE on disk, or ``None`` for random weights
        (tests, benchmarks): tokenprune never downloads, so open_clip's pretrained tags
        and ``hf-hub:`` names are refused. The tokenizer defaults to
        ``open_clip.get_tokenizer(model_name)``.
        """
        import open_clip

        if model_name.startswith("hf-hub:"):
            raise ConfigError(
                f"model_name {model_name!r} would download from the hub; tokenprune loads local "
                "files only: use 'local-dir:/path' or a config name with a checkpoint file"
            )
        if pretrained is not None and not Path(pretrained).is_file():
            raise ConfigError(
                f"pretrained must be a local checkpoint file (tokenprune never downloads); "
                f"{str(pretrained)!r} is not a file. Download it yourself and pass its path, or "
                "pass None for random weights"
            )
        # open_clip 3.x: load_weights, pretrained_text; 2.x: pretrained_hf (its HF text towers
        # would otherwise fetch their weights)
        wanted = {"load_weights": pretrained is not None, "pretrained_text": False, "pretrained_hf": False}
        accepted = inspect.signature(open_clip.create_model).parameters
        model = open_clip.create_model(
            model_name,
            pretrained=None if pretrained is None else str(pretrained),
            precision=precision,
            device=device,
            pretrained_image=False,
            **{name: value for name, value in wanted.items() if name in accepted},
        )
        if tokenizer is None:
            tokenizer = open_clip.get_tokenizer(model_name)
        return cls(model, tokenizer)

    # ------------------------------------------------------------------ hooks

    @property
    def device(self) -> torch.device:
        return next(self.model.visual.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.visual.parameters()).dtype

    def tokenize_batch(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        # open_clip pads every prompt to the context length and pools at the end token.
        return self.tokenizer(list(prompts), context_length=self.context_length), None

    def _encode_text(self, token_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.model.encode_text(token_ids)

    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model.encode_image(pixels)
        return (
            out[0] if isinstance(out, tuple) else out
        )  # output_tokens=True returns (pooled, tokens)

    def _project_cls(self, cls: torch.Tensor) -> torch.Tensor:
        vit = _vision_transformer(self.model)
        assert vit is not None
        pooled = vit.ln_post(cls)
        return pooled if vit.proj is None else pooled @ vit.proj

    def _own_trunk(self) -> Trunk | str:
        return open_clip_vision_trunk(self.model.visual)

    def _trunk_of(self, tower: nn.Module) -> Trunk | str:
        return open_clip_vision_trunk(tower)
