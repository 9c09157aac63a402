"""One registry per stage (adapters, allocators, selectors), presets, and plugins.

Register with a decorator::

    @tp.register_selector("my_topk")
    @dataclass(frozen=True)
    class MyTopK(tp.Selector):
        layer: int = -2
        ...

Build by name, by preset name, or from a config dict::

    tp.build_selector("my_topk", layer=20)
    tp.build_allocator("hired@reference")
    tp.build_selector({"name": "my_topk", "layer": 20})

Third-party packages register through the entry-point group ``tokenprune.plugins``; the
entry point names a module (imported for its decorators) or a zero-argument function
(called). Loading is lazy and per stage (like mmengine's registry ``locations``): the first
lookup or listing in a registry imports that registry's built-in package only (an allocator
lookup never imports the adapters), then every plugin once. A registration into a registry
whose built-ins have not loaded yet loads them first, so a built-in name always comes first
and a clash is reported against it.
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import re
import sys
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, is_dataclass
from importlib import metadata
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from .errors import ConfigError, DuplicateNameError, UnknownNameError, did_you_mean

__all__ = [
    "Registry",
    "Entry",
    "Preset",
    "ENTRY_POINT_GROUP",
    "load_plugins",
    "ADAPTERS",
    "ALLOCATORS",
    "SELECTORS",
    "REGISTRIES",
    "register_adapter",
    "register_allocator",
    "register_selector",
    "register_preset",
    "build_adapter",
    "build_allocator",
    "build_selector",
    "list_adapters",
    "list_allocators",
    "list_selectors",
]

ENTRY_POINT_GROUP = "tokenprune.plugins"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_PRESET = re.compile(r"^([a-z][a-z0-9_]*)@([a-z0-9][a-z0-9_]*)$")

T = TypeVar("T")


def _summary(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _origin(obj: object) -> str:
    module = getattr(obj, "__module__", "?")
    try:
        _, line = inspect.getsourcelines(obj)  # type: ignore[arg-type]
        return f"{module} (line {line})"
    except (OSError, TypeError):
        return module


@dataclass(frozen=True)
class Entry:
    """A registered factory (usually a class) and where it was registered."""

    name: str
    factory: Callable[..., Any]
    origin: str
    summary: str

    def option_names(self) -> tuple[str, ...] | None:
        """Accepted option names, or ``None`` when they cannot be known in advance."""
        if is_dataclass(self.factory):
            return tuple(f.name for f in fields(self.factory) if f.init)
        try:
            params = inspect.signature(self.factory).parameters.values()
        except (TypeError, ValueError):
            return None
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return None
        return tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


@dataclass(frozen=True)
class Preset:
    """A named setting of a registered entry, e.g. ``hired@reference``."""

    name: str
    base: str
    options: Mapping[str, Any]
    doc: str
    origin: str

    @property
    def summary(self) -> str:
        return self.doc.strip().splitlines()[0] if self.doc.strip() else ""


_load_lock = threading.RLock()
_plugins_loaded = False


def load_plugins(*, reload: bool = False) -> None:
    """Import the built-ins of every registry and every ``tokenprune.plugins`` entry point.

    Lookups call this on their own, lazily and per stage; call it to load everything at once
    (``reload=True`` reads the entry points again). A plugin that fails to load, or raises
    ``SystemExit`` while loading, is reported with a ``RuntimeWarning`` naming it; the others
    still load.
    """
    for registry in REGISTRIES.values():
        registry.load_builtins()
    _load_entry_points(reload=reload)


def _load_entry_points(*, reload: bool = False) -> None:
    global _plugins_loaded
    if _plugins_loaded and not reload:
        return
    with _load_lock:
        if _plugins_loaded and not reload:
            return
        _plugins_loaded = True  # set first: the plugins look names up while they register
        for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                loaded = entry_point.load()
                if callable(loaded) and not inspect.ismodule(loaded) and not inspect.isclass(loaded):
                    loaded()
            except (Exception, SystemExit) as exc:  # a broken plugin (or a name clash) must not break the toolkit
                warnings.warn(
                    f"tokenprune plugin {entry_point.name!r} ({entry_point.value}) failed to "
                    f"load: {type(exc).__name__}: {exc}",
                    RuntimeWarning,
                    stacklevel=2,
                )


def _suggest(name: str, candidates: list[str], what: str) -> str:
    listing = ", ".join(candidates) if candidates else "(none registered)"
    return f"{did_you_mean(name, candidates)} Available {what}: {listing}."


class Registry(Generic[T]):
    """Names to factories for one pipeline stage."""

    def __init__(self, stage: str, base: type, locations: tuple[str, ...] = ()) -> None:
        self.stage = stage
        self.base = base
        #: Modules imported (for their registration decorators) before the first lookup.
        self.locations = tuple(locations)
        self._builtins_loaded = not self.locations
        self._entries: dict[str, Entry] = {}
        self._presets: dict[str, Preset] = {}

    def load_builtins(self) -> None:
        """Import this registry's :attr:`locations` once; a failed import is retried next time."""
        if self._builtins_loaded:
            return
        with _load_lock:
            if self._builtins_loaded:
                return
            self._builtins_loaded = True  # set first: the imports below register into this registry
            try:
                for module in self.locations:
                    importlib.import_module(module)
            except BaseException:
                self._builtins_loaded = False  # the next lookup retries rather than seeing a partial registry
                raise

    def _load(self) -> None:
        """Everything a lookup needs: this registry's built-ins, then the plugins."""
        self.load_builtins()
        _load_entry_points()

    def __repr__(self) -> str:
        return f"Registry({self.stage!r}, {len(self._entries)} entries, {len(self._presets)} presets)"

    # ----------------------------------------------------------------- registration
    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering a class (or factory function) under ``name``."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(
                f"{self.stage} name must be snake_case ([a-z][a-z0-9_]*), got {name!r}"
            )

        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if inspect.isclass(factory) and not issubclass(factory, self.base):
                raise ConfigError(
                    f"{factory.__qualname__} must subclass tokenprune.{self.base.__name__} "
                    f"to be registered as {self.stage} {name!r}"
                )
            self._add(Entry(name, factory, _origin(factory), _summary(factory)))
            if inspect.isclass(factory):
                factory.registry_name = name  # type: ignore[attr-defined]
            return factory

        return decorator

    def _add(self, entry: Entry) -> None:
        if not any(module in sys.modules for module in self.locations):
            self.load_builtins()  # built-in names first, so a clash names the built-in
        existing = self._entries.get(entry.name)
        if existing is not None:
            if existing.factory is entry.factory:
                return  # the same object re-registered (module reloaded by a plugin loader)
            raise DuplicateNameError(
                f"{self.stage} {entry.name!r} is already registered by {existing.origin}; "
                f"cannot register it again from {entry.origin}. Pick another name."
            )
        self._entries[entry.name] = entry

    def unregister(self, name: str) -> None:
        """Remove an entry and its presets (mainly for tests and notebooks)."""
        self._entries.pop(name, None)
        for preset in [p for p in self._presets.values() if p.base == name]:
            del self._presets[preset.name]

    def register_preset(self, name: str, options: Mapping[str, Any], doc: str, *, _depth: int = 1) -> Preset:
        """Register ``base@variant`` as the entry ``base`` with ``options``."""
        match = _PRESET.match(name) if isinstance(name, str) else None
        if match is None:
            raise ConfigError(f"preset name must look like 'base@variant', got {name!r}")
        if not doc or not doc.strip():
            raise ConfigError(f"preset {name!r} needs a doc listing what it sets and why")
        caller = inspect.stack()[_depth]
        origin = f"{caller.frame.f_globals.get('__name__', '?')} (line {caller.lineno})"
        preset = Preset(name, match.group(1), MappingProxyType(dict(options)), inspect.cleandoc(doc), origin)
        existing = self._presets.get(name)
        if existing is not None and dict(existing.options) != dict(preset.options):
            raise DuplicateNameError(
                f"{self.stage} preset {name!r} is already registered by {existing.origin}; "
                f"cannot register it again from {origin}."
            )
        self._presets[name] = preset
        return preset

    # ----------------------------------------------------------------- lookup
    def names(self, *, presets: bool = True) -> list[str]:
        self._load()
        names = list(self._entries)
        if presets:
            names += list(self._presets)
        return sorted(names)

    def list(self, pattern: str = "*", *, presets: bool = True) -> list[str]:
        """Registered names matching a shell-style ``pattern``, sorted."""
        return [n for n in self.names(presets=presets) if fnmatch.fnmatchcase(n, pattern)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def entries(self) -> dict[str, Entry]:
        """Every registered entry (presets excluded), by name."""
        self._load()
        return dict(self._entries)

    def entry(self, name: str) -> Entry:
        self._load()
        if name in self._entries:
            return self._entries[name]
        if name in self._presets:
            preset = self._presets[name]
            if preset.base not in self._entries:
                raise UnknownNameError(
                    f"{self.stage} preset {name!r} (registered by {preset.origin}) is based on "
                    f"{preset.base!r}, which is not registered."
                    + _suggest(preset.base, sorted(self._entries), f"{self.stage}s")
                )
            return self._entries[preset.base]
        raise UnknownNameError(
            f"no {self.stage} named {name!r}." + _suggest(name, self.names(), f"{self.stage}s")
        )

    def preset(self, name: str) -> Preset | None:
        self._load()
        return self._presets.get(name)

    def summary(self, name: str) -> str:
        preset = self.preset(name)
        return preset.summary if preset else self.entry(name).summary

    def resolve(self, name: str, options: Mapping[str, Any] | None = None) -> tuple[Entry, dict[str, Any]]:
        """Entry and full options for ``name`` (a preset's options, then ``options``)."""
        if not isinstance(name, str):
            raise ConfigError(f"{self.stage} name must be a str, got {type(name).__name__}")
        entry = self.entry(name)
        merged: dict[str, Any] = {}
        preset = self._presets.get(name)
        if preset is not None:
            merged.update(preset.options)
        merged.update(options or {})
        allowed = entry.option_names()
        if allowed is not None:
            unknown = [k for k in merged if k not in allowed]
            if unknown:
                key = unknown[0]
                raise ConfigError(
                    f"{self.stage} {name!r} has no option {key!r}.{did_you_mean(key, allowed)} "
                    f"Its options: {', '.join(allowed) or '(none)'}."
                )
        return entry, merged

    def build(self, spec: str | Mapping[str, Any], /, **options: Any) -> T:
        """Build from a name (``"hired"``, ``"hired@reference"``) or ``{"name": ..., **options}``."""
        if isinstance(spec, Mapping):
            config = dict(spec)
            if "name" not in config:
                raise ConfigError(
                    f"a {self.stage} config dict needs a 'name' key, got keys {sorted(config)}"
                )
            name = config.pop("name")
            config.update(options)
            options = config
        else:
            name = spec
        entry, merged = self.resolve(name, options)
        try:
            instance = entry.factory(**merged)
        except TypeError as exc:
            raise ConfigError(f"cannot build {self.stage} {name!r} with {merged}: {exc}") from exc
        if not isinstance(instance, self.base):
            raise ConfigError(
                f"{self.stage} {name!r} built a {type(instance).__name__}, "
                f"not a tokenprune.{self.base.__name__}"
            )
        return instance  # type: ignore[return-value]

    def name_of(self, instance: object) -> str:
        """The registered name of ``instance``'s class (raises if it was never registered)."""
        self._load()
        for name, entry in self._entries.items():
            if type(instance) is entry.factory:
                return name
        raise UnknownNameError(
            f"{type(instance).__qualname__} is not a registered {self.stage}; register it "
            f"with tokenprune.register_{self.stage}(name) so the pipeline can be saved and rebuilt"
        )


# The three stage registries and their public functions. ``contracts`` does not import
# this module, so there is no cycle.
from .contracts import Adapter, BudgetAllocator, Selector  # noqa: E402

ADAPTERS: Registry[Adapter] = Registry("adapter", Adapter, ("tokenprune.adapters",))
ALLOCATORS: Registry[BudgetAllocator] = Registry("allocator", BudgetAllocator, ("tokenprune.strategies",))
SELECTORS: Registry[Selector] = Registry("selector", Selector, ("tokenprune.strategies",))

register_adapter = ADAPTERS.register
register_allocator = ALLOCATORS.register
register_selector = SELECTORS.register
build_adapter = ADAPTERS.build
build_allocator = ALLOCATORS.build
build_selector = SELECTORS.build


def list_adapters(pattern: str = "*") -> list[str]:
    """Registered adapter names (and presets) matching a shell-style pattern, sorted."""
    return ADAPTERS.list(pattern)


def list_allocators(pattern: str = "*") -> list[str]:
    """Registered allocator names (and presets) matching a shell-style pattern, sorted."""
    return ALLOCATORS.list(pattern)


def list_selectors(pattern: str = "*") -> list[str]:
    """Registered selector names (and presets) matching a shell-style pattern, sorted."""
    return SELECTORS.list(pattern)


REGISTRIES: dict[str, Registry[Any]] = {
    "adapter": ADAPTERS,
    "allocator": ALLOCATORS,
    "selector": SELECTORS,
}


def register_preset(stage: str, name: str, options: Mapping[str, Any], doc: str) -> Preset:
    """Register a named preset (``base@variant``) in the ``stage`` registry."""
    if stage not in REGISTRIES:
        raise ConfigError(f"unknown stage {stage!r}; stages: {', '.join(REGISTRIES)}")
    return REGISTRIES[stage].register_preset(name, options, doc, _depth=2)
