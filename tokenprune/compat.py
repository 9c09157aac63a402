"""Make ``transformers``, ``timm`` and ``open_clip`` importable beside a CPU-only torch.

``timm`` depends on ``torchvision``. When the installed torchvision wheel was built for a
different torch (for example a CUDA build next to the CPU torch), its C++ extension fails
to load, and ``import torchvision`` then dies in ``_meta_registrations`` while registering
fake kernels for ``torchvision::nms`` / ``torchvision::qnms``: those operators were never
defined. transformers, timm and open_clip all import torchvision, so they die too.

:func:`ensure_torchvision_importable` defines the two missing operator schemas (with a
kernel that raises a clear error if anyone actually calls them), so that torchvision's
pure-Python parts import. It does nothing when torchvision is absent, already imported,
or when its C++ extension loads. tokenprune calls it on import, before any of those
libraries is imported; call it yourself if you import them before tokenprune.

Programs that import timm or transformers before tokenprune (``accelerate launch`` does,
in its launcher) need the shim earlier: ``tokenprune compat install`` writes a
one-line ``.pth`` file into this environment's site-packages that runs the shim right
before the first ``import torchvision`` (and costs nothing otherwise). It is written only
where torchvision's ops fail to load; ``tokenprune compat uninstall`` removes it.
``make setup`` runs ``install``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

__all__ = ["ensure_torchvision_importable", "torchvision_ops_available", "install_hook", "uninstall_hook", "hook_path"]

_PLACEHOLDER_OPS = ("nms", "qnms")
_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
_library: torch.library.Library | None = None  # kept alive: dropping it unregisters the ops
_ops_available: bool | None = None


def _load_extension(package_dir: Path) -> bool:
    for candidate in sorted(package_dir.glob("_C*.so")) + sorted(package_dir.glob("_C*.pyd")):
        try:
            torch.ops.load_library(str(candidate))
            return True
        except (OSError, RuntimeError, ImportError):
            continue
    return False


def _unavailable_kernel(name: str):
    def kernel(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError(
            f"torchvision::{name} is a placeholder registered by tokenprune.compat: the "
            "installed torchvision's C++ ops do not load beside this torch build. Install a "
            "torchvision built for this torch to use its detection ops."
        )

    return kernel


def ensure_torchvision_importable() -> bool:
    """Register placeholder ``torchvision::nms``/``qnms`` schemas if torchvision's C ops can't load.

    Returns ``True`` when placeholders were (or had already been) registered, ``False`` when
    nothing was needed. Idempotent and cheap after the first call.
    """
    global _library, _ops_available
    if _library is not None:
        return True
    if _ops_available is not None or "torchvision" in sys.modules:
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        _ops_available = False
        return False
    if _load_extension(Path(spec.origin).parent):
        _ops_available = True
        return False
    _ops_available = False
    if all(hasattr(torch.ops.torchvision, op) for op in _PLACEHOLDER_OPS):
        return False  # someone else already defined them
    library = torch.library.Library("torchvision", "FRAGMENT")
    for op in _PLACEHOLDER_OPS:
        if not hasattr(torch.ops.torchvision, op):
            library.define(op + _SCHEMA)
            library.impl(op, _unavailable_kernel(op), "CompositeExplicitAutograd")
    _library = library
    return True


def torchvision_ops_available() -> bool:
    """Whether torchvision's compiled ops loaded (``False`` also when torchvision is absent)."""
    ensure_torchvision_importable()
    return bool(_ops_available)


# --------------------------------------------------------------------------- .pth hook

_PTH_NAME = "tokenprune-torchvision.pth"


def hook_path() -> Path:
    """Where :func:`install_hook` writes its ``.pth`` line (this environment's purelib)."""
    import sysconfig

    return Path(sysconfig.get_paths()["purelib"]) / _PTH_NAME


def install_hook(*, force: bool = False) -> Path | None:
    """Write the ``.pth`` start-up hook if torchvision's ops fail to load here (or ``force``).

    Returns the written path, or ``None`` when nothing was needed.
    """
    spec = importlib.util.find_spec("torchvision")
    if not force and (spec is None or spec.origin is None or _load_extension(Path(spec.origin).parent)):
        return None
    hook = Path(__file__).with_name("_torchvision_hook.py").resolve()
    line = f"import os; p = {str(hook)!r}; os.path.exists(p) and exec(open(p).read())\n"
    path = hook_path()
    path.write_text(line, encoding="utf-8")
    return path


def uninstall_hook() -> bool:
    """Remove the ``.pth`` start-up hook; ``True`` if there was one."""
    path = hook_path()
    if path.exists():
        path.unlink()
        return True
    return False
