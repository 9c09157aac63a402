"""tokenprune.compat makes transformers/timm/open_clip importable beside a broken torchvision."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import textwrap

import pytest


PURELIB = sysconfig.get_paths()["purelib"]


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return run_python_raw(["-c", textwrap.dedent(code)])


def run_python_raw(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)


def ops_load_here() -> bool:
    probe = run_python(
        """
        import importlib.util, pathlib, torch
        spec = importlib.util.find_spec("torchvision")
        from tokenprune.compat import _load_extension
        print(spec is not None and _load_extension(pathlib.Path(spec.origin).parent))
        """
    )
    return probe.stdout.strip() == "True"


def test_frameworks_import_after_tokenprune():
    result = run_python(
        """
        import tokenprune
        import torchvision, timm, open_clip, transformers
        from transformers import CLIPVisionModel, LlavaNextForConditionalGeneration
        print("imported", tokenprune.compat.torchvision_ops_available())
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("imported")


def test_placeholders_explain_themselves_when_called():
    if ops_load_here():
        pytest.skip("torchvision's C ops load on this machine: no placeholders are registered")
    result = run_python(
        """
        import torch, tokenprune
        assert tokenprune.compat.ensure_torchvision_importable() is True  # idempotent
        try:
            torch.ops.torchvision.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
        except RuntimeError as error:
            print(error)
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "placeholder registered by tokenprune.compat" in result.stdout


def test_without_the_shim_the_import_fails_here():
    """Documents why the shim exists (only where torchvision's ops really fail to load)."""
    if ops_load_here():
        pytest.skip("torchvision works on this machine")
    # -S: no site processing, so no .pth start-up hook either; site-packages added by hand
    result = run_python_raw(["-S", "-c", f"import sys; sys.path.append({PURELIB!r}); import torchvision"])
    assert result.returncode != 0 and "torchvision::nms" in result.stderr


def test_startup_hook_lets_timm_import_before_tokenprune(tmp_path, monkeypatch):
    from tokenprune import compat

    target = tmp_path / "tokenprune-torchvision.pth"
    monkeypatch.setattr(compat, "hook_path", lambda: target)
    assert compat.install_hook(force=True) == target
    line = target.read_text()
    assert line.startswith("import os;") and "_torchvision_hook.py" in line
    # a fresh interpreter without site processing that runs the .pth line, then imports timm
    code = f"import sys; sys.path.append({PURELIB!r}); exec(open({str(target)!r}).read()); import timm; print('ok', 'tokenprune' in sys.modules)"
    result = run_python_raw(["-S", "-c", code])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["ok", "True"]
    quiet = run_python_raw(["-S", "-c", f"exec(open({str(target)!r}).read()); import sys; print('torch' in sys.modules)"])
    assert quiet.stdout.strip() == "False"  # the hook costs nothing until torchvision is imported
    assert compat.uninstall_hook() and not target.exists() and not compat.uninstall_hook()


def test_does_nothing_when_the_extension_loads():
    result = run_python(
        """
        import tokenprune.compat as compat
        compat._library = None
        compat._ops_available = None
        compat._load_extension = lambda path: True
        import sys; sys.modules.pop("torchvision", None)
        print(compat.ensure_torchvision_importable(), compat.torchvision_ops_available())
        """
    )
    # tokenprune.compat was imported through the package, which already ran the shim;
    # reset above, a working extension means: nothing registered, ops available.
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False", "True"]


def test_does_nothing_without_torchvision():
    result = run_python(
        """
        import importlib.util
        real_find_spec = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "torchvision" else real_find_spec(name, *a)
        import torch
        import tokenprune.compat as compat
        print(compat.ensure_torchvision_importable(), hasattr(torch.ops.torchvision, "nms"))
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False", "False"]
