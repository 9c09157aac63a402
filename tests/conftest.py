"""Shared test configuration.

Hypothesis profiles: ``ci`` (default; >= 500 examples per property) and ``long`` for
local runs (``HYPOTHESIS_PROFILE=long make test``).
"""

from __future__ import annotations

import os

# Tests run with the value checks on (Selection, Signals, Pipeline.apply): off by default
# because each costs a host read; tests that count host reads turn it off themselves.
os.environ.setdefault("TOKENPRUNE_VALIDATE", "1")

import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import tokenprune  # noqa: F401  (runs the torchvision compat shim before any test imports transformers)

from . import example_strategies  # noqa: F401, E402  (registers the test-defined strategies)

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
