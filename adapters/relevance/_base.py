"""The relevance-scorer interface and the CLIP logic shared by every framework."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar, Final, Literal

import torch
import torch.nn.functional as F

from tokenprune import ConfigError, ContractError, Needs, SignalError

from ._weights import Trunk, TrunkMatch, TrunkMatchCache

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "REUSED_TOWER_CLS",
    "SCORER_FORWARD",
    "ClipRelevanceScorer",
    "RelevancePath",
    "RelevanceScorer",
    "renormalize",
]

#: The fast path: the tower's own last-layer CLS went through the scorer's head.
REUSED_TOWER_CLS: Final = "reused_tower_cls"
#: The slow path: the scorer ran its own image encoder over the partitions' pixels.
SCORER_FORWARD: Final = "scorer_forward"
RelevancePath = Literal["reused_tower_cls", "scorer_forward"]

#: Normalisation of OpenAI's CLIP (and of LLaVA's CLIPImageProcessor).
OPENAI_CLIP_MEAN: Final = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: Final = (0.26862954, 0.26130258, 0.27577711)

# Two normalisations this close give the same pixels to float32 precision.
_NORM_TOLERANCE = 1e-6


def _channel_stats(
    values: Sequence[float] | torch.Tensor, what: str, *, positive: bool
) -> tuple[float, ...]:
    if isinstance(values, torch.Tensor):
        values = values.detach().flatten().tolist()
    try:
        stats = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{what} must be a sequence of floats, one per channel; got {values!r}"
        ) from None
    if not stats or not all(math.isfinite(v) for v in stats):
        raise ConfigError(
            f"{what} must be finite floats, one per channel; got {stats!r}"
        )
    if positive and min(stats) <= 0:
        raise ConfigError(f"{what} must be > 0 in every channel; got {stats!r}")
    return stats


def _same_stats(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= _NORM_TOLERANCE for x, y in zip(a, b))


def _per_channel(stats: Sequence[float], channels: int, what: str) -> torch.Tensor:
    if len(stats) == 1:
        stats = tuple(stats) * channels
    if len(stats) != channels:
        raise ContractError(
            f"{what} has {len(stats)} values but pixel_values has {channels} channels"
        )
    return torch.tensor(stats, dtype=torch.float32).view(1, channels, 1, 1)


def renormalize(
    pixel_values: torch.Tensor,
    *,
    from_mean: Sequence[float],
    from_std: Sequence[float],
    to_mean: Sequence[float],
    to_std: Sequence[float],
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Pixels normalised with ``from_*`` -> the same pixels normalised with ``to_*``, float32.

    With ``size`` given and different from the pixels' own, the image is resized like a
    CLIP processor does it: the shorter side scaled to fit (bicubic, antialiased, on the
    raw [0, 1] intensities, clamped back to [0, 1]), then centre-cropped to ``size``.
    When the statistics agree and no resize is needed, the values are passed through
    unchanged (no round-off).
    """
    channels = int(pixel_values.shape[1])
    pixels = pixel_values.float()
    height, width = int(pixels.shape[-2]), int(pixels.shape[-1])
    resize = size is not None and (height, width) != tuple(size)
    if not resize and _same_stats(from_mean, to_mean) and _same_stats(from_std, to_std):
        return pixels
    device = pixels.device
    raw = pixels * _per_channel(from_std, channels, "pixel_std").to(
        device
    ) + _per_channel(from_mean, channels, "pixel_mean").to(device)
    if resize:
        assert size is not None
        target_h, target_w = size
        scale = max(target_h / height, target_w / width)
        scaled = (
            max(target_h, round(height * scale)),
            max(target_w, round(width * scale)),
        )
        raw = F.interpolate(
            raw, size=scaled, mode="bicubic", align_corners=False, antialias=True
        )
        top, left = (scaled[0] - target_h) // 2, (scaled[1] - target_w) // 2
        raw = raw[..., top : top + target_h, left : left + target_w].clamp(0.0, 1.0)
    to_mean_t = _per_channel(to_mean, channels, "scorer image_mean").to(device)
    to_std_t = _per_channel(to_std, channels, "scorer image_std").to(device)
    return (raw - to_mean_t) / to_std_t


