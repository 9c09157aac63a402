"""CLIP prompt-relevance scorers: ``Signals.relevance`` for HERO-style allocation.

A scorer gives each partition of an image the raw cosine similarity between a CLIP image
embedding of its pixels and the CLIP text embedding of the prompt::

    from tokenprune.adapters.relevance import HFClipScorer
    scorer = HFClipScorer.from_pretrained("/models/clip-vit-large-patch14-336")
    relevance = scorer.score(pixel_values, prompt,                  # [P, 3, 336, 336]
                             pixel_mean=processor.image_processor.image_mean,
                             pixel_std=processor.image_processor.image_std,
                             tower=vlm.vision_tower, tower_cls=signals.embedding(-1))
    scorer.last_path    # "reused_tower_cls": no second vision forward was needed

When the VLM's vision tower IS the scorer's image encoder (same architecture and weights,
detected, never assumed) and saw the same pixels, the scorer reuses the tower's own
last-layer CLS (post-layernorm + projection) instead of running a second vision forward.

Everything here imports transformers / open_clip lazily, inside functions.
"""

from ._base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    REUSED_TOWER_CLS,
    SCORER_FORWARD,
    ClipRelevanceScorer,
    RelevancePath,
    RelevanceScorer,
    renormalize,
)
from ._weights import Trunk, TrunkMatch, compare_trunks
from .hf_clip import HFClipScorer, hf_vision_core
from .open_clip_scorer import OpenClipScorer, open_clip_vision_trunk

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "REUSED_TOWER_CLS",
    "SCORER_FORWARD",
    "ClipRelevanceScorer",
    "HFClipScorer",
    "OpenClipScorer",
    "RelevancePath",
    "RelevanceScorer",
    "Trunk",
    "TrunkMatch",
    "compare_trunks",
    "hf_vision_core",
    "open_clip_vision_trunk",
    "renormalize",
]
