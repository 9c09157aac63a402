"""Typed errors. Every error says what was wrong and what is allowed.

Each class also derives from the closest built-in (``ValueError``, ``LookupError``,
``TypeError``) so callers that already catch those keep working.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable

__all__ = [
    "TokenpruneError",
    "ConfigError",
    "BudgetError",
    "ContractError",
    "SignalError",
    "RegistryError",
    "UnknownNameError",
    "DuplicateNameError",
    "IncompatibleError",
    "close_matches",
    "did_you_mean",
]


class TokenpruneError(Exception):
    """Base class of every error raised on purpose by tokenprune."""


class ConfigError(TokenpruneError, ValueError):
    """A strategy, adapter or pipeline option has a wrong name, type or value."""


class BudgetError(ConfigError):
    """A token budget is not a fraction in (0, 1] or a non-negative int."""


class ContractError(TokenpruneError, ValueError):
    """A Layout, Signals or Selection breaks its documented shape/dtype/range contract."""


class SignalError(ContractError):
    """A strategy needs a signal that is missing, or a signal holds NaN/inf."""


class RegistryError(TokenpruneError, LookupError):
    """Base class for registry lookups and registrations."""


class UnknownNameError(RegistryError):
    """No adapter/allocator/selector/preset is registered under that name."""


class DuplicateNameError(RegistryError, ValueError):
    """A name is registered twice in the same registry."""


class IncompatibleError(TokenpruneError, ValueError):
    """Parts that each make sense do not fit together (model family, tower, strategy needs)."""


def close_matches(word: object, candidates: Iterable[str], *, n: int = 3, cutoff: float = 0.5) -> list[str]:
    """The candidates closest to ``word`` (at most ``n``), best first: the one fuzzy matcher."""
    return difflib.get_close_matches(str(word), list(candidates), n=n, cutoff=cutoff)


def did_you_mean(
    word: object,
    candidates: Iterable[str],
    *,
    n: int = 3,
    cutoff: float = 0.5,
    render: Callable[[str], str] = repr,
) -> str:
    """``" Did you mean 'a', 'b'?"`` for the close matches of ``word``, or ``""`` when none is close."""
    close = close_matches(word, candidates, n=n, cutoff=cutoff)
    return f" Did you mean {', '.join(render(c) for c in close)}?" if close else ""