def _check_prompt(prompt: object) -> str:
    if prompt is None:
        raise SignalError(
            "prompt relevance needs a prompt, got None; give the text, or turn the text term "
            "off (e.g. hero with lam=1.0) for prompt-free pruning"
        )
    if not isinstance(prompt, str):
        raise ContractError(f"prompt must be a str, got {type(prompt).__name__}")
    if not prompt.strip():
        raise SignalError(
            "prompt relevance needs a non-empty prompt, got an empty/whitespace string; CLIP's "
            "embedding of an empty text ranks partitions by nothing the user asked. Give the "
            "text, or turn the text term off (e.g. hero with lam=1.0)"
        )
    return prompt


def _check_pixels(pixel_values: object) -> torch.Tensor:
    if not isinstance(pixel_values, torch.Tensor):
        raise ContractError(
            f"pixel_values must be a torch.Tensor [P, C, H, W], got {type(pixel_values).__name__}"
        )
    if pixel_values.dim() != 4:
        raise ContractError(
            f"pixel_values must be [P, C, H, W], got shape {tuple(pixel_values.shape)}"
        )
    if not pixel_values.is_floating_point():
        raise ContractError(
            f"pixel_values must be floating (processor-normalised), got {pixel_values.dtype}"
        )
    if _on_host(pixel_values) and not bool(torch.isfinite(pixel_values).all()):
        raise SignalError("pixel_values hold NaN/inf; pixels must be finite")
    return pixel_values


def _on_host(tensor: torch.Tensor) -> bool:
    """Value checks run only on CPU tensors: on an accelerator they would cost a host sync per call."""
    return tensor.device.type == "cpu" and tensor.numel() > 0


