"""Token budgets: parsing them, and turning weights into exact integer shares.

:func:`apportion` is the one place where a budget becomes integers (DESIGN §4).

The ideal share of partition ``i`` at a total ``h`` is its *water-filled quota*
``q_i(h)``: proportional to its weight, capped at its capacity, with what a capped
partition cannot hold handed on to the others; partitions of weight zero receive only
what the positive ones cannot hold (shared equally among them, again capped).

``rounding="exact"`` returns integers that

* sum to ``min(total, capacity.sum())``;
* lie in ``[floor(q_i), ceil(q_i)]`` (so within ``[0, capacity_i]``; equal weights give
  shares that differ by at most one);
* never decrease when the total grows (house monotonicity: no Alabama paradox).

It does so by handing out seats one at a time as a unit-job schedule: the ``k``-th seat
of partition ``i`` may be given once ``q_i(h) > k - 1`` (upper quota) and must be given
by the first ``h`` with ``q_i(h) >= k`` (lower quota). Earliest-deadline-first meets
every deadline because the quotas themselves are a feasible fractional schedule; this is
the Balinski–Young quota idea, generalised to capacity-capped quotas. Ties go to the
seat whose quota is reached first, then to the lower index. All of it runs on host
numbers in exact integer arithmetic (the weights scaled to Python ints): no tensor op, no
rounding error (float64 seat tables once dated a seat one total early and broke house
monotonicity).

``rounding="floor"`` returns ``floor(q_i)`` and leaves the remainder unassigned, like the
released reference code; it keeps every property above except the exact sum. ``q_i`` is
the EXACT quota of the weights as given (binary floats read exactly, rational arithmetic),
not a float product: weights ``[1.0, 0.0, 0.2, 1.0]``, capacity ``[1, 0, 5, 20]``, total 25
give ``[1, 0, 4, 19]``, because ``0.2`` is slightly above 1/5 and the last quota is 19.99...
The reference presets read their decimal options as decimals where it matters
(``hired``'s ``alpha``); pass integer weights for decimal ratios.
"""

from __future__ import annotations

import heapq
import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import torch

from .errors import BudgetError, ConfigError, ContractError

__all__ = ["Budget", "Rounding", "apportion", "apportion_many", "check_budget_tensor", "check_budget_values", "host_split", "parse_budget", "quota"]

Rounding = Literal["exact", "floor"]
_ROUNDINGS = ("exact", "floor")


# --------------------------------------------------------------------------- validation


def _as_weights(weights: torch.Tensor | Sequence[float]) -> list[float]:
    if isinstance(weights, (list, tuple)) and all(type(w) in (float, int) for w in weights):
        values = [float(w) for w in weights]  # host numbers: checked without tensor ops
        if not all(math.isfinite(v) for v in values):
            raise ConfigError(f"weights must be finite, got {values}")
        if any(v < 0 for v in values):
            raise ConfigError(f"weights must be >= 0, got {values}")
        return values
    tensor = torch.as_tensor(weights, dtype=torch.float64).detach().cpu()
    if tensor.dim() != 1:
        raise ConfigError(f"weights must be 1-D [P], got shape {tuple(tensor.shape)}")
    if not bool(torch.isfinite(tensor).all()):
        raise ConfigError(f"weights must be finite, got {tensor.tolist()}")
    if bool((tensor < 0).any()):
        raise ConfigError(f"weights must be >= 0, got {tensor.tolist()}")
    return tensor.tolist()


def _as_capacity(capacity: torch.Tensor | Sequence[int], size: int) -> list[int]:
    if isinstance(capacity, (list, tuple)) and all(type(c) is int for c in capacity):
        if len(capacity) != size:
            raise ConfigError(f"capacity must have shape [{size}] like weights, got {(len(capacity),)}")
        if any(c < 0 for c in capacity):
            raise ConfigError(f"capacity must be >= 0, got {list(capacity)}")
        return list(capacity)
    tensor = torch.as_tensor(capacity).detach().cpu()
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        if tensor.dtype == torch.bool or not bool((tensor == tensor.round()).all()):
            raise ConfigError(f"capacity must hold integers, got {tensor.tolist()}")
    if tuple(tensor.shape) != (size,):
        raise ConfigError(f"capacity must have shape [{size}] like weights, got {tuple(tensor.shape)}")
    values = [int(v) for v in tensor.tolist()]
    if any(v < 0 for v in values):
        raise ConfigError(f"capacity must be >= 0, got {values}")
    return values


def _as_total(total: int) -> int:
    if isinstance(total, bool) or not isinstance(total, numbers.Integral) or total < 0:
        raise ConfigError(f"total must be an int >= 0, got {total!r}")
    return int(total)


