"""Contract checks and hypothesis strategies for testing allocators and selectors.

The generic invariant suite of tokenprune runs these over every registered strategy and
preset; use them for your own strategies too::

    from hypothesis import given
    from tokenprune import testing as tpt

    @given(tpt.cases(MySelector().needs))
    def test_my_selector(case):
        tpt.check_selector(MySelector(), case)

Requires ``hypothesis`` (the ``test`` extra).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import strategies as st

from .budget import quota
from .contracts import BudgetAllocator, Layout, Needs, Selection, Selector, Signals

__all__ = [
    "Case",
    "DispatchCount",
    "cases",
    "check_allocator",
    "check_selection_contract",
    "check_selector",
    "count_dispatch",
    "layouts",
]


@dataclass(frozen=True, eq=False)
class Case:
    """One random image: its layout, signals satisfying some Needs, and two totals."""

    layout: Layout
    signals: Signals
    total: int
    larger_total: int
    seed: int

    def __repr__(self) -> str:  # hypothesis prints failing examples: keep it readable
        lay = self.layout
        return (
            f"Case(side={lay.tokens_per_side}, tiles={lay.tiles}, thumbnail={lay.has_thumbnail}, "
            f"capacity={lay.capacity.tolist()}, total={self.total}, larger_total={self.larger_total}, "
            f"seed={self.seed})"
        )


@st.composite
def _valid_mask(draw: st.DrawFn, side: int, thumbnail: bool) -> torch.Tensor:
    """A partition's valid mask: full, a centred sub-rectangle (LLaVA-NeXT padding), any, or empty."""
    kind = draw(st.sampled_from(["full", "rect", "random", "empty"] if not thumbnail else ["full"]))
    grid = torch.zeros(side, side, dtype=torch.bool)
    if kind == "full":
        grid[:] = True
    elif kind == "rect":
        top = draw(st.integers(0, side - 1))
        bottom = draw(st.integers(top + 1, side))
        left = draw(st.integers(0, side - 1))
        right = draw(st.integers(left + 1, side))
        grid[top:bottom, left:right] = True
    elif kind == "random":
        bits = draw(st.lists(st.booleans(), min_size=side * side, max_size=side * side))
        grid = torch.tensor(bits, dtype=torch.bool).view(side, side)
    return grid.flatten()


@st.composite
def layouts(draw: st.DrawFn, max_side: int = 6, max_tiles: int = 3) -> Layout:
    """Random layouts: single partitions (square or a non-square ``grid``, as Qwen2-VL's),
    tile grids with or without a thumbnail."""
    side = draw(st.integers(1, max_side))
    structure = draw(st.sampled_from(["single", "grid", "tiles", "thumbnail+tiles"]))
    if structure == "single":
        return Layout(side, (0, 0), False, draw(_valid_mask(side, False)).unsqueeze(0))
    if structure == "grid":
        short = draw(st.integers(1, side))
        grid = (short, side) if draw(st.booleans()) else (side, short)
        inside = torch.zeros(side, side, dtype=torch.bool)
        inside[: grid[0], : grid[1]] = True
        valid = draw(_valid_mask(side, False)) & inside.flatten()
        return Layout(side, (0, 0), False, valid.unsqueeze(0), grid=grid)
    rows = draw(st.integers(1, max_tiles))
    cols = draw(st.integers(1, max_tiles))
    thumbnail = structure == "thumbnail+tiles"
    masks = [draw(_valid_mask(side, True))] if thumbnail else []
    masks += [draw(_valid_mask(side, False)) for _ in range(rows * cols)]
    overlap = None
    if thumbnail:
        # Each thumbnail patch is shared among tiles by random integer parts summing to 1.
        n = side * side
        parts = torch.tensor(
            draw(st.lists(st.integers(0, 3), min_size=rows * cols * n, max_size=rows * cols * n)),
            dtype=torch.float64,
        ).view(rows * cols, n)
        parts[0] += (parts.sum(0) == 0).double()
        overlap = (parts / parts.sum(0, keepdim=True)).float()
    return Layout(side, (rows, cols), thumbnail, torch.stack(masks), overlap)