class RelevanceScorer(ABC):
    """Scores how relevant each partition of an image is to the prompt.

    ``score`` returns the RAW cosine similarity (float32 ``[P]``, in [-1, 1]) between a
    CLIP image embedding of each partition's pixels and the CLIP text embedding of the
    prompt; allocators (HERO) turn it into weights themselves. Implementations report
    the path their last call took in :attr:`last_path` and why in :attr:`last_reason`.

    The adapters call :meth:`score_batch` once per batch (every image's partitions
    concatenated, one prompt per image); per image, :meth:`score` takes what the adapter
    has at hand anyway:

    * ``pixel_values`` ``[P, 3, H, W]``: the VLM processor's pixels of the image's
      partitions (thumbnail first, then tiles), normalised with ``pixel_mean`` /
      ``pixel_std`` (the VLM processor's), at the tower's resolution;
    * ``prompt``: the user's text;
    * ``tower``: the VLM's vision tower module (optional);
    * ``tower_cls`` ``[P, D]``: the tower's last-layer CLS hidden state per partition,
      raw (before any post-norm), as recorded by the attention tap (optional;
      ``Signals.embedding(-1)`` when :meth:`needs_for` asked for it).
    """

    #: ``"reused_tower_cls"`` or ``"scorer_forward"`` after a call, ``None`` before.
    last_path: RelevancePath | None = None
    #: Why the last call took its path (e.g. which weight differed).
    last_reason: str | None = None

    @abstractmethod
    def score(
        self,
        pixel_values: torch.Tensor,
        prompt: str,
        *,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        tower: nn.Module | None = None,
        tower_cls: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Raw cosines ``[P]`` float32, on ``pixel_values``' device."""

    def score_batch(
        self,
        pixel_values: torch.Tensor,
        prompts: Sequence[str],
        counts: Sequence[int],
        *,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        tower: nn.Module | None = None,
        tower_cls: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """A whole batch (what the adapters call): image ``i`` owns the next ``counts[i]``
        partitions of ``pixel_values`` (and of ``tower_cls``) and is scored against
        ``prompts[i]``. This default calls :meth:`score` per image; scorers that can batch
        (:class:`ClipRelevanceScorer`) override it."""
        if len(prompts) != len(counts) or sum(counts) != int(pixel_values.shape[0]):
            raise ContractError(
                f"score_batch needs one prompt and one partition count per image, counts summing to "
                f"the {int(pixel_values.shape[0])} partitions of pixel_values; got {len(prompts)} prompts "
                f"and counts {list(counts)}"
            )
        pixels = pixel_values.split(list(counts))
        cls = [None] * len(counts) if tower_cls is None else tower_cls.split(list(counts))
        return [
            self.score(p, prompt, pixel_mean=pixel_mean, pixel_std=pixel_std, tower=tower, tower_cls=c)
            for p, prompt, c in zip(pixels, prompts, cls)
        ]

    def needs_for(self, tower: nn.Module | None) -> Needs:
        """Signals the tap should record on ``tower`` so that :meth:`score` can use them."""
        return Needs()


class ClipRelevanceScorer(RelevanceScorer):
    """CLIP scoring, common to every framework: pixels, prompt, cosine, fast path.

    Slow path (always valid): re-normalise the VLM's pixels to the scorer's statistics,
    resize them to the scorer's input size if it differs, run the scorer's image encoder,
    project, L2-normalise.

    Fast path (``last_path == "reused_tower_cls"``): when the VLM's tower computes the
    same raw CLS as the scorer's image encoder would, apply only the scorer's head (post
    layer norm + visual projection) to the tower's CLS: no second vision forward. It is
    taken only when all of these hold, else the slow path runs and ``last_reason`` says
    which failed:

    * ``tower`` and ``tower_cls`` were given;
    * the scorer's image encoder is a plain CLS-pooled ViT (its head applies to a CLS);
    * the tower's trunk has the scorer's architecture and weights (see
      :func:`~tokenprune.adapters.relevance._weights.compare_trunks`; decided once per
      tower and re-checked only when a tensor changes);
    * the scorer would see the very same pixels: ``pixel_values`` are at the scorer's
      input size and were normalised with the scorer's mean/std. LLaVA's tower runs at
      336² with OpenAI's statistics, so a CLIP-L/14-336 scorer qualifies and a 224²
      scorer never does.
    """

    #: Framework name for messages ("transformers", "open_clip").
    framework: ClassVar[str] = "unknown"
    #: Text embeddings kept per scorer (LRU); a benchmark question set repeats prompts a lot.
    text_cache_size: int = 1024

    def __init__(
        self,
        *,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        image_size: int | tuple[int, int],
        context_length: int,
    ) -> None:
        self.image_mean = _channel_stats(image_mean, "image_mean", positive=False)
        self.image_std = _channel_stats(image_std, "image_std", positive=True)
        if len(self.image_mean) != len(self.image_std):
            raise ConfigError(
                f"image_mean and image_std must have one value per channel each; got "
                f"{len(self.image_mean)} and {len(self.image_std)}"
            )
        size = (
            (image_size, image_size)
            if isinstance(image_size, int)
            else tuple(image_size)
        )
        if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            raise ConfigError(
                f"image_size must be a positive int or (height, width), got {image_size!r}"
            )
        self.image_size: tuple[int, int] = (int(size[0]), int(size[1]))
        if not isinstance(context_length, int) or context_length < 2:
            raise ConfigError(
                f"context_length must be an int >= 2, got {context_length!r}"
            )
        self.context_length = context_length
        self.last_path = None
        self.last_reason = None
        self._matches = TrunkMatchCache()
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    # ------------------------------------------------------------------ framework hooks

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where the scorer's weights live."""

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """The scorer's image-encoder dtype."""

    @abstractmethod
    def tokenize_batch(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids ``[K, T]`` of the prompts (truncated to :attr:`context_length`, padded
        to one length) and their attention mask (``None`` when the text tower needs none)."""

    def tokenize(self, prompt: str) -> torch.Tensor:
        """Token ids ``[1, T]`` of the prompt, truncated to :attr:`context_length`."""
        return self.tokenize_batch([prompt])[0]

    @abstractmethod
    def _encode_text(self, token_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Projected text embeddings ``[K, E]`` (not normalised)."""

    @abstractmethod
    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings ``[P, E]`` of scorer-ready pixels (not normalised)."""

    @abstractmethod
    def _project_cls(self, cls: torch.Tensor) -> torch.Tensor:
        """The scorer's head (post-norm + projection) on raw CLS states ``[P, D]`` -> ``[P, E]``."""

    @abstractmethod
    def _own_trunk(self) -> Trunk | str:
        """The scorer's image-encoder trunk, or why its head cannot take a CLS."""

    @abstractmethod
    def _trunk_of(self, tower: nn.Module) -> Trunk | str:
        """The tower's trunk in this framework, or why there is none."""

    # ------------------------------------------------------------------ public API

    def embed_prompt(self, prompt: str) -> torch.Tensor:
        """Unit-norm text embedding ``[E]`` float32 (long prompts are truncated, not rejected).

        Cached per prompt (see :meth:`embed_prompts`): a question asked again costs nothing.
        """
        cached = self._text_cache.get(prompt)
        if cached is not None:
            self._text_cache.move_to_end(prompt)
            return cached
        return self.embed_prompts([prompt])[0]

    @torch.no_grad()
    def embed_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings ``[K, E]`` float32, one row per prompt, in order.

        The prompts not yet cached are tokenized together and encoded in ONE text-tower
        forward; every embedding is kept in a bounded LRU cache owned by this scorer (so
        keyed by the scorer and the prompt text; :attr:`text_cache_size` entries, oldest
        dropped first). After editing the text tower's weights call :meth:`forget_prompts`.
        """
        prompts = [_check_prompt(prompt) for prompt in prompts]
        cache = self._text_cache
        missing = list(dict.fromkeys(p for p in prompts if p not in cache))
        if missing:
            token_ids, mask = self.tokenize_batch(missing)
            mask = None if mask is None else mask.to(self.device)
            encoded = F.normalize(self._encode_text(token_ids.to(self.device), mask).float(), dim=-1)
            for prompt, row in zip(missing, encoded):
                cache[prompt] = row
        for prompt in prompts:
            cache.move_to_end(prompt)
        rows = [cache[prompt] for prompt in prompts]
        while len(cache) > max(self.text_cache_size, 0):
            cache.popitem(last=False)
        return rows[0][None] if len(rows) == 1 else torch.stack(rows)

    def forget_prompts(self) -> None:
        """Drop the cached text embeddings (needed only after editing the text tower)."""
        self._text_cache.clear()

    @torch.no_grad()
    def embed_partitions(
        self,
        pixel_values: torch.Tensor,
        *,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
    ) -> torch.Tensor:
        """Unit-norm image embeddings ``[P, E]`` float32 by the scorer's own encoder."""
        pixels = self.prepare_pixels(
            pixel_values, pixel_mean=pixel_mean, pixel_std=pixel_std
        )
        return F.normalize(
            self._encode_images(pixels.to(self.device, self.dtype)).float(), dim=-1
        )

    def prepare_pixels(
        self,
        pixel_values: torch.Tensor,
        *,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
    ) -> torch.Tensor:
        """The VLM's pixels as the scorer expects them (its statistics and size), float32."""
        pixels = _check_pixels(pixel_values)
        return renormalize(
            pixels,
            from_mean=_channel_stats(pixel_mean, "pixel_mean", positive=False),
            from_std=_channel_stats(pixel_std, "pixel_std", positive=True),
            to_mean=self.image_mean,
            to_std=self.image_std,
            size=self.image_size,
        )

    @torch.no_grad()
    def embed_tower_cls(self, tower_cls: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings ``[P, E]`` float32 from raw CLS states (the fast path's head)."""
        reason = self._own_trunk()
        if isinstance(reason, str):
            raise ContractError(f"this scorer cannot embed a CLS state: {reason}")
        return F.normalize(
            self._project_cls(tower_cls.to(self.device, self.dtype)).float(), dim=-1
        )

    def match_tower(self, tower: nn.Module) -> TrunkMatch:
        """Whether ``tower`` computes the scorer's raw CLS (cached per tower)."""
        own = self._own_trunk()
        if isinstance(own, str):
            return TrunkMatch(False, own)
        theirs = self._trunk_of(tower)
        if isinstance(theirs, str):
            return TrunkMatch(False, theirs)
        return self._matches.match(own, theirs)

    def forget_towers(self) -> None:
        """Drop cached weight comparisons (needed only after edits through ``param.data``)."""
        self._matches.clear()

    @property
    def weight_comparisons(self) -> int:
        """How many full tower/scorer weight comparisons ran (the rest were cache hits)."""
        return self._matches.comparisons

    def needs_for(self, tower: nn.Module | None) -> Needs:
        """``cls_embedding`` of the last block when ``tower`` shares the scorer's weights."""
        if tower is not None and self.match_tower(tower):
            return Needs(cls_embedding=frozenset({-1}))
        return Needs()

    def score(
        self,
        pixel_values: torch.Tensor,
        prompt: str,
        *,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        tower: nn.Module | None = None,
        tower_cls: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.score_batch(
            pixel_values,
            [prompt],
            [int(pixel_values.shape[0])] if isinstance(pixel_values, torch.Tensor) and pixel_values.dim() else [0],
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
            tower=tower,
            tower_cls=tower_cls,
        )[0]

    def score_batch(
        self,
        pixel_values: torch.Tensor,
        prompts: Sequence[str],
        counts: Sequence[int],
        *,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        tower: nn.Module | None = None,
        tower_cls: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Raw cosines of a whole batch: one ``[P_i]`` float32 tensor per image.

        ``pixel_values`` / ``tower_cls`` hold the partitions of every image, concatenated
        (image ``i`` has ``counts[i]`` of them) and ``prompts[i]`` is image ``i``'s prompt.
        One path decision, one text-tower forward for the prompts not cached yet, one image
        embedding pass and one product for the batch; no host reads on an accelerator.
        """
        pixels = _check_pixels(pixel_values)
        count = int(pixels.shape[0])
        if len(prompts) != len(counts) or sum(counts) != count or any(c < 0 for c in counts):
            raise ContractError(
                f"score_batch needs one prompt and one partition count per image, counts summing to "
                f"the {count} partitions of pixel_values; got {len(prompts)} prompts and counts {list(counts)}"
            )
        if tower_cls is not None:
            if not isinstance(tower_cls, torch.Tensor) or tower_cls.dim() != 2 or int(tower_cls.shape[0]) != count:
                shape = tuple(tower_cls.shape) if isinstance(tower_cls, torch.Tensor) else type(tower_cls).__name__
                raise ContractError(f"tower_cls must be [P, D] with P = {count} partitions, got {shape}")
            if _on_host(tower_cls) and not bool(torch.isfinite(tower_cls).all()):
                raise SignalError("tower_cls holds NaN/inf; the tower's CLS states must be finite")
        texts = self.embed_prompts(prompts)  # [K, E]
        path, reason = self.choose_path(
            pixels, pixel_mean=pixel_mean, pixel_std=pixel_std, tower=tower, tower_cls=tower_cls
        )
        if path == REUSED_TOWER_CLS:
            assert tower_cls is not None
            images = self.embed_tower_cls(tower_cls)
        else:
            images = self.embed_partitions(pixels, pixel_mean=pixel_mean, pixel_std=pixel_std)
        self.last_path, self.last_reason = path, reason
        if len(set(prompts)) == 1:
            scores = images @ texts[0]
        else:  # each partition against its own image's prompt
            owner = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(list(counts), dtype=torch.long))
            scores = (images * texts[owner.to(texts.device, non_blocking=True)]).sum(-1)
        return list(scores.to(pixels.device).split(list(counts)))

    def choose_path(
        self,
        pixel_values: torch.Tensor,
        *,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        tower: nn.Module | None,
        tower_cls: torch.Tensor | None,
    ) -> tuple[RelevancePath, str]:
        """The path :meth:`score` takes for these inputs, and why."""
        if tower is None:
            return SCORER_FORWARD, "no tower given"
        if tower_cls is None:
            return (
                SCORER_FORWARD,
                "no tower_cls given (ask the tap for needs_for(tower))",
            )
        size = (int(pixel_values.shape[-2]), int(pixel_values.shape[-1]))
        if size != self.image_size:
            return SCORER_FORWARD, (
                f"the tower saw {size[0]}x{size[1]} pixels, the scorer takes "
                f"{self.image_size[0]}x{self.image_size[1]}"
            )
        mean = _channel_stats(pixel_mean, "pixel_mean", positive=False)
        std = _channel_stats(pixel_std, "pixel_std", positive=True)
        if not (
            _same_stats(mean, self.image_mean) and _same_stats(std, self.image_std)
        ):
            return SCORER_FORWARD, (
                f"the tower's pixels are normalised with mean {mean} / std {std}, the scorer's "
                f"with {self.image_mean} / {self.image_std}"
            )
        match = self.match_tower(tower)
        return (REUSED_TOWER_CLS if match else SCORER_FORWARD), match.reason
