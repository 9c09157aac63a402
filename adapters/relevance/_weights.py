"""Does a VLM's vision tower compute the same raw CLS as a scorer's image encoder?

A *trunk* is the part of a CLIP image encoder that produces the raw last-layer CLS hidden
state: patch embedding, CLS and position embeddings, pre-norm, transformer blocks. The
head (post-norm, projection, pooling) is left out: the fast path applies the *scorer's*
head to the *tower's* CLS, so only the trunks must agree.

Two trunks agree when, in this order (cheapest first):

1. their architecture matches: every submodule has the same class and the same plain
   settings (head counts, norm eps, activation variant ... anything an equal weight set
   could still compute differently with);
2. their parameters and buffers have the same names, shapes, dtypes and devices;
3. the tensors are the very same memory (``data_ptr``), or else hold equal values.

Comparing values of a 300M-parameter tower takes a noticeable fraction of a second, so
:class:`TrunkMatchCache` remembers each decision per tower and repeats it only when a
tensor of either trunk was replaced or modified in place (``data_ptr`` / ``_version``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch import nn

__all__ = ["Trunk", "TrunkMatch", "TrunkMatchCache", "compare_trunks"]

# Module attributes that never change what a module computes in inference.
_IGNORED_SETTINGS = frozenset({"training", "gradient_checkpointing", "output_tokens"})
_PLAIN = (bool, int, float, str, type(None))


def _plain(value: object) -> bool:
    if isinstance(value, _PLAIN):
        return True
    return isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value)


@dataclass(frozen=True, eq=False)
class Trunk:
    """The modules of a CLIP image encoder up to (and including) the last block.

    Attributes:
        module: the encoder's root module (e.g. a transformers ``CLIPVisionModel`` or an
            open_clip ``VisionTransformer``).
        head: names of the root's children that come after the raw CLS (post-norm,
            projection, pooling); excluded from every comparison.
    """

    module: nn.Module
    head: tuple[str, ...] = ()

    def _in_head(self, name: str) -> bool:
        return any(name == h or name.startswith(h + ".") for h in self.head)

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Named parameters then buffers of the trunk (head excluded)."""
        named = [
            (n, p) for n, p in self.module.named_parameters() if not self._in_head(n)
        ]
        named += [
            (f"buffer:{n}", b)
            for n, b in self.module.named_buffers()
            if not self._in_head(n)
        ]
        return named

    def architecture(self) -> list[tuple[str, str, tuple[tuple[str, object], ...]]]:
        """``(name, class, plain settings)`` of every submodule below the root."""
        described = []
        for name, sub in self.module.named_modules():
            if not name or self._in_head(name):
                continue
            settings = tuple(
                sorted(
                    (key, value)
                    for key, value in vars(sub).items()
                    if not key.startswith("_")
                    and key not in _IGNORED_SETTINGS
                    and _plain(value)
                )
            )
            described.append((name, type(sub).__qualname__, settings))
        return described

    def stamp(self) -> tuple[tuple[int, int, int], ...]:
        """Cheap fingerprint that changes when a tensor is swapped or edited in place.

        Walking ``named_parameters`` of a ViT-L costs milliseconds of host time, paid on
        every scored image; the slots (owning module, attribute name) are found once per
        trunk and then read directly, so a replaced tensor is still seen.
        """
        slots = _SLOTS.get(self.module)
        if slots is None or slots[0] != self.head:
            slots = (self.head, self._slots())
            _SLOTS[self.module] = slots
        return tuple(
            (id(t), t.data_ptr(), t._version) for table, name in slots[1] if (t := table.get(name)) is not None
        )

    def _slots(self) -> list[tuple[dict[str, torch.Tensor | None], str]]:
        found = []
        for prefix, sub in self.module.named_modules():
            for table in (sub._parameters, sub._buffers):
                found += [(table, name) for name in table if not self._in_head(f"{prefix}.{name}".lstrip("."))]
        return found


