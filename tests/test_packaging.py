"""Packaging: every sub-package is installed under tokenprune.*, never as top-level adapters/strategies."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = {"tokenprune": "tokenprune", "adapters": "tokenprune.adapters", "strategies": "tokenprune.strategies"}


def test_every_package_directory_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for folder, dotted in TOP_LEVEL.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((dotted, *relative)))
    assert found == listed, f"not listed: {sorted(found - listed)}; listed but missing: {sorted(listed - found)}"
    assert config["package-dir"] == {"tokenprune": "tokenprune", "tokenprune.adapters": "adapters", "tokenprune.strategies": "strategies"}


def test_adapters_and_strategies_import_under_tokenprune_only(tmp_path):
    import subprocess
    import sys

    import tokenprune.adapters
    import tokenprune.strategies

    assert Path(tokenprune.adapters.__file__).parent == ROOT / "adapters"
    assert Path(tokenprune.strategies.__file__).parent == ROOT / "strategies"
    # Outside the repository (as users run it), no top-level "adapters"/"strategies" is ours.
    probe = "import importlib.util as u; print([getattr(u.find_spec(n), 'origin', None) for n in ('adapters', 'strategies')])"
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert str(ROOT) not in result.stdout, result.stdout
