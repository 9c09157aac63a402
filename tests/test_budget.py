"""The budget parser: fractions of P*N or absolute token counts, nothing else."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

import tokenprune as tp


@pytest.mark.parametrize(
    ("value", "kind", "tokens_of_2880"),
    [
        (0.2, "fraction", 576),
        (0.4, "fraction", 1152),
        (1.0, "fraction", 2880),
        ("20%", "fraction", 576),
        (" 0.2 ", "fraction", 576),
        ("100%", "fraction", 2880),
        (576, "tokens", 576),
        ("576", "tokens", 576),
        (0, "tokens", 0),
        (5000, "tokens", 5000),
    ],
)
def test_accepted_budgets(value, kind, tokens_of_2880):
    budget = tp.parse_budget(value)
    assert budget.kind == kind
    assert budget.tokens(2880) == tokens_of_2880


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (-1, "negative"),
        (1.5, "float above 1.0"),
        (576.0, "pass the int 576"),
        (0.0, "for zero tokens pass the int 0"),
        (-0.2, "must be > 0"),
        (float("nan"), "not finite"),
        (float("inf"), "not finite"),
        (True, "bool"),
        (False, "bool"),
        ("abc", "not a number"),
        ("", "not a number"),
        ("120%", "percentage must be in"),
        ("0%", "percentage must be in"),
        (None, "NoneType"),
        ([0.2], "list"),
    ],
)
def test_rejected_budgets(value, match):
    with pytest.raises(tp.BudgetError, match=match):
        tp.parse_budget(value)


def test_budget_error_is_a_value_error_and_a_tokenprune_error():
    with pytest.raises(ValueError):
        tp.parse_budget(-3)
    with pytest.raises(tp.TokenpruneError):
        tp.parse_budget("x")


@given(st.integers(1, 10_000), st.integers(1, 100))
def test_fraction_tokens_floor_the_exact_decimal_product(full, percent):
    budget = tp.parse_budget(percent / 100)
    assert budget.tokens(full) == (full * percent) // 100


def test_exact_decimal_product_is_not_floored_below():
    # 0.7 * 10 is 7.000000000000001 in floats, 0.1 * 30 is 3.0000000000000004; both exact here
    assert tp.parse_budget(0.7).tokens(10) == 7
    assert tp.parse_budget(0.29).tokens(100) == 29  # 0.29 * 100 = 28.999999999999996 in floats
    assert math.floor(0.29 * 100) == 28


def test_budget_round_trips_through_config_and_str():
    for value in (0.2, 576):
        budget = tp.parse_budget(value)
        assert tp.parse_budget(budget.to_config()) == budget
        assert tp.parse_budget(budget) is budget
    assert str(tp.parse_budget(0.2)) == "20%"
    assert str(tp.parse_budget(576)) == "576 tokens"


def test_budget_dataclass_validates_direct_construction():
    with pytest.raises(tp.BudgetError):
        tp.Budget("fraction", 2.0)
    with pytest.raises(tp.BudgetError):
        tp.Budget("tokens", -1)
    with pytest.raises(tp.BudgetError):
        tp.Budget("percent", 0.2)  # type: ignore[arg-type]


def test_numpy_scalars_are_read_by_their_printed_value():
    import numpy as np

    assert tp.parse_budget(np.float32(0.7)).tokens(2880) == 2016
    assert tp.parse_budget(np.int64(576)).tokens(2880) == 576
