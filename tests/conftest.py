"""Shared test configuration.

Hypothesis profiles: ``ci`` (default; >= 500 examples per property) and ``long`` for
local runs (``HYPOTHESIS_PROFILE=long make test``).
"""

from __future__ import annotations

import os
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
