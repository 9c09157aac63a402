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
seat whose quota is reached first, then to the lower index.

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
from typing import Any, Literal

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


def _integer_weights(weights: list[float], bound: int) -> list[int] | None:
    """The weights scaled by one common power of two to exact integers, or ``None`` when
    that would overflow int64 arithmetic on totals up to ``bound``."""
    ratios = [w.as_integer_ratio() for w in weights]
    scale = max(den for _, den in ratios)  # denominators of floats are powers of two
    scaled = [num * (scale // den) for num, den in ratios]
    if max(scaled, default=0) * (bound + 1) * max(len(scaled), 1) >= 2**62:
        return None
    return scaled


def _seat_tables(
    rows: list[tuple[list[float], list[int], int, int]], integer: list[list[int]] | None
) -> list[list[tuple[int, int, float, int]]]:
    """Every seat that may be handed out by each row's target, for a group of rows at once.

    A row is ``(weights, caps, held, target)``. The ``k``-th seat of partition ``i`` is
    ``(release, due, when, i)``: ``release`` the total at which ``q_i`` first exceeds
    ``k - 1``, ``due`` the total at which it first reaches ``k``, ``when = H_i(k)``, with
    ``H_i(k) = sum_j min(c_j, k * w_j / w_i)`` over positive weights (``held`` plus an equal
    fill for zero weights). Tensors ``[R, P, K, P]`` (rows, partitions, seats, partitions).
    In exact int64 arithmetic when ``integer`` gives the rows' weights scaled to integers;
    otherwise in float64, with exact Fractions at the rare totals that sit within rounding
    error of an integer.
    """
    size = max(len(w) for w, _, _, _ in rows)
    seats = max(max(caps, default=0) for _, caps, _, _ in rows)

    def padded(values: list[list[Any]], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor([v + [0] * (size - len(v)) for v in values], dtype=dtype)

    c = padded([caps for _, caps, _, _ in rows], torch.int64)
    raw = padded([w for w, _, _, _ in rows], torch.float64)
    positive = (raw > 0) & (c > 0)
    held = torch.tensor([h for _, _, h, _ in rows], dtype=torch.int64)
    target = torch.tensor([t for _, _, _, t in rows], dtype=torch.int64)
    n_rows = len(rows)
    # Broadcast shapes (one view each; the host-side arithmetic stays a fixed set of ops).
    k_seat = torch.arange(seats + 1, dtype=torch.int64).view(1, 1, seats + 1, 1)  # [1, 1, K, 1]
    c_other = c.view(n_rows, 1, 1, size)  # c_j
    mask = positive.view(n_rows, 1, 1, size)
    zero_caps = torch.where(raw == 0, c, torch.zeros_like(c)).view(n_rows, 1, size)
    zero_h = held.view(n_rows, 1) + torch.minimum(zero_caps, k_seat.view(1, seats + 1, 1)).sum(dim=2)  # [R, K]
    if integer is not None:
        w = padded(integer, torch.int64)
        w_safe = torch.where(positive, w, torch.ones_like(w)).view(n_rows, size, 1, 1)  # w_i
        scaled = torch.minimum(c_other * w_safe, k_seat * w.view(n_rows, 1, 1, size))
        numerator = (scaled * mask).sum(dim=3)  # = w_i * H_i(k), exactly
        divisor = w_safe.view(n_rows, size, 1)
        floor_h = torch.div(numerator, divisor, rounding_mode="floor")
        ceil_h = -torch.div(-numerator, divisor, rounding_mode="floor")
        when = numerator.double() / divisor.double()
    else:
        w_safe = torch.where(positive, raw, torch.ones_like(raw)).view(n_rows, size, 1, 1)
        ratio = raw.view(n_rows, 1, 1, size) / w_safe
        level = torch.minimum(c_other.double(), k_seat.double() * ratio)
        when = (level * mask).sum(dim=3)
        floor_h, ceil_h = torch.floor(when).long(), torch.ceil(when).long()
        near = (when - when.round()).abs() <= 1e-7 * when.clamp(min=1.0)
        near &= (when <= target.view(n_rows, 1, 1) + 1) & positive.view(n_rows, size, 1)  # later seats are never released
        if bool(near.any()):
            for r, i, seat in torch.nonzero(near).tolist():
                weights, caps = rows[r][0], rows[r][1]
                fractions = [Fraction(x) for x in weights]
                exact = sum(
                    (min(Fraction(caps[j]), seat * fractions[j] / fractions[i]) for j in range(len(caps)) if fractions[j] > 0 and caps[j] > 0),
                    Fraction(0),
                )
                floor_h[r, i, seat], ceil_h[r, i, seat] = math.floor(exact), math.ceil(exact)
    zero = ~positive.view(n_rows, size, 1)
    zero_row = zero_h.view(n_rows, 1, seats + 1)
    floor_h = torch.where(zero, zero_row, floor_h)
    ceil_h = torch.where(zero, zero_row, ceil_h)
    when = torch.where(zero, zero_row.double(), when)
    release, due, when = floor_h[..., :-1] + 1, ceil_h[..., 1:], when[..., 1:]  # seat k = 1..K
    wanted = (k_seat.view(1, 1, seats + 1)[..., 1:] <= c.view(n_rows, size, 1)) & (release <= target.view(n_rows, 1, 1))
    owner = torch.arange(size, dtype=torch.float64).view(1, size, 1).expand(release.shape)
    row = torch.arange(n_rows, dtype=torch.float64).view(n_rows, 1, 1).expand(release.shape)
    # float64 holds every total and index exactly: one host read for all rows' seats
    columns = [release.double(), due.double(), when, owner, row]
    table = torch.stack(columns, dim=-1)[wanted].tolist()
    out: list[list[tuple[int, int, float, int]]] = [[] for _ in rows]
    for r_, d_, t_, i_, row_ in table:
        out[int(row_)].append((int(r_), int(d_), t_, int(i_)))
    return out


def _exact_shares(caps: list[int], target: int, seats: list[tuple[int, int, float, int]]) -> list[int]:
    """Earliest-deadline-first over the seats (ties: the quota reached first, lower index)."""
    seats.sort()
    shares = [0] * len(caps)
    ready: list[tuple[int, float, int]] = []
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
    numbers, as host ints: one fixed set of tensor ops for all of them (the batched path of
    the built-in allocators, which read their weights to the host once per batch)."""
    if rounding not in _ROUNDINGS:
        raise ConfigError(f"rounding must be one of {_ROUNDINGS}, got {rounding!r}")
    checked = []
    for weights, total, capacity in problems:
        w = _as_weights(weights)
        checked.append((w, _as_capacity(capacity, len(w)), _as_total(total)))
    if rounding == "floor":
        return [[math.floor(q) for q in _exact_quota(w, caps, total)] for w, caps, total in checked]
    out: list[list[int] | None] = [None] * len(checked)
    integer_rows, float_rows = [], []
    for index, (w, caps, total) in enumerate(checked):
        target = min(total, sum(caps))
        if target == sum(caps):  # everything fits: no choice to make
            out[index] = list(caps)
            continue
        held = sum(c for x, c in zip(w, caps) if x > 0 and c > 0)
        integer = _integer_weights(w, max(caps, default=0) + sum(caps))
        (integer_rows if integer is not None else float_rows).append((index, (w, caps, held, target), integer))
    for group, exact_integers in ((integer_rows, True), (float_rows, False)):
        if not group:
            continue
        integers = [integer for _, _, integer in group] if exact_integers else None
        tables = _seat_tables([row for _, row, _ in group], integers)  # type: ignore[arg-type]
        for (index, (_, caps, _, target), _), seats in zip(group, tables):
            out[index] = _exact_shares(caps, target, seats)
    return out  # type: ignore[return-value]


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
