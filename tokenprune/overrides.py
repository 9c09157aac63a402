"""The one override grammar: flat keys that change a pipeline config.

``Pipeline(...)``, ``Pipeline.from_dict``, sweep grids and lmms-eval ``model_args`` all read
these keys through :func:`apply_overrides`, so each accepts exactly what the others do:

* ``adapter`` / ``allocator`` / ``selector``: a name, preset name (``"hired@reference"``),
  config dict or instance — replaces that part, its options included;
* ``budget``: the per-image budget;
* ``<part>.<option>`` (``allocator.alpha``): one option of that part, set after any
  replacement;
* ``<option>`` (``alpha``): one option, routed to the one part whose registered class
  declares it (an error when none or several do).

Example::

    apply_overrides({"allocator": "hired", "selector": "cls_final", "budget": 0.2},
                    {"allocator.alpha": 0.3, "budget": 0.1, "selector": "hero"})
    # {"adapter": None, "allocator": {"name": "hired", "alpha": 0.3},
    #  "selector": {"name": "hero"}, "budget": 0.1}
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError, did_you_mean
from .registry import ADAPTERS, ALLOCATORS, SELECTORS, Registry

__all__ = ["PARTS", "apply_overrides", "split_config"]

PARTS = ("adapter", "allocator", "selector")
_REGISTRIES: dict[str, Registry[Any]] = {"adapter": ADAPTERS, "allocator": ALLOCATORS, "selector": SELECTORS}
_STRUCTURE = (*PARTS, "budget")


def split_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A flat config's structural keys (parts, budget) and its override keys (the rest)."""
    structure = {k: v for k, v in config.items() if k in _STRUCTURE}
    return structure, {k: v for k, v in config.items() if k not in _STRUCTURE}


def _normalised(spec: Any) -> Any:
    """A part as ``{"name": ..., **options}``; instances and ``None`` stay as they are."""
    if isinstance(spec, str):
        return {"name": spec}
    if isinstance(spec, Mapping):
        return copy.deepcopy(dict(spec))
    return spec


def _article(part: str) -> str:
    return "an" if part[0] in "aeiou" else "a"


def _set_option(config: dict[str, Any], part: str, option: str, value: Any, key: str) -> None:
    spec = config.get(part)
    if spec is None:
        raise ConfigError(f"{part} options were given without {_article(part)} {part}: {key}={value!r}")
    if not isinstance(spec, dict):
        raise ConfigError(
            f"{part} option {key}={value!r} was given with a ready-made {part} instance "
            f"({type(spec).__name__}); set it on the instance instead"
        )
    spec[option] = value


def _owners(config: Mapping[str, Any], option: str) -> tuple[list[str], list[str]]:
    """Parts (given by name) that declare ``option``, and every option they declare."""
    owners, everything = [], set()
    for part in PARTS:
        spec = config.get(part)
        name = spec.get("name") if isinstance(spec, Mapping) else None
        if not isinstance(name, str):
            continue
        names = _REGISTRIES[part].entry(name).option_names() or ()
        everything.update(names)
        if option in names:
            owners.append(part)
    return owners, sorted(everything)


def apply_overrides(config: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``config`` (``adapter``/``allocator``/``selector``/``budget``, plus any override
    keys of its own) with ``overrides`` applied, as a new pipeline config dict.

    Part replacements and ``budget`` apply first, then ``part.option`` keys, then bare
    option names. A bare option that contradicts a ``part.option`` key of the same call is
    an error, as are unknown parts, unknown options and options for a missing part.
    """
    structure, own = split_config(config)
    keys = {**own, **(overrides or {})}
    result: dict[str, Any] = {part: _normalised(structure.get(part)) for part in PARTS}
    if "budget" in structure:
        result["budget"] = structure["budget"]
    for key, value in keys.items():
        if not isinstance(key, str):
            raise ConfigError(f"override keys must be strings, got {key!r}")
        if key in PARTS:
            result[key] = _normalised(value)
        elif key == "budget":
            result["budget"] = value
    explicit: dict[tuple[str, str], Any] = {}
    for key, value in keys.items():
        part, dot, option = key.partition(".")
        if not dot:
            continue
        if part not in PARTS or not option:
            hint = did_you_mean(part, PARTS, n=1, render=lambda close: repr(f"{close}.{option}")) if option else ""
            raise ConfigError(f"key {key!r}: options are written allocator.NAME, selector.NAME or adapter.NAME.{hint}")
        _set_option(result, part, option, value, key)
        explicit[(part, option)] = value
    for key, value in keys.items():
        if key in _STRUCTURE or "." in key:
            continue
        owners, everything = _owners(result, key)
        if len(owners) > 1:
            raise ConfigError(
                f"option {key!r} is taken by both the {' and the '.join(owners)}; name the part: "
                + " or ".join(f"{p}.{key}=..." for p in owners)
                + " (in Pipeline(...): "
                + " or ".join(f"{p}_options={{{key!r}: ...}}" for p in owners)
                + ")"
            )
        if not owners:
            hint = did_you_mean(key, everything)
            raise ConfigError(
                f"unknown pipeline config keys [{key!r}]: no part of this pipeline takes option {key!r}.{hint} "
                f"Options: {', '.join(everything) or '(none)'}."
            )
        part = owners[0]
        if (part, key) in explicit and explicit[(part, key)] != value:
            raise ConfigError(
                f"option {key!r} is given twice with different values: {key}={value!r} and "
                f"{part}.{key}={explicit[(part, key)]!r}; give it once"
            )
        _set_option(result, part, key, value, key)
    return result