def _attention(generator: torch.Generator, p: int, heads: int, n: int) -> torch.Tensor:
    """Softmax rows over CLS + N keys with coarse logits (many ties), CLS column dropped."""
    spread = float(torch.randint(1, 40, (1,), generator=generator))
    logits = torch.randint(0, 4, (p, heads, n + 1), generator=generator).float() * spread / 4
    return logits.softmax(dim=-1)[..., 1:].contiguous()


def _received(generator: torch.Generator, p: int, heads: int, n: int) -> torch.Tensor:
    """Attention received per token: the mean of N coarse softmax rows (ties likely)."""
    rows = _attention(generator, p * heads, n, n)  # n query rows over a sink plus n keys
    received = rows.view(p, heads, n, n).mean(dim=2)
    return received / received.sum(dim=-1, keepdim=True).clamp(min=1e-12)


def _signals(needs: Needs, layout: Layout, seed: int) -> Signals:
    generator = torch.Generator().manual_seed(seed)
    absolute = [layer for layer in needs.layers if layer >= 0]
    negative = [-layer for layer in needs.layers if layer < 0]
    num_layers = max([layer + 1 for layer in absolute] + negative + [1]) + seed % 3
    resolved = needs.resolve(num_layers)
    p, n = layout.num_partitions, layout.tokens_per_partition
    heads, width = 2, 8

    def rand(*shape: int) -> torch.Tensor:
        return torch.randint(-3, 4, shape, generator=generator).float() / 3

    # towers run in fp32, fp16 or bf16: the attention rows a strategy reads may be any of them
    dtype = (torch.float32, torch.float16, torch.bfloat16)[seed % 3]

    def attention(heads: int) -> torch.Tensor:
        return _attention(generator, p, heads, n).to(dtype)

    return Signals(
        features=rand(p, n, width),
        cls_attention={layer: attention(heads) for layer in resolved.cls_attention},
        wide_cls_attention={layer: attention(1) for layer in resolved.wide_cls_attention},
        cls_embedding={layer: rand(p, width) for layer in resolved.cls_embedding},
        keys={layer: rand(p, n, width) for layer in resolved.keys},
        relevance=(torch.rand(p, generator=generator) * 2 - 1) if needs.relevance else None,
        prompt="a test prompt",
        num_layers=num_layers,
        received_attention={layer: _received(generator, p, heads, n).to(dtype) for layer in resolved.received_attention},
    )


@st.composite
def cases(draw: st.DrawFn, needs: Needs, max_side: int = 6, max_tiles: int = 3) -> Case:
    """A layout, signals for ``needs`` and two totals ``total <= larger_total``."""
    layout = draw(layouts(max_side=max_side, max_tiles=max_tiles))
    seed = draw(st.integers(0, 2**31 - 1))
    full = layout.full_tokens
    total = draw(st.integers(0, full + 2))
    larger = draw(st.integers(total, full + 4))
    return Case(layout, _signals(needs, layout, seed), total, larger, seed)


# --------------------------------------------------------------------------- checks


def check_allocator(allocator: BudgetAllocator, case: Case) -> None:
    """Assert the allocator contract (DESIGN §4) on one case."""
    layout, signals = case.layout, case.signals
    capacity = layout.capacity
    budgets = allocator.allocate(layout, signals, case.total)
    assert isinstance(budgets, torch.Tensor) and budgets.dtype == torch.int64, budgets
    assert tuple(budgets.shape) == (layout.num_partitions,), budgets.shape
    budgets = budgets.cpu()
    assert bool((budgets >= 0).all()) and bool((budgets <= capacity).all()), (budgets, capacity)
    expected = min(case.total, int(capacity.sum()))
    if allocator.exact:
        assert int(budgets.sum()) == expected, (budgets.tolist(), expected)
    else:
        assert int(budgets.sum()) <= expected, (budgets.tolist(), expected)
    again = allocator.allocate(layout, signals, case.total).cpu()
    assert torch.equal(budgets, again), "allocator is not deterministic"
    larger = allocator.allocate(layout, signals, case.larger_total).cpu()
    assert bool((larger >= budgets).all()), (
        f"raising the total from {case.total} to {case.larger_total} lowered a share: "
        f"{budgets.tolist()} -> {larger.tolist()}"
    )
    batch = allocator.allocate_batch([layout, layout], [signals, signals], [case.larger_total, case.total])
    assert torch.equal(batch[0].cpu(), larger) and torch.equal(batch[1].cpu(), budgets)


