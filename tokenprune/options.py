"""Type checks for option dataclasses, so ``alpha="0.5"`` fails at construction.

Strategies and adapters are frozen dataclasses whose fields are their options.
:func:`check_option_types` compares each value with its annotation (``int``, ``float``,
``bool``, ``str``, ``Literal``, ``X | None``, ``tuple[X, ...]``) and raises
:class:`~tokenprune.ConfigError` naming the option, the value and what is allowed. An
``int`` given for a ``float`` option is stored as ``float``; a list given for a tuple
option is stored as a tuple (so the object stays hashable and compares equal after a
config round trip). Annotations it does not understand are not checked.
"""

from __future__ import annotations

import math
import numbers
import types
import typing
from dataclasses import fields, is_dataclass
from typing import Any, Literal, Union, get_args, get_origin

from .errors import ConfigError

__all__ = ["check_option_types"]

_UNCHECKED = object()


def _coerce(value: Any, annotation: Any) -> Any:
    """Return the (possibly coerced) value, or ``_UNCHECKED`` if it does not fit."""
    origin = get_origin(annotation)
    if annotation is Any:
        return value
    if origin is Literal:
        return value if any(value == a and type(value) is type(a) for a in get_args(annotation)) else _UNCHECKED
    if origin in (Union, types.UnionType):
        for arm in get_args(annotation):
            out = _coerce(value, arm)
            if out is not _UNCHECKED:
                return out
        return _UNCHECKED
    if annotation is type(None):
        return value if value is None else _UNCHECKED
    if annotation is bool:
        if _is_numpy_bool(value):
            return bool(value)
        return value if isinstance(value, bool) else _UNCHECKED
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            return _UNCHECKED
        return value if type(value) is int else int(value)  # numpy integers too
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return _UNCHECKED
        # numpy float32(0.7) is 0.699999988...: read it by its printed value, as budgets are
        return float(value) if isinstance(value, (int, float)) else float(str(value))
    if annotation is str:
        return value if isinstance(value, str) else _UNCHECKED
    if origin is tuple:
        args = get_args(annotation)
        if not isinstance(value, (tuple, list)):
            return _UNCHECKED
        if len(args) == 2 and args[1] is Ellipsis:
            items = [_coerce(v, args[0]) for v in value]
        elif args:
            if len(args) != len(value):
                return _UNCHECKED
            items = [_coerce(v, a) for v, a in zip(value, args)]
        else:
            items = list(value)
        return _UNCHECKED if any(i is _UNCHECKED for i in items) else tuple(items)
    return value  # not a checked annotation


def _is_numpy_bool(value: Any) -> bool:
    """A 0-d boolean array scalar (``numpy.bool_``), recognised without importing numpy."""
    dtype = getattr(value, "dtype", None)
    return getattr(dtype, "kind", None) == "b" and getattr(value, "ndim", None) == 0


def _describe(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(annotation))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(annotation))
    if annotation is type(None):
        return "None"
    if origin is tuple:
        return f"a tuple {annotation}".replace("typing.", "")
    return getattr(annotation, "__name__", str(annotation))


def check_option_types(obj: Any) -> None:
    """Check (and normalise) every init field of the dataclass instance ``obj``."""
    if not is_dataclass(obj):
        return
    try:
        hints = typing.get_type_hints(type(obj))
    except Exception:  # unresolvable annotations: nothing we can check
        return
    owner = getattr(type(obj), "registry_name", None) or type(obj).__name__
    for f in fields(obj):
        if not f.init or f.name not in hints:
            continue
        value = getattr(obj, f.name)
        out = _coerce(value, hints[f.name])
        if out is _UNCHECKED:
            raise ConfigError(
                f"{owner}: option {f.name}={value!r} must be {_describe(hints[f.name])}"
            )
        if isinstance(out, float) and not math.isfinite(out):
            raise ConfigError(f"{owner}: option {f.name}={value!r} must be finite")
        if out is not value:
            object.__setattr__(obj, f.name, out)