# --------------------------------------------------------------------------- quotas


def _fill(order: list[int], weight: list[Fraction], caps: list[int], amount: Fraction, out: list[Fraction]) -> None:
    """Water-fill ``amount`` over ``order`` proportionally to ``weight``, capped by ``caps``."""
    remaining = sorted(order, key=lambda i: (Fraction(caps[i]) / weight[i], i))
    total_weight = sum((weight[i] for i in remaining), Fraction(0))
    for pos, i in enumerate(remaining):
        if amount * weight[i] >= caps[i] * total_weight:
            out[i] = Fraction(caps[i])
            amount -= caps[i]
            total_weight -= weight[i]
        else:
            for j in remaining[pos:]:
                out[j] = amount * weight[j] / total_weight
            return


def _exact_quota(weights: list[float], caps: list[int], total: int) -> list[Fraction]:
    size = len(weights)
    fractions = [Fraction(w) for w in weights]
    positive = [i for i in range(size) if fractions[i] > 0 and caps[i] > 0]
    zero = [i for i in range(size) if fractions[i] == 0 and caps[i] > 0]
    amount = min(total, sum(caps))
    out = [Fraction(0)] * size
    held = sum(caps[i] for i in positive)
    if positive:
        _fill(positive, fractions, caps, Fraction(min(amount, held)), out)
    if amount > held:
        _fill(zero, [Fraction(1)] * size, caps, Fraction(amount - held), out)
    return out


def quota(
    weights: torch.Tensor | Sequence[float],
    total: int,
    capacity: torch.Tensor | Sequence[int],
) -> torch.Tensor:
    """The water-filled (ideal, fractional) shares, float64 ``[P]``. See module docs."""
    w = _as_weights(weights)
    caps = _as_capacity(capacity, len(w))
    return torch.tensor([float(q) for q in _exact_quota(w, caps, _as_total(total))], dtype=torch.float64)


# --------------------------------------------------------------------------- apportion


