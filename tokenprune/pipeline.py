"""``Pipeline``: an adapter, a budget allocator, a selector and a budget, composed.

A pipeline is the unit of an ablation: it validates everything at construction, prints
itself readably, and round-trips exactly through a plain dict::

    pipe = tp.Pipeline(adapter="llava_next", allocator="hired", selector="cls_final", budget=0.2)
    tp.Pipeline.from_dict(pipe.to_dict()) == pipe   # True

Without an adapter it runs at the strategy level on a given ``Layout`` and ``Signals``
(:meth:`Pipeline.apply`), which is what strategy authors and tests use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from .adapter import TowerAdapter, VLMAdapter
from .budget import (
    Budget,
    check_budget_tensor,
    check_budget_values,
    host_split,
    parse_budget,
)
from .contracts import (
    Adapter,
    BudgetAllocator,
    Layout,
    Needs,
    Selection,
    Selector,
    Signals,
    implements_counted,
    validating,
)
from .errors import ConfigError, ContractError
from .overrides import apply_overrides, split_config
from .registry import ADAPTERS, ALLOCATORS, SELECTORS, Registry

__all__ = ["ImageStats", "Pipeline", "PruneResult"]

_PARTS = ("adapter", "allocator", "selector")
_A = TypeVar("_A", bound=Adapter)


@dataclass(frozen=True)
class ImageStats:
    """What happened to one image: token counts per partition and in total."""

    partitions: tuple[str, ...]
    full_tokens: int
    budget: int
    capacity: tuple[int, ...]
    allocated: tuple[int, ...]
    kept: tuple[int, ...]
    adaptive: bool

    @property
    def kept_total(self) -> int:
        return sum(self.kept)

    def as_dict(self) -> dict[str, Any]:
        return {
            "partitions": list(self.partitions),
            "full_tokens": self.full_tokens,
            "budget": self.budget,
            "capacity": list(self.capacity),
            "allocated": list(self.allocated),
            "kept": list(self.kept),
            "kept_total": self.kept_total,
            "adaptive": self.adaptive,
        }


@dataclass(frozen=True, eq=False)
class PruneResult:
    """Budgets and selection for one image, with its stats."""

    budgets: torch.Tensor
    selection: Selection
    stats: ImageStats


def _build_part(registry: Registry[Any], spec: object, kind: type) -> tuple[Any, str | None]:
    """Instance and the name it was built from (``None`` for a given instance)."""
    if isinstance(spec, kind):
        return spec, None
    if isinstance(spec, Mapping):
        return registry.build(spec), spec.get("name")
    raise ConfigError(
        f"{registry.stage} must be a registered name, a preset name, a config dict or a "
        f"tokenprune.{kind.__name__} instance; got {type(spec).__name__}"
    )


def _check_strings(name: str, value: Any, *, optional: bool) -> None:
    """``value`` is a string or a non-empty list/tuple of strings (or None when optional)."""
    if value is None and optional:
        return
    if isinstance(value, str):
        return
    if isinstance(value, (list, tuple)) and value and all(isinstance(item, str) for item in value):
        return
    allowed = "a string or a non-empty list of strings" + (" (or None)" if optional else "")
    shown = [type(item).__name__ for item in value] if isinstance(value, (list, tuple)) else type(value).__name__
    raise ConfigError(f"{name} must be {allowed}, got {shown}")


class Pipeline:
    """Adapter + allocator + selector + budget.

    Args:
        adapter: VLM family (``"llava"``, ``"llava_next"``, ...), an instance, or ``None``
            for strategy-level use on given Layout/Signals.
        allocator: budget allocator name, preset name (``"hired@reference"``), config
            dict or instance.
        selector: selector name, preset name, config dict or instance.
        budget: per-image budget: a fraction in (0, 1] of the image's full token count,
            or an int token count (see :func:`tokenprune.parse_budget`).
        adapter_options, allocator_options, selector_options: options of each part.
        **options: options routed to the one part that declares them; ambiguous or
            unknown names are an error.
    """

    def __init__(
        self,
        adapter: str | Mapping[str, Any] | Adapter | None = None,
        *,
        allocator: str | Mapping[str, Any] | BudgetAllocator,
        selector: str | Mapping[str, Any] | Selector,
        budget: float | str | Budget,
        adapter_options: Mapping[str, Any] | None = None,
        allocator_options: Mapping[str, Any] | None = None,
        selector_options: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        self.budget: Budget = parse_budget(budget)
        keys: dict[str, Any] = {}
        for part, part_options in (
            ("adapter", adapter_options),
            ("allocator", allocator_options),
            ("selector", selector_options),
        ):
            keys.update({f"{part}.{name}": value for name, value in (part_options or {}).items()})
        keys.update(options)
        config = apply_overrides({"adapter": adapter, "allocator": allocator, "selector": selector}, keys)
        self.allocator: BudgetAllocator
        self.selector: Selector
        self.adapter: Adapter | None
        self.allocator, self._allocator_name = _build_part(ALLOCATORS, config["allocator"], BudgetAllocator)
        self.selector, self._selector_name = _build_part(SELECTORS, config["selector"], Selector)
        if config["adapter"] is None:
            self.adapter, self._adapter_name = None, None
        else:
            self.adapter, self._adapter_name = _build_part(ADAPTERS, config["adapter"], Adapter)
            self.adapter.check_parts(self.allocator, self.selector)

    # ------------------------------------------------------------------ properties
    @property
    def needs(self) -> Needs:
        """Union of what the allocator and selector read."""
        return self.allocator.needs | self.selector.needs

    @property
    def adaptive(self) -> bool:
        return bool(self.selector.adaptive)

    # ------------------------------------------------------------------ strategy level
    def image_budget(self, layout: Layout) -> int:
        """The budget of one image in tokens."""
        return self.budget.tokens(layout.full_tokens)

    def apply(self, layout: Layout, signals: Signals) -> PruneResult:
        """Allocate and select for one image whose signals are already computed."""
        return self.apply_batch([layout], [signals])[0]

    def apply_batch(self, layouts: Sequence[Layout], signals: Sequence[Signals]) -> list[PruneResult]:
        """Allocate and select for a batch of images (each keeps its own budget).

        At most one host read per batch (the budgets, unless the allocator computed them on
        the host); value checks that would read more run in validation mode only
        (:func:`tokenprune.validation`, ``TOKENPRUNE_VALIDATE=1``)."""
        if len(layouts) != len(signals):
            raise ContractError(f"{len(layouts)} layouts but {len(signals)} signals")
        alloc_name = self.part_label("allocator")
        sel_name = self.part_label("selector")
        for layout, signal in zip(layouts, signals):
            signal.check_layout(layout)
            signal.require(self.allocator.needs, who=f"allocator {alloc_name}")
            signal.require(self.selector.needs, who=f"selector {sel_name}")
        totals = [self.image_budget(layout) for layout in layouts]
        if implements_counted(self.allocator, "allocate_counted", ("allocate", "allocate_batch")):
            all_budgets, counts = self.allocator.allocate_counted(layouts, signals, totals)
        else:
            all_budgets, counts = list(self.allocator.allocate_batch(layouts, signals, totals)), None
        counts = self._check_budgets(layouts, totals, all_budgets, counts, f"allocator {alloc_name}")
        if implements_counted(self.selector, "select_counted", ("select", "select_batch")):
            selections = self.selector.select_counted(layouts, signals, all_budgets, counts)
        else:
            selections = list(self.selector.select_batch(layouts, signals, all_budgets))
        results = []
        for layout, total, budgets, wanted, selection in zip(layouts, totals, all_budgets, counts, selections):
            kept = self._check_selection(layout, wanted, selection, sel_name)
            stats = ImageStats(
                partitions=tuple(layout.partition_names()),
                full_tokens=layout.full_tokens,
                budget=total,
                capacity=layout.capacity_counts,
                allocated=wanted,
                kept=kept,
                adaptive=self.adaptive,
            )
            results.append(PruneResult(budgets=budgets, selection=selection, stats=stats))
        return results

    def _check_budgets(
        self,
        layouts: Sequence[Layout],
        totals: Sequence[int],
        budgets: Sequence[torch.Tensor],
        counts: Sequence[tuple[int, ...]] | None,
        who: str,
    ) -> list[tuple[int, ...]]:
        """The allocator's budgets as host ints, checked (the one budget check, on the host)."""
        if len(budgets) != len(layouts):
            raise ContractError(f"{who} returned budgets for {len(budgets)} images, the batch has {len(layouts)}")
        for layout, tensor in zip(layouts, budgets):
            check_budget_tensor(tensor, layout.num_partitions, who, int64=True)
        if counts is None:
            counts = host_split(budgets)
        for layout, total, values in zip(layouts, totals, counts):
            check_budget_values(values, layout.capacity_counts, who, total=total, exact=self.allocator.exact)
        return [tuple(values) for values in counts]

    def _check_selection(
        self, layout: Layout, wanted: tuple[int, ...], selection: Selection, who: str
    ) -> tuple[int, ...]:
        if not isinstance(selection, Selection):
            raise ContractError(f"selector {who} must return a Selection, got {type(selection).__name__}")
        if validating():
            selection.check_layout(layout)
        elif selection.num_partitions != layout.num_partitions:
            raise ContractError(
                f"selection has {selection.num_partitions} partitions, the layout has {layout.num_partitions}"
            )
        counts = selection.count_values
        if self.adaptive:
            ok = all(c <= w for c, w in zip(counts, wanted))
        else:
            ok = counts == wanted
        if not ok:
            rule = "at most" if self.adaptive else "exactly"
            raise ContractError(
                f"selector {who} kept {list(counts)} tokens per partition; it must keep "
                f"{rule} its budgets {list(wanted)}"
            )
        return counts

    # ------------------------------------------------------------------ models
    def _adapter_of(self, kind: type[_A], method: str, wanted: str) -> _A:
        """The adapter, if it implements the contract ``method`` needs; else a ConfigError."""
        adapter = self.adapter
        if not isinstance(adapter, kind):
            have = "no adapter" if adapter is None else f"adapter {self.part_label('adapter')}"
            raise ConfigError(f"Pipeline.{method} needs {wanted}; this pipeline has {have}")
        return adapter

    def _vlm_adapter(self, method: str) -> VLMAdapter:
        return self._adapter_of(VLMAdapter, method, "a VLM adapter (e.g. adapter='llava_next', 'llava' or 'sharegpt4v')")

    def prepare(
        self, model: Any, processor: Any, *, images: Any, text: Any, question: Any = None, **tokenizer_kwargs: Any
    ) -> dict[str, Any]:
        """Prune ``images`` and return kwargs for the unmodified ``model.generate``.

        Runs the vision tower once with the attention tap, allocates, selects, projects the
        kept features, and tokenizes ``text`` with exactly ``K`` image placeholders per
        image (left padding). Per-image stats land in :attr:`last_stats` (emptied first, so
        a failed call never leaves the previous call's stats behind). ``question``: what
        prompt-relevance strategies score against (default: ``text`` without image tokens).
        """
        adapter = self._vlm_adapter("prepare")
        self.record_images([])
        _check_strings("text", text, optional=False)
        _check_strings("question", question, optional=True)
        return adapter.prepare(self, model, processor, images, text, question=question, **tokenizer_kwargs)

    def attach(self, model: Any, processor: Any) -> AbstractContextManager[None]:
        """Context manager: the processor and model prune on their own while inside.

        For code that calls the processor and ``model.generate`` itself (evaluation
        harnesses). Per-instance, removable, signature-preserving wrappers; leaving the
        context restores both exactly. Needs a fixed per-image token count.
        """
        return self._vlm_adapter("attach").attach(self, model, processor)

    @property
    def last_stats(self) -> list[Any]:
        """Per-image stats of the last :meth:`prepare` (or attached forward)."""
        return [image.stats for image in self.last_images]

    @property
    def last_images(self) -> list[Any]:
        """Per image of the last :meth:`prepare` (or attached forward): its layout,
        selection, LLM-space embeddings and stats."""
        return list(self.__dict__.get("_last_images", []))

    def record_images(self, images: Sequence[Any]) -> None:
        """Adapters: make ``images`` (one :class:`~tokenprune.ImageTokens` each) what
        :attr:`last_images` / :attr:`last_stats` report."""
        self.__dict__["_last_images"] = list(images)

    # ------------------------------------------------------------------ towers
    def prune(
        self, tower: Any, pixel_values: torch.Tensor, layouts: Sequence[Layout] | None = None, **kwargs: Any
    ) -> list[Any]:
        """Prune a bare vision tower's output (adapter ``vision_tower``).

        Runs ``tower`` once on ``pixel_values`` with the attention tap, then allocates and
        selects per image. By default each item of ``pixel_values`` is one image of one
        partition; pass ``layouts`` for multi-crop images (their partitions consume
        consecutive crops). Extra keyword arguments (``relevance=``, ``prompt=``) go to the
        adapter. Returns, per image, the kept features, their indices and stats.
        """
        adapter = self._adapter_of(TowerAdapter, "prune", "an adapter that prunes bare towers, e.g. adapter='vision_tower'")
        return adapter.prune(self, tower, pixel_values, layouts, **kwargs)

    # ------------------------------------------------------------------ config
    def part_label(self, part: str) -> str:
        """How error messages name ``part`` (``"adapter"``, ``"allocator"``, ``"selector"``):
        its registered name quoted, or its class name for a ready-made instance."""
        if part not in _PARTS:
            raise ConfigError(f"part must be one of {', '.join(_PARTS)}, got {part!r}")
        name = getattr(self, f"_{part}_name")
        if name is not None:
            return repr(name)
        return type(getattr(self, part)).__name__


    def _part_config(self, part: str) -> dict[str, Any] | None:
        instance = getattr(self, part)
        if instance is None:
            return None
        name = getattr(self, f"_{part}_name")
        if name is None:
            registry = {"adapter": ADAPTERS, "allocator": ALLOCATORS, "selector": SELECTORS}[part]
            name = registry.name_of(instance)
        return {"name": name, **instance.options()}

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that :meth:`from_dict` rebuilds into an equal pipeline."""
        return {
            "adapter": self._part_config("adapter"),
            "allocator": self._part_config("allocator"),
            "selector": self._part_config("selector"),
            "budget": self.budget.to_config(),
        }

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> Pipeline:
        """Rebuild from :meth:`to_dict` output (or a hand-written config of the same shape).

        Besides ``adapter``/``allocator``/``selector``/``budget`` the config may hold the
        override keys of :func:`tokenprune.overrides.apply_overrides` (``allocator.alpha``,
        or a bare option name routed to the part that takes it).
        """
        if not isinstance(config, Mapping):
            raise ConfigError(f"a pipeline config must be a mapping, got {type(config).__name__}")
        structure, keys = split_config(config)
        missing = sorted({"allocator", "selector", "budget"} - set(structure))
        if missing:
            raise ConfigError(f"pipeline config is missing {missing}")
        resolved = apply_overrides(structure, keys)
        return cls(
            adapter=resolved["adapter"],
            allocator=resolved["allocator"],
            selector=resolved["selector"],
            budget=resolved["budget"],
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Pipeline):
            return NotImplemented
        return all(
            type(getattr(self, p)) is type(getattr(other, p))
            and (getattr(self, p) is None or getattr(self, p).options() == getattr(other, p).options())
            for p in _PARTS
        ) and self.budget == other.budget

    __hash__ = None  # type: ignore[assignment]

    def describe(self) -> str:
        """A readable multi-line summary."""
        lines = ["Pipeline"]
        for part in _PARTS:
            instance = getattr(self, part)
            if instance is None:
                lines.append(f"  {part + ':':<11}none (strategy level: apply() on given Layout/Signals)")
                continue
            name = getattr(self, f"_{part}_name") or type(instance).__name__
            opts = ", ".join(f"{k}={v!r}" for k, v in instance.options().items())
            registry = {"adapter": ADAPTERS, "allocator": ALLOCATORS, "selector": SELECTORS}[part]
            summary = registry.summary(name) if name in registry else ""
            lines.append(f"  {part + ':':<11}{name}({opts})" + (f"\n{'':13}{summary}" if summary else ""))
        kind = "of each image's tokens" if self.budget.kind == "fraction" else "per image"
        lines.append(f"  {'budget:':<11}{self.budget} {kind}")
        lines.append(f"  {'needs:':<11}{self.needs.describe()}")
        if self.adaptive:
            lines.append(f"  {'':<11}(adaptive selector: keeps at most the budget and reports its count)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        parts = []
        for part in _PARTS:
            instance = getattr(self, part)
            if instance is not None:
                parts.append(f"{part}={getattr(self, f'_{part}_name') or type(instance).__name__!r}")
        parts.append(f"budget={self.budget.to_config()!r}")
        return f"Pipeline({', '.join(parts)})"
