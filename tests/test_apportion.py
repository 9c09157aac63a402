"""apportion: exact integer shares with quota, capacity and house monotonicity."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tokenprune as tp
from tokenprune import testing as tpt
from tokenprune.budget import _exact_quota

weights_st = st.lists(
    st.one_of(
        st.just(0.0),
        st.floats(min_value=1e-6, max_value=1e3, allow_nan=False),
        st.sampled_from([0.5, 1.0, 2.0, 3.0]),
    ),
    min_size=1,
    max_size=7,
)


@st.composite
def problems(draw: st.DrawFn) -> tuple[list[float], list[int], int, int]:
    weights = draw(weights_st)
    capacity = draw(st.lists(st.integers(0, 40), min_size=len(weights), max_size=len(weights)))
    total = draw(st.integers(0, sum(capacity) + 5))
    larger = draw(st.integers(total, sum(capacity) + 10))
    return weights, capacity, total, larger


@given(problems())
def test_sum_is_exact_and_shares_within_capacity(problem):
    weights, capacity, total, _ = problem
    shares = tp.apportion(weights, total, capacity)
    assert shares.dtype == torch.int64
    assert int(shares.sum()) == min(total, sum(capacity))
    assert all(0 <= s <= c for s, c in zip(shares.tolist(), capacity))


@given(problems())
def test_each_share_is_floor_or_ceiling_of_its_water_filled_quota(problem):
    weights, capacity, total, _ = problem
    shares = tp.apportion(weights, total, capacity).tolist()
    ideal = tp.quota(weights, total, capacity).tolist()
    for share, q in zip(shares, ideal):
        assert math.floor(q + 1e-9) <= share <= math.ceil(q - 1e-9), (shares, ideal)


@given(problems())
def test_raising_the_total_never_lowers_a_share(problem):
    weights, capacity, total, larger = problem
    low = tp.apportion(weights, total, capacity)
    high = tp.apportion(weights, larger, capacity)
    assert bool((high >= low).all()), (low.tolist(), high.tolist())


@given(st.integers(1, 8), st.integers(0, 60), st.data())
def test_equal_weights_give_shares_that_differ_by_at_most_one(size, total, data):
    weight = data.draw(st.floats(min_value=1e-3, max_value=10))
    shares = tp.apportion([weight] * size, total, [100] * size)
    assert int(shares.max() - shares.min()) <= 1
    # ties are broken by index: the lower indices get the extra tokens
    assert shares.tolist() == sorted(shares.tolist(), reverse=True)


@given(problems())
def test_floor_rounding_keeps_everything_but_the_exact_sum(problem):
    weights, capacity, total, larger = problem
    shares = tp.apportion(weights, total, capacity, rounding="floor")
    # floor of the EXACT quota of the weights as given (binary floats), never float arithmetic
    exact = _exact_quota([float(w) for w in weights], list(capacity), total)
    assert shares.tolist() == [math.floor(q) for q in exact]
    assert int(shares.sum()) <= min(total, sum(capacity))
    assert bool((tp.apportion(weights, larger, capacity, rounding="floor") >= shares).all())


@given(problems())
def test_zero_weights_only_get_what_positive_weights_cannot_hold(problem):
    weights, capacity, total, _ = problem
    shares = tp.apportion(weights, total, capacity).tolist()
    held = sum(c for w, c in zip(weights, capacity) if w > 0)
    given_to_zero = sum(s for w, s in zip(weights, shares) if w == 0)
    assert given_to_zero == max(0, min(total, sum(capacity)) - held)


def test_floor_is_the_floor_of_the_exact_quota_regression():
    # issue 11.13, found by the long hypothesis profile: 0.2 as a binary float is slightly above
    # 1/5, so the last partition's exact quota is 19.99..., just under its cap of 20: floor gives 19
    # (float arithmetic would round the quota to 20.0 and give 20).
    weights, capacity = [1.0, 0.0, 0.2, 1.0], [1, 0, 5, 20]
    assert tp.apportion(weights, 25, capacity, rounding="floor").tolist() == [1, 0, 4, 19]
    assert _exact_quota(weights, capacity, 25)[3] < 20
    assert tp.apportion(weights, 25, capacity).tolist() == [1, 0, 4, 20]


def test_hand_computed_examples():
    assert tp.apportion([1, 1, 1], 10, [5, 5, 5]).tolist() == [4, 3, 3]
    # quotas 5/3, 10/3, 5 -> the third is capped at 5 and exactly filled
    assert tp.apportion([1, 2, 3], 10, [5, 5, 5]).tolist() == [2, 3, 5]
    # the middle partition can hold only 2: the rest is water-filled to the others
    assert tp.quota([1, 1, 1], 9, [10, 2, 10]).tolist() == [3.5, 2.0, 3.5]
    assert tp.apportion([1, 1, 1], 9, [10, 2, 10]).tolist() == [4, 2, 3]
    # zero weight gets only the overflow
    assert tp.apportion([0, 1, 0], 10, [5, 5, 5]).tolist() == [3, 5, 2]
    assert tp.apportion([0, 0, 0], 7, [5, 5, 5]).tolist() == [3, 2, 2]
    assert tp.apportion([1, 2, 3], 10, [5, 5, 5], rounding="floor").tolist() == [1, 3, 5]
    assert tp.apportion([], 0, []).tolist() == []


def test_avoids_the_alabama_paradox_of_largest_remainders():
    # The textbook Alabama paradox: Hamilton's method gives C 2 seats at 10 and 1 at 11.
    weights, capacity = [6, 6, 2], [100, 100, 100]
    at_10 = tp.apportion(weights, 10, capacity).tolist()
    at_11 = tp.apportion(weights, 11, capacity).tolist()
    assert all(b >= a for a, b in zip(at_10, at_11)), (at_10, at_11)


def test_quota_of_exact_decimals_is_not_fooled_by_float_error():
    # 0.1 + 0.2 style weights: quotas land exactly on integers and must floor/ceil exactly
    shares = tp.apportion([0.1, 0.2, 0.3], 12, [100, 100, 100])
    assert shares.tolist() == [2, 4, 6]


def test_result_device_follows_weights_and_sequences_work():
    shares = tp.apportion(torch.tensor([1.0, 3.0]), 4, torch.tensor([4, 4]))
    assert shares.tolist() == [1, 3] and shares.device.type == "cpu"


@pytest.mark.parametrize(
    ("weights", "total", "capacity", "rounding", "match"),
    [
        ([1.0, -1.0], 4, [4, 4], "exact", "weights must be >= 0"),
        ([1.0, float("nan")], 4, [4, 4], "exact", "finite"),
        ([1.0, float("inf")], 4, [4, 4], "exact", "finite"),
        ([1.0, 1.0], -1, [4, 4], "exact", "total must be an int >= 0"),
        ([1.0, 1.0], 2.5, [4, 4], "exact", "total must be an int >= 0"),
        ([1.0, 1.0], True, [4, 4], "exact", "total must be an int >= 0"),
        ([1.0, 1.0], 4, [4, -1], "exact", "capacity must be >= 0"),
        ([1.0, 1.0], 4, [4.5, 1], "exact", "capacity must hold integers"),
        ([1.0, 1.0], 4, [4], "exact", r"capacity must have shape \[2\]"),
        ([[1.0]], 4, [4], "exact", "weights must be 1-D"),
        ([1.0], 4, [4], "round", "rounding must be one of"),
    ],
)
def test_bad_input_is_a_clear_error(weights, total, capacity, rounding, match):
    with pytest.raises(tp.ConfigError, match=match):
        tp.apportion(weights, total, capacity, rounding=rounding)


def test_house_monotone_where_float_quotas_land_next_to_an_integer_regression():
    # The float64 seat tables (before issue 12) took the 1st seat of partition 0 as due at 22:
    # 6 / 0.333... rounds to 18.0, but the exact H_0(1) is 22.000...2, due at 23. At total 20
    # that gave partition 0 a token it lost again at 21 (an Alabama paradox).
    weights, capacity = [0.3333333333333333, 0.0, 6.0, 1.0], [8, 1, 33, 26]
    shares = [tp.apportion(weights, total, capacity).tolist() for total in range(15, 30)]
    assert all(all(b >= a for a, b in zip(low, high)) for low, high in itertools.pairwise(shares)), shares
    assert shares[5:7] == [[0, 0, 17, 3], [0, 0, 18, 3]]


def test_apportion_many_runs_on_host_numbers_without_tensor_ops():
    problems = [([0.3, 0.0, 1.7], 9, [4, 5, 6]), ([1.0, 1.0], 3, [2, 2]), ([2.5e-9, 1.0, 0.2], 40, [30, 5, 30])]
    with tpt.count_dispatch() as count:
        shares = tp.budget.apportion_many(problems)
    assert count.ops == 0 and count.reads == 0, count.read_names
    # by hand: 1.7 fills its 6, the rest goes to weight 0.3 before weight 0; equal quotas 1.5
    # break to the lower index; weight 1.0 fills its 5, then 0.2 its 30, the tiny weight the rest
    assert shares == [[3, 0, 6], [2, 1], [5, 5, 30]]
