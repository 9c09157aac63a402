"""The generic invariant suite (DESIGN §4), run over EVERY registered allocator and selector.

Strategies and presets added later (built-in or by a plugin) are picked up automatically:
the parametrisation lists the registries. Each example draws a random layout (single
partition, tile grid with or without thumbnail, padding shaped as rectangles, arbitrary
masks or empty partitions), signals for the strategy's own ``Needs`` (coarse values with
many ties, peaked and flat attention), and budgets; see ``tokenprune.testing``.
"""

from __future__ import annotations

import dataclasses
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenprune as tp
from tokenprune import testing as tpt

ALLOCATORS = tp.list_allocators()
SELECTORS = tp.list_selectors()


def _variants(registry) -> list[tuple[str, dict]]:
    """Every registered strategy with each Literal/bool option switched, one at a time.

    Modes such as ``spatial(mode="pool")`` or ``prumerge(count="auto")`` are code paths of
    their own: the defaults alone would leave them unchecked. Combinations a strategy rejects
    in ``check()`` are skipped.
    """
    found = []
    for name in registry.list(presets=False):
        factory = registry.entry(name).factory
        if not dataclasses.is_dataclass(factory):
            continue
        hints = typing.get_type_hints(factory)
        for field in dataclasses.fields(factory):
            annotation = hints.get(field.name)
            choices = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else ()
            choices = (True, False) if annotation is bool else choices
            for value in choices:
                if value == field.default:
                    continue
                try:
                    registry.build(name, **{field.name: value})
                except tp.ConfigError:
                    continue
                found.append((name, {field.name: value}))
    return found


ALLOCATOR_VARIANTS = _variants(tp.ALLOCATORS)
SELECTOR_VARIANTS = _variants(tp.SELECTORS)


def test_the_suite_sees_the_test_strategies_and_every_preset():
    assert "example_attention_mass" in ALLOCATORS and "example_topk" in SELECTORS
    assert "example_attention_mass@floor" in ALLOCATORS


@pytest.mark.parametrize("name", ALLOCATORS)
def test_allocator_invariants(name):
    allocator = tp.build_allocator(name)

    @given(tpt.cases(allocator.needs))
    def check(case):
        tpt.check_allocator(allocator, case)

    check()


@pytest.mark.parametrize("name", SELECTORS)
def test_selector_invariants(name):
    selector = tp.build_selector(name)

    @given(tpt.cases(selector.needs | tp.Needs(features=True)))
    def check(case):
        tpt.check_selector(selector, case)

    check()


@pytest.mark.parametrize(("name", "options"), ALLOCATOR_VARIANTS, ids=lambda v: str(v))
def test_allocator_option_variants(name, options):
    allocator = tp.build_allocator(name, **options)

    @settings(max_examples=200)
    @given(tpt.cases(allocator.needs))
    def check(case):
        tpt.check_allocator(allocator, case)

    check()


@pytest.mark.parametrize(("name", "options"), SELECTOR_VARIANTS, ids=lambda v: str(v))
def test_selector_option_variants(name, options):
    selector = tp.build_selector(name, **options)

    @settings(max_examples=200)
    @given(tpt.cases(selector.needs | tp.Needs(features=True)))
    def check(case):
        tpt.check_selector(selector, case)

    check()


@pytest.mark.parametrize("name", ALLOCATORS)
def test_allocators_compose_with_every_selector_in_a_pipeline(name):
    allocator = tp.build_allocator(name)

    @given(tpt.cases(allocator.needs | tp.Needs.union(*(tp.build_selector(s).needs for s in SELECTORS))), st.sampled_from(SELECTORS))
    def check(case, selector_name):
        pipe = tp.Pipeline(allocator=allocator, selector=selector_name, budget=max(case.total, 0))
        result = pipe.apply(case.layout, case.signals)  # the pipeline re-checks every contract
        assert result.stats.kept_total <= min(case.total, int(case.layout.capacity.sum()))

    check()