# Per trunk root: (head, [(owning module, tensor attribute)]) for Trunk.stamp.
_SLOTS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[str, ...], list[tuple[dict[str, torch.Tensor | None], str]]]] = (
    weakref.WeakKeyDictionary()
)


@dataclass(frozen=True)
class TrunkMatch:
    """Whether two trunks compute the same raw CLS, and why (or why not)."""

    same: bool
    reason: str

    def __bool__(self) -> bool:
        return self.same


def _first_architecture_difference(scorer: Trunk, tower: Trunk) -> str | None:
    ours, theirs = scorer.architecture(), tower.architecture()
    for a, b in zip(ours, theirs):
        if a != b:
            if a[0] != b[0] or a[1] != b[1]:
                return f"submodule {a[0]!r} ({a[1]}) vs {b[0]!r} ({b[1]})"
            ours_set, theirs_set = dict(a[2]), dict(b[2])
            keys = sorted(
                k
                for k in ours_set.keys() | theirs_set.keys()
                if ours_set.get(k) != theirs_set.get(k)
            )
            key = keys[0]
            return f"{a[0]}.{key} is {ours_set.get(key)!r} in the scorer, {theirs_set.get(key)!r} in the tower"
    if len(ours) != len(theirs):
        return (
            f"the scorer's trunk has {len(ours)} submodules, the tower's {len(theirs)}"
        )
    return None


def compare_trunks(scorer: Trunk, tower: Trunk) -> TrunkMatch:
    """Compare architecture, then names/shapes/dtypes/devices, then memory, then values."""
    difference = _first_architecture_difference(scorer, tower)
    if difference is not None:
        return TrunkMatch(False, f"architectures differ: {difference}")
    ours, theirs = scorer.tensors(), tower.tensors()
    if [n for n, _ in ours] != [n for n, _ in theirs]:
        missing = sorted({n for n, _ in ours} ^ {n for n, _ in theirs})
        return TrunkMatch(False, f"parameter names differ (e.g. {missing[:3]})")
    for (name, a), (_, b) in zip(ours, theirs):
        if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
            return TrunkMatch(
                False,
                f"{name} is {tuple(a.shape)} {a.dtype} on {a.device} in the scorer, "
                f"{tuple(b.shape)} {b.dtype} on {b.device} in the tower",
            )
    if all(a.data_ptr() == b.data_ptr() for (_, a), (_, b) in zip(ours, theirs)):
        return TrunkMatch(
            True, "the tower and the scorer share their image-encoder tensors"
        )
    with torch.no_grad():
        for (name, a), (_, b) in zip(ours, theirs):
            if a.data_ptr() != b.data_ptr() and not torch.equal(a, b):
                return TrunkMatch(False, f"weights differ: {name} holds other values")
    return TrunkMatch(True, "the tower's image-encoder weights equal the scorer's")


class TrunkMatchCache:
    """Remembers :func:`compare_trunks` per tower, until a tensor of either side changes.

    Entries are keyed weakly by the tower's trunk module, so a dropped tower frees its
    entry. Edits made through ``param.data`` bypass PyTorch's version counter and are not
    seen: call :meth:`clear` after such edits.
    """

    def __init__(self) -> None:
        self._entries: weakref.WeakKeyDictionary[
            nn.Module, tuple[tuple[object, ...], TrunkMatch]
        ] = weakref.WeakKeyDictionary()
        self.comparisons = 0  # full comparisons run (for tests and stats)

    def match(self, scorer: Trunk, tower: Trunk) -> TrunkMatch:
        stamp = (scorer.stamp(), tower.stamp())
        hit = self._entries.get(tower.module)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        self.comparisons += 1
        result = compare_trunks(scorer, tower)
        self._entries[tower.module] = (stamp, result)
        return result

    def clear(self) -> None:
        self._entries.clear()
