"""The tokenprune command line."""

from __future__ import annotations

import subprocess
import sys

from tokenprune.cli import main


def test_list_shows_every_stage_with_descriptions(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "adapters (" in out and "allocators (" in out and "selectors (" in out
    assert "example_topk" in out and "Test selector: top-b valid tokens" in out
    assert "example_attention_mass@floor" in out and "Test preset: floors the shares" in out


def test_list_filters_by_stage_and_pattern(capsys):
    assert main(["list", "selectors", "--pattern", "example_*"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("selectors (1):") and "example_topk" in out and "allocators" not in out


def test_python_dash_m_and_console_script_entry():
    result = subprocess.run(
        [sys.executable, "-m", "tokenprune", "list", "allocators"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("allocators (")
    bad = subprocess.run([sys.executable, "-m", "tokenprune", "lst"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "invalid choice: 'lst'" in bad.stderr