def check_selection_contract(selector: Selector, layout: Layout, budgets: torch.Tensor, selection: Selection) -> None:
    """Exact (or, if adaptive, at most) budget of unique, ascending, valid indices."""
    assert isinstance(selection, Selection), type(selection)
    selection.check_layout(layout)
    counts = selection.counts
    if selector.adaptive:
        assert bool((counts <= budgets.cpu()).all()), (counts.tolist(), budgets.tolist())
    else:
        assert torch.equal(counts, budgets.cpu()), (counts.tolist(), budgets.tolist())


def _random_budgets(layout: Layout, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    capacity = layout.capacity
    small = (torch.rand(capacity.shape, generator=generator) * (capacity + 1).float()).long().clamp(max=capacity)
    extra = (torch.rand(capacity.shape, generator=generator) * (capacity - small + 1).float()).long()
    return small, (small + extra).clamp(max=capacity)


def check_selector(selector: Selector, case: Case) -> None:
    """Assert the selector contract on one case: counts, indices, nesting, determinism, batching."""
    layout, signals = case.layout, case.signals
    small, large = _random_budgets(layout, case.seed)
    first = selector.select(layout, signals, small)
    check_selection_contract(selector, layout, small, first)
    again = selector.select(layout, signals, small)
    assert all(torch.equal(a, b) for a, b in zip(first.indices, again.indices)), "not deterministic"
    bigger = selector.select(layout, signals, large)
    check_selection_contract(selector, layout, large, bigger)
    if selector.nested:
        for p, (a, b) in enumerate(zip(first.indices, bigger.indices)):
            assert bool(torch.isin(a, b).all()), (
                f"partition {p}: tokens kept at budget {int(small[p])} are not all kept at "
                f"budget {int(large[p])}: {a.tolist()} vs {b.tolist()}"
            )
    if type(selector).select_batch is Selector.select_batch:
        return  # the default batch path is the per-image loop
    batch = selector.select_batch([layout, layout], [signals, signals], [large, small])
    for got, want in zip(batch, (bigger, first)):
        check_selection_contract(selector, layout, want.counts, got)


def water_filled(weights: Any, total: int, capacity: Any) -> torch.Tensor:
    """Alias of :func:`tokenprune.quota` for test readability."""
    return quota(weights, total, capacity)


# --------------------------------------------------------------------------- dispatch counting

#: aten operators whose result the host must wait for: on an accelerator each is a sync.
HOST_READ_OPS = frozenset(
    {
        "aten._local_scalar_dense",  # .item(), int(t), bool(t), float(t)
        "aten.nonzero",  # data-dependent output size
        "aten.masked_select",
        "aten._unique2",
        "aten.unique_consecutive",
        "aten.unique_dim",
        "aten.repeat_interleave",  # without output_size
    }
)


@dataclass
class DispatchCount:
    """What one call dispatched: every aten operator, and the ones that read values back
    to the host (``HOST_READ_OPS`` plus ``Tensor.tolist``/``numpy``/``cpu`` calls, which on
    the CPU bypass the dispatcher but on an accelerator copy to the host and wait)."""

    ops: int = 0
    reads: int = 0
    read_names: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.ops} ops, {self.reads} host reads"


@contextmanager
def count_dispatch() -> Iterator[DispatchCount]:
    """Context manager counting dispatched aten operators and host reads (a CPU proxy of
    launches and syncs on a GPU)::

        with tpt.count_dispatch() as count:
            pipe.apply(layout, signals)
        assert count.reads <= 1
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    count = DispatchCount()

    def note(name: str) -> None:
        count.reads += 1
        count.read_names.append(name)

    class _Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            name = f"aten.{func.__name__.split('.')[0]}"
            count.ops += 1
            if name in HOST_READ_OPS:
                note(name)
            return func(*args, **(kwargs or {}))

    patched = {}
    for method in ("tolist", "numpy"):
        original = getattr(torch.Tensor, method)

        def wrapper(self: torch.Tensor, *args: Any, __original: Any = original, __name: str = method, **kw: Any) -> Any:
            note(f"Tensor.{__name}")
            return __original(self, *args, **kw)

        patched[method] = original
        setattr(torch.Tensor, method, wrapper)
    try:
        with _Counter():
            yield count
    finally:
        for method, original in patched.items():
            setattr(torch.Tensor, method, original)
