"""Typed errors. Every error says what was wrong and what is allowed.

Each class also derives from the closest built-in (``ValueError``, ``LookupError``,
``TypeError``) so callers that already catch those keep working.
"""

from __future__ import annotations

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
