"""``tokenprune doctor``: what this installation runs on and what tokenprune detected there.

Versions of python, torch, transformers, timm and open_clip, the device, whether the
torchvision shim (:mod:`tokenprune.compat`) is active, and for every registered VLM adapter
and each model class it declares that the installed transformers has: the generate path
(:func:`tokenprune.runtime.generate_path`) and the attention tap of its vision tower
(:func:`tokenprune.runtime.tap_name`). Plain text to paste into a bug report, or ``--json``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
from typing import Any

import torch

from ._subcommand import add_command
from .errors import IncompatibleError

__all__ = ["add_doctor_parser", "report", "format_report"]

_PACKAGES = ("torch", "transformers", "timm", "open_clip_torch", "tokenprune")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _device() -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"type": "cpu", "name": None, "cuda": torch.version.cuda}
    return {"type": "cuda", "name": torch.cuda.get_device_name(0), "cuda": torch.version.cuda, "count": torch.cuda.device_count()}


def _model_class(name: str, adapter: Any = None) -> dict[str, Any]:
    from .runtime import generate_path, tap_name

    try:
        import transformers

        model_class = getattr(transformers, name, None)
    except ImportError as error:
        return {"available": False, "why": f"transformers does not import: {error}"}
    if model_class is None:
        return {"available": False, "why": "not in the installed transformers"}
    try:
        path = generate_path(model_class)
    except IncompatibleError as error:
        path = f"none ({error})"
    # an adapter may need more of generate than a path (Qwen: explicit position_ids)
    refusal = getattr(adapter, "generate_refusal", None)
    why = refusal(model_class) if refusal is not None else None
    if why:
        path = f"none ({why})"
    row: dict[str, Any] = {"available": True, "generate_path": path}
    try:
        row["tap"] = tap_name(model_class)
    except Exception as error:  # a report, not a run: say what failed and go on
        row["tap"] = None
        row["tap_error"] = f"{type(error).__name__}: {error}"
    return row


def report() -> dict[str, Any]:
    """Everything ``tokenprune doctor`` prints, as a JSON-ready dict."""
    from . import compat
    from .registry import ADAPTERS

    adapters = {}
    for name, entry in sorted(ADAPTERS.entries().items()):
        classes = getattr(entry.factory, "model_classes", ())
        if classes:  # VLM adapters; a bare-tower adapter has no model class
            adapters[name] = {model_class: _model_class(model_class, entry.factory) for model_class in classes}
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {package: _version(package) for package in _PACKAGES},
        "device": _device(),
        "torchvision_shim_active": compat.ensure_torchvision_importable(),
        "adapters": adapters,
    }


def format_report(data: dict[str, Any]) -> str:
    """The report as plain text, one fact a line."""
    lines = [f"python          {data['python']} ({data['platform']})"]
    lines += [f"{package:<16}{version or 'not installed'}" for package, version in data["packages"].items()]
    device = data["device"]
    described = device["name"] if device["type"] == "cuda" else "cpu (no CUDA device)"
    lines.append(f"device          {described}; torch built for CUDA {device['cuda'] or '-'}")
    lines.append(f"torchvision shim active: {'yes' if data['torchvision_shim_active'] else 'no'}")
    lines.append("adapters (model class: generate path, attention tap):")
    for adapter, classes in data["adapters"].items():
        for model_class, row in classes.items():
            if not row["available"]:
                detail = row["why"]
            else:
                tap = row["tap"] or f"none ({row['tap_error']})"
                detail = f"{row['generate_path']}, {tap}"
            lines.append(f"  {adapter:<12}{model_class}: {detail}")
    return "\n".join(lines)


def _cmd_doctor(args: argparse.Namespace) -> int:
    data = report()
    print(json.dumps(data, indent=2) if args.json else format_report(data))
    return 0


_HELP = "versions, device and what tokenprune detected (generate path, attention taps): for bug reports"


def add_doctor_parser(sub: Any) -> None:
    doctor = add_command(sub, "doctor", _HELP, __doc__)
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.set_defaults(func=_cmd_doctor)