def _scaled(weights: list[float]) -> list[int]:
    """The weights times one common power of two: exact Python ints (ratios unchanged)."""
    ratios = [w.as_integer_ratio() for w in weights]
    scale = max((den for _, den in ratios), default=1)  # float denominators are powers of two
    return [num * (scale // den) for num, den in ratios]


def _seats(weights: list[float], caps: list[int], target: int) -> list[tuple[int, int, Fraction, int]]:
    """Every seat released by ``target``: ``(release, due, when, i)`` (see module docs).

    The ``k``-th seat of partition ``i`` is released at ``floor(H_i(k - 1)) + 1`` and due at
    ``ceil(H_i(k))``, with ``H_i(k) = sum_j min(c_j, k w_j / w_i)`` over positive weights
    (for weight zero: everything the positive ones hold, plus an equal fill). Exact integer
    arithmetic: ``w_i H_i(k) = A + k B`` between the totals at which some ``j`` fills up.
    """
    size = len(caps)
    scaled = _scaled(weights)
    positive = [i for i in range(size) if scaled[i] > 0 and caps[i] > 0]
    zero = [i for i in range(size) if scaled[i] == 0]
    held = sum(caps[i] for i in positive)
    is_positive = set(positive)
    out = []
    for i in range(size):
        if caps[i] == 0:
            continue
        if i in is_positive:
            w_i, members = scaled[i], [(caps[j] * scaled[i], scaled[j]) for j in positive]
            base = 0
        else:  # weight zero: equal weights among the zero-weight partitions, after ``held``
            w_i, members = 1, [(caps[j], 1) for j in zero]
            base = held
        # members sorted by the k at which they cap: caps_j * w_i / w_j (compare cross-products)
        members.sort(key=lambda m: Fraction(m[0], m[1]))
        capped, slope, cursor = 0, sum(w for _, w in members), 0
        previous = base * w_i  # w_i * H_i(0)
        for k in range(1, caps[i] + 1):
            release = previous // w_i + 1
            if release > target:
                break
            while cursor < len(members) and k * members[cursor][1] >= members[cursor][0]:
                capped += members[cursor][0]
                slope -= members[cursor][1]
                cursor += 1
            numerator = base * w_i + capped + k * slope
            out.append((release, -(-numerator // w_i), Fraction(numerator, w_i), i))
            previous = numerator
    return out


def _exact_shares(caps: list[int], target: int, seats: list[tuple[int, int, Fraction, int]]) -> list[int]:
    """Earliest-deadline-first over the seats (ties: the quota reached first, lower index)."""
    seats.sort()
    shares = [0] * len(caps)
    ready: list[tuple[int, Fraction, int]] = []
    cursor = 0
    for slot in range(1, target + 1):
        while cursor < len(seats) and seats[cursor][0] <= slot:
            _, due, when, i = seats[cursor]
            heapq.heappush(ready, (due, when, i))
            cursor += 1
        due, _, i = heapq.heappop(ready)
        if due < slot:  # cannot happen: the quotas are a feasible schedule
            raise AssertionError(f"apportion missed a lower quota at total {slot}")
        shares[i] += 1
    return shares


def apportion_many(
    problems: Sequence[tuple[Sequence[float], int, Sequence[int]]], rounding: Rounding = "exact"
) -> list[list[int]]:
    """:func:`apportion` of many ``(weights, total, capacity)`` problems given as host
    numbers, as host ints, in exact integer arithmetic on the host: no tensor op and no
    device read (the batched path of the built-in allocators, which read their weights to
    the host once per batch)."""
    if rounding not in _ROUNDINGS:
        raise ConfigError(f"rounding must be one of {_ROUNDINGS}, got {rounding!r}")
    checked = []
    for weights, total, capacity in problems:
        w = _as_weights(weights)
        checked.append((w, _as_capacity(capacity, len(w)), _as_total(total)))
    if rounding == "floor":
        return [[math.floor(q) for q in _exact_quota(w, caps, total)] for w, caps, total in checked]
    out = []
    for w, caps, total in checked:
        target = min(total, sum(caps))
        # everything fits: no choice to make
        out.append(list(caps) if target == sum(caps) else _exact_shares(caps, target, _seats(w, caps, target)))
    return out


def apportion(
    weights: torch.Tensor | Sequence[float],
    total: int,
    capacity: torch.Tensor | Sequence[int],
    rounding: Rounding = "exact",
) -> torch.Tensor:
    """Integer shares of ``total`` for partitions with ``weights`` and ``capacity``.

    Args:
        weights: ``[P]`` finite, non-negative. Only ratios matter.
        total: tokens to hand out, int ``>= 0``.
        capacity: ``[P]`` ints ``>= 0``, the most each partition can take.
        rounding: ``"exact"`` (sums to ``min(total, capacity.sum())``) or ``"floor"``
            (the reference code's floors; the remainder is dropped).

    Returns:
        int64 ``[P]`` on the device of ``weights`` (CPU for plain sequences).
    """
    device = weights.device if isinstance(weights, torch.Tensor) else torch.device("cpu")
    shares = apportion_many([(weights, total, capacity)], rounding)[0]  # type: ignore[list-item]
    return torch.tensor(shares, dtype=torch.int64, device=device)


# --------------------------------------------------------------------------- the budget check


def check_budget_tensor(budgets: object, partitions: int, who: str, *, int64: bool = False) -> torch.Tensor:
    """Raise :class:`~tokenprune.ContractError` unless ``budgets`` is an integer tensor ``[P]``
    (``int64`` when ``int64``, as allocators must return).

    Shape and dtype only: free (no host read). With :func:`check_budget_values` this is the
    one budget check of the package; the pipeline and every strategy use these two.
    """
    ok = (
        isinstance(budgets, torch.Tensor)
        and tuple(budgets.shape) == (partitions,)
        and (budgets.dtype == torch.int64 if int64 else not (budgets.dtype.is_floating_point or budgets.dtype.is_complex or budgets.dtype == torch.bool))
    )
    if not ok:
        kind = "an int64" if int64 else "an integer"
        raise ContractError(
            f"{who} budgets must be {kind} tensor of shape [{partitions}], got "
            f"{getattr(budgets, 'dtype', type(budgets))} {tuple(getattr(budgets, 'shape', ()))}"
        )
    return budgets  # type: ignore[return-value]


def check_budget_values(
    values: Sequence[int],
    capacity: Sequence[int],
    who: str,
    *,
    total: int | None = None,
    exact: bool = True,
) -> None:
    """Raise :class:`~tokenprune.ContractError` unless each budget lies in ``[0, capacity]``
    and, when ``total`` is given, they sum to ``min(total, sum(capacity))`` (at most that
    when not ``exact``). Works on host ints: callers read a batch's budgets once."""
    values, capacity = list(values), list(capacity)
    if any(v < 0 for v in values):
        raise ContractError(f"{who} budgets {values} must lie in [0, capacity={capacity}]; some are negative")
    if any(v > c for v, c in zip(values, capacity)):
        raise ContractError(
            f"{who} budgets {values} must lie in [0, capacity]: they exceed the valid tokens per partition {capacity}"
        )
    if total is None:
        return
    expected, got = min(total, sum(capacity)), sum(values)
    if (exact and got != expected) or got > expected:
        raise ContractError(
            f"{who} returned budgets summing to {got}; the image's budget is {expected} "
            f"(min of {total} and capacity {sum(capacity)})"
        )


def host_split(budgets: Sequence[torch.Tensor]) -> list[tuple[int, ...]]:
    """Per-image budgets as host ints, read in ONE transfer for the whole batch."""
    sizes = [int(b.shape[0]) for b in budgets]
    if not sum(sizes):
        return [() for _ in sizes]
    flat = torch.cat([b.reshape(-1) for b in budgets]).tolist()
    out, start = [], 0
    for size in sizes:
        out.append(tuple(flat[start : start + size]))
        start += size
    return out


# --------------------------------------------------------------------------- budgets

_INT = re.compile(r"^[+-]?\d+$")


@dataclass(frozen=True)
class Budget:
    """A per-image token budget: a fraction of ``P * N`` or an absolute token count.

    ``Budget.parse(0.2)`` keeps 20 % of the image's full token count (padding included,
    newline tokens not counted); ``Budget.parse(576)`` keeps 576 tokens. Fractions become
    tokens by flooring the exact decimal product (``0.2 * 2880 = 576``, never 575).
    """

    kind: Literal["fraction", "tokens"]
    value: float | int

    def __post_init__(self) -> None:
        if self.kind == "fraction":
            if isinstance(self.value, bool) or not isinstance(self.value, float) or not 0.0 < self.value <= 1.0:
                raise BudgetError(f"a fraction budget must be a float in (0, 1], got {self.value!r}")
        elif self.kind == "tokens":
            if isinstance(self.value, bool) or not isinstance(self.value, int) or self.value < 0:
                raise BudgetError(f"a token budget must be an int >= 0, got {self.value!r}")
        else:
            raise BudgetError(f"Budget.kind must be 'fraction' or 'tokens', got {self.kind!r}")

    @classmethod
    def parse(cls, value: object) -> Budget:
        return parse_budget(value)

    def tokens(self, full_tokens: int) -> int:
        """Tokens for an image whose full count (``P * N``) is ``full_tokens``."""
        if self.kind == "tokens":
            return int(self.value)
        return math.floor(Fraction(repr(self.value)) * full_tokens)

    def to_config(self) -> float | int:
        return self.value

    def __str__(self) -> str:
        if self.kind == "tokens":
            return f"{self.value} tokens"
        return f"{self.value * 100:g}%"


def parse_budget(value: object) -> Budget:
    """A :class:`Budget` from ``0.2``, ``"20%"``, ``"0.2"``, ``576``, ``"576"`` or a Budget.

    Raises :class:`~tokenprune.BudgetError` for anything else: negatives, floats above 1,
    NaN/inf, bools, and strings that are not numbers.
    """
    if isinstance(value, Budget):
        return value
    allowed = "a fraction in (0, 1] of the image's tokens (e.g. 0.2 or '20%') or an int >= 0 tokens"
    if isinstance(value, bool):
        raise BudgetError(f"budget {value!r} is a bool; expected {allowed}")
    if isinstance(value, str):
        text = value.strip()
        try:
            if text.endswith("%"):
                percent = Fraction(text[:-1].strip())
                if not 0 < percent <= 100:
                    raise BudgetError(f"budget {value!r}: a percentage must be in (0, 100]")
                return Budget("fraction", float(percent / 100))
            if _INT.match(text):
                return parse_budget(int(text))
            return parse_budget(float(text))
        except BudgetError:
            raise
        except (ValueError, ZeroDivisionError):
            raise BudgetError(f"budget {value!r} is not a number; expected {allowed}") from None
    if isinstance(value, numbers.Integral):
        if value < 0:
            raise BudgetError(f"budget {value!r} is negative; expected {allowed}")
        return Budget("tokens", int(value))
    if isinstance(value, numbers.Real):
        # numpy float32(0.7) is 0.699999988...: read non-Python floats by their printed value
        number = float(value) if isinstance(value, (float, numbers.Rational)) else float(str(value))
        if not math.isfinite(number):
            raise BudgetError(f"budget {value!r} is not finite; expected {allowed}")
        if number <= 0.0:
            raise BudgetError(f"budget {value!r} must be > 0 as a fraction; for zero tokens pass the int 0")
        if number > 1.0:
            hint = f"; for {int(number)} tokens pass the int {int(number)}" if number.is_integer() else ""
            raise BudgetError(f"budget {value!r} is a float above 1.0{hint}; expected {allowed}")
        return Budget("fraction", number)
    raise BudgetError(f"budget {value!r} has type {type(value).__name__}; expected {allowed}")
