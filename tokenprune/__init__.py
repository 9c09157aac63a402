"""tokenprune: training-free visual-token pruning for vision-language models.

Drop visual tokens between the vision tower and the LLM, inside an exact per-image
budget, with pluggable strategies (HiRED, HERO, PruMerge, PruMerge+, spatial) composed
by a :class:`Pipeline`::

    import tokenprune as tp
    pipe = tp.Pipeline(adapter="llava_next", allocator="hired", selector="cls_final", budget=0.2)
"""

from __future__ import annotations

# Must run before anything imports transformers, timm or open_clip (see compat's docs).
from .compat import ensure_torchvision_importable

ensure_torchvision_importable()

from .budget import Budget, apportion, parse_budget, quota  # noqa: E402
from .contracts import (  # noqa: E402
    Adapter,
    AttentionTap,
    BudgetAllocator,
    Layout,
    Needs,
    Partitioner,
    Selection,
    Selector,
    Signals,
    validation,
)
from .adapter import ImageTokens, OrderedTokens, TowerAdapter, VLMAdapter  # noqa: E402
from .errors import (  # noqa: E402
    BudgetError,
    ConfigError,
    ContractError,
    DuplicateNameError,
    IncompatibleError,
    RegistryError,
    SignalError,
    TokenpruneError,
    UnknownNameError,
)
from .pipeline import ImageStats, Pipeline, PruneResult  # noqa: E402
from .tower import PrunedImage, prune_batch  # noqa: E402
from .registry import (  # noqa: E402
    ADAPTERS,
    ALLOCATORS,
    SELECTORS,
    build_adapter,
    build_allocator,
    build_selector,
    list_adapters,
    list_allocators,
    list_selectors,
    load_plugins,
    register_adapter,
    register_allocator,
    register_preset,
    register_selector,
)

__version__ = "0.1.0"

__all__ = [
    "ADAPTERS",
    "ALLOCATORS",
    "SELECTORS",
    "Adapter",
    "validation",
    "AttentionTap",
    "Budget",
    "BudgetAllocator",
    "BudgetError",
    "ConfigError",
    "ContractError",
    "DuplicateNameError",
    "ImageStats",
    "ImageTokens",
    "IncompatibleError",
    "Layout",
    "Needs",
    "OrderedTokens",
    "Partitioner",
    "Pipeline",
    "PruneResult",
    "PrunedImage",
    "RegistryError",
    "Selection",
    "Selector",
    "SignalError",
    "Signals",
    "TokenpruneError",
    "TowerAdapter",
    "UnknownNameError",
    "VLMAdapter",
    "apportion",
    "build_adapter",
    "build_allocator",
    "build_selector",
    "ensure_torchvision_importable",
    "list_adapters",
    "list_allocators",
    "list_selectors",
    "load_plugins",
    "parse_budget",
    "prune_batch",
    "quota",
    "register_adapter",
    "register_allocator",
    "register_preset",
    "register_selector",
]
