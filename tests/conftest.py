"""Shared test configuration.

Hypothesis profiles: ``ci`` (default; >= 500 examples per property) and ``long`` for
local runs (``HYPOTHESIS_PROFILE=long make test``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

# Tests run with the value checks on (Selection, Signals, Pipeline.apply): off by default
# because each costs a host read; tests that count host reads turn it off themselves.
os.environ.setdefault("TOKENPRUNE_VALIDATE", "1")

import pytest
import torch
from hypothesis import HealthCheck, settings

import tokenprune  # (runs the torchvision compat shim before any test imports transformers)

from . import example_strategies  # noqa: F401  (registers the test-defined strategies)

settings.register_profile(
    "ci",
    max_examples=500,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long",
    max_examples=5000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "quick",
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


# --------------------------------------------------------------------------- selector tests


@dataclass(frozen=True)
class FillInOrder(tokenprune.BudgetAllocator):
    """Test allocator: fills partition 0 to capacity, then partition 1, and so on."""

    def allocate(self, layout: tokenprune.Layout, signals: tokenprune.Signals, total: int) -> torch.Tensor:
        capacity = layout.capacity
        before = torch.cumsum(capacity, 0) - capacity
        return (total - before).clamp(min=0).minimum(capacity).to(torch.int64)


@pytest.fixture
def fill_in_order() -> FillInOrder:
    """An allocator whose budgets are easy to compute by hand (the selector tests' pipelines)."""
    return FillInOrder()


# --------------------------------------------------------------------------- allocator tests


@dataclass(frozen=True)
class FirstValid(tokenprune.Selector):
    """Test selector: the first ``budgets[p]`` valid tokens of each partition."""

    def select(self, layout: tokenprune.Layout, signals: tokenprune.Signals, budgets: torch.Tensor) -> tokenprune.Selection:
        return tokenprune.Selection(
            tuple(layout.valid[p].nonzero().flatten()[: int(b)] for p, b in enumerate(budgets.tolist()))
        )


def assert_batch_equals_per_image(
    allocator: tokenprune.BudgetAllocator,
    layouts: list[tokenprune.Layout],
    signals: list[tokenprune.Signals],
    totals: list[int],
) -> None:
    """``allocate_batch`` gives every image exactly what ``allocate`` gives it alone."""
    batch = allocator.allocate_batch(layouts, signals, totals)
    assert len(batch) == len(layouts)
    for budgets, layout, signal, total in zip(batch, layouts, signals, totals):
        assert torch.equal(budgets, allocator.allocate(layout, signal, total))


def quadrants(side: int = 4) -> torch.Tensor:
    """2x2 tiles over a ``side`` x ``side`` thumbnail: tile r{r}c{c} owns the rows and columns of its quarter."""
    tokens = side * side
    overlap = torch.zeros(4, tokens)
    for token in range(tokens):
        row, col = divmod(token, side)
        overlap[(row // (side // 2)) * 2 + col // (side // 2), token] = 1.0
    return overlap


# ---------------------------------------------------------------------- tiny vision towers
@pytest.fixture(scope="session")
def hf_vision_tower() -> Callable[..., torch.nn.Module]:
    """Builder of tiny transformers vision towers (64 wide, 4 heads, 3 blocks, 32 px, patch 8), seeded.

    ``hf_vision_tower(kind="clip" | "siglip", attn="sdpa", mlp_ratio=2, **config)``: ``config``
    adds CLIP/SigLIP config fields (``hidden_act=...``); the model is in eval mode.
    """

    def build(kind: str = "clip", *, attn: str = "sdpa", mlp_ratio: int = 2, **config: object) -> torch.nn.Module:
        import transformers

        prefix = {"clip": "CLIP", "siglip": "Siglip"}[kind]
        config_class = getattr(transformers, f"{prefix}VisionConfig")
        model_class = getattr(transformers, f"{prefix}VisionModel")
        torch.manual_seed(0)
        width = 64
        vision_config = config_class(
            hidden_size=width, intermediate_size=mlp_ratio * width, num_hidden_layers=3, num_attention_heads=4,
            image_size=32, patch_size=8, **config,
        )  # fmt: skip
        return model_class._from_config(vision_config, attn_implementation=attn).eval()

    return build
